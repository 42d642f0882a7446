"""QLoRA on CPU (bitsandbytes 0.50 runs nf4 layers on CPU), adapter merging, and the compatibility matrix."""

from __future__ import annotations

import json
import os
import subprocess

import bitsandbytes as bnb
import pytest
import torch

from arxiv_ft import phases
from arxiv_ft.merge import merge_run
from arxiv_ft.methods import LAUNCHES, METHODS, IncompatibleLaunch, get_method
from arxiv_ft.modeling import dequantized_base, load_model, prepare_for_kbit, quantization_config
from arxiv_ft.options import LLAMA_LINEAR_MODULES
from tests.conftest import ROOT, apply_lora, load_trained, run_train
from tests.test_distributed import accelerate_train
from tests.test_train import FAST, predictions


def dequantized(module) -> torch.Tensor:
    """The weight a 4-bit layer computes with, read through its own kernel (x = I gives W^T).

    bitsandbytes repacks 4-bit weights for its CPU kernel after the first forward, so bytes can't be compared.
    """
    with torch.no_grad():
        return module(torch.eye(module.in_features)).clone()


@pytest.fixture(scope="module")
def qlora_run(tiny_model_dir, tmp_path_factory):
    """One QLoRA run, with the in-memory model captured before saving."""
    captured = {}
    original = phases.save_run

    def capture(run, metrics):
        model = run.launch.accelerator.unwrap_model(run.trainable.model)
        captured["model"] = model
        captured["packed"] = {n: dequantized(m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        return original(run, metrics)

    out = tmp_path_factory.mktemp("qlora")
    phases.save_run = capture
    try:
        argv = ["--model", tiny_model_dir, "--method", "qlora", "--lr", "1e-2", "--output-dir", str(out)]
        run_train([*argv, "--eval-before", "false", *FAST])
    finally:
        phases.save_run = original
    return captured, out


def test_qlora_trains_the_adapter_and_leaves_the_4bit_base_unchanged(qlora_run, tiny_model_dir, tokenizer):
    captured, out = qlora_run
    fresh = load_model(
        tiny_model_dir,
        torch.float32,
        quantization_config=quantization_config(torch.float32, torch.uint8),
        device_map="cpu",
    )
    fresh = prepare_for_kbit(fresh, False)  # read through the kernel training uses, as `captured` was
    fresh_packed = {n: dequantized(m) for n, m in fresh.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(fresh_packed) == 14  # 7 projections x 2 layers are nf4
    for name, packed in captured["packed"].items():
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(packed, fresh_packed[key]), name  # the 4-bit base did not move
    lora_b = [p for n, p in captured["model"].named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: it trained
    assert all(p.dtype == torch.float32 for p in lora_b)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cost"]["parameter_bytes"] < _fp32_bytes(tiny_model_dir)  # embeddings stay fp32 here


def test_qlora_gradients_after_an_evaluation_equal_lora_on_the_dequantised_base(tiny_model_dir):
    """train.py evaluates and probes the 4-bit base before training: that must not change the training backward.

    (bitsandbytes' CPU inference repacking has no backward; prepare_for_kbit keeps it off. Without that, on an
    AVX512-BF16 CPU like this project's, the LoRA-A gradients here were off by 30-100%.)
    """
    quant = quantization_config(torch.float32, torch.uint8)
    models = [
        prepare_for_kbit(load_model(tiny_model_dir, quantization_config=quant, device_map="cpu"), False),
        dequantized_base(tiny_model_dir, "uint8"),
    ]
    models = [apply_lora(m, 4, 8, 0.0, LLAMA_LINEAR_MODULES) for m in models]
    torch.manual_seed(1)
    adapters = [[p for p in m.parameters() if p.requires_grad] for m in models]
    with torch.no_grad():
        for p, same in zip(*adapters, strict=True):  # non-zero B, so A gets gradients through the base
            p.copy_(same.copy_(torch.randn_like(p) * 0.05))
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        models[0].eval()(input_ids=ids)  # what an evaluation does first
    grads = []
    for m in models:
        m.train()(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad for p in m.parameters() if p.requires_grad])
    for got, expected in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=1e-5)


def _fp32_bytes(model_dir):
    model = load_model(model_dir)
    return sum(p.numel() * 4 for p in model.parameters())


def test_qlora_adapter_reloads_onto_a_fresh_4bit_base_and_predicts_identically(qlora_run, tokenizer):
    captured, out = qlora_run
    model = captured["model"].eval()
    reloaded = load_trained(out).eval()
    got, expected = predictions(reloaded, tokenizer, out), predictions(model, tokenizer, out)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    # bitsandbytes' CPU path repacks weights after the first forward: scores agree to float rounding only.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)


def test_merged_lora_predicts_like_base_plus_adapter(tiny_model_dir, tokenizer, tmp_path):
    out = tmp_path / "lora"
    run_train(["--model", tiny_model_dir, "--lr", "1e-2", "--output-dir", str(out), "--eval-before", "false", *FAST])
    merged = load_trained(merge_run(out, tmp_path / "merged")).eval()
    assert not hasattr(merged, "peft_config")
    adapter = predictions(load_trained(out).eval(), tokenizer, out)
    torch.testing.assert_close(predictions(merged, tokenizer, out), adapter, rtol=1e-5, atol=1e-4)


def test_merged_qlora_predicts_like_the_quantised_base_plus_adapter(qlora_run, tokenizer, tmp_path):
    """Merged onto the de-quantised nf4 base. Tolerance 1e-3 on label log-likelihoods (stated in docs/guide.md)."""
    captured, out = qlora_run
    merged = load_trained(merge_run(out, tmp_path / "merged")).eval()
    with_adapter = predictions(load_trained(out).eval(), tokenizer, out)
    got = predictions(merged, tokenizer, out)
    assert (got - with_adapter).abs().max() < 1e-3
    assert torch.equal(got.argmax(-1), with_adapter.argmax(-1))


SUPPORTED = {  # (method, launch, device) cells that must pass the check
    (m, launch, d)
    for m in ("full", "lora", "qlora", "dora")
    for launch in LAUNCHES
    for d in ("cpu", "cuda")
    if not (launch == "fsdp" and d == "cpu") and not (m == "qlora" and launch == "zero3-offload")
}


def test_every_method_is_in_the_matrix():
    assert set(METHODS) == {"full", "lora", "qlora", "dora"}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_compatibility_matrix(method, launch, device):
    compute = "bf16" if device == "cuda" else "fp32"
    check = get_method(method).check
    if (method, launch, device) in SUPPORTED:
        check(launch, device, quant_storage=compute, compute_dtype=compute)
        if method == "qlora" and launch in ("zero3", "fsdp"):
            with pytest.raises(IncompatibleLaunch, match=f"--bnb-quant-storage {compute}"):
                check(launch, device, quant_storage="uint8", compute_dtype=compute)
    else:
        with pytest.raises(IncompatibleLaunch, match="Use accelerate_configs/"):
            check(launch, device, quant_storage=compute, compute_dtype=compute)


@pytest.mark.slow
@pytest.mark.parametrize(
    "config,env,argv,message",
    [
        ("zero3-offload.yaml", {"DS_ACCELERATOR": "cpu"}, ["--method", "qlora"], "cannot offload"),
        ("zero3.yaml", {"DS_ACCELERATOR": "cpu"}, ["--method", "qlora"], "--bnb-quant-storage fp32"),
        ("fsdp.yaml", {"ACCELERATE_USE_CPU": "1"}, ["--method", "lora"], "FSDP"),
    ],
)
def test_unsupported_launches_fail_before_loading_a_model(config, env, argv, message, tmp_path):
    # A model path that does not exist: had a model load been attempted, the error would be a different one.
    model, out = str(tmp_path / "no-such-model"), str(tmp_path / "o")
    cmd = accelerate_train(config, 1, "--model", model, *argv, "--output-dir", out)
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr[-2000:]
    assert "no-such-model" not in res.stderr
