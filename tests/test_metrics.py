"""The task metrics: the `evaluate` module equals scikit-learn and a plain ECE loop, and it loads offline by path."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from arxiv_ft.metrics import METRIC_SCRIPT, classification_metrics, format_report, load_metric

ROOT = Path(__file__).resolve().parent.parent
OFFLINE = {"HF_EVALUATE_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
LABELS = [f"cs.{c}" for c in "AI CL CR CV DB DC DS GT HC IR IT LG LO NE NI PL RO SE SI SY CE".split()]  # 21, as shipped


def sklearn_metrics(y_true: list[str], y_pred: list[str | None], labels: list[str]) -> dict:
    """The same figures straight from scikit-learn, None predictions as the `<none>` class."""
    pred = ["<none>" if p is None else p for p in y_pred]
    # Macro-F1 over the labels that occur: scikit-learn's default, except that `<none>` is no class to average.
    present = [label for label in labels if label in set(y_true) | set(pred)]
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, pred, labels=labels, average=None, zero_division=0
    )
    columns = labels + (["<none>"] if "<none>" in pred else [])
    return {
        "accuracy": accuracy_score(y_true, pred),
        "macro_f1": f1_score(y_true, pred, labels=present, average="macro", zero_division=0),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": support,
        "columns": columns,
        "confusion": confusion_matrix(y_true, pred, labels=columns)[: len(labels)],
    }


def ece_reference(probs, true: list[int], n_bins: int = 15) -> float:
    """Expected calibration error as Guo et al. write it: a loop over (lo, hi] bins of top-1 confidence."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == np.asarray(true)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return ece


def random_case(kind: str, seed: int) -> tuple[list[str], list[str | None]]:
    """True and predicted labels: every class, a few classes (others absent or only predicted), or unparsed ones."""
    rng = np.random.default_rng(seed)
    n = 300
    true_pool, pred_pool = {"all": (21, 21), "missing": (5, 8), "unparsed": (21, 21)}[kind]
    y_true = [LABELS[i] for i in rng.integers(0, true_pool, n)]
    y_pred = [t if rng.random() < 0.6 else LABELS[rng.integers(0, pred_pool)] for t in y_true]
    if kind == "unparsed":
        y_pred = [None if rng.random() < 0.2 else p for p in y_pred]
    return y_true, y_pred


def assert_matches_sklearn(y_true: list[str], y_pred: list[str | None], labels: list[str]) -> dict:
    got = classification_metrics(y_true, y_pred, labels)
    want = sklearn_metrics(y_true, y_pred, labels)
    assert got["n"] == len(y_true)
    assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-12)
    assert got["macro_f1"] == pytest.approx(want["macro_f1"], abs=1e-12)
    if None not in y_pred:  # then it is scikit-learn's default exactly: no label set passed
        assert got["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0), abs=1e-12)
    assert list(got["per_class"]) == labels
    for key in ("precision", "recall", "f1"):
        np.testing.assert_allclose([got["per_class"][x][key] for x in labels], want[key], atol=1e-12)
    assert [got["per_class"][x]["support"] for x in labels] == want["support"].tolist()
    assert got["unparsed"] == sum(p is None for p in y_pred)
    assert got["confusion"]["rows_true"] == labels
    assert got["confusion"]["columns_predicted"] == want["columns"]
    assert got["confusion"]["counts"] == want["confusion"].tolist()
    return got


def test_two_classes_predicted_perfectly_score_macro_f1_one():
    """The bug: labels absent from the data were averaged in as F1 0, so this scored 2/21 = 0.095."""
    y = ["cs.CL", "cs.CV", "cs.CL", "cs.CV"]
    m = classification_metrics(y, list(y), LABELS)
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0
    assert list(m["per_class"]) == LABELS  # every label is still reported, absent ones with support 0
    assert m["per_class"]["cs.AI"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_class"]["cs.CL"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["all", "missing", "unparsed"])
def test_matches_scikit_learn_on_random_inputs(kind, seed):
    assert_matches_sklearn(*random_case(kind, seed), LABELS)


def test_labels_predicted_but_never_true_count_in_macro_f1():
    m = assert_matches_sklearn(["cs.AI", "cs.AI", "cs.CL"], ["cs.AI", "cs.LG", "cs.CL"], LABELS)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0 + 1) / 3)  # cs.AI, cs.LG (F1 0), cs.CL


@pytest.mark.parametrize("pred", ["cs.AI", "cs.CL", None], ids=["right", "wrong", "unparsed"])
def test_a_single_paper(pred):
    m = assert_matches_sklearn(["cs.AI"], [pred], LABELS)
    assert m["accuracy"] == m["macro_f1"] == (1.0 if pred == "cs.AI" else 0.0)


def test_unparsed_predictions_are_wrong_and_get_their_own_column():
    m = classification_metrics(["cs.AI", "cs.AI", "cs.CL"], [None, "cs.AI", "cs.CL"], ["cs.AI", "cs.CL"])
    assert m["accuracy"] == pytest.approx(2 / 3) and m["unparsed"] == 1
    assert m["confusion"] == {
        "rows_true": ["cs.AI", "cs.CL"],
        "columns_predicted": ["cs.AI", "cs.CL", "<none>"],
        "counts": [[1, 0, 1], [0, 1, 0]],
    }
    assert m["per_class"]["cs.AI"]["recall"] == 0.5 and m["per_class"]["cs.AI"]["precision"] == 1.0
    clean = classification_metrics(["cs.AI"], ["cs.AI"], ["cs.AI", "cs.CL"])
    assert clean["unparsed"] == 0 and clean["confusion"]["columns_predicted"] == ["cs.AI", "cs.CL"]


def test_empty_input_gives_every_key_and_nan_rates():
    m = classification_metrics([], [], LABELS)
    assert m["n"] == 0 and m["unparsed"] == 0
    assert math.isnan(m["accuracy"]) and math.isnan(m["macro_f1"])
    assert all(c["support"] == 0 for c in m["per_class"].values()) and len(m["per_class"]) == 21
    assert m["confusion"]["counts"] == [[0] * 21] * 21
    assert m["ece"] is None
    assert math.isnan(classification_metrics([], [], LABELS, probs=[])["ece"])


def test_result_keeps_the_keys_callers_and_saved_json_rely_on():
    y_true, y_pred = random_case("unparsed", 3)
    m = classification_metrics(y_true, y_pred, LABELS)
    assert set(m) == {
        "n",
        "accuracy",
        "macro_f1",
        "unparsed",
        "per_class",
        "confusion",
        "ece",
        "mean_confidence",
        "brier",
    }
    assert set(m["per_class"]["cs.AI"]) == {"precision", "recall", "f1", "support"}
    assert set(m["confusion"]) == {"rows_true", "columns_predicted", "counts"}
    assert m["ece"] is None and m["mean_confidence"] is None and m["brier"] is None
    assert json.loads(json.dumps(m)) == m


def test_bad_inputs_are_refused_and_do_not_leak_into_the_next_call():
    with pytest.raises(ValueError, match="2 true labels but 1 predictions"):
        classification_metrics(["cs.AI", "cs.CL"], ["cs.AI"], LABELS)
    with pytest.raises(ValueError, match="outside the label set"):
        classification_metrics(["cs.AI", "math.AG"], ["cs.AI", "cs.AI"], LABELS)
    with pytest.raises(ValueError, match="probability rows"):
        classification_metrics(["cs.AI"], ["cs.AI"], ["cs.AI", "cs.CL"], probs=[[1.0, 0.0]] * 2)
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(["cs.AI"], ["cs.AI"], ["cs.AI", "cs.CL"], probs=[[1.0]])
    with pytest.raises(ValueError, match="sum to 1"):  # log-probabilities passed by mistake
        classification_metrics(["cs.AI"], ["cs.AI"], ["cs.AI", "cs.CL"], probs=[[-0.1, -2.4]])
    m = classification_metrics(["cs.CL"], ["cs.CL"], ["cs.AI", "cs.CL"])  # the cached module is reused
    assert m["n"] == 1 and m["accuracy"] == 1.0


def test_ece_on_a_hand_computed_example():
    labels = ["a", "b", "c"]
    y_true = ["a", "b", "b", "c"]
    probs = [
        [0.90, 0.05, 0.05],  # confidence 0.90 (bin 13: 13/15..14/15), right
        [0.90, 0.05, 0.05],  # confidence 0.90 (bin 13), wrong: the bin has accuracy 0.5, confidence 0.9
        [0.20, 0.50, 0.30],  # confidence 0.50 (bin 7: 7/15..8/15), right
        [0.45, 0.30, 0.25],  # confidence 0.45 (bin 6: 6/15..7/15), wrong
    ]
    m = classification_metrics(y_true, ["a", "a", "b", "a"], labels, probs=probs)
    # 2/4 x |0.5 - 0.9| + 1/4 x |1 - 0.5| + 1/4 x |0 - 0.45|; one bin would have given |0.5 - 0.6875| = 0.1875
    assert m["ece"] == pytest.approx(0.2 + 0.125 + 0.1125)
    assert m["mean_confidence"] == pytest.approx(0.6875)
    assert m["brier"] == pytest.approx((0.015 + 1.715 + 0.38 + 0.855) / 4)
    assert "ECE 0.4375  mean confidence 0.6875  Brier 0.7412" in format_report(m, labels)


def test_confident_and_right_is_perfectly_calibrated():
    m = classification_metrics(["a", "b"], ["a", "b"], ["a", "b"], probs=[[1.0, 0.0], [0.0, 1.0]])
    assert m["ece"] == 0.0 and m["brier"] == 0.0 and m["mean_confidence"] == 1.0


@pytest.mark.parametrize("concentration", [0.05, 0.5, 5.0])
def test_calibration_matches_a_straightforward_numpy_loop(concentration):
    rng = np.random.default_rng(int(concentration * 100))
    probs = rng.dirichlet([concentration] * len(LABELS), size=400)
    true = rng.integers(0, len(LABELS), 400)
    true[:200] = probs[:200].argmax(axis=1)  # half right, so every bin has both outcomes
    y_true = [LABELS[i] for i in true]
    m = classification_metrics(y_true, [LABELS[i] for i in probs.argmax(axis=1)], LABELS, probs=probs.tolist())
    assert m["ece"] == pytest.approx(ece_reference(probs, true), abs=1e-12)
    assert m["mean_confidence"] == pytest.approx(probs.max(axis=1).mean(), abs=1e-12)
    order = np.argsort(LABELS)  # scikit-learn wants the columns in sorted label order; the label set is not sorted
    want_brier = brier_score_loss(y_true, probs[:, order], labels=sorted(LABELS), scale_by_half=False)
    assert m["brier"] == pytest.approx(want_brier, abs=1e-12)


def test_confidences_on_bin_edges_fall_in_the_lower_bin():
    edges = np.linspace(0.0, 1.0, 16)
    probs = [[e, 1.0 - e] for e in edges[8:]]  # top-1 confidence exactly on each edge from 8/15 to 1
    true = [i % 2 for i in range(len(probs))]
    m = classification_metrics(["ab"[t] for t in true], ["a"] * len(probs), ["a", "b"], probs=probs)
    assert m["ece"] == pytest.approx(ece_reference(probs, true), abs=1e-12)


def test_metric_is_loaded_once_per_process():
    assert load_metric() is load_metric()
    assert Path(METRIC_SCRIPT).is_file() and METRIC_SCRIPT.parent.name == "evaluation"


def test_loads_offline_by_path(monkeypatch):
    import evaluate

    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)  # what HF_EVALUATE_OFFLINE=1 sets at import
    with pytest.raises(Exception, match="(?i)offline|find"):
        evaluate.load("accuracy")  # hub metrics are out of reach...
    metric = evaluate.load(str(METRIC_SCRIPT), keep_in_memory=True)  # ...the packaged script is not
    m = metric.compute(predictions=["cs.AI", "<none>"], references=["cs.AI", "cs.CL"], labels=["cs.AI", "cs.CL"])
    assert m["accuracy"] == 0.5 and m["unparsed"] == 1


LOAD_OFFLINE = """
import json
import evaluate
from arxiv_ft import metrics
try:
    evaluate.load("accuracy")
    hub = "reachable"
except Exception:
    hub = "unreachable"
m = metrics.classification_metrics(["cs.AI", "cs.CL"], ["cs.AI", None], ["cs.AI", "cs.CL"], probs=[[0.7, 0.3]] * 2)
print(json.dumps({"script": str(metrics.METRIC_SCRIPT), "hub": hub, "metrics": m}))
"""


def test_installed_wheel_ships_the_metric_script_and_loads_it_offline(tmp_path):
    """A non-editable install: the script must be package data of the wheel, found beside the installed package."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "arxiv_ft", src / "arxiv_ft", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"), str(src)]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("arxiv_ft-*.whl")
    assert "arxiv_ft/evaluation/arxiv_classification.py" in zipfile.ZipFile(wheel).namelist()
    site = tmp_path / "site"
    install = [*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    # A fresh interpreter, away from the working tree, with the hub unreachable and an empty evaluate modules cache.
    env = {**os.environ, **OFFLINE, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": str(site)}
    res = subprocess.run(
        [sys.executable, "-c", LOAD_OFFLINE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.splitlines()[-1])
    assert Path(out["script"]).is_relative_to(site) and out["hub"] == "unreachable"
    assert out["metrics"]["accuracy"] == 0.5 and out["metrics"]["unparsed"] == 1
    assert out["metrics"]["ece"] == pytest.approx(0.2)  # one bin: confidence 0.7, accuracy of the arg-max 0.5
