"""train.py end to end on a tiny random LLaMA: what trains, what stays frozen, what is saved and reloaded."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from arxiv_ft import config as cfglib
from arxiv_ft.modeling import load_model, load_tokenizer
from arxiv_ft.options import TrainConfig
from tests.conftest import ASSETS, FAST_TRAIN, ROOT, capture_trained_model, load_trained, run_predictions, run_train

FAST = FAST_TRAIN


def run(argv):
    return run_train(argv)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


predictions = run_predictions


def test_lora_trains_only_the_adapter_and_reloads_identically(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    base_before = weights(load_model(tiny_model_dir))
    captured = capture_trained_model(monkeypatch)
    out = tmp_path / "lora"
    metrics = run(["--model", tiny_model_dir, "--output-dir", str(out), "--lr", "1e-2", *FAST])
    model = captured["model"]
    state = weights(model)
    lora = {k: v for k, v in state.items() if "lora_" in k}
    assert lora and all(v.dtype == torch.float32 for v in lora.values())
    assert any(("lora_B" in k) and v.abs().sum() > 0 for k, v in lora.items())  # B starts at zero: it moved
    for key, value in state.items():
        if "lora_" not in key:
            base_key = key.replace("base_model.model.", "").replace(".base_layer", "")
            torch.testing.assert_close(value, base_before[base_key], rtol=0, atol=0)
    # Saved: adapter only, as safetensors, with exactly the trained adapter weights.
    saved = load_file(out / "adapter_model.safetensors")
    assert len(saved) == len(lora) and not (out / "model.safetensors").exists()
    assert (out / "labels.txt").read_text().split() == metrics["labels"]
    assert json.loads((out / "prompt.json").read_text())["template"] == "arxiv-v1"
    saved_metrics = json.loads((out / "metrics.json").read_text())
    assert set(saved_metrics) >= {"before", "after", "train", "cost"}
    assert len(saved_metrics["train"]["loss_curve"]) == saved_metrics["train"]["steps"]
    # Reload from disk: identical scores to the in-memory model.
    reloaded = load_trained(out).eval()
    model.eval()
    torch.testing.assert_close(predictions(reloaded, tokenizer, out), predictions(model, tokenizer, out))


def test_full_fine_tuning_changes_weights_and_reloads_identically(tiny_model_dir, tokenizer, tmp_path):
    base_before = weights(load_model(tiny_model_dir))
    out = tmp_path / "full"
    run(
        [
            "--model",
            tiny_model_dir,
            "--method",
            "full",
            "--lr",
            "1e-3",
            "--output-dir",
            str(out),
            "--eval-before",
            "false",
            *FAST,
        ]
    )
    reloaded = load_trained(out).eval()
    after = weights(reloaded)
    changed = [k for k in base_before if not torch.equal(base_before[k], after[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.embed_tokens.weight" in changed
    assert (out / "model.safetensors").exists() and not (out / "adapter_model.safetensors").exists()
    # The output folder is a complete model: tokenizer included, loadable by path.
    assert load_tokenizer(str(out)).chat_template is not None


def test_accumulation_and_packing_match_large_batch_run(tiny_model_dir, tmp_path):
    """Batch 6 vs 3 x 2 accumulation vs 6 packed into one row: same loss trajectory and weights (AdamW, clipping,
    schedule and all)."""
    common = [
        "--model",
        tiny_model_dir,
        "--method",
        "full",
        "--lr",
        "1e-3",
        "--eval-before",
        "false",
        "--max-steps",
        "3",
    ]
    a = run([*common, *FAST, "--output-dir", str(tmp_path / "a")])
    fast = FAST.copy()
    fast[fast.index("--batch-size") + 1] = "3"
    b = run([*common, *fast, "--grad-accum-steps", "2", "--output-dir", str(tmp_path / "b")])
    c = run([*common, *FAST, "--packing", "true", "--output-dir", str(tmp_path / "c")])
    wa = load_file(tmp_path / "a" / "model.safetensors")
    for other, name in ((b, "b"), (c, "c")):
        assert other["train"]["loss_curve"] == pytest.approx(a["train"]["loss_curve"], rel=1e-4)
        wo = load_file(tmp_path / name / "model.safetensors")
        for key in wa:
            torch.testing.assert_close(wo[key], wa[key], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiled_run_matches_eager_run(tiny_model_dir, tmp_path):
    """--compile (inductor, regional): the same loss curve and saved adapter as eager (~1 min to compile)."""
    common = ["--model", tiny_model_dir, "--eval-before", "false", "--probes", "false", "--max-steps", "3", *FAST]
    eager = run([*common, "--output-dir", str(tmp_path / "eager")])
    compiled = run([*common, "--compile", "true", "--output-dir", str(tmp_path / "compiled")])
    assert compiled["train"]["loss_curve"] == pytest.approx(eager["train"]["loss_curve"], rel=1e-3)
    saved = [load_file(tmp_path / name / "adapter_model.safetensors") for name in ("eager", "compiled")]
    assert saved[0].keys() == saved[1].keys()  # compiled-module prefixes must not leak into the saved names
    for key in saved[0]:
        torch.testing.assert_close(saved[1][key], saved[0][key], rtol=1e-2, atol=1e-4)


def test_help_documents_every_option():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True)
    for field in (f.name for f in dataclasses.fields(TrainConfig)):
        assert "--" + field.replace("_", "-") in out.stdout


def test_unknown_option_and_bad_values_are_named(tmp_path):
    def fails(*argv):
        res = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True)
        assert res.returncode == 2
        return res.stderr

    assert "--learnin-rate" in fails("--learnin-rate", "1")
    assert "--method" in fails("--method", "qlora-ish")
    preset = tmp_path / "p.yaml"
    preset.write_text("lr: 1e-4\nepochz: 2\n")
    assert "epochz" in fails("--config", str(preset))


def test_unknown_label_in_data_is_an_error_naming_it(tiny_model_dir, tmp_path):
    bad = tmp_path / "train.jsonl"
    lines = (ASSETS / "cs-train-sample.jsonl").read_text().splitlines()[:5]
    lines.append(json.dumps({"id": "2401.00001", "title": "T", "abstract": "A", "categories": "math.CO cs.LG"}))
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit, match=r"id 2401.00001.*'math.CO'"):
        run(["--model", tiny_model_dir, "--train-file", str(bad), "--output-dir", str(tmp_path / "o")])


def test_preset_values_apply_and_flags_override(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("lr: 0.001\nmethod: full\nepochs: 2\n")
    cfg = cfglib.parse_config(TrainConfig, ["--config", str(preset), "--epochs", "3"], "")
    assert (cfg.lr, cfg.method, cfg.epochs) == (0.001, "full", 3.0)


@pytest.mark.slow
def test_real_smollm2_trains_and_reloads_identically(smollm2_path, tokenizer, tmp_path, monkeypatch):
    """The real model through the whole path: GGUF-converted weights, LoRA, save, reload, identical scores."""
    captured = capture_trained_model(monkeypatch)
    out = tmp_path / "real"
    metrics = run(
        [
            "--model",
            "smollm2-135m",
            "--output-dir",
            str(out),
            "--max-steps",
            "3",
            "--train-per-class",
            "2",
            "--eval-per-class",
            "1",
            "--eval-batch-size",
            "21",
            "--probes",
            "false",
        ]
    )
    assert metrics["train"]["loss_curve"][0] > metrics["train"]["loss_curve"][-1]
    assert json.loads((out / "train_config.json").read_text())["model"] == "smollm2-135m"
    reloaded = load_trained(out).eval()
    torch.testing.assert_close(
        predictions(reloaded, tokenizer, out, n=8), predictions(captured["model"].eval(), tokenizer, out, n=8)
    )


@pytest.mark.slow
def test_accelerate_launch_of_the_module_and_the_installed_command(tiny_model_dir, tmp_path):
    """`accelerate launch -m arxiv_ft.train` and `arxiv-ft train` run the same training as train.py."""
    from tests.test_distributed import ACCELERATE

    args = ["--model", tiny_model_dir, "--max-steps", "2", *FAST, "--probes", "false"]
    launched = [ACCELERATE, "launch", "--num_processes", "1", "-m", "arxiv_ft.train", *args]
    subprocess.run([*launched, "--output-dir", str(tmp_path / "a")], cwd=ROOT, check=True, capture_output=True)
    command = Path(sys.executable).parent / "arxiv-ft"
    subprocess.run([str(command), "train", *args, "--output-dir", str(tmp_path / "b")], check=True, capture_output=True)
    curves = [json.loads((tmp_path / n / "metrics.json").read_text())["train"]["loss_curve"] for n in ("a", "b")]
    assert curves[0] == pytest.approx(curves[1], rel=1e-5) and len(curves[0]) == 2


def test_the_zero_shot_evaluation_is_computed_once_per_base_model_papers_and_prompt(
    tiny_model_dir, tmp_path, monkeypatch
):
    from arxiv_ft import phases

    monkeypatch.setenv("ARXIV_FT_CACHE", str(tmp_path / "cache"))
    calls = []
    original = phases.run_evaluation
    monkeypatch.setattr(phases, "run_evaluation", lambda *a, **k: calls.append(a[1]) or original(*a, **k))
    common = ["--model", tiny_model_dir, "--max-steps", "1", *FAST, "--probes", "false"]
    first = run([*common, "--output-dir", str(tmp_path / "a")])
    second = run([*common, "--output-dir", str(tmp_path / "b"), "--seed", "1"])
    assert calls == ["zero-shot", "fine-tuned", "test", "fine-tuned", "test"] and first["before"] == second["before"]
    run([*common, "--output-dir", str(tmp_path / "c"), "--max-seq-tokens", "150"])  # another prompt: recomputed
    assert calls[-3:] == ["zero-shot", "fine-tuned", "test"]


def test_a_loss_that_becomes_nan_stops_the_run_naming_the_step(tiny_model_dir, tmp_path, monkeypatch):
    """--lr inf and friends trained on and crashed later in the metric module; a diverged loss now stops the run at the
    step it happened, before it is checkpointed."""
    from arxiv_ft import fit

    original = fit.train_step

    def diverge_at_step_2(setup, step):
        result = original(setup, step)
        return {**result, "loss": float("nan")} if step == 1 else result

    monkeypatch.setattr(fit, "train_step", diverge_at_step_2)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit, match=r"step 2: the training loss is nan \(the run diverged"):
        run_train(["--model", tiny_model_dir, "--output-dir", str(out), "--probes", "false", *FAST_TRAIN])
    assert not (out / "ledger.json").exists()
