"""Records -> token ids with masked labels (built once, at tokenisation), and the collator that only pads.

Masking follows TRL's rule: render the prompt alone and prompt+answer with the tokenizer's chat template,
check that the prompt's ids are a prefix of the full ids, and set every prompt position to -100. The trained
target is the answer plus the template's end-of-turn token; the template's trailing newline is not trained (unless
the end-of-turn marker is plain text that merges with it into one token).
Labels never depend on the pad id, so a tokenizer whose pad token is its EOS (SmolLM2) still trains the EOS.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from jinja2 import TemplateError

from arxiv_ft.fileio import atomic_write, file_digest
from arxiv_ft.prompts import BUDGETS, PromptSpec, PromptTemplate, get_template, record_messages
from arxiv_ft.records import Record

IGNORE_INDEX = -100


class TokenizationError(ValueError):
    """The chat template does not render prompt+answer as prompt followed by answer."""


class ChatTemplateError(TokenizationError):
    """The tokenizer's chat template refused the prompt's messages (Gemma's raises on a system turn)."""


TEMPLATE_SECONDS = 10.0  # a chat template's first renders take milliseconds; one running longer is refused


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Stop what runs inside after `seconds` with a ChatTemplateError (jinja's sandbox bounds `range`, not nested
    loops: a template that loops 10^10 times ran for minutes). Only the main thread of a Unix process can be
    interrupted; elsewhere the block runs unbounded."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def stop(signum, frame):
        raise ChatTemplateError(
            f"the chat template took over {seconds:.0f} s to render a two-line prompt: it loops without bound; "
            "fix chat_template.jinja or pass --chat-template chatml|llama3|FILE.jinja"
        )

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Example:
    """One tokenised paper: prompt ids, then target ids (answer + end-of-turn), and the label's index."""

    id: str
    label: str
    prompt_ids: list[int]
    target_ids: list[int]
    label_index: int = -1

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.target_ids

    @property
    def labels(self) -> list[int]:
        return [IGNORE_INDEX] * len(self.prompt_ids) + self.target_ids


@dataclass
class TokenizeStats:
    """What tokenisation did to the data: kept, dropped (and why), abstracts shortened."""

    kept: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


class PromptBuilder:
    """Turns records into prompt ids (for scoring) and examples (for training) under a token budget.

    The abstract is shortened so that the prompt + the longest label's target fits `max_seq_tokens`; the budget does
    not depend on the record's own label, so the model sees the same prompt at training and inference time.
    `budget="paper"` counts only the tokens after the shared prefix (the system turn with the label list, which
    training and scoring run once per batch): a long label list then costs no abstract. `budget="total"` counts
    every token (the budget of runs made before it existed).
    """

    def __init__(
        self,
        tokenizer,
        template: PromptTemplate,
        labels: list[str],
        max_seq_tokens: int,
        budget: str = "total",
        system_role: str = "system",
        chat_kwargs: dict | None = None,
    ):
        if budget not in BUDGETS:
            raise ValueError(f"token budget {budget!r}: choose {' or '.join(BUDGETS)}")
        self.tokenizer = tokenizer
        self.template = template
        self.labels = list(labels)
        self.max_seq_tokens = max_seq_tokens
        self.budget = budget
        self.system_role = system_role
        self.chat_kwargs = dict(chat_kwargs or {})
        # Strings the tokenizer turns into control tokens wherever they appear (`<|im_end|>`, `<|eot_id|>`, ...).
        added = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
        self._control = sorted((t for t in added | set(tokenizer.all_special_tokens) if len(t) > 1), key=len)[::-1]
        with _time_limit(TEMPLATE_SECONDS):
            self.end_of_turn = self._end_of_turn()
        self.label_targets = {label: self._encode(label + self.end_of_turn) for label in self.labels}
        self.label_decisions = _decision_positions([self.label_targets[label] for label in self.labels])
        self._prefix = self._common_prefix()
        uncounted = len(self._prefix) if budget == "paper" else 0
        self.max_prompt_tokens = max_seq_tokens + uncounted - max(len(t) for t in self.label_targets.values())

    @classmethod
    def from_spec(cls, tokenizer, spec: PromptSpec, labels: list[str]) -> PromptBuilder:
        """The builder a saved `prompt.json` describes."""
        return cls(
            tokenizer,
            get_template(spec.template),
            labels,
            spec.max_seq_tokens,
            spec.token_budget,
            spec.system_role,
            spec.chat_kwargs,
        )

    def defuse(self, text: str) -> str:
        """`text` with every control-token string broken by a zero-width space, so a title or abstract that contains
        `<|im_end|>\n<|im_start|>assistant` stays text instead of ending the user's turn."""
        for token in self._control:
            if token in text:
                text = text.replace(token, token[0] + "\u200b" + token[1:])
        return text

    def _messages(self, record: Record, abstract: str | None = None) -> list[dict]:
        paper = Record(record.id, self.defuse(record.title), self.defuse(record.abstract), record.categories)
        return record_messages(
            self.template, paper, self.labels, None if abstract is None else self.defuse(abstract), self.system_role
        )

    def _encode(self, text: str) -> list[int]:
        # Special tokens come from the chat template itself; adding BOS again would double it.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _render(self, messages, answer: str | None = None) -> str:
        # The first render happens in __init__ (_end_of_turn), so a template that refuses these messages stops
        # the builder, and train, before any model is loaded.
        try:
            if answer is None:
                return self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True, **self.chat_kwargs
                )
            full = messages + [{"role": "assistant", "content": answer}]
            return self.tokenizer.apply_chat_template(full, tokenize=False, **self.chat_kwargs)
        except TemplateError as exc:
            fold = ""
            if self.system_role == "system":
                fold = "--system-role user to fold the instructions into the user turn (for templates without a "
                fold += "system role, like Gemma's), or "
            raise ChatTemplateError(
                f"the tokenizer's chat template refused the prompt ({type(exc).__name__}: {exc}): pass {fold}"
                "--chat-template chatml|llama3|FILE.jinja to render it with another template"
            ) from exc

    def _end_of_turn(self) -> str:
        """The text the template puts right after an assistant answer (e.g. `<|im_end|>`), minus whitespace."""
        messages = self.template.messages("t", "a", self.labels, self.system_role)
        prompt, full = self._render(messages), self._render(messages, "ANSWER")
        if not full.startswith(prompt + "ANSWER"):
            raise TokenizationError("chat template does not render the answer right after the generation prompt")
        rendered = full[len(prompt + "ANSWER") :]
        end = rendered.rstrip()
        if not end:
            # Templates without an end-of-turn marker: train the EOS token instead, so generation stops.
            return self.tokenizer.eos_token
        # A marker that is text rather than one control token can merge with the whitespace after it (chatml's
        # `<|im_end|>` + "\n" ends in the one token "|>\n" for Llama 3's tokenizer): then the whitespace is trained
        # too, or the label's tokens would not be the ones the rendering holds.
        bare, whole = self._encode("ANSWER" + end), self._encode("ANSWER" + rendered)
        return end if whole[: len(bare)] == bare else rendered

    def fit_prompt(self, record: Record) -> tuple[list[int], str] | None:
        """(prompt ids, abstract used) with the abstract shortened to fit; None if no abstract fits at all."""
        abstract = record.abstract
        ids = self._encode(self._render(self._messages(record)))
        abstract_ids = None
        excess = len(ids) - self.max_prompt_tokens
        # Decoding a cut and re-encoding can merge tokens differently: shrink until it fits.
        while excess > 0:
            abstract_ids = abstract_ids if abstract_ids is not None else self._encode(self.defuse(record.abstract))
            keep = len(abstract_ids) - excess
            if keep <= 0:
                return None
            abstract_ids = abstract_ids[:keep]
            abstract = self.tokenizer.decode(abstract_ids).rstrip() + " ..."
            ids = self._encode(self._render(self._messages(record, abstract)))
            excess = len(ids) - self.max_prompt_tokens
        return ids, abstract

    def _common_prefix(self) -> list[int]:
        a, b = (
            self._encode(self._render(self._messages(Record(i, t, x, (self.labels[0],)))))
            for i, t, x in (("a", "Alpha", "One."), ("b", "Zeta", "Two."))
        )
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        # Keep one token back: a token boundary can merge differently where the texts start to differ.
        return a[: max(n - 1, 0)]

    def visible_text(self, record: Record) -> str:
        """The paper as its prompt shows it: the title and the abstract as shortened to fit (for a baseline that
        reads exactly what the LLM reads)."""
        fitted = self.fit_prompt(record)
        abstract = "" if fitted is None else fitted[1]
        return f"{record.title}. {abstract.removesuffix(' ...')}"

    def shared_prefix_ids(self) -> list[int]:
        """The tokens every prompt starts with (the rendered system turn), found by rendering two papers."""
        return list(self._prefix)

    def prompt_ids(self, record: Record) -> list[int] | None:
        """Prompt ids for scoring a record (the same ids its training example starts with)."""
        fitted = self.fit_prompt(record)
        return None if fitted is None else fitted[0]

    def example(self, record: Record, stats: TokenizeStats | None = None) -> Example | None:
        """A training example with prompt masked, or None (counted in `stats`) if it has no trainable target."""
        stats = stats if stats is not None else TokenizeStats()
        if record.primary not in self.label_targets:
            stats.drop("label not in label set")
            return None
        fitted = self.fit_prompt(record)
        if fitted is None:
            stats.drop("prompt too long even without abstract")
            return None
        prompt, abstract = fitted
        full = self._encode(self._render(self._messages(record, abstract), record.primary))
        if full[: len(prompt)] != prompt:
            raise TokenizationError(f"record {record.id}: tokenised prompt is not a prefix of prompt+answer")
        expected = self.label_targets[record.primary]
        target = full[len(prompt) : len(prompt) + len(expected)]
        if target != expected:
            raise TokenizationError(f"record {record.id}: answer tokens {target} differ from the label's {expected}")
        stats.kept += 1
        stats.truncated += abstract != record.abstract
        return Example(record.id, record.primary, prompt, target, self.labels.index(record.primary))


def tokenize_records(builder: PromptBuilder, records: list[Record]) -> tuple[list[Example], TokenizeStats]:
    """Tokenise records into examples, dropping (and counting) those without a trainable target."""
    stats = TokenizeStats()
    examples = [example for example in (builder.example(r, stats) for r in records) if example is not None]
    return examples, stats


# Bump when what tokenisation writes changes (the cache key of tokenised datasets includes it).
TOKENIZE_VERSION = 1


class TokenizedExamples(Sequence):
    """Training examples kept in an Arrow file (memory-mapped, shared by every process), read row by row.

    Holding 190-token examples as Python lists costs ~8 KB each in every process; here a process holds the lengths.
    """

    def __init__(self, ds):
        self.ds = ds
        self.lengths = np.asarray(ds["n_tokens"], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> Example:
        row = self.ds[int(index)]
        return Example(row["id"], row["label"], row["prompt_ids"], row["target_ids"], row["label_index"])


def _digest_file(cache_file: Path) -> Path:
    return cache_file.with_name(cache_file.name + ".sha256")


def _verified_cache(cache_file: Path) -> bool:
    """Whether the cache entry holds what was written there: its SHA-256 matches the one recorded when it was written.
    An entry emptied, cut short or replaced under its own name (it was trained on silently) is removed, to be rebuilt.
    """
    import logging

    if not cache_file.is_file():
        return False
    recorded = _digest_file(cache_file)
    if recorded.is_file() and recorded.read_text().strip() == file_digest(cache_file):
        return True
    logging.getLogger(__name__).warning(
        "%s: the tokenisation cache entry does not match the digest recorded when it was written (damaged, "
        "replaced, or written by an older version): rebuilding it",
        cache_file,
    )
    cache_file.unlink(missing_ok=True)
    return False


def tokenize_dataset(builder: PromptBuilder, ds, cache_dir, main_process_first=None):
    """Tokenise a normalised dataset (sources.normalise) into examples with `datasets.map`, cached on disk.

    The cache file is named by what decides its content (the rows, the tokenizer, the chat template, the prompt
    spec and labels, this code's version): the main process writes it, every other process and every later run
    with the same inputs reads it. Returns (TokenizedExamples, stats as a dict, whether all prompts start with the
    shared prefix).
    """
    import contextlib

    fingerprint = _cache_key(builder, ds)
    cache_file = Path(cache_dir) / f"tokenized-{fingerprint}.arrow"
    cache_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tokenize = _tokenize_batch(builder)
    first = main_process_first() if main_process_first is not None else contextlib.nullcontext()
    with first:
        trusted = _verified_cache(cache_file)
        before = set(cache_file.parent.glob("tmp*"))
        try:
            tokenized = ds.map(
                tokenize,
                batched=True,
                remove_columns=ds.column_names,
                cache_file_name=str(cache_file),
                load_from_cache_file=trusted,
                new_fingerprint=fingerprint,
                desc="tokenize",
            )
        except BaseException:  # a full disk, a kill: the temporary file `datasets` was writing is not left behind
            for leftover in set(cache_file.parent.glob("tmp*")) - before:
                leftover.unlink(missing_ok=True)
            raise
        if not trusted and cache_file.is_file():
            atomic_write(_digest_file(cache_file), file_digest(cache_file) + "\n")
    dropped = collections.Counter(r for r in tokenized["dropped"] if r)
    kept = [i for i, reason in enumerate(tokenized["dropped"]) if not reason]
    stats = {"kept": len(kept), "truncated": int(sum(tokenized["truncated"])), "dropped": dict(dropped)}
    kept_ds = tokenized.select(kept) if len(kept) < len(tokenized) else tokenized
    has_prefix = bool(all(kept_ds["has_prefix"])) if len(kept_ds) else True
    return TokenizedExamples(kept_ds), stats, has_prefix


def _cache_key(builder: PromptBuilder, ds) -> str:
    """What decides a tokenised dataset's content: the rows, the tokenizer, the chat template, the prompt spec and
    labels, this code's version."""
    from arxiv_ft.fileio import json_digest

    tokenizer = builder.tokenizer
    key = {
        "version": TOKENIZE_VERSION,
        "rows": ds._fingerprint,
        "tokenizer": [
            *(type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer)),
            json_digest(sorted(tokenizer.get_vocab().items())),
        ],
        "chat_template": hashlib.sha256(str(tokenizer.chat_template).encode()).hexdigest(),
        "builder": [builder.template.id, builder.labels, builder.max_seq_tokens, builder.budget, builder.system_role],
        "chat_kwargs": builder.chat_kwargs,
    }
    return json_digest(key)[:32]


def _tokenize_batch(builder: PromptBuilder):
    """The `datasets.map` function: a batch of normalised rows -> examples' columns (a dropped row keeps its reason)."""
    prefix = builder.shared_prefix_ids()

    def tokenize(batch):
        out = {k: [] for k in ("id", "label", "prompt_ids", "target_ids", "label_index", "n_tokens", "dropped")}
        out |= {"truncated": [], "has_prefix": []}
        for rid, title, abstract, primary in zip(batch["id"], batch["title"], batch["abstract"], batch["primary"]):
            stats = TokenizeStats()
            example = builder.example(Record(rid, title, abstract, (primary,)), stats)
            out["id"].append(rid)
            out["label"].append(primary)
            out["prompt_ids"].append(example.prompt_ids if example else [])
            out["target_ids"].append(example.target_ids if example else [])
            out["label_index"].append(example.label_index if example else -1)
            out["n_tokens"].append(len(example.input_ids) if example else 0)
            out["dropped"].append(next(iter(stats.dropped), ""))
            out["truncated"].append(bool(stats.truncated))
            out["has_prefix"].append(bool(example) and example.prompt_ids[: len(prefix)] == prefix)
        return out

    return tokenize


def _decision_positions(targets: list[list[int]]) -> list[list[bool]]:
    """For each label's target, which positions decide between labels (labels sharing the tokens before it differ
    there): for `cs . XX <eot>` only `XX`. The other positions follow from the ones before them."""
    following: dict[tuple[int, ...], set[int]] = {}
    for t in targets:
        for j in range(len(t)):
            following.setdefault(tuple(t[:j]), set()).add(t[j])
    return [[len(following[tuple(t[:j])]) > 1 for j in range(len(t))] for t in targets]


def left_pad(rows: list[list[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, position ids) of left-padded rows: every row ends in the last column.

    Position ids count real tokens only, so a left-padded row computes exactly what it computes alone.
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def collate_left_padded(
    examples: list[Example],
    pad_id: int,
    skip_prefix: int = 0,
    decision_weight: float | None = None,
    label_decisions=None,
) -> dict[str, torch.Tensor]:
    """Left-pad (as scoring and generation do), so every row ends at the last column.

    `skip_prefix` drops that many leading tokens every example shares (see loss.AnswerLoss). With
    `decision_weight`, a `weights` tensor gives each target token weight 1, and `decision_weight` where the label is
    decided (`label_decisions[label_index]`, see PromptBuilder.label_decisions).
    """
    rows = [example.input_ids[skip_prefix:] for example in examples]
    input_ids, attention_mask, position_ids = left_pad(rows, pad_id)
    labels, _, _ = left_pad([example.labels[skip_prefix:] for example in examples], IGNORE_INDEX)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "labels": labels}
    if decision_weight is not None:
        weights = [
            [0.0] * (len(example.prompt_ids) - skip_prefix)
            + [decision_weight if d else 1.0 for d in label_decisions[example.label_index]]
            for example in examples
        ]
        width = labels.shape[1]
        batch["weights"] = torch.tensor([[0.0] * (width - len(w)) + w for w in weights])
    return batch


def collate_prompts(examples: list[Example], pad_id: int, skip_prefix: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded prompts without their answers, and each example's label index: for objectives that score the
    whole label set (label-softmax, classification head)."""
    rows = [example.prompt_ids[skip_prefix:] for example in examples]
    input_ids, attention_mask, position_ids = left_pad(rows, pad_id)
    label_index = torch.tensor([example.label_index for example in examples], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "label_index": label_index,
    }


def collate_packed(examples: list[Example], skip_prefix: int = 0) -> dict[str, torch.Tensor]:
    """One row, no padding: the examples end to end, position ids restarting at 0 for each.

    `segment_ids` numbers the example each token belongs to; loss.AnswerLoss turns them into a block-diagonal causal
    mask, so a token attends only to its own example (and the shared prefix) and the row computes exactly what the
    examples compute alone. An example's first token is always prompt, so no target is predicted across a boundary.
    """
    input_ids, labels, position_ids, segment_ids = [], [], [], []
    for i, example in enumerate(examples):
        ids = example.input_ids[skip_prefix:]
        input_ids += ids
        labels += example.labels[skip_prefix:]
        position_ids += range(len(ids))
        segment_ids += [i] * len(ids)
    batch = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "segment_ids": segment_ids}
    return {k: torch.tensor([v], dtype=torch.long) for k, v in batch.items()}


class BatchPlan:
    """Which examples each optimizer step uses: a pure function of (examples, seed, step).

    A step takes `step_size` examples (micro-batch x processes x accumulation steps) from a seeded per-epoch
    permutation; the last partial step of an epoch is dropped. With `group_by_length`, chunks of 16 steps are
    sorted by length before being cut, so a batch pads little while the order stays random. The step's examples
    are cut into `grad_accum_steps` micro-batches, and process p takes rows p::world of each. So the same
    global batch is seen whatever the split into processes and accumulation, and resuming needs only the step.
    """

    def __init__(
        self,
        examples: list[Example],
        step_size: int,
        grad_accum_steps: int,
        epochs: float,
        max_steps: int,
        seed: int,
        group_by_length: bool,
    ):
        if step_size % grad_accum_steps:
            raise ValueError(f"step size {step_size} is not a multiple of grad_accum_steps {grad_accum_steps}")
        self.examples = examples
        self.step_size = step_size
        self.grad_accum_steps = grad_accum_steps
        self.seed = seed
        self.group_by_length = group_by_length
        self.steps_per_epoch = len(examples) // step_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(examples)} examples are fewer than one optimizer step's {step_size}")
        self.steps = max_steps if max_steps > 0 else max(1, round(epochs * self.steps_per_epoch))
        self._epoch, self._batches = -1, []

    def _plan_epoch(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.examples), generator=g).tolist()[: self.steps_per_epoch * self.step_size]
        lengths = getattr(self.examples, "lengths", None)
        if lengths is None:
            lengths = [len(example.input_ids) for example in self.examples]
        length = lambda i: lengths[i]  # noqa: E731
        if self.group_by_length:
            chunk = 16 * self.step_size
            order = [
                i for start in range(0, len(order), chunk) for i in sorted(order[start : start + chunk], key=length)
            ]
        batches = [order[i : i + self.step_size] for i in range(0, len(order), self.step_size)]
        if self.group_by_length:  # long and short steps alternate instead of following the chunk order
            batches = [sorted(batches[i], key=length) for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def step_batches(self, step: int) -> list[list[Example]]:
        """The step's micro-batches (all processes' rows), `grad_accum_steps` of them."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._plan_epoch(epoch)
        examples = [self.examples[i] for i in self._batches[index]]
        size = self.step_size // self.grad_accum_steps
        return [examples[i : i + size] for i in range(0, len(examples), size)]
