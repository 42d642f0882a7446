"""The test split is what it claims to be: disjoint from every paper anything learned from or was chosen on, and no
committed result was produced with it as its selection set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from arxiv_ft.records import read_records
from tests.conftest import ASSETS, ROOT

TEST_FILES = ("cs-test-sample.jsonl", "cs-test.jsonl.gz")
# Tasks with a test split of their own (the every-category task's splits were drawn from the dump independently of the
# cs split: 124 of its validation papers are cs test papers, which is no selection on the cs task's test).
TASK_TEST_FILES = {"all-arxiv/test.jsonl.gz": ROOT / "data" / "all-arxiv" / "test.jsonl.gz"}


@pytest.fixture(scope="module")
def test_ids() -> set[str]:
    ids = {r.id for r in read_records(ASSETS / "cs-test-sample.jsonl")}
    assert ids == {r.id for r in read_records(ROOT / "data" / "cs-test.jsonl.gz")}
    return ids


def test_test_papers_are_disjoint_from_training_and_validation(test_ids):
    assert len(test_ids) == 630
    for name in ("cs-train-sample.jsonl", "cs-validation-sample.jsonl"):
        assert not test_ids & {r.id for r in read_records(ASSETS / name)}, name
    for name in ("cs-train.jsonl.gz", "cs-validation.jsonl.gz"):
        assert not test_ids & {r.id for r in read_records(ROOT / "data" / name)}, name


def _names_test_file(path) -> bool:
    return bool(path) and (Path(path).name in TEST_FILES or str(path).endswith(tuple(TASK_TEST_FILES)))


def _task_test_ids(ledger: dict, test_ids: set[str]) -> set[str]:
    """The test papers of the ledger's own task: the cs task's unless its test file is another task's test split."""
    test_file = str((ledger.get("data") or {}).get("test_file") or "")
    for tail, path in TASK_TEST_FILES.items():
        if test_file.endswith(tail):
            return {r.id for r in read_records(path)}
    return test_ids


def _selection_problems(result: dict, test_ids: set[str]) -> list[str]:
    """How a committed result file used the test papers as its selection set (empty: it did not)."""
    # A ledger: `task` holds what choices were made on (validation); its `test` section is the final number.
    if "ledger_version" in result and "task" in result:
        problems = [] if not _names_test_file(result["data"].get("eval_file")) else ["eval_file is the test split"]
        test_ids = _task_test_ids(result, test_ids)
        for entry, scores in result["task"].items():
            if scores and test_ids & set(scores.get("ids") or []):
                problems.append(f"task.{entry} scores test papers")
        return problems
    if "sources" in result and "runs" in result:  # a report summary: checked through its ledgers
        return [
            f"source {s['path']} is not a committed ledger" for s in result["sources"] if not Path(s["path"]).is_file()
        ]
    if "runs" in result and "tfidf_whole_split" in result:  # the learning curves
        missing = [r["run"] for r in result["runs"] if "eval_file" not in r]
        used = [r["run"] for r in result["runs"] if _names_test_file(r.get("eval_file"))]
        return [f"{run}: no eval_file recorded" for run in missing] + [f"{run}: selected on test" for run in used]
    if "selected_on" in result:  # calibration.json, whole-arxiv results: the file its choices (T) were fitted on
        return ["selected on the test split"] if _names_test_file(result["selected_on"]) else []
    if {"train_file", "eval_file", "method"} <= set(result):  # a run's train_config.json
        return ["eval_file is the test split"] if _names_test_file(result["eval_file"]) else []
    return ["unknown result file: it must say which papers it was selected on"]


def _problems_of(path: Path, test_ids: set[str]) -> list[str]:
    result = json.loads(path.read_text())
    if {"labels", "after", "test", "cost"} <= set(result):  # a run's metrics.json: its train_config.json says
        beside = path.with_name("train_config.json")
        return _problems_of(beside, test_ids) if beside.is_file() else ["metrics.json without its train_config.json"]
    return _selection_problems(result, test_ids)


def test_no_committed_result_was_selected_on_the_test_papers(test_ids, monkeypatch):
    monkeypatch.chdir(ROOT)  # report summaries name their ledgers relative to the repository
    files = sorted((ROOT / "docs" / "results").rglob("*.json"))
    assert files, "no committed results found"
    problems = {}
    for path in files:
        found = _problems_of(path, test_ids)
        if found:
            problems[str(path.relative_to(ROOT))] = found
    assert not problems


def test_the_check_catches_a_ledger_selected_on_test(test_ids):
    ledger = json.loads((ROOT / "docs" / "results" / "cpu-smollm2" / "ledgers" / "lora-seed10.json").read_text())
    ledger["data"]["eval_file"] = "arxiv_ft/assets/cs-test-sample.jsonl"
    ledger["task"]["after"]["ids"] = sorted(test_ids)[:3]
    assert len(_selection_problems(ledger, test_ids)) == 2
    # The every-category task is checked against its own test split.
    every = json.loads(next((ROOT / "docs" / "results").rglob("all-categories/ledgers/*.json")).read_text())
    assert _selection_problems(every, test_ids) == []
    every["task"]["after"]["ids"] = every["test"]["after"]["ids"][:3]
    assert _selection_problems(every, test_ids) == ["task.after scores test papers"]


def test_every_category_splits_are_disjoint_and_outside_papers_are_outside():
    """data/all-arxiv: test, validation, training and the out-of-set papers share no paper; every out-of-set paper's
    primary is one of the categories named as left out, none of the labels; every test paper of a label is newer than
    each of its training papers."""
    folder = ROOT / "data" / "all-arxiv"
    splits = {
        name: list(read_records(folder / f"{name}.jsonl.gz")) for name in ("train", "validation", "test", "outside")
    }
    ids = {name: {r.id for r in records} for name, records in splits.items()}
    names = list(ids)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not ids[a] & ids[b], (a, b)
    labels = set((folder / "labels.txt").read_text().split())
    others = {line.split("\t")[0] for line in (folder / "other-categories.txt").read_text().splitlines()}
    assert len(splits["outside"]) == 300 and {r.primary for r in splits["outside"]} <= others
    assert not others & labels
    assert {r.primary for name in ("train", "validation", "test") for r in splits[name]} == labels
    oldest_test = {}
    for r in splits["test"]:
        oldest_test[r.primary] = min(oldest_test.get(r.primary, r.update_date), r.update_date)
    assert all(r.update_date <= oldest_test[r.primary] for r in splits["train"])
