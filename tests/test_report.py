"""The report from recorded ledgers (fabricated fixture numbers), ledger validation, and the TF-IDF baseline."""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import pytest

from arxiv_ft import baseline, report
from arxiv_ft.ledger import LedgerError, validate_ledger
from tests.conftest import ASSETS, ROOT

LEDGERS = ROOT / "tests" / "fixtures" / "ledgers"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fixture(run_id: str) -> dict:
    return json.loads((LEDGERS / run_id / "ledger.json").read_text())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    summary = report.main([str(LEDGERS), "--out", str(out), "--price-per-device-hour", "2.5"])
    return out, summary


def test_fixture_ledgers_are_valid():
    for path in report.find_ledgers([LEDGERS]):
        assert validate_ledger(json.loads(path.read_text())) == [], path


def test_report_has_every_run_and_method_rows(built):
    out, summary = built
    md = (out / "report.md").read_text()
    for run_id in ("lora-s0", "lora-s1", "lora-s2", "full-s0", "tfidf-svm-n630-s0"):
        assert f"| {run_id} |" in md
    lora = [_fixture(f"lora-s{s}") for s in range(3)]
    acc = [d["task"]["after"]["accuracy"] for d in lora]
    expected = f"{100 * statistics.mean(acc):.1f}% ± {100 * statistics.stdev(acc):.1f}%"
    lora_row = next(line for line in md.splitlines() if line.startswith("| lora · "))
    assert "| 3 (0, 1, 2) |" in lora_row and expected in lora_row
    tfidf_row = next(line for line in md.splitlines() if line.startswith("| tfidf-svm-n630-s0 |"))
    cells = [c.strip() for c in tfidf_row.strip("|").split("|")]
    assert cells[4] == "61.4%" and cells[5] == "—"  # no "before", so no gain
    assert cells[8:11] == ["—"] * 3 and cells[11] == "1.4 s"  # no forgetting probes; a wall time
    assert cells[12:16] == ["—"] * 4 and cells[17] == "—"  # no device cost
    assert "How to read the columns" in md and "FABRICATED" in md

    groups = {g["method"]: g for g in summary["groups"]}
    assert [g["method"] for g in summary["groups"]] == ["lora", "full", "tfidf-svm"]
    assert groups["lora"]["acc_after"]["mean"] == pytest.approx(statistics.mean(acc))
    assert groups["lora"]["acc_after"]["std"] == pytest.approx(statistics.stdev(acc))
    assert groups["full"]["acc_after"]["std"] is None  # one seed: no spread to report
    full = next(r for r in summary["runs"] if r["run_id"] == "full-s0")
    assert full["cost"] == pytest.approx(_fixture("full-s0")["cost"]["device_hours"] * 2.5)
    assert json.loads((out / "summary.json").read_text())["runs"][0]["run_id"] == summary["runs"][0]["run_id"]


def test_plots_are_valid_pngs(built):
    import matplotlib.image

    out, summary = built
    assert summary["plots"] == ["accuracy_vs_cost.png", "gain_vs_forgetting.png", "loss_curves.png"]
    for name in summary["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 100 and image.shape[1] > 100


def test_validation_names_the_problems(tmp_path):
    good = _fixture("lora-s0")
    assert validate_ledger(good) == []
    bad = copy.deepcopy(good)
    bad["method"] = "lorax"
    bad["task"]["after"] = {"accuracy": "high"}
    del bad["forgetting"]["delta"]["mc_delta"]
    problems = validate_ledger(bad)
    assert any("lorax" in p for p in problems) and any("task.after" in p for p in problems)
    assert any("forgetting" in p for p in problems)
    assert validate_ledger({"ledger_version": 1}) and validate_ledger([]) == ["not a JSON object"]

    (tmp_path / "runs" / "broken").mkdir(parents=True)
    (tmp_path / "runs" / "broken" / "ledger.json").write_text(json.dumps(bad))
    with pytest.raises(LedgerError, match="broken"):
        report.build_report([tmp_path / "runs", LEDGERS], tmp_path / "out")
    summary = report.build_report([tmp_path / "runs", LEDGERS], tmp_path / "out", skip_invalid=True)
    assert len(summary["runs"]) == 5 and len(summary["skipped"]) == 1


def test_tfidf_baseline_on_shipped_samples_writes_a_ledger(tmp_path):
    ledger = baseline.main(["--eval-per-class", "20", "--out", str(tmp_path / "tfidf" / "ledger.json")])
    assert ledger["data"]["n_train"] == 630 and ledger["data"]["n_eval"] == 420
    assert ledger["task"]["after"]["accuracy"] > 0.5  # chance is 1/21; tuned, it scores ~0.61 at 630 papers
    assert "C=" in ledger["model"] and "char_wb" in ledger["model"]  # C chosen by CV on the training papers
    assert validate_ledger(json.loads((tmp_path / "tfidf" / "ledger.json").read_text())) == []
    assert (tmp_path / "tfidf" / "metrics.json").is_file()
    assert len(ledger["data"]["labels"]) == len((ASSETS / "cs-labels.txt").read_text().split())


def test_committed_cpu_report_rebuilds_from_its_ledgers(tmp_path, monkeypatch):
    """docs/results/cpu-smollm2/report.md is what the report code makes of the committed ledgers (real runs)."""
    committed = ROOT / "docs" / "results" / "cpu-smollm2"
    monkeypatch.chdir(ROOT)  # the report lists its sources as given: relative, as tools/compare_cpu.sh passes them
    ledgers = sorted(str(p.relative_to(ROOT)) for p in (committed / "ledgers").glob("*.json"))
    assert {Path(p).stem.rsplit("-seed", 1)[0] for p in ledgers} >= {"lora", "qlora", "full"}
    report.main([*ledgers, "--out", str(tmp_path)])
    assert (tmp_path / "report.md").read_text() == (committed / "report.md").read_text()


def test_groups_are_named_by_the_settings_that_differ_and_unequal_paper_counts_are_said():
    """The report named groups `cfg 8be6651d` and compared runs scored on 21 and on 210 papers without a word."""
    from arxiv_ft.report import distinguishing_settings, scores_line

    plain = {"a": "lora · m · n=630", "b": "lora · m · n=630", "c": "full · m · n=630"}
    configs = {"a": {"lr": 0.002, "epochs": 2}, "b": {"lr": 0.0004, "epochs": 2}, "c": {"lr": 0.0002, "epochs": 2}}
    assert distinguishing_settings(configs, plain) == {"a": "lr=0.002", "b": "lr=0.0004"}
    many = {"a": {"w": 1, "x": 1, "y": 1, "z": 1}, "b": {"w": 2, "x": 2, "y": 2, "z": 2}, "c": {}}
    assert distinguishing_settings(many, plain)["a"] == "w=1, x=1, y=1, … (cfg a)"
    assert "scored on different numbers of papers (21, 210)" in scores_line([{"n_eval": 21}, {"n_eval": 210}], "test")
    assert "different numbers" not in scores_line([{"n_eval": 210}, {"n_eval": 210}], "test")


def test_runs_of_two_checkouts_group_together_and_each_seed_has_one_tfidf_row(tmp_path):
    """Real ledgers: QLoRA seeds 10 and 11 ran from two checkouts (other absolute paths) and at two code versions (the
    second records the KL penalty's options, unused by its objective): one group, not two. Full and QLoRA seed 10
    fitted the same TF-IDF on the same papers: one row for seed 10, not one per method."""
    frontiers = ROOT / "docs" / "results" / "frontiers" / "ledgers"
    q10, q11, f10 = (
        json.loads((frontiers / f"{name}.json").read_text())
        for name in ("qlora-lr2e-3-seed10", "qlora-lr2e-3-seed11", "full-lr2e-4-seed10")
    )
    assert q10["config"]["train_file"] != q11["config"]["train_file"] and "kl_beta" in q11["config"]
    assert report.group_key(q10) == report.group_key(q11) != report.group_key(f10)
    for entry in report.IN_RUN_BASELINES:
        assert report.baseline_key(q10, entry) == report.baseline_key(f10, entry)
    ledgers = [str(frontiers / f"{name}.json") for name in ("qlora-lr2e-3-seed10", "qlora-lr2e-3-seed11")]
    summary = report.main([*ledgers, str(frontiers / "full-lr2e-4-seed10.json"), "--out", str(tmp_path)])
    tfidf = [g for g in summary["groups"] if g["method"] == "tfidf-svm"]
    assert len(tfidf) == 2 and all(g["seeds"] == [10, 11] for g in tfidf)
