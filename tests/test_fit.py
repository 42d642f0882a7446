"""The learning-rate function and the loop (arxiv_ft/fit.py), pinned directly: warm-up, decay shapes and floor;
`train_step`'s loss normalisation and bookkeeping; `fit`'s checkpoint, evaluation and stop hooks."""

from __future__ import annotations

import math

import pytest
import torch

from arxiv_ft.fit import SCHEDULES, Stopped, TrainState, fit, lr_factor, lr_schedule, train_step
from tests.conftest import FAST_TRAIN


def test_warm_up_starts_above_zero_and_reaches_the_peak():
    assert [lr_factor(s, "cosine", 4, 20) for s in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert lr_factor(0, "linear", 0, 20) == 1.0  # no warm-up: the peak at once


@pytest.mark.parametrize("shape", SCHEDULES)
def test_each_shape_decays_to_its_floor_and_never_below(shape):
    total, warmup, floor = 50, 5, 0.1
    factors = [lr_factor(s, shape, warmup, total, floor) for s in range(total)]
    assert all(floor - 1e-12 <= f <= 1.0 for f in factors)
    after = factors[warmup:]
    assert all(a >= b - 1e-12 for a, b in zip(after, after[1:]))  # never rises again after warm-up
    if shape == "constant":
        assert set(after) == {1.0}
    else:
        progress = (total - 1 - warmup) / (total - warmup)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if shape == "cosine" else 1 - progress
        assert factors[-1] == pytest.approx(floor + (1 - floor) * decay) and factors[-1] < 0.2
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(10, "step", warmup, total)


def test_a_schedule_positioned_at_a_step_equals_one_stepped_there():
    def fresh():
        return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)

    opt_a, opt_b = fresh(), fresh()
    stepped = lr_schedule(opt_a, "cosine", 3, 12, 0.1)
    for _ in range(7):
        opt_a.step()
        stepped.step()
    positioned = lr_schedule(opt_b, "cosine", 3, 12, 0.1, step=7)
    assert stepped.get_last_lr() == pytest.approx(positioned.get_last_lr())
    assert positioned.get_last_lr()[0] == pytest.approx(1e-3 * lr_factor(7, "cosine", 3, 12, 0.1))


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """The project's own phases build a tiny LoRA set-up, exactly as train.py does."""
    from arxiv_ft import phases
    from arxiv_ft.config import parse_config
    from arxiv_ft.options import TrainConfig

    out = tmp_path_factory.mktemp("fit") / "run"
    argv = ["--model", tiny_model_dir, "--output-dir", str(out), "--probes", "false", *FAST_TRAIN]
    cfg = parse_config(TrainConfig, [*argv, "--epochs", "2", "--lr", "1e-2"], "")
    launch = phases.start(cfg)
    task = phases.load_task(cfg, launch)
    trainable = phases.build(cfg, launch, task)
    return phases.Run(cfg, launch, task, trainable, phases.setup_fit(cfg, launch, task, trainable))


def test_train_step_returns_the_mean_loss_over_the_steps_target_tokens(run):
    setup = run.setup
    examples = [e for micro in setup.plan.step_batches(0) for e in micro]
    batch = setup.collate(examples)
    with torch.no_grad():
        setup.train_model.eval()  # no dropout: the same loss train_step sees with its seeded dropout off
        want = float(setup.train_model(**batch)) / sum(len(e.target_ids) for e in examples)
    before = [p.detach().clone() for p in setup.train_model.parameters() if p.requires_grad]
    setup.train_model.eval()
    result = train_step(setup, 0)
    assert result["loss"] == pytest.approx(want, rel=1e-5)
    warmup = math.ceil(run.cfg.warmup_ratio * setup.plan.steps)
    assert warmup >= 1 and result["lr"] == pytest.approx(run.cfg.lr * lr_factor(0, "cosine", warmup, setup.plan.steps))
    assert result["tokens"] == sum(len(e.input_ids) for e in examples)
    assert result["targets"] == sum(len(e.target_ids) for e in examples)
    after = [p for p in setup.train_model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))  # the optimizer stepped


def test_fit_calls_its_hooks_and_stops_after_a_checkpoint(run):
    steps = run.setup.plan.steps
    calls = []
    state = fit(
        run.setup,
        TrainState(step=1),
        log=lambda m: None,
        log_every=1,
        checkpoint_every=2,
        checkpoint=lambda s: calls.append(("checkpoint", s.step)),
        eval_every=3,
        evaluate=lambda s: calls.append(("evaluate", s.step)),
        progress=False,
    )
    assert state.step == steps and len(state.loss_curve) == steps - 1
    assert [c for c in calls if c[0] == "checkpoint"] == [("checkpoint", s) for s in range(2, steps, 2)]
    assert [c for c in calls if c[0] == "evaluate"] == [("evaluate", s) for s in range(3, steps + 1, 3)] + (
        [("evaluate", steps)] if steps % 3 else []
    )
    saved = []
    with pytest.raises(Stopped) as stop:
        fit(
            run.setup,
            TrainState(step=0),
            log=lambda m: None,
            log_every=1,
            checkpoint_every=0,
            checkpoint=lambda s: saved.append(s.step),
            should_stop=lambda: True,
            progress=False,
        )
    assert stop.value.step == 1 and saved == [1]  # the step in progress finishes, is saved, then the run stops
