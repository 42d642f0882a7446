"""The training loop: one optimizer step (`train_step`) and the loop around it (`fit`), callable from `train`, a
test or a benchmark.

Each step's examples are a pure function of (seed, step) (`data.BatchPlan`), the learning rate a pure function of
the step (`lr_factor`), and the random numbers a step draws (dropout) come from a generator seeded by (seed, step,
process): resuming needs only the step, whatever the number of processes, and no pickled RNG or scheduler state.
The loss is normalised by the step's loss units (target tokens, or examples) over every micro-batch and process
(torchtune's rule), so batch 8, 4 x 2 accumulation and 2 processes give the same gradient.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from arxiv_ft.data import BatchPlan, Example
from arxiv_ft.loss import loss_scale
from arxiv_ft.options import SCHEDULES


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


def schedule(cfg, optimizer, total_steps: int, step: int = 0):
    """The learning-rate schedule a train config asks for (warm-up ratio, shape, floor), positioned at `step`."""
    warmup = min(total_steps, math.ceil(cfg.warmup_ratio * total_steps))
    return lr_schedule(optimizer, cfg.lr_schedule, warmup, total_steps, cfg.min_lr_ratio, step)


def lr_schedule(optimizer, schedule: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0, step: int = 0):
    """A LambdaLR following `lr_factor`, positioned at `step` (resuming needs nothing else)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    factor = lambda s: lr_factor(s, schedule, warmup_steps, total_steps, min_ratio)  # noqa: E731
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=step - 1)


@dataclass
class TrainState:
    """Where training is: the step (which fixes the data position) and what was measured so far."""

    step: int = 0
    loss_curve: list[float] = field(default_factory=list)
    lr_curve: list[float] = field(default_factory=list)
    tokens_seen: int = 0  # real tokens of all processes (padding excluded, shared prefix counted per example)
    target_tokens_seen: int = 0  # all processes
    train_seconds: float = 0.0
    evals: list[dict] = field(default_factory=list)  # periodic evaluations: step, accuracy, macro_f1
    best: dict | None = None  # the best periodic evaluation so far (by macro-F1), kept in best/

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> TrainState:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class Setup:
    """What a step needs: the prepared objective module, optimizer, schedule, batch plan and how to batch."""

    accelerator: object
    train_model: torch.nn.Module  # an objective from arxiv_ft.loss (model + loss in one forward), prepared
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    plan: BatchPlan
    collate: Callable[[list[Example]], dict]  # micro-batch -> tensors
    units: Callable[[Example], float]  # an example's share of the step's loss normaliser
    max_grad_norm: float = 1.0
    seed: int = 0


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed the random numbers one step draws (dropout) from (seed, step, process)."""
    torch.manual_seed((seed * 1_000_003 + step) * 1_009 + rank)


def train_step(setup: Setup, step: int) -> dict:
    """One optimizer step: every micro-batch of `step` (this process's rows), backward, clip, update, schedule.

    Returns the step's mean loss (over all processes), the learning rate it used, and the step's real and target
    tokens (all processes).
    """
    acc = setup.accelerator
    rank, world = acc.process_index, acc.num_processes
    micro_batches = setup.plan.step_batches(step)
    normaliser = sum(setup.units(example) for micro in micro_batches for example in micro)
    scale = loss_scale(normaliser, world, setup.plan.grad_accum_steps)
    lr = setup.scheduler.get_last_lr()[0]
    seed_step(setup.seed, step, rank)
    loss_sum = 0.0
    for micro in micro_batches:
        batch = {k: v.to(acc.device) for k, v in setup.collate(micro[rank::world]).items()}
        with acc.accumulate(setup.train_model):
            loss = setup.train_model(**batch)
            acc.backward(loss * scale)
            if acc.sync_gradients and setup.max_grad_norm > 0:
                acc.clip_grad_norm_(setup.train_model.parameters(), setup.max_grad_norm)
            setup.optimizer.step()
            setup.optimizer.zero_grad(set_to_none=True)
        loss_sum += float(loss.detach())
    setup.scheduler.step()
    return {
        "loss": float(acc.reduce(torch.tensor(loss_sum, device=acc.device), "sum")) / normaliser,
        "lr": lr,
        # Real tokens of the step's examples (shared prefix included, padding not): what a plain loop would process.
        "tokens": sum(len(example.input_ids) for micro in micro_batches for example in micro),
        "targets": sum(len(example.target_ids) for micro in micro_batches for example in micro),
    }


class Stopped(Exception):
    """A stop signal arrived; a checkpoint of the step reached was saved."""

    def __init__(self, step: int):
        super().__init__(f"stopped after step {step}")
        self.step = step


def fit(
    setup: Setup,
    state: TrainState,
    *,
    log: Callable[[str], None],
    log_every: int,
    checkpoint_every: int,
    checkpoint: Callable[[TrainState], None],
    eval_every: int = 0,
    evaluate: Callable[[TrainState], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    track: Callable[[dict, int], None] = lambda values, step: None,
    progress: bool = True,
) -> TrainState:
    """Run the steps from `state.step` to the plan's end; checkpoint, evaluate and stop as asked. Returns the state.

    On a stop signal the step in progress finishes, a checkpoint is saved and `Stopped` is raised.
    """
    from tqdm.auto import tqdm

    plan, acc = setup.plan, setup.accelerator
    setup.train_model.train()
    bar = tqdm(total=plan.steps, initial=state.step, desc="train", disable=not (progress and acc.is_local_main_process))
    started = time.perf_counter() - state.train_seconds
    try:
        for step in range(state.step, plan.steps):
            result = train_step(setup, step)
            if not math.isfinite(result["loss"]):  # every process sees the same reduced loss, and stops alike
                raise SystemExit(
                    f"step {step + 1}: the training loss is {result['loss']} (the run diverged; nothing after the last "
                    "checkpoint is saved): lower --lr or raise --warmup-ratio, then resume or start again"
                )
            state.step = step + 1
            state.loss_curve.append(result["loss"])
            state.lr_curve.append(result["lr"])
            state.tokens_seen += result["tokens"]
            state.target_tokens_seen += result["targets"]
            state.train_seconds = time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(loss=f"{result['loss']:.4f}", lr=f"{result['lr']:.2e}")
            track({"train/loss": result["loss"], "train/lr": result["lr"]}, state.step)
            last = state.step == plan.steps
            if state.step % log_every == 0 or last:
                log(f"step {state.step}/{plan.steps} loss {result['loss']:.4f} lr {result['lr']:.2e}")
            if evaluate is not None and eval_every and (state.step % eval_every == 0 or last):
                evaluate(state)
                setup.train_model.train()
                started = time.perf_counter() - state.train_seconds  # evaluation time is not training time
            if should_stop():
                checkpoint(state)
                raise Stopped(state.step)
            if checkpoint_every and state.step % checkpoint_every == 0 and not last:
                checkpoint(state)
    finally:
        bar.close()
    return state
