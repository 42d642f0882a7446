"""The task metrics as one Hugging Face `evaluate` metric: accuracy, macro-F1, per-class report, confusion matrix
and the calibration of the label probabilities (expected calibration error, mean confidence, Brier score).

Load it by path, which works offline (`evaluate.load("accuracy")` needs the hub):
`evaluate.load("arxiv_ft/evaluation/arxiv_classification.py")`; `arxiv_ft.metrics.classification_metrics` does
that once per process. evaluate copies this file alone into its modules cache and parses its imports line by line,
so it is self-contained (no imports from `arxiv_ft`) with one import per line.

Every figure comes from the confusion matrix in numpy, not from scikit-learn, so the tests comparing it with
scikit-learn compare two implementations; it also stays linear in the number of papers (one dictionary look-up
each), where scikit-learn sorts the string labels.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

UNPARSED = "<none>"  # confusion column of predictions outside the label set (unparseable generations)

_DESCRIPTION = __doc__

_INPUTS = """
Args:
    predictions (list of str): predicted label per paper; a prediction outside `labels` (by convention
        "<none>" for an unparseable generation) counts as wrong and is counted in its own confusion column.
    references (list of str): true label per paper; each must be in `labels`.
    labels (list of str): the label set, in its order (rows of the confusion matrix, columns of `probabilities`).
    probabilities (list of list of float, optional): each paper's probability of every label, in label-set order
        (rows sum to 1). Without it the calibration figures are None. A keyword of `compute` rather than an input
        column: evaluate requires every declared input on every call, and these are optional.
    n_bins (int): equal-width confidence bins of the expected calibration error (default 15).
Returns:
    n, accuracy, macro_f1 (mean F1 over the labels that occur in the references or the predictions; NaN when
    n == 0), unparsed (predictions outside the label set), per_class {label: precision, recall, f1, support} for
    every label of the set, confusion {rows_true, columns_predicted, counts}, and from `probabilities`: ece,
    mean_confidence, brier (None without them).
"""


class ArxivClassification(evaluate.Metric):
    """Single-label classification metrics over a fixed label set, with calibration of the label probabilities."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://arxiv.org/abs/1706.04599"],  # Guo et al. 2017, the ECE definition used here
        )

    def _compute(
        self,
        predictions: list[str],
        references: list[str],
        labels: list[str],
        probabilities: list[list[float]] | None = None,
        n_bins: int = 15,
    ) -> dict:
        if UNPARSED in labels or len(set(labels)) != len(labels):
            raise ValueError(f"labels must be distinct and must not contain {UNPARSED!r}")
        index = {label: i for i, label in enumerate(labels)}
        n, k = len(references), len(labels)
        unknown = sorted({r for r in references if r not in index})
        if unknown:
            raise ValueError(f"true labels outside the label set: {unknown[:10]}")
        true = np.fromiter((index[r] for r in references), dtype=np.int64, count=n)
        pred = np.fromiter((index.get(p, k) for p in predictions), dtype=np.int64, count=n)  # k: the unparsed column
        counts = np.bincount(true * (k + 1) + pred, minlength=k * (k + 1)).reshape(k, k + 1)
        hits = np.diag(counts)
        support = counts.sum(axis=1)
        predicted = counts[:, :k].sum(axis=0)
        precision = _ratio(hits, predicted)
        recall = _ratio(hits, support)
        f1 = _ratio(2 * hits, support + predicted)  # = 2PR/(P+R); 0 where the label is neither true nor predicted
        # A label absent from both the references and the predictions has no F1 to average (scikit-learn's default
        # when it is not given the label set); averaging its 0 in made a perfect 2-class score 2/21 with 21 labels.
        present = (support + predicted) > 0
        unparsed = int(counts[:, k].sum())
        columns = labels + ([UNPARSED] if unparsed else [])
        return {
            "n": n,
            "accuracy": float(hits.sum() / n) if n else float("nan"),
            "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
            "unparsed": unparsed,
            "per_class": {
                label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                for label, p, r, f, s in zip(labels, precision, recall, f1, support)
            },
            "confusion": {
                "rows_true": list(labels),
                "columns_predicted": columns,
                "counts": counts[:, : len(columns)].tolist(),
            },
            **calibration(probabilities, true, k, n_bins),
        }


def calibration(probabilities: list[list[float]] | None, true: np.ndarray, n_labels: int, n_bins: int) -> dict:
    """Expected calibration error, mean confidence and Brier score of the label probabilities (None without them).

    ECE (Guo et al. 2017): the top-1 probability is the confidence and the arg-max label the prediction; papers fall
    into `n_bins` equal-width bins (lo, hi] of confidence, and ECE = sum over bins of (papers in bin / n) x
    |accuracy in bin - mean confidence in bin|. Brier: mean over papers of the squared distance between the
    probability vector and the one-hot true label (0 best, 2 worst).
    """
    if probabilities is None:
        return {"ece": None, "mean_confidence": None, "brier": None}
    probs = np.asarray(probabilities, dtype=np.float64)
    if len(true) == 0 and probs.size == 0:
        return {"ece": float("nan"), "mean_confidence": float("nan"), "brier": float("nan")}
    if probs.shape != (len(true), n_labels):
        raise ValueError(f"probabilities have shape {probs.shape}; expected {(len(true), n_labels)}")
    # Catches log-probabilities or logits passed by mistake; the tolerance leaves room for half-precision softmax.
    if (probs < 0).any() or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-2):
        raise ValueError("each row of probabilities must be non-negative and sum to 1")
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == true
    # Bin b holds confidences in (edges[b], edges[b + 1]]: searching the n_bins - 1 inner edges gives b directly.
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.searchsorted(edges[1:-1], confidence, side="left")
    # Per bin, sum(correct - confidence) = size x (accuracy - mean confidence), so |sums| / n is the weighted gap.
    gap = np.bincount(bins, weights=correct - confidence, minlength=n_bins)
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(true)), true] = 1.0
    return {
        "ece": float(np.abs(gap).sum() / len(true)),
        "mean_confidence": float(confidence.mean()),
        "brier": float(((probs - onehot) ** 2).sum(axis=1).mean()),
    }


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator elementwise, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0)
