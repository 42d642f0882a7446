"""The training loop's pieces: the learning-rate schedule (and, later, the step and the loop)."""

from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "linear", "constant")


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """The multiplier of the peak learning rate for optimizer step `step` (0-based).

    Warm-up rises linearly from 1/(warmup_steps + 1) (never 0: the first step must move the weights) to 1 at step
    `warmup_steps`; then the schedule decays towards `min_ratio`, which the last step approaches.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    return min_ratio + (1.0 - min_ratio) * decay


def lr_schedule(optimizer, schedule: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """A LambdaLR following `lr_factor`; its state is a pure function of the step, so resuming needs only the step."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, schedule, warmup_steps, total_steps, min_ratio)
    )
