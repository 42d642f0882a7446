"""Training-step throughput on the same real examples: the project's step vs a plain Hugging Face loop vs TRL.

    python benchmarks/bench_train.py --steps 3 --warmup 1 --out benchmarks/results/train-cpu.json   # CPU, LoRA
    python benchmarks/bench_train.py --device cuda --methods full,lora,qlora --steps 20 --warmup 3   # GPU

Implementations (--impls): `project` = train.py's step (AnswerLoss: shared prefix once per micro-batch, left padding,
logits for the targets only; length-grouped BatchPlan); `packed` = the same step with each batch packed into one
row without padding (`--packing`: block-diagonal attention mask, same examples); `hf` = the model called with
`labels=` (full-vocabulary logits and loss) on right-padded batches in random order; `trl` / `trl-pf` = TRL's
SFTTrainer with completion-only loss (pre-tokenised: the same ids and labels), without / with `padding_free`.
Every step is forward + backward + clipping + AdamW. Each (method, impl) runs in a fresh subprocess, so its peak
memory is its own. Tokens/s counts real tokens (non-padding, shared prefix included) of the examples each step
trained on.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import torch

from arxiv_ft.data import IGNORE_INDEX, BatchPlan, Example, collate_left_padded, collate_packed, tokenize_records
from arxiv_ft.loss import AnswerLoss, loss_scale, target_token_count
from arxiv_ft.metrics import mfu, training_flops_per_token
from arxiv_ft.modeling import apply_lora, count_parameters, prepare_for_kbit, quantization_config

IMPLS = ("hf", "project", "packed", "trl", "trl-pf")


def right_padded(examples, pad_id: int) -> dict[str, torch.Tensor]:
    """What a plain HF loop feeds the model (as DataCollatorForSeq2Seq does): right padding, labels -100 on pads."""
    width = max(len(e.input_ids) for e in examples)
    batch = {
        "input_ids": torch.full((len(examples), width), pad_id),
        "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
        "labels": torch.full((len(examples), width), IGNORE_INDEX),
    }
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        batch["input_ids"][row, :n], batch["labels"][row, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels)
        batch["attention_mask"][row, :n] = 1
    return batch


def train_model(args, method: str, dtype: torch.dtype):
    """The model as train.py builds it for `method` (LoRA r16 on all linear layers; full = every weight)."""
    torch.manual_seed(args.seed)
    if method == "qlora":
        model = prepare_for_kbit(common.build_model(args, dtype, quantization_config(dtype, torch.uint8)), False)
    else:  # full fine-tuning keeps fp32 master weights and autocasts to bf16 (as train.py with mixed precision)
        model = common.build_model(args, torch.float32 if method == "full" else dtype)
    model.config.use_cache = False
    if method != "full":
        model = apply_lora(model, args.lora_rank, 2.0 * args.lora_rank, 0.05, tuple(common.lora_targets()))
    return model


def check_same_loss(model, prefix, examples, pad_id: int, strict: bool) -> dict:
    """The project's loss and the plain HF loss on one batch, dropout off: the speed-up must not change the loss.

    fp32 must agree within 1e-4 (else the run stops); bf16 rounds the two paths' sums differently: 1% is reported.
    """
    model.eval()
    with torch.no_grad():
        batch = {k: v.to(model.device) for k, v in collate_left_padded(examples, pad_id, len(prefix)).items()}
        ours = float(AnswerLoss(model, prefix).to(model.device)(**batch)) / target_token_count(batch["labels"])
        plain = float(model(**{k: v.to(model.device) for k, v in right_padded(examples, pad_id).items()}).loss)
    model.train()
    diff, tol = abs(ours - plain), 1e-4 if strict else 1e-2 * max(1.0, abs(plain))
    result = dict(project=ours, hf=plain, abs_diff=diff, tolerance=tol, ok=diff <= tol)
    print(f"loss check: project {ours:.6f}  plain HF {plain:.6f}  |diff| {diff:.2e} (tol {tol:.1e})")
    if strict and not result["ok"]:
        raise SystemExit(f"loss check failed: {result}")
    return result


def run_variant(args, method: str, impl: str) -> dict:
    """One (method, impl) in this process: warm-up steps, then timed steps; returns its measurements."""
    dtype = common.resolve_dtype(args.dtype, args.device)
    tokenizer, builder = common.load_builder(args.model, args.max_seq_tokens)
    examples = [Example(*row) for row in json.loads(Path(args.examples_file).read_text())]
    model = train_model(args, method, dtype)
    (n_trainable, n_total), pad = count_parameters(model), tokenizer.pad_token_id
    autocast = torch.autocast(args.device, torch.bfloat16, enabled=method == "full" and dtype == torch.bfloat16)
    n_steps = args.warmup + args.steps
    ours = impl in ("project", "packed")
    plan = BatchPlan(examples, args.batch_size, 1, 1.0, 0, args.seed, group_by_length=ours)
    batches = [plan.step_batches(step % plan.steps)[0] for step in range(n_steps)]
    prefix = builder.shared_prefix_ids()
    out = {"method": method, "impl": impl, "trainable_params": n_trainable, "total_params": n_total}
    if impl == "project":
        out["loss_check"] = check_same_loss(model, prefix, batches[0], pad, strict=dtype == torch.float32)
    if impl.startswith("trl"):
        times, tokens, base = run_trl(args, model, tokenizer, examples, method, dtype, impl == "trl-pf", n_steps)
    else:
        loss_module = AnswerLoss(model, prefix).to(args.device) if ours else None
        collate = collate_packed if impl == "packed" else lambda exs, skip: collate_left_padded(exs, pad, skip)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.lr)
        base = common.reset_peak_memory(args.device)
        times, tokens = [], []
        for exs in batches:
            common.sync(args.device)
            started = time.perf_counter()
            with autocast:
                if loss_module is not None:
                    batch = {k: v.to(args.device) for k, v in collate(exs, len(prefix)).items()}
                    loss = loss_module(**batch) * loss_scale(target_token_count(batch["labels"]), 1, 1)
                else:
                    loss = model(**{k: v.to(args.device) for k, v in right_padded(exs, pad).items()}).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            common.sync(args.device)
            times.append(time.perf_counter() - started)
            tokens.append(sum(len(e.input_ids) for e in exs))
    timed, timed_tokens = times[args.warmup :], sum(tokens[args.warmup :])
    tokens_per_s, flops = timed_tokens / sum(timed), training_flops_per_token(n_total, n_trainable, method == "full")
    peak = common.peak_memory(args.device)
    out.update(step_s=timed, step_s_median=statistics.median(timed), warmup_s=times[: args.warmup])
    out.update(timed_tokens=timed_tokens, tokens_per_s=tokens_per_s, peak_memory_bytes=peak)
    out.update(memory_growth_bytes=peak - base, flops_per_token=flops, achieved_tflops=flops * tokens_per_s / 1e12)
    out["mfu"] = mfu(flops, tokens_per_s, common.peak_flops(args.device, dtype, args.peak_tflops))
    return out


def run_trl(args, model, tokenizer, examples, method, dtype, padding_free: bool, n_steps: int):
    """TRL's SFTTrainer on the same tokenised examples; per-step wall times (between step ends) and real tokens."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]})
    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *_, **__):
            common.sync(args.device)
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(
            output_dir=tmp, per_device_train_batch_size=args.batch_size, max_steps=n_steps, learning_rate=args.lr,
            max_grad_norm=1.0, optim="adamw_torch",  # the others' optimizer (torch's AdamW, foreach), clipping
            gradient_checkpointing=False,  # TRL's default is True (~30% slower); the others do not checkpoint
            completion_only_loss=True, padding_free=padding_free, max_length=None,  # examples already fit
            bf16=dtype == torch.bfloat16 or method == "full" and args.device == "cuda", use_cpu=args.device == "cpu",
            save_strategy="no", report_to="none", logging_steps=n_steps, dataloader_num_workers=0, seed=args.seed,
        )  # fmt: skip
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
        trainer.add_callback(StepClock())
        collate, counts = trainer.data_collator, []

        def counting_collator(features):  # batch i is the i-th one built (the dataloader may fetch ahead)
            counts.append(sum(len(f["input_ids"]) for f in features))
            return collate(features)

        trainer.data_collator = counting_collator
        base = common.reset_peak_memory(args.device)
        started = time.perf_counter()
        trainer.train()
    times = [b - a for a, b in zip([started, *ends[:-1]], ends)]
    return times, counts[: len(times)], base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(parser)
    parser.add_argument("--methods", default="lora", help="comma list of full, lora, qlora (CPU: lora is quick)")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {', '.join(IMPLS)} (trl if installed)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1 for the TRL variants)")
    parser.add_argument("--lora-rank", type=int, default=16, help="alpha = 2 x rank, dropout 0.05, all linear layers")
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # method:impl, run in this process (the parent's child)
    parser.add_argument("--examples-file", help=argparse.SUPPRESS)  # the parent's tokenised examples
    args = parser.parse_args()
    common.set_threads(args.threads)
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args, *args.variant.split(":"))), flush=True)
        return
    impls = args.impls.split(",")
    if importlib.util.find_spec("trl") is None:
        print("TRL is not importable: its variants are skipped (install it only if it leaves torch as it is)")
        impls = [i for i in impls if not i.startswith("trl")]
    machine = common.machine_info(args.device)
    print(f"machine: {machine}")
    # Tokenised once, here: every variant trains on exactly these examples (train.py's default 30 papers a class).
    _, builder = common.load_builder(args.model, args.max_seq_tokens)
    records = common.sample_records(common.ASSETS / "cs-train-sample.jsonl", builder.labels, 30, args.seed)
    examples = [[e.id, e.label, e.prompt_ids, e.target_ids] for e in tokenize_records(builder, records)[0]]
    examples_file = Path(tempfile.mkdtemp()) / "examples.json"
    examples_file.write_text(json.dumps(examples))
    results = []
    for method in args.methods.split(","):
        for impl in impls:
            print(f"--- {method} / {impl}", flush=True)
            cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", f"{method}:{impl}"]
            cmd += ["--examples-file", str(examples_file)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            print("\n".join(ln for ln in proc.stdout.splitlines() if not ln.startswith("RESULT ")))
            if proc.returncode or not lines:
                print(f"{method}/{impl} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
                results.append({"method": method, "impl": impl, "error": proc.stderr[-3000:]})
                continue
            results.append(json.loads(lines[-1][len("RESULT ") :]))
            common.write_json({"args": vars(args), "machine": machine, "results": results}, args.out, quiet=True)
    shutil.rmtree(examples_file.parent)
    machine["load_average_after"] = list(os.getloadavg())
    report(args, results, machine)


def report(args, results: list[dict], machine: dict) -> None:
    baseline = {r["method"]: r["tokens_per_s"] for r in results if r["impl"] == "hf" and "error" not in r}
    header = "method impl tokens/s step_s(median) peak_MiB growth_MiB TFLOP/s MFU speedup".split()
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["method"], r["impl"], "failed", "", "", "", "", "", ""])
            continue
        base = baseline.get(r["method"])
        r["speedup_vs_hf"] = r["tokens_per_s"] / base if base else None
        mfu_pct = r["mfu"] and 100 * r["mfu"]
        row = [r["method"], r["impl"], f"{r['tokens_per_s']:.0f}", f"{r['step_s_median']:.3f}"]
        row += [f"{r['peak_memory_bytes'] / 2**20:.0f}", f"{r['memory_growth_bytes'] / 2**20:.0f}"]
        row += [f"{r['achieved_tflops']:.3f}", common.fmt(mfu_pct, ".1f%"), common.fmt(r["speedup_vs_hf"], ".2fx")]
        rows.append(row)
    setting = f"batch {args.batch_size}, max_seq_tokens {args.max_seq_tokens}, {args.device}"
    print(f"\nmodel {common.describe_model(args)}, {setting}")
    common.print_table(header, rows)
    for r in results:
        if "loss_check" in r:
            c = r["loss_check"]
            print(f"{r['method']}: same batch, mean loss project {c['project']:.6f} vs plain HF {c['hf']:.6f}")
    common.write_json({"args": vars(args), "machine": machine, "results": results}, args.out)


if __name__ == "__main__":
    main()
