"""Use a trained classifier from Python: a model, its prompt builder and its scorer, behind one `predict`.

    from arxiv_ft import Classifier
    clf = Classifier.from_pretrained("runs/default")          # a run folder, a checkpoint, or best/
    clf.predict([{"title": "Attention is all you need", "abstract": "The dominant sequence ..."}], top_k=3)
    # [{"label": "cs.CL", "top_k": [["cs.CL", 0.81], ["cs.LG", 0.12], ["cs.AI", 0.03]]}]

The scores are exactly infer.py's (the same builder, scorer and batching rules); train.py evaluates through the same
object. Papers are dicts with `title` and `abstract` (an `id` is kept if given) or `records.Record`s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from arxiv_ft.data import PromptBuilder
from arxiv_ft.prompts import PromptSpec
from arxiv_ft.records import Record, RecordError, parse_record
from arxiv_ft.scoring import HeadScorer, LabelScorer, generate_labels


@dataclass
class Classifier:
    """A causal LM (plus a head for cls-head runs) that names a paper's category among a fixed label set."""

    model: torch.nn.Module
    tokenizer: object
    builder: PromptBuilder
    head: torch.nn.Module | None = None
    temperature: float = 1.0  # label log-likelihoods are divided by it before the softmax (calibration.py)

    def __post_init__(self):
        if self.head is not None:
            self.scorer = HeadScorer(self.model, self.head, self.builder, self.tokenizer.pad_token_id)
        else:
            self.scorer = LabelScorer(self.model, self.builder, self.tokenizer.pad_token_id)

    @property
    def labels(self) -> list[str]:
        return self.builder.labels

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str | torch.device | None = None, dtype: str = "auto", trust_remote_code=False
    ) -> Classifier:
        """Load a train.py output folder, one of its checkpoints, or its best/ folder."""
        from arxiv_ft.calibration import read_temperature
        from arxiv_ft.modeling import resolve_dtype
        from arxiv_ft.rundir import RunDir

        run = RunDir(folder).check()
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = run.load_model(resolve_dtype(dtype, device), trust_remote_code).to(device).eval()
        tokenizer = run.load_tokenizer(trust_remote_code)
        builder = PromptBuilder.from_spec(tokenizer, run.prompt(), run.labels())
        return cls(model, tokenizer, builder, run.load_head(device), read_temperature(run.path))

    @classmethod
    def zero_shot(
        cls, model: str, labels: list[str], prompt: PromptSpec | None = None, device=None, dtype: str = "auto"
    ) -> Classifier:
        """A base model, unchanged, as a classifier over `labels` (the zero-shot baseline)."""
        from arxiv_ft.modeling import load_model, load_tokenizer, resolve_dtype

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tokenizer = load_tokenizer(model)
        builder = PromptBuilder.from_spec(tokenizer, prompt or PromptSpec(), labels)
        return cls(load_model(model, resolve_dtype(dtype, device)).to(device).eval(), tokenizer, builder)

    def prompts(self, records: list[Record]) -> list[list[int] | None]:
        """Each paper's prompt ids (None where even the title does not fit the token budget)."""
        return [self.builder.prompt_ids(r) for r in records]

    def probabilities(self, prompts: list[list[int]]) -> torch.Tensor:
        """[len(prompts), n_labels] label probabilities for prompts of one batch (at the classifier's temperature)."""
        return self.scores(prompts)[0]

    def scores(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(label probabilities [batch, n_labels] at the classifier's temperature, label mass [batch]) from one
        forward. The label mass is p(the answer is one of the allowed labels) = sum over labels of p(label tokens +
        end-of-turn | prompt), uncalibrated: a paper from outside the label set may draw the model's mass elsewhere.
        None for a classification head (its softmax is over the labels only)."""
        log_likelihoods = self.scorer.score_prompts(prompts).float()
        probs = torch.softmax(log_likelihoods / self.temperature, dim=-1)
        return probs, None if self.head is not None else torch.logsumexp(log_likelihoods, dim=-1).exp()

    def log_likelihoods(self, records: list[Record], batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """(label log-likelihoods [n, n_labels], true label index [n]) of the papers that fit and whose label is in the
        set, in input order: what a temperature is fitted on."""
        index = {label: i for i, label in enumerate(self.labels)}
        kept = [(r, p) for r, p in zip(records, self.prompts(records)) if p is not None and r.primary in index]
        rows = []
        with torch.no_grad():
            for start in range(0, len(kept), batch_size):
                rows.append(self.scorer.score_prompts([p for _, p in kept[start : start + batch_size]]).float())
        scores = torch.cat(rows) if rows else torch.zeros((0, len(self.labels)))
        return scores, torch.tensor([index[r.primary] for r, _ in kept], dtype=torch.long)

    def predict(self, papers: list, top_k: int = 3, batch_size: int = 16) -> list[dict | None]:
        """The label and the top-k (label, probability) pairs of each paper, in input order (None: does not fit)."""
        records = [_as_record(p, i) for i, p in enumerate(papers)]
        results: list[dict | None] = [None] * len(records)
        prompts = self.prompts(records)
        order = sorted((i for i, p in enumerate(prompts) if p is not None), key=lambda i: len(prompts[i]))
        k = min(top_k, len(self.labels))
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                top_p, top_i = self.probabilities([prompts[i] for i in idx]).topk(k, dim=-1)
                for row, i in enumerate(idx):
                    top = [[self.labels[j], round(p, 6)] for p, j in zip(top_p[row].tolist(), top_i[row].tolist())]
                    results[i] = {"id": records[i].id, "label": top[0][0], "top_k": top}
        return results

    def generate(self, records: list[Record], batch_size: int = 16, max_new_tokens: int = 8):
        """Free generation and parsing (the tutorial's way), for comparison with label scoring."""
        return generate_labels(self.model, self.tokenizer, self.builder, records, batch_size, max_new_tokens)


def _as_record(paper, index: int) -> Record:
    if isinstance(paper, Record):
        return paper
    if not isinstance(paper, dict):
        raise TypeError(f"paper {index}: expected a dict with title and abstract, or a Record")
    obj = {"id": str(paper.get("id", index)), "categories": paper.get("categories", "unknown"), **paper}
    obj["id"], obj["categories"] = str(obj["id"]), obj["categories"] or "unknown"
    try:
        return parse_record(obj)
    except RecordError as exc:
        raise ValueError(f"paper {index}: {exc}") from None


def evaluate(
    classifier: Classifier,
    records: list[Record],
    accelerator,
    mode: str = "score",
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Score (and/or generate) every process's share of `records`, gather, and compute the metrics on every process.

    A paper whose prompt cannot fit the token budget counts as wrong (it was not classified), as in infer.py.
    """
    import time

    from accelerate.utils import gather_object

    from arxiv_ft.metrics import classification_metrics

    share = records[accelerator.process_index :: accelerator.num_processes]
    result, started = {}, time.perf_counter()
    show = progress and accelerator.is_local_main_process
    if mode in ("score", "both"):
        preds = classifier.scorer.predict(share, batch_size, progress=show)
        rows = gather_object(
            [(r.id, r.primary, p.predicted if p else None, p.probs if p else None) for r, p in zip(share, preds)]
        )
        result["score"] = _metrics(rows, classifier.labels, classification_metrics)
    if mode in ("generate", "both"):
        gens = classifier.generate(share, batch_size)
        rows = gather_object([(r.id, r.primary, g[1] if g else None, None) for r, g in zip(share, gens)])
        result["generate"] = _metrics(rows, classifier.labels, classification_metrics)
    result["seconds"] = time.perf_counter() - started
    return result


def _metrics(rows, labels, classification_metrics) -> dict:
    rows = sorted(rows, key=lambda r: r[0])  # the same order whatever the number of processes
    probs = [r[3] for r in rows]
    uniform = [1.0 / len(labels)] * len(labels)
    metrics = classification_metrics(
        [r[1] for r in rows],
        [r[2] for r in rows],
        labels,
        probs=None if all(p is None for p in probs) else [p if p is not None else uniform for p in probs],
    )
    metrics["ids"] = [r[0] for r in rows]
    metrics["correct"] = [int(r[1] == r[2]) for r in rows]
    return metrics
