"""`arxiv-ft sweep`: the points of a spec, one train.py run each; a sweep started again after an interruption skips
finished points and ends with the ledgers an uninterrupted sweep writes."""

from __future__ import annotations

import json

import pytest
import yaml

from arxiv_ft import sweep
from tests.conftest import ROOT


@pytest.fixture
def spec(tmp_path, tiny_model_dir):
    options = {"model": tiny_model_dir, "epochs": 1, "train_per_class": 2, "eval_per_class": 1, "test_per_class": 1}
    options |= {"batch_size": 6, "max_seq_tokens": 160, "eval_batch_size": 21, "probes": False}
    options |= {"checkpoint_every_steps": 0, "tfidf_baseline": False}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"seeds": [5], "methods": {"lora": [1.0e-2, 3.0e-2]}, "options": options}))
    return str(path)


def test_points_and_their_arguments(spec, tmp_path, capsys):
    sweep.main([spec, "--out", str(tmp_path / "s"), "--list"])
    assert capsys.readouterr().out.split("\n")[:2] == ["0 lora-lr0.01-s5", "1 lora-lr0.03-s5"]
    sweep.main([spec, "--out", str(tmp_path / "s"), "--args-of", "1"])
    args = capsys.readouterr().out.split()
    folder = str(tmp_path / "s" / "lora-lr0.03-s5")
    assert args[-8:] == ["--method", "lora", "--lr", "0.03", "--seed", "5", "--output-dir", folder]
    with pytest.raises(SystemExit, match="has 2 points"):
        sweep.main([spec, "--out", str(tmp_path / "s"), "--point", "2"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"seeds": [1], "methods": {"lora": [-1]}}))
    with pytest.raises(SystemExit, match="a list of positive learning rates"):
        sweep.main([str(bad), "--out", str(tmp_path / "s"), "--list"])


def test_an_interrupted_sweep_skips_finished_points_and_ends_like_an_uninterrupted_one(spec, tmp_path):
    def ledgers(out):
        found = {}
        for path in sorted(out.glob("*/ledger.json")):
            d = json.loads(path.read_text())
            found[path.parent.name] = (d["train"]["loss_curve"], d["task"]["after"], d["test"]["after"])
        return found

    straight = tmp_path / "straight"
    assert set(sweep.run_sweep(spec, str(straight)).values()) == {0}
    resumed = tmp_path / "resumed"
    sweep.main([spec, "--out", str(resumed), "--point", "0"])  # the sweep stopped after its first point
    first = resumed / "lora-lr0.01-s5" / "ledger.json"
    stamp = first.stat().st_mtime_ns
    assert not (resumed / "lora-lr0.03-s5" / "ledger.json").exists()
    status = sweep.run_sweep(spec, str(resumed))
    assert status == {"lora-lr0.01-s5": "done", "lora-lr0.03-s5": 0} and first.stat().st_mtime_ns == stamp
    got, want = ledgers(resumed), ledgers(straight)
    assert list(got) == ["lora-lr0.01-s5", "lora-lr0.03-s5"] and got == want
    assert got["lora-lr0.01-s5"][0] != got["lora-lr0.03-s5"][0]  # the rates differ, so do the runs


@pytest.mark.parametrize("spec", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_sweep_spec_is_valid_and_its_recipes_parse(spec, monkeypatch):
    from arxiv_ft.config import parse_config
    from arxiv_ft.options import TrainConfig

    monkeypatch.chdir(ROOT)
    parsed = sweep.read_spec(spec)
    for point in sweep.points(parsed):
        cfg = parse_config(TrainConfig, sweep.train_args(parsed, point, "runs/x"), "")
        assert (cfg.method, cfg.lr, cfg.seed) == (point.method, point.lr, point.seed)
