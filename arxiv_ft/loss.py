"""The one place where logits and labels meet: the shift, the mask, and the normalisation.

The output head runs only on the positions that predict a target (`logits_to_keep` as a boolean mask): the
full-vocabulary head never runs on prompt positions. Two batch layouts share this: left-padded rows
(`data.collate_left_padded`) and one packed row without padding (`data.collate_packed`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from arxiv_ft.data import IGNORE_INDEX


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """[batch, length] bool: True where the next token is a target (position j predicts label j + 1)."""
    if (labels[:, 0] != IGNORE_INDEX).any():
        raise ValueError("a row starts with a target token: no position predicts it")
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    if not keep.any():
        raise ValueError("batch has no target tokens")
    return keep


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
    """Sum of next-token cross-entropy over the targets.

    `logits` is [n_targets, vocab]: one row per True of `predicting_positions(labels)`, in row-major order
    (what `logits_to_keep=predicting_positions(labels)` returns).
    """
    targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(f"{logits.shape[0]} logit rows for {targets.shape[0]} targets; use predicting_positions")
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def packed_attention_mask(segment_ids: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """[rows, 1, length, n_prefix + length] bool: a token sees the shared prefix and the earlier tokens of its own
    example, never another example's (True = attend; SDPA's convention)."""
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    allowed = causal & same
    allowed = torch.cat([allowed.new_ones(allowed.shape[0], length, n_prefix), allowed], dim=2)
    return allowed[:, None]


class AnswerLoss(torch.nn.Module):
    """The training forward: model + masked loss in one call, so DDP/DeepSpeed see exactly one forward.

    With `prefix_ids` (the system turn every prompt starts with), batches hold only what follows it: the prefix
    runs once per micro-batch (batch size 1), its KV cache is broadcast to every row, and gradients still flow
    through it. On the arXiv prompts that prefix is more than half of every example's tokens.

    A batch is either left-padded (`attention_mask`) or packed (`segment_ids`: which example each token belongs
    to; attention is then block-diagonal causal, built here, so no token attends across examples).
    """

    def __init__(self, model, prefix_ids: list[int] | None = None):
        super().__init__()
        self.model = model
        self.register_buffer("prefix_ids", torch.tensor([prefix_ids or []], dtype=torch.long), persistent=False)

    def forward(self, input_ids, position_ids, labels, attention_mask=None, segment_ids=None) -> torch.Tensor:
        """Summed cross-entropy over the batch's target tokens."""
        if (attention_mask is None) == (segment_ids is None):
            raise ValueError("pass attention_mask (padded batch) or segment_ids (packed batch), not both")
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
            position_ids = position_ids + n_prefix
        if segment_ids is not None:
            # A 4D mask is used as given, so this holds only for SDPA's boolean convention.
            if self.model.config._attn_implementation != "sdpa":
                raise ValueError("packed batches need attn_implementation='sdpa'")
            attention_mask = packed_attention_mask(segment_ids, n_prefix)
        elif n_prefix:
            attention_mask = torch.cat([attention_mask.new_ones(batch, n_prefix), attention_mask], dim=1)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=n_prefix > 0,
            logits_to_keep=predicting_positions(labels),
        )
        return summed_loss(out.logits, labels)
