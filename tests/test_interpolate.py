"""WiSE-FT interpolation (arxiv_ft/interpolate.py): α = 0 is the base and α = 1 the run, for every method; the command
writes one ledger a α that the report reads, and skips finished α when run again."""

from __future__ import annotations

import json

import pytest
import torch

from arxiv_ft.classifier import Classifier
from arxiv_ft.interpolate import interpolated_model
from arxiv_ft.records import read_records
from arxiv_ft.rundir import RunDir
from tests.conftest import ASSETS, FAST_TRAIN, run_train

FAST = [*FAST_TRAIN, "--probes", "false", "--lr", "2e-2", "--checkpoint-every-steps", "0"]


@pytest.fixture(scope="module")
def papers():
    return list(read_records(ASSETS / "cs-validation-sample.jsonl"))[:8]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """One tiny run per method (a few steps at a high learning rate, so the tuned model is far from the base)."""
    out = {}
    for method in ("lora", "dora", "qlora", "full"):
        folder = tmp_path_factory.mktemp("wise") / method
        run_train(["--model", tiny_model_dir, "--method", method, "--output-dir", str(folder), *FAST])
        out[method] = folder
    return out


def label_scores(model, folder, papers) -> torch.Tensor:
    run = RunDir(folder)
    tokenizer = run.load_tokenizer()
    from arxiv_ft.data import PromptBuilder

    classifier = Classifier(model.eval(), tokenizer, PromptBuilder.from_spec(tokenizer, run.prompt(), run.labels()))
    prompts = [p for p in classifier.prompts(papers) if p is not None]
    with torch.no_grad():
        return classifier.scorer.score_prompts(prompts)


@pytest.mark.parametrize("method", ["lora", "dora", "qlora", "full"])
def test_alpha_0_is_the_base_and_alpha_1_the_run(runs, tiny_model_dir, papers, method):
    from arxiv_ft.modeling import load_model

    folder = runs[method]
    run = RunDir(folder)
    tuned = run.load_model(torch.float32)
    want_tuned = label_scores(tuned, folder, papers)
    if run.method().adapter:
        with tuned.disable_adapter():  # the base as training saw it (QLoRA: its nf4 base)
            want_base = label_scores(tuned, folder, papers)
    else:
        want_base = label_scores(load_model(tiny_model_dir, torch.float32), folder, papers)
    assert (want_tuned - want_base).abs().max() > 0.05  # the run moved away from its base: the test can fail
    for alpha, want in ((0.0, want_base), (1.0, want_tuned)):
        got = label_scores(interpolated_model(run, alpha)[0], folder, papers)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    halfway = label_scores(interpolated_model(run, 0.5)[0], folder, papers)
    assert (halfway - want_base).abs().max() > 1e-3 and (halfway - want_tuned).abs().max() > 1e-3


def test_the_command_writes_a_ledger_per_alpha_that_the_report_reads(runs, tmp_path):
    from arxiv_ft import cli
    from arxiv_ft.ledger import Ledger
    from arxiv_ft.report import build_report

    folder = runs["lora"]
    argv = ["interpolate", str(folder), "--alphas", "0,0.5,1", "--probe-windows", "2", "--probe-mc-items", "7"]
    cli.main(argv)
    ledgers = {a: Ledger.read(folder / "interpolation" / f"alpha-{a:.2f}" / "ledger.json") for a in (0, 0.5, 1)}
    run = Ledger.read(folder / "ledger.json")
    assert ledgers[0].task["after"]["correct"] == run.task["before"]["correct"]  # α = 0: the zero-shot base
    assert ledgers[1].task["after"]["correct"] == run.task["after"]["correct"]  # α = 1: the run
    assert ledgers[1].test["after"]["correct"] == run.test["after"]["correct"]
    assert ledgers[0].forgetting["delta"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert ledgers[1].forgetting["delta"]["kl"] > ledgers[0.5].forgetting["delta"]["kl"] > 0
    assert ledgers[0.5].config["wise_alpha"] == 0.5 and ledgers[0.5].run_id.endswith("@alpha0.50")
    assert ledgers[1].task["tfidf_tuned"] == run.task["tfidf_tuned"]  # the same papers: the run's baseline rows
    # Again: every α is there already, nothing is scored.
    paths = {a: folder / "interpolation" / f"alpha-{a:.2f}" / "ledger.json" for a in ledgers}
    stamps = {a: p.stat().st_mtime_ns for a, p in paths.items()}
    cli.main(argv)
    assert {a: p.stat().st_mtime_ns for a, p in paths.items()} == stamps
    summary = build_report([str(folder / "interpolation")], tmp_path / "report")
    labels = {g["label"] for g in summary["groups"]}
    assert any("wise_alpha=0.5" in label for label in labels), labels
    json.dumps(summary)  # the report's summary is plain JSON


def test_each_alpha_scores_the_test_papers_the_run_scored_even_from_another_checkout(runs, tmp_path):
    """A run made in another checkout: its `--test-file auto` no longer resolves here (its validation file is not this
    checkout's shipped sample). Each alpha reads the test file the run's ledger names and scores it itself; where it
    cannot, the command fails instead of writing the run's own test score under the alpha's name."""
    import shutil

    from arxiv_ft import cli
    from arxiv_ft.ledger import Ledger

    folder, other = tmp_path / "moved", tmp_path / "other-checkout"
    shutil.copytree(runs["lora"], folder, ignore=shutil.ignore_patterns("interpolation"))
    other.mkdir()
    shutil.copy(ASSETS / "cs-validation-sample.jsonl", other)
    five = [line for line in (ASSETS / "cs-test-sample.jsonl").read_text().splitlines() if line.strip()][:5]
    (other / "cs-test-sample.jsonl").write_text("\n".join(five) + "\n")

    def rewrite(test_file: str) -> None:
        config = json.loads((folder / "train_config.json").read_text())
        assert config["test_file"] == "auto"
        config["eval_file"] = str(other / "cs-validation-sample.jsonl")
        (folder / "train_config.json").write_text(json.dumps(config))
        ledger = json.loads((folder / "ledger.json").read_text())
        ledger["config"]["eval_file"], ledger["data"]["test_file"] = config["eval_file"], test_file
        (folder / "ledger.json").write_text(json.dumps(ledger))

    rewrite(str(other / "cs-test-sample.jsonl"))
    cli.main(["interpolate", str(folder), "--alphas", "0.5", "--no-probes"])
    got = Ledger.read(folder / "interpolation" / "alpha-0.50" / "ledger.json").test["after"]
    assert got["ids"] and set(got["ids"]) <= {json.loads(line)["id"] for line in five}  # read from that file
    rewrite("")  # no test file named, and `auto` finds none: refused
    with pytest.raises(SystemExit, match="test papers"):
        cli.main(["interpolate", str(folder), "--alphas", "0.25", "--no-probes"])
