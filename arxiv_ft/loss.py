"""The one place where logits and labels meet: the shift, the mask, and the normalisation.

Batches are left-padded (see `data.collate_left_padded`), so every target sits in the last few columns and the
model is asked for only those logits (`logits_to_keep`): the full-vocabulary head never runs on prompt positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

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


def loss_scale(step_target_tokens: int, world_size: int, grad_accum_steps: int) -> float:
    """Factor for a micro-batch's summed loss so the optimizer step sees the mean over all its target tokens.

    accelerate divides each micro-batch loss by grad_accum_steps and DDP averages gradients over processes;
    both are undone here, and the sum is divided by the step's target tokens over every micro-batch and process.
    """
    return world_size * grad_accum_steps / step_target_tokens


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


class AnswerLoss(torch.nn.Module):
    """The training forward: model + masked loss in one call, so DDP/DeepSpeed see exactly one forward.

    With `prefix_ids` (the system turn every prompt starts with), batches hold only what follows it: the prefix
    runs once per micro-batch (batch size 1), its KV cache is broadcast to every row, and gradients still flow
    through it. On the arXiv prompts that prefix is more than half of every example's tokens.
    """

    def __init__(self, model, prefix_ids: list[int] | None = None):
        super().__init__()
        self.model = model
        self.register_buffer("prefix_ids", torch.tensor([prefix_ids or []], dtype=torch.long), persistent=False)

    def forward(self, input_ids, attention_mask, position_ids, labels) -> torch.Tensor:
        """Summed cross-entropy over the batch's target tokens."""
        n_prefix, batch = self.prefix_ids.shape[1], input_ids.shape[0]
        cache = None
        if n_prefix:
            out = self.model(input_ids=self.prefix_ids, use_cache=True)
            cache = DynamicCache(
                ddp_cache_data=[
                    (lyr.keys.expand(batch, -1, -1, -1), lyr.values.expand(batch, -1, -1, -1))
                    for lyr in out.past_key_values.layers
                ]
            )
            attention_mask = torch.cat([attention_mask.new_ones(batch, n_prefix), attention_mask], dim=1)
            position_ids = position_ids + n_prefix
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=n_prefix > 0,
            logits_to_keep=logits_window(labels),
        )
        return summed_loss(out.logits, labels)
