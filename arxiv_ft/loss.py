"""The one place where logits and labels meet: the shift, the mask, and the normalisation.

Batches are left-padded (see `data.collate_left_padded`), so every target sits in the last few columns and the
model is asked for only those logits (`logits_to_keep`): the full-vocabulary head never runs on prompt positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from arxiv_ft.data import IGNORE_INDEX


def logits_window(labels: torch.Tensor) -> int:
    """How many trailing positions hold every target and the position that predicts the first one."""
    has_target = (labels != IGNORE_INDEX).any(dim=0)
    if not has_target.any():
        raise ValueError("batch has no target tokens")
    first_column = int(has_target.nonzero()[0])
    return labels.shape[1] - first_column + 1


def target_token_count(labels: torch.Tensor) -> int:
    """Number of tokens that carry loss (all of them are after the first position, so no shift is needed)."""
    return int((labels != IGNORE_INDEX).sum())


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over target positions.

    `logits` may cover only the last `k` positions (k = logits.shape[1]); `labels` covers the whole sequence.
    Logit column j predicts label column (L - k + j + 1).
    """
    k = logits.shape[1]
    shifted_labels = labels[:, labels.shape[1] - k + 1 :]
    if (labels[:, : labels.shape[1] - k + 1] != IGNORE_INDEX).any():
        raise ValueError(f"targets lie outside the last {k} logits; pass logits_to_keep=logits_window(labels)")
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), shifted_labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def model_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward a left-padded batch asking only for the logits the targets need; return the summed loss."""
    labels = batch["labels"]
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=logits_window(labels),
        use_cache=False,
    )
    return summed_loss(out.logits, labels)
