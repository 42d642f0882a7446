"""The statistics behind every reported difference: Holm's correction against a hand computation, the hierarchical
bootstrap against a naive loop and against the paper-only bootstrap it generalises, and the forgetting intervals of an
unchanged model (exactly zero)."""

from __future__ import annotations

import numpy as np
import pytest

from arxiv_ft import stats


def test_holm_matches_a_hand_computation():
    # Sorted p: 0.01 (x4), 0.02 (x3), 0.03 (x2), 0.5 (x1); monotone step-down.
    assert stats.holm([0.03, 0.01, 0.5, 0.02]) == pytest.approx([0.06, 0.04, 0.5, 0.06])
    assert stats.holm([0.04, 0.03]) == pytest.approx([0.06, 0.06])  # never below an earlier step
    assert stats.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert stats.holm([]) == []


def test_hierarchical_bootstrap_equals_a_naive_loop_with_the_same_draws():
    rng = np.random.default_rng(1)
    a = (rng.random((3, 50)) < 0.6).astype(float)
    b = (rng.random((2, 50)) < 0.5).astype(float)
    got = stats.hierarchical_bootstrap(a, b, samples=200, seed=7)
    draws = np.random.default_rng(7)
    rows_a = draws.integers(0, 3, size=(200, 3))
    rows_b = draws.integers(0, 2, size=(200, 2))
    papers = draws.integers(0, 50, size=(200, 50))
    boot = []
    for k in range(200):
        total = 0.0
        for p in papers[k]:
            total += np.mean([a[r, p] for r in rows_a[k]]) - np.mean([b[r, p] for r in rows_b[k]])
        boot.append(total / 50)
    assert got["ci95"] == pytest.approx(tuple(np.percentile(boot, [2.5, 97.5])))
    assert got["difference"] == pytest.approx(a.mean() - b.mean())
    assert got["seeds"] == [3, 2] and got["papers"] == 50 and got["seeds_counted"]


def test_seed_variance_widens_the_interval_that_papers_alone_give():
    rng = np.random.default_rng(0)
    truth = (rng.random(400) < 0.6).astype(float)
    same_seeds = np.stack([truth] * 3)  # three seeds that agree on every paper: no seed variance
    shifted = np.stack([(rng.random(400) < level).astype(float) for level in (0.4, 0.6, 0.8)])  # seeds disagree
    base = (rng.random((3, 400)) < 0.5).astype(float)
    narrow = stats.hierarchical_bootstrap(same_seeds, base[:1].repeat(3, 0), seed=0)
    wide = stats.hierarchical_bootstrap(shifted, base[:1].repeat(3, 0), seed=0)
    assert wide["ci95"][1] - wide["ci95"][0] > 1.5 * (narrow["ci95"][1] - narrow["ci95"][0])
    assert narrow["mde"] == pytest.approx(2.8016 * narrow["se"], rel=1e-3)
    with pytest.raises(ValueError, match="same papers"):
        stats.hierarchical_bootstrap(np.zeros((2, 5)), np.zeros((2, 6)))


def test_one_seed_is_never_called_a_difference(tmp_path):
    from arxiv_ft.report import compare_groups

    rows, groups = [], []
    for name, acc, seeds in (("a", 0.9, [0]), ("b", 0.1, [0, 1])):
        for _ in seeds:
            rows.append({"group": name, "outcomes": {f"p{i}": int(i < acc * 100) for i in range(100)}})
        groups.append({"group": name, "label": name, "acc_after": {"std": None if len(seeds) == 1 else 0.0}})
    (only,) = compare_groups(rows, groups, samples=200)
    assert only["p_value"] < 0.01 and not only["seeds_counted"] and not only["significant"]


def test_forgetting_of_an_unchanged_model_is_zero_with_a_zero_interval(tokenizer):
    from arxiv_ft import forgetting as fg
    from tests.conftest import make_tiny_llama

    cfg = fg.ProbeConfig(n_windows=4, window_tokens=32, mc_items=7, batch_size=4, kl=False)
    model = make_tiny_llama(tokenizer)
    base, tuned = fg.run_probes(model, tokenizer, cfg), fg.run_probes(model, tokenizer, cfg)
    delta = fg.forgetting_delta(base, tuned)
    assert delta["ppl_change_pct"] == 0 and delta["mc_delta"] == 0
    assert delta["ci95"]["ppl_change_pct"] == (0.0, 0.0) and delta["ci95"]["mc_delta"] == (0.0, 0.0)
    other = fg.run_probes(make_tiny_llama(tokenizer, seed=1), tokenizer, cfg)
    moved = fg.forgetting_delta(base, other)["ci95"]["ppl_change_pct"]
    assert moved[0] < moved[1]  # another model: a real interval around its change


def _curve_ledger(base: dict, per_class: int, seed: int, llm: list[int], tfidf: list[int], ids: list[str]) -> dict:
    import copy

    ledger = copy.deepcopy(base)
    ledger["seed"], ledger["config"]["train_per_class"] = seed, per_class
    for entry in ("after", "tfidf_tuned", "tfidf_tuned_full_text", "tfidf", "tfidf_full_text"):
        correct = llm if entry == "after" else tfidf
        ledger["test"][entry] = {"accuracy": float(np.mean(correct)), "macro_f1": 0.0, "n": len(ids)}
        ledger["test"][entry] |= {"ids": list(ids), "correct": list(correct)}
    return ledger


def test_learning_curves_pair_the_llm_and_tfidf_by_paper_and_count_seeds(tmp_path):
    """tools/learning_curves.py: each size's LLM-minus-TF-IDF difference is taken paper by paper (ids matched, not
    positions), a size with one seed is never called a difference, and Holm covers every comparison of the curves."""
    import json
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tools"))
    import learning_curves

    base = json.loads((root / "docs/results/test-split/ledgers/lora-seed10.json").read_text())
    ids = [f"p{i}" for i in range(200)]
    rng = np.random.default_rng(0)
    half, quarter = [int(i < 100) for i in range(200)], [int(i < 50) for i in range(200)]
    # (papers a class, seed, the LLM's outcomes, TF-IDF's): at 30 a class both are right on the same papers.
    runs = [(30, 10, half, half), (30, 11, half, half), (100, 10, [1] * 200, quarter), (100, 11, [1] * 200, quarter)]
    paths = []
    for per_class, seed, llm, tfidf in runs + [(10, 10, [1] * 200, [0] * 200)]:
        order = rng.permutation(200)  # each ledger lists the papers in its own order
        ledger = _curve_ledger(base, per_class, seed, [llm[i] for i in order], [tfidf[i] for i in order],
                               [ids[i] for i in order])  # fmt: skip
        paths.append(tmp_path / f"n{per_class}-s{seed}.json")
        paths[-1].write_text(json.dumps(ledger))

    rows = learning_curves.collect(paths)
    comparisons = learning_curves.compare(rows, samples=500)
    by = {(c["per_class"], c["b"].split(",")[1].strip()): c for c in comparisons}
    # Paired by id, identical outcomes differ by exactly 0 in every resample; pairing by list position would not.
    same = by[(30, "the text the LLM reads")]
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0] and not same["significant"]
    better = by[(100, "the text the LLM reads")]
    assert better["difference"] == pytest.approx(0.75) and better["seeds"] == [2, 2] and better["significant"]
    one_seed = by[(10, "the text the LLM reads")]
    assert one_seed["difference"] == pytest.approx(1.0) and not one_seed["seeds_counted"]
    assert not one_seed["significant"]
    assert len(comparisons) == 6 and all(c["p_holm"] >= c["p_value"] for c in comparisons)
    assert all(r["eval_file"].endswith("cs-validation-sample.jsonl") for r in rows)
