"""The objectives table: every objective's entry is all that differs between them, so a new objective is one entry."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest

from arxiv_ft import objectives
from arxiv_ft.config import parse_config
from arxiv_ft.options import TrainConfig
from tests.conftest import FAST_TRAIN, run_train


def test_every_entry_checks_its_incompatible_options():
    assert list(objectives.OBJECTIVES) == ["answer-tokens", "decision-weighted", "label-softmax", "cls-head"]
    for name in ("decision-weighted", "label-softmax", "cls-head"):
        with pytest.raises(ValueError, match="--packing"):
            TrainConfig(objective=name, packing=True)
    with pytest.raises(ValueError, match="checkpointing"):
        TrainConfig(objective="label-softmax", gradient_checkpointing=True)
    TrainConfig(objective="cls-head", gradient_checkpointing=True)  # the head needs no KV cache of the prompt
    with pytest.raises(ValueError, match="not one of answer-tokens"):
        TrainConfig(objective="no-such-objective")


def test_adding_an_entry_is_the_only_change_needed_to_add_an_objective(tiny_model_dir, tmp_path, monkeypatch):
    """A toy objective (the answer tokens, every example weighing the same) trains end to end once it is in the
    table: options accept it, build/collate/units are its own, the run folder and ledger name it."""
    used = []

    @dataclass(frozen=True)
    class PerExample(objectives.Objective):
        name: str = "per-example"
        help: str = "toy: the answer tokens' loss, each example weighing the same"

        def units(self, cfg, builder):
            used.append("units")
            return lambda example: 1.0

    monkeypatch.setitem(objectives.OBJECTIVES, "per-example", PerExample())
    out = tmp_path / "toy"
    argv = ["--model", tiny_model_dir, "--objective", "per-example", "--output-dir", str(out), "--probes", "false"]
    assert parse_config(TrainConfig, argv, "").objective == "per-example"
    metrics = run_train([*argv, *FAST_TRAIN])
    assert used and all(math.isfinite(x) for x in metrics["train"]["loss_curve"])
    assert json.loads((out / "ledger.json").read_text())["config"]["objective"] == "per-example"
