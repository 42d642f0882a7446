"""Forgetting probes: exact zero delta on an unchanged model, perplexity against a direct computation, MC scoring."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from arxiv_ft import forgetting as fg
from tests.conftest import make_tiny_llama

TINY = fg.ProbeConfig(n_windows=2, window_tokens=64, mc_items=7, batch_size=4)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return make_tiny_llama(tokenizer, seed=0)


@pytest.fixture(scope="module")
def text() -> str:
    return fg.ASSETS.joinpath("wikitext2_raw_test.txt").read_text(encoding="utf-8")


def test_unchanged_model_has_exactly_zero_delta(tiny, tokenizer, tmp_path):
    first = fg.run_probes(tiny, tokenizer, TINY)
    calls = []

    def loader():
        calls.append(1)
        return tiny

    cached = [fg.base_probes_cached("tiny", tokenizer, loader, TINY, tmp_path) for _ in range(2)]
    assert len(calls) == 1, "the base model is probed once, then read from the cache"
    for base in (first, *cached):  # fresh, and after a JSON round trip
        delta = fg.forgetting_delta(base, fg.run_probes(tiny, tokenizer, TINY))
        assert delta["ppl_delta"] == 0.0 and delta["nll_delta"] == 0.0 and delta["ppl_ratio"] == 1.0
        assert delta["mc_delta"] == 0.0 and delta["mc_acc_delta"] == 0.0
        assert delta["mc_items_lost"] == delta["mc_items_gained"] == 0
        assert set(delta["mc_task_delta"]) == {
            "arc_easy",
            "arc_challenge",
            "hellaswag",
            "piqa",
            "winogrande",
            "boolq",
            "mmlu",
        }
        assert all(v == 0.0 for v in delta["mc_task_delta"].values())
    assert first["multiple_choice"]["n"] == 7 and first["perplexity"]["tokens"] == 2 * 63


def test_delta_refuses_different_probe_configs(tiny, tokenizer):
    a = fg.run_probes(tiny, tokenizer, TINY)
    b = fg.run_probes(tiny, tokenizer, fg.ProbeConfig(n_windows=1, window_tokens=64, mc_items=2, batch_size=4))
    with pytest.raises(ValueError, match="not comparable"):
        fg.forgetting_delta(a, b)


def test_perplexity_matches_a_direct_forward(tiny, tokenizer, text):
    probe = fg.perplexity(tiny, tokenizer, text, window_tokens=128, n_windows=3, batch_size=2)
    all_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stride = len(all_ids) // 3  # three windows spread over the whole text, not the first 384 tokens
    assert stride > 128
    ids = torch.tensor([all_ids[i * stride : i * stride + 128] for i in range(3)])
    with torch.no_grad():
        loss = tiny(input_ids=ids, labels=ids).loss  # HF shifts the labels and averages over the 3 x 127 targets
    assert probe["tokens"] == 3 * 127 and probe["windows"] == 3
    assert probe["nll"] == pytest.approx(float(loss), rel=1e-5)
    assert probe["ppl"] == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_kl_is_zero_for_fresh_lora_and_positive_for_another_model(tokenizer, text):
    from tests.conftest import apply_lora

    peft_model = apply_lora(make_tiny_llama(tokenizer, seed=0), 4, 8.0, 0.0, ("q_proj", "v_proj"))
    kl = fg.next_token_kl(None, peft_model, tokenizer, text, window_tokens=32, n_windows=2)
    assert kl["positions"] == 2 * 31 and abs(kl["kl"]) < 1e-6  # LoRA's B starts at zero: tuned == base
    other = fg.next_token_kl(make_tiny_llama(tokenizer, seed=1), peft_model, tokenizer, text, 32, 2)
    assert other["kl"] > 1e-3


def test_item_selection_and_templates():
    items = fg.read_items(fg.ASSETS / "probe_mix_800.jsonl")
    chosen = fg.select_items(items, 9)
    assert [i["task"] for i in chosen[:7]] == [
        "arc_easy",
        "arc_challenge",
        "hellaswag",
        "piqa",
        "winogrande",
        "boolq",
        "mmlu",
    ]
    assert chosen[7]["id"] == items[1]["id"]  # the second ARC-Easy item in the file
    by_task = {i["task"]: i for i in chosen}
    wino = fg.mc_requests(by_task["winogrande"])
    assert [c for c, _ in wino] == by_task["winogrande"]["context_options"]
    assert len({cont for _, cont in wino}) == 1  # partial scoring: one shared continuation
    boolq = fg.mc_requests(by_task["boolq"])
    assert boolq[0][0].endswith("?\nAnswer:") and [c for _, c in boolq] == [" no", " yes"]
    arc = fg.mc_requests(by_task["arc_easy"])
    assert arc[0][0].startswith("Question: ") and arc[0][0].endswith("\nAnswer:")


class ConstantLM(torch.nn.Module):
    """Every next token has the same distribution: p(' the') = 1/2, p(' cat') = 1/4, the rest share 1/4."""

    def __init__(self, vocab_size: int, the_id: int, cat_id: int):
        super().__init__()
        probs = torch.full((vocab_size,), 0.25 / (vocab_size - 2))
        probs[the_id], probs[cat_id] = 0.5, 0.25
        self.logp = torch.nn.Parameter(probs.log())

    def forward(self, input_ids, logits_to_keep=0, **_):
        keep = logits_to_keep or input_ids.shape[1]
        return SimpleNamespace(logits=self.logp.expand(input_ids.shape[0], keep, -1))


def test_multiple_choice_hand_checked_and_length_normalised(tokenizer):
    the_id, cat_id = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" the", " cat"))
    assert fg.encode_pair(tokenizer, "Question: q\nAnswer:", " the the the")[1] == [the_id] * 3
    model = ConstantLM(len(tokenizer), the_id, cat_id)
    items = [
        # sum: 3 ln 1/2 < ln 1/4, so acc picks "cat"; mean per token: ln 1/2 > ln 1/4, so acc_norm picks "the the the"
        {"id": "a", "task": "arc_easy", "question": "q", "choices": ["the the the", "cat"], "answer_index": 0},
        {"id": "b", "task": "arc_easy", "question": "q", "choices": ["cat", "the"], "answer_index": 1},
        {"id": "c", "task": "piqa", "question": "q", "choices": ["the", "cat"], "answer_index": 1},
    ]
    mc = fg.multiple_choice(model, tokenizer, items, batch_size=2)
    assert mc["correct"] == [1, 1, 0]
    assert mc["acc_norm"] == mc["accuracy"] == pytest.approx(2 / 3) and mc["acc"] == pytest.approx(1 / 3)
    assert mc["tasks"]["arc_easy"] == {"n": 2, "acc": 0.5, "acc_norm": 1.0}
    assert mc["tasks"]["piqa"] == {"n": 1, "acc": 0.0, "acc_norm": 0.0}


def test_multiple_choice_batched_equals_one_by_one(tiny, tokenizer):
    items = fg.select_items(fg.read_items(fg.ASSETS / "probe_mix_800.jsonl"), 7)
    requests = [fg.encode_pair(tokenizer, c, x) for item in items for c, x in fg.mc_requests(item)]
    batched = fg.score_continuations(tiny, requests, 8, tokenizer.pad_token_id)
    single = fg.score_continuations(tiny, requests, 1, tokenizer.pad_token_id)
    assert [n for _, n in batched] == [n for _, n in single] == [len(x) for _, x in requests]
    for (a, _), (b, _) in zip(batched, single):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-4)  # fp32 summation order differs with padding, nothing else


def test_perplexity_and_kl_from_one_pass_equal_the_separate_probes(tokenizer, text):
    """run_probes computes perplexity and KL from one forward of the tuned model per window; the numbers are those
    of the separate functions."""
    from tests.conftest import apply_lora

    model = apply_lora(make_tiny_llama(tokenizer), 4, 8.0, 0.0, ["q_proj", "v_proj"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # an adapter that changed something
    cfg = fg.ProbeConfig(n_windows=3, window_tokens=48, mc_items=7, batch_size=4, kl=True)
    both = fg.run_probes(model, tokenizer, cfg, progress=False)
    ppl = fg.perplexity(model, tokenizer, text_of(cfg), 48, 3)
    kl = fg.next_token_kl(None, model, tokenizer, text_of(cfg), 48, 3)
    assert both["perplexity"]["window_nll"] == pytest.approx(ppl["window_nll"], rel=1e-6)
    assert both["kl"]["kl"] == pytest.approx(kl["kl"], rel=1e-6) and kl["kl"] > 1e-4


def text_of(cfg) -> str:
    return Path(cfg.text_file).read_text(encoding="utf-8")
