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
    assert list(objectives.OBJECTIVES) == [
        *("answer-tokens", "decision-weighted", "label-softmax", "cls-head", "kl-regularised")
    ]
    for name in ("decision-weighted", "label-softmax", "cls-head", "kl-regularised"):
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


def test_the_kl_penalty_equals_an_independent_computation(tokenizer, labels, train_records):
    """kl-regularised = the answer-token loss + beta x KL(base || model) over the general windows drawn, times the
    micro-batch's target tokens; the base is the adapter switched off. Computed here with a separate base model."""
    import torch

    from arxiv_ft.data import PromptBuilder, collate_left_padded, tokenize_records
    from arxiv_ft.loss import AnswerLoss, KLRegularisedLoss, general_windows
    from arxiv_ft.prompts import get_template
    from tests.conftest import apply_lora, make_tiny_llama

    base = make_tiny_llama(tokenizer, seed=3)
    model = apply_lora(make_tiny_llama(tokenizer, seed=3), 8, 16.0, 0.0, ["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():  # move the adapter away from the identity, or the KL would be 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    builder = PromptBuilder(tokenizer, get_template("arxiv-v1"), labels, 80, "paper")
    examples, _ = tokenize_records(builder, train_records[:4])
    batch = collate_left_padded(examples, tokenizer.pad_token_id, 0)
    windows = general_windows(tokenizer, TrainConfig().kl_text, 32)[:10]
    loss = KLRegularisedLoss(model, [], windows, beta=0.3, n_windows=3)
    torch.manual_seed(7)
    got = loss(**batch)
    torch.manual_seed(7)
    pick = torch.randint(len(windows), (3,))
    text = windows[pick]
    with torch.no_grad():
        p = torch.softmax(base(input_ids=text).logits.float(), -1)
    log_q = torch.log_softmax(model(input_ids=text).logits.float(), -1)
    kl = (p * (p.log() - log_q)).sum(-1).mean()
    answer = AnswerLoss(model, [])(**batch)
    n_targets = sum(len(e.target_ids) for e in examples)
    assert kl > 1e-4
    torch.testing.assert_close(got, answer + 0.3 * kl * n_targets, atol=1e-5, rtol=1e-5)


def test_kl_regularised_trains_end_to_end_and_forgets_less_at_a_high_beta(tiny_model_dir, tmp_path):
    """The objective through train.py (LoRA): it trains, and at a large beta the probes' KL is smaller than without."""
    kls = {}
    for objective, beta in (("answer-tokens", 0.0), ("kl-regularised", 5.0)):
        out = tmp_path / objective
        argv = ["--model", tiny_model_dir, "--objective", objective, "--kl-beta", str(beta), "--output-dir", str(out)]
        argv += ["--lr", "2e-2", "--probe-windows", "2", "--probe-mc-items", "7", "--checkpoint-every-steps", "0"]
        metrics = run_train([*argv, *FAST_TRAIN])
        assert all(math.isfinite(x) for x in metrics["train"]["loss_curve"])
        kls[objective] = metrics["forgetting"]["delta"]["kl"]
    assert kls["kl-regularised"] < kls["answer-tokens"]


@pytest.mark.parametrize("name", ["general_text_boolq.txt", "general_text_howto.txt"])
def test_no_penalty_text_holds_a_probes_text(name):
    """What the penalty holds still is not what the probes read: no passage of either shipped penalty text contains
    a multiple-choice item's context or a WikiText-2 line, and the WikiHow one comes from no article a probe uses."""
    from arxiv_ft.options import ASSETS

    passages = (ASSETS / name).read_text(encoding="utf-8").split("\n\n")
    assert len(passages) >= 400
    text = "\n".join(passages)
    items = [json.loads(line) for line in (ASSETS / "probe_mix_800.jsonl").open()]
    contexts = [i["question"].split("Passage:", 1)[-1].split("\nQuestion:")[0].strip()[:120] for i in items]
    assert not [c for c in contexts if len(c) > 40 and c in text]
    wiki = [line.strip() for line in (ASSETS / "wikitext2_raw_test.txt").open() if len(line.strip()) > 200]
    assert not [line for line in wiki[::50] if line[:150] in text]
    titles = {i["question"].split(". ", 1)[0].split(": ", 1)[-1] for i in items if i["task"] == "hellaswag"}
    assert not [t for t in titles if t.startswith("How to ") and f"{t}." in text]
