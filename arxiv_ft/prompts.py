"""Versioned prompt templates: a record becomes chat messages; the tokenizer's own chat template renders them.

A template id is saved beside every checkpoint, and `infer.py` refuses an id it does not know, so a prompt
change is a new id, never an edit of an old one.
"""

from __future__ import annotations

from dataclasses import dataclass

from arxiv_ft.records import Record


@dataclass(frozen=True)
class PromptTemplate:
    """System text (with the label list) and user text (with title and abstract); the answer is the label id."""

    id: str
    system: str
    user: str

    def messages(self, title: str, abstract: str, labels: list[str]) -> list[dict[str, str]]:
        """Chat messages for one paper, without the answer."""
        return [
            {"role": "system", "content": self.system.format(labels=", ".join(labels))},
            {"role": "user", "content": self.user.format(title=title, abstract=abstract)},
        ]


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
}
DEFAULT_TEMPLATE = "arxiv-v1"


def get_template(template_id: str) -> PromptTemplate:
    """Look up a template by id; an unknown id is an error listing the known ones."""
    try:
        return TEMPLATES[template_id]
    except KeyError:
        raise ValueError(f"unknown prompt template {template_id!r}; known: {', '.join(TEMPLATES)}") from None


def record_messages(template: PromptTemplate, record: Record, labels: list[str], abstract: str | None = None):
    """Messages for a record, optionally with a shortened abstract."""
    return template.messages(record.title, record.abstract if abstract is None else abstract, labels)
