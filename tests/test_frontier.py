"""The frontier (arxiv_ft/frontier.py): points per (method, rate, α) over seeds, the Pareto front, forgetting at
matched accuracy read along each method's front, and the verdict's wording."""

from __future__ import annotations

import pytest

from arxiv_ft import frontier


def row(method, lr, acc, ppl, seed=0, alpha=None, ci=2.0, wall=100.0):
    config = {"lr": lr} | ({"wise_alpha": alpha} if alpha is not None else {})
    return {
        "method": method,
        "seed": seed,
        "config": config,
        "acc_after": acc,
        "ppl_change_pct": ppl,
        "kl": ppl / 100,
        "mc_delta": -ppl / 1000,
        "forgetting_ci95": {"ppl_change_pct": [ppl - ci, ppl + ci], "kl": [ppl / 100 - 0.01, ppl / 100 + 0.01]},
        "wall_seconds": wall,
        "device_count": 1,
    }


@pytest.fixture
def pts():
    rows = [
        row("lora", 2e-3, 0.60, 50.0, seed=0),
        row("lora", 2e-3, 0.58, 54.0, seed=1),  # two seeds: one point, mean 59%, +52%
        row("lora", 2e-3, 0.40, 10.0, alpha=0.5),
        row("lora", 4e-4, 0.30, 2.0),
        row("full", 2e-4, 0.59, 8.0, ci=1.0, wall=300.0),
        row("full", 2e-4, 0.45, 3.0, alpha=0.5, ci=1.0, wall=300.0),
        {"method": "tfidf-svm", "seed": 0, "config": {}, "acc_after": 0.6, "kl": None, "ppl_change_pct": None},
    ]
    return frontier.points(rows)


def test_points_average_seeds_and_label_rates_and_alphas(pts):
    lora = {p["label"]: p for p in pts if p["method"] == "lora"}
    assert set(lora) == {"lr 0.002", "lr 0.002, α 0.5", "lr 0.0004"}
    assert lora["lr 0.002"]["accuracy"] == pytest.approx(0.59) and lora["lr 0.002"]["ppl_change_pct"] == 52.0
    assert lora["lr 0.002"]["ppl_change_pct_ci"] == [48.0, 56.0]  # the envelope of the two seeds' intervals
    assert lora["lr 0.002"]["seeds"] == [0, 1] and len(pts) == 5  # the baseline is no point


def test_the_front_and_matched_accuracy(pts):
    front = frontier.pareto(pts, "ppl_change_pct")
    assert [(p["method"], p["label"]) for p in front] == [
        ("lora", "lr 0.0004"),
        ("full", "lr 0.0002, α 0.5"),
        ("full", "lr 0.0002"),
    ]
    lora = [p for p in pts if p["method"] == "lora"]
    got = frontier.at_accuracy(lora, 0.50, "ppl_change_pct")  # between 40% (+10) and 59% (+52): 10/19 of the way
    assert got["value"] == pytest.approx(10 + (0.10 / 0.19) * 42) and got["ci"][0] < got["value"] < got["ci"][1]
    assert frontier.at_accuracy(lora, 0.62, "ppl_change_pct") is None  # beyond what LoRA reached
    assert frontier.targets(pts) == [0.45, 0.5, 0.55]
    table, verdicts = frontier.matched_table(pts, [0.50])
    assert "| 50% |" in table and "full forgets least, and its interval is clear of lora's" in verdicts[0]


def test_overlapping_intervals_are_no_verdict():
    rows = [row("lora", 1e-3, 0.4, 10.0, ci=8), row("lora", 2e-3, 0.6, 20.0, ci=8)]
    rows += [row("full", 1e-4, 0.4, 12.0, ci=8), row("full", 2e-4, 0.6, 22.0, ci=8)]
    _, verdicts = frontier.matched_table(frontier.points(rows), [0.5])
    assert verdicts == [
        "At 50% accuracy, lora forgets least, but its interval overlaps full's: no method dominates here."
    ]


def test_the_verdict_names_only_the_methods_whose_intervals_overlap():
    rows = [row("full", 1e-4, 0.4, 1.0, ci=1), row("full", 2e-4, 0.6, 3.0, ci=1)]
    rows += [row("lora", 1e-3, 0.4, 1.5, ci=1), row("lora", 2e-3, 0.6, 3.5, ci=1)]  # overlaps full's
    rows += [row("qlora", 1e-3, 0.4, 20.0, ci=1), row("qlora", 2e-3, 0.6, 30.0, ci=1)]  # clear of it
    _, verdicts = frontier.matched_table(frontier.points(rows), [0.5])
    assert verdicts == [
        "At 50% accuracy, full forgets least, but its interval overlaps lora's: no method dominates here"
        " (it is clear of qlora's)."
    ]


def test_the_plot_is_written(pts, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    assert (tmp_path / "f.png").name in frontier.plot(pts, tmp_path / "f.png") and (tmp_path / "f.png").stat().st_size


def test_the_base_starts_every_unquantised_methods_curve():
    rows = [row("lora", 2e-3, 0.05, 0.0, alpha=0.0), row("lora", 2e-3, 0.6, 70.0)]
    rows += [row("full", 2e-4, 0.6, 17.0), row("qlora", 2e-3, 0.58, 36.0)]
    pts = frontier.points(rows)
    full = sorted((p for p in pts if p["method"] == "full"), key=lambda p: p["accuracy"])
    assert [p["label"] for p in full] == ["base (α 0)", "lr 0.0002"] and full[0]["ppl_change_pct"] == 0.0
    assert [p["label"] for p in pts if p["method"] == "qlora"] == ["lr 0.002"]  # its base is the 4-bit copy


def test_a_forgetting_penalty_is_a_curve_of_its_own():
    """A kl-regularised run at the default's rate and seed is not averaged into the plain run's point: the report must
    be able to show whether the penalty moves the front."""
    rows = [row("lora", 2e-3, 0.05, 0.0, alpha=0.0), row("lora", 2e-3, 0.60, 50.0)]
    penalised = row("lora", 2e-3, 0.58, 20.0)
    penalised["config"] |= {"objective": "kl-regularised", "kl_beta": 0.5}
    pts = frontier.points(rows + [penalised])
    assert {p["method"] for p in pts} == {"lora", "lora + KL β 0.5"}
    kl = sorted((p for p in pts if p["method"] == "lora + KL β 0.5"), key=lambda p: p["accuracy"])
    assert [p["label"] for p in kl] == ["base (α 0)", "lr 0.002"] and kl[1]["ppl_change_pct"] == 20.0
    plain = [p for p in pts if p["method"] == "lora" and p["alpha"] == 1.0]
    assert len(plain) == 1 and plain[0]["ppl_change_pct"] == 50.0 and plain[0]["seeds"] == [0]


def test_a_penalty_on_another_text_is_another_curve():
    """The same β on the WikiHow text is not averaged with the Wikipedia one (the default, named by any checkout's
    path): which text holds the model still is what the pair of curves compares."""
    wiki, howto = row("lora", 2e-3, 0.60, 1.0), row("lora", 2e-3, 0.59, 9.0)
    wiki["config"] |= {"objective": "kl-regularised", "kl_beta": 2.0, "kl_text": "/elsewhere/general_text_boolq.txt"}
    howto["config"] |= {"objective": "kl-regularised", "kl_beta": 2.0, "kl_text": "assets/general_text_howto.txt"}
    pts = frontier.points([wiki, howto])
    assert {p["method"]: p["ppl_change_pct"] for p in pts} == {"lora + KL β 2": 1.0, "lora + KL β 2 on howto": 9.0}
