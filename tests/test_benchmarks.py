"""The benchmarks cannot rot: gpu_check.sh --tiny runs every part of the GPU check on CPU (what needs CUDA is
skipped, saying why), and the time guard reports what it did not start instead of running past the budget."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

# Every row the issue asks for: training (project, plain HF, TRL) per method, the two sharded launches, inference.
EXPECTED = (
    [("train", m, i) for m in ("lora", "qlora", "full") for i in ("project", "hf", "trl")]
    + [("launch", "full", "project")] * 2
    + [("infer", "base", i) for i in ("score", "generate", "loop")]
)


def measured_or_skipped(row: dict) -> bool:
    rate = row.get("papers_per_s" if row["part"] == "infer" else "tokens_per_s")
    ok = row["status"] == "ok" and isinstance(rate, float) and math.isfinite(rate) and rate > 0
    return ok or row["status"].startswith("skipped: ")


@pytest.mark.slow
def test_gpu_check_tiny_reports_every_variant(tmp_path):
    out = tmp_path / "gpu-check.json"
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_STARTED"}
    res = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny", "--out", str(out)],
        cwd=tmp_path,  # the script finds the repository itself
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert sorted((r["part"], r["method"], r["impl"]) for r in rows) == sorted(EXPECTED)
    assert {r["launch"] for r in rows if r["part"] == "launch"} == {"fsdp", "zero3"}
    bad = [(r["variant"], r["status"]) for r in rows if not measured_or_skipped(r)]
    assert not bad, f"neither measured nor skipped with a reason: {bad}\n{res.stderr[-4000:]}"
    # On CPU exactly what needs CUDA (FSDP) or is not installed is skipped; the rest ran.
    fsdp = next(r for r in rows if r.get("launch") == "fsdp")
    assert fsdp["status"].startswith("skipped: FSDP needs a GPU")
    for r in rows:
        if r["impl"] in ("project", "hf", "score", "generate", "loop") and r.get("launch") != "fsdp":
            assert r["status"] == "ok", (r["variant"], r["status"])
    zero3 = next(r for r in rows if r.get("launch") == "zero3")
    assert zero3["save_check"]["ok"] and zero3["total_params"] > 0
    # ONE markdown table on stdout, a line per row, each with a figure or the reason it has none.
    table = [ln for ln in res.stdout.splitlines() if ln.startswith("|")]
    assert len(table) == 2 + len(rows)
    for line in table[2:]:
        assert "/s" in line or "skipped:" in line, line


def test_time_guard_skips_instead_of_starting(tmp_path):
    import bench_infer
    import bench_train
    import common

    args = bench_train.build_parser().parse_args(["--model", "unused", "--processes", "shared"])
    spent = common.Deadline(0.0)
    variants = [("lora", "project", "single"), ("full", "hf", "single"), ("full", "project", "fsdp")]
    results = bench_train.run_all(args, variants, spent, tmp_path, min_group_s=1.0)
    assert [(r["method"], r["impl"], r["launch"]) for r in results] == variants
    assert all(r["status"].startswith("skipped: ") for r in results)
    clf = SimpleNamespace(model=SimpleNamespace(device="cpu"))  # never used: nothing may start
    skipped = bench_infer.measure(clf, [], args, ("score", "loop"), spent)
    assert all(r["status"].startswith("skipped: time budget") for r in skipped.values()) and len(skipped) == 2


def test_smoothquant_migration_keeps_the_fp32_function_and_tames_the_outlier_channel(tokenizer):
    """int8_variants' SmoothQuant step only moves scale between the up and down projections: the fp32 model's logits
    are unchanged, and an outlier channel of the down projection's input shrinks relative to the others."""
    import torch
    from int8_variants import smooth_down_proj

    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(tokenizer, seed=5).eval()
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.up_proj.weight[3] *= 50.0  # one outlier channel in the SwiGLU product
    seen = {}
    mlp.down_proj.register_forward_pre_hook(lambda _, a: seen.__setitem__("x", a[0].abs().amax((0, 1))))
    ids = tokenizer("Sparse attention for long documents.")["input_ids"]
    with torch.no_grad():
        before = model(torch.tensor([ids])).logits
        ratio_before = float(seen["x"][3] / seen["x"].median())
        smooth_down_proj(model, [ids], alpha=0.8)
        after = model(torch.tensor([ids])).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert float(seen["x"][3] / seen["x"].median()) < ratio_before / 3
