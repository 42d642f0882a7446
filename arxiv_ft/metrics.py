"""Task metrics (accuracy, macro-F1, per-class report, confusion matrix) and cost figures; pure functions.

scikit-learn computes the classification metrics: it is what the `evaluate` hub's accuracy/F1 modules wrap,
and it needs no hub, so metrics work offline.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support


def classification_metrics(y_true: list[str], y_pred: list[str | None], labels: list[str]) -> dict:
    """Accuracy, macro-F1 over the label set, per-class precision/recall/F1/support, confusion matrix.

    A prediction of None (an unparseable generation) counts as wrong; it gets its own confusion column.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    if not y_true:
        return {"n": 0, "accuracy": float("nan"), "macro_f1": float("nan")}
    pred = [p if p is not None else "<none>" for p in y_pred]
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, pred, labels=labels, average=None, zero_division=0
    )
    columns = labels + (["<none>"] if "<none>" in pred else [])
    matrix = confusion_matrix(y_true, pred, labels=columns)
    return {
        "n": len(y_true),
        "accuracy": float(np.mean([t == p for t, p in zip(y_true, pred)])),
        "macro_f1": float(np.mean(f1)),
        "unparsed": pred.count("<none>"),
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support)
        },
        "confusion": {"rows_true": labels, "columns_predicted": columns, "counts": matrix[: len(labels)].tolist()},
    }


def format_report(metrics: dict, labels: list[str]) -> str:
    """A per-class table as text, like scikit-learn's classification_report."""
    lines = [f"{'label':<12}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
    for label in labels:
        c = metrics["per_class"][label]
        lines.append(f"{label:<12}{c['precision']:>10.3f}{c['recall']:>10.3f}{c['f1']:>10.3f}{c['support']:>9d}")
    lines.append(f"accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  (n={metrics['n']})")
    return "\n".join(lines)


def training_flops_per_token(n_params: int, n_trainable: int, full: bool) -> float:
    """Model FLOPs per trained token (attention excluded): 6N for full fine-tuning.

    With frozen base weights (LoRA/QLoRA) the backward still propagates activation gradients through every
    layer (2N) but computes no weight gradients for frozen weights: 4N + 6 x trainable.
    """
    return 6.0 * n_params if full else 4.0 * n_params + 6.0 * n_trainable


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak; None when the peak is unknown."""
    if not peak_flops:
        return None
    return flops_per_token * tokens_per_s / peak_flops
