"""Versioned prompt templates: a record becomes chat messages; the tokenizer's own chat template renders them.

A template id is saved beside every checkpoint, and `infer.py` refuses an id it does not know, so a prompt
change is a new id, never an edit of an old one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

from arxiv_ft.records import Record


@dataclass(frozen=True)
class PromptTemplate:
    """System text (with the label list) and user text (with title and abstract); the answer is the label id."""

    id: str
    system: str
    user: str
    by_archive: bool = False  # list the labels one line per archive ("cs: cs.AI, cs.CL") instead of one flat list

    def label_list(self, labels: list[str]) -> str:
        """The labels as the system text shows them; the answer is the label id either way."""
        if not self.by_archive:
            return ", ".join(labels)
        groups: dict[str, list[str]] = {}
        for label in labels:  # first-seen order of archives; labels keep their order inside each archive
            groups.setdefault(label.split(".", 1)[0], []).append(label)
        return "".join(f"\n{archive}: {', '.join(members)}" for archive, members in groups.items())

    def messages(self, title: str, abstract: str, labels: list[str], system_role: str = "system") -> list[dict]:
        """Chat messages for one paper, without the answer; `system_role="user"` folds the system text into the user
        turn, for chat templates that have no system role (Gemma's refuse one)."""
        system = self.system.format(labels=self.label_list(labels))
        user = self.user.format(title=title, abstract=abstract)
        if system_role == "user":
            return [{"role": "user", "content": f"{system}\n\n{user}"}]
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]


TEMPLATES = {
    # The label list sits in the system turn so every prompt starts with the same tokens.
    "arxiv-v1": PromptTemplate(
        id="arxiv-v1",
        system=(
            "You classify arXiv papers by their primary category. "
            "Answer with exactly one category id from this list: {labels}."
        ),
        user="Title: {title}\nAbstract: {abstract}",
    ),
    # Two-level: the labels grouped by archive, and the model told to settle the archive first (the answer is still
    # the category id, which starts with its archive, so label scoring and the trie are unchanged). Measured against
    # arxiv-v1 on the every-category task in docs/results/whole-arxiv/.
    "arxiv-v2-two-level": PromptTemplate(
        id="arxiv-v2-two-level",
        system=(
            "You classify arXiv papers by their primary category. First decide the paper's archive, then its "
            "category within that archive. Answer with exactly one category id; the ids, by archive:{labels}"
        ),
        user="Title: {title}\nAbstract: {abstract}",
        by_archive=True,
    ),
}
DEFAULT_TEMPLATE = "arxiv-v1"
# What a token budget counts: the paper's tokens only (after the system turn every prompt shares), or all of them.
BUDGETS = ("paper", "total")
# Where the instructions go: a system turn, or the start of the user turn (for chat templates without a system role).
SYSTEM_ROLES = ("system", "user")


def get_template(template_id: str) -> PromptTemplate:
    """Look up a template by id; an unknown id is an error listing the known ones."""
    try:
        return TEMPLATES[template_id]
    except KeyError:
        raise ValueError(f"unknown prompt template {template_id!r}; known: {', '.join(TEMPLATES)}") from None


def record_messages(
    template: PromptTemplate,
    record: Record,
    labels: list[str],
    abstract: str | None = None,
    system_role: str = "system",
):
    """Messages for a record, optionally with a shortened abstract."""
    return template.messages(record.title, record.abstract if abstract is None else abstract, labels, system_role)


@dataclass(frozen=True)
class PromptSpec:
    """Everything that decides a paper's prompt tokens besides the tokenizer and the labels; saved with every run
    (`prompt.json`) and read back by inference, so a paper renders to the same ids at training and inference.

    `chat_kwargs` are extra variables for the chat template, pinned at training time: Llama 3's template writes
    "Today Date: ..." from `date_string`, which would otherwise be the day the prompt is rendered.
    """

    template: str = DEFAULT_TEMPLATE
    max_seq_tokens: int = 192
    token_budget: str = "total"  # what max_seq_tokens counts: "total" or "paper" (after the shared system turn)
    system_role: str = "system"  # "user": fold the system text into the user turn (templates without a system role)
    chat_kwargs: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> PromptSpec:
        """Read a saved spec; folders written before a field existed get that field's old behaviour."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def chat_date_string(day: date | None = None) -> str:
    """`day` (default: today) as Llama 3's template writes it, "26 Jul 2024".

    Spelled out rather than strftime("%d %b %Y"): %b follows the process's LC_TIME locale, and a German locale would
    pin "Dez" where the model was trained on "Dec".
    """
    day = day or date.today()
    return f"{day.day:02d} {_MONTHS[day.month - 1]} {day.year}"


CHAT_TEMPLATES = Path(__file__).resolve().parent / "chat"  # shipped chat templates, by name: chatml, llama3, ...


def resolve_chat_template(tokenizer, spec: str, model: str) -> None:
    """Give `tokenizer` the chat template `spec` names (a file, or a shipped name); without one, it must have its own.

    A base model's tokenizer has no chat template: training then stops here, before any model is loaded, saying what
    to pass. The template becomes part of the tokenizer saved with the run, so inference renders the same way.
    """
    if spec:
        path = Path(spec) if Path(spec).is_file() else CHAT_TEMPLATES / f"{spec}.jinja"
        if not path.is_file():
            shipped = ", ".join(sorted(p.stem for p in CHAT_TEMPLATES.glob("*.jinja")))
            raise SystemExit(f"--chat-template {spec}: neither a file nor a shipped template ({shipped})")
        tokenizer.chat_template = path.read_text(encoding="utf-8")
    elif tokenizer.chat_template is None:
        shipped = " or ".join(sorted(p.stem for p in CHAT_TEMPLATES.glob("*.jinja")))
        raise SystemExit(
            f"the tokenizer of {model!r} has no chat template (a base model?): pass --chat-template {shipped} "
            f"(shipped in {CHAT_TEMPLATES}), or --chat-template FILE.jinja, to train it with one"
        )
