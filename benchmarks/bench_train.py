"""Training-step throughput on the same real examples: the project's step vs a plain Hugging Face loop vs TRL.

    python benchmarks/bench_train.py --steps 3 --warmup 2 --out benchmarks/results/train-cpu.json     # CPU, LoRA
    python benchmarks/bench_train.py --methods full,lora,qlora --steps 20 --warmup 3                   # a GPU
    python benchmarks/bench_train.py --methods full --impls project --launches fsdp,zero3              # sharded, 1 GPU

Every variant is built by the project's own phases from one TrainConfig: `phases.start` (accelerate, the dtype rule,
the method x launch check), `phases.load_task` (train.py's default 630 papers, tokenised with masked labels),
`phases.build` (the method table's build/wrap, the objective module) and `phases.setup_fit` (BatchPlan, AdamW --
fused on CUDA --, schedule, collator, accelerate's prepare). The timed step is `arxiv_ft.fit.train_step` itself.

Implementations (--impls):
  project  train.py's step: AnswerLoss runs the shared system turn once per micro-batch, left padding, logits only
           where a target is predicted; length-grouped BatchPlan.
  packed   the same with --packing: each micro-batch in one row, block-diagonal attention.
  hf       what a plain Hugging Face loop computes: the model called with `labels=` (logits over the vocabulary at
           every position, mean cross-entropy) on right-padded batches in random order, no prefix sharing. It runs
           through the same train_step, optimizer and clipping, so only the model's work differs.
  trl      TRL's SFTTrainer on the same ids and labels (completion-only loss), same optimizer, no checkpointing;
  trl-pf   the same with padding_free. Skipped, saying so, when trl is not installed.
Launches (--launches): `single` (a plain process) and, for `project`, `fsdp` / `zero3`: `accelerate launch` with the
shipped accelerate_configs/fsdp.yaml / zero3.yaml on one process, then the consolidated save (`phases.save_weights`),
which this process reloads with `RunDir.load_model` and checks against the trained model's loss on one batch.

Mixed precision: on CUDA with --dtype auto, LoRA/QLoRA train a bf16 base (train.py's default) and full fine-tuning
keeps fp32 weights under bf16 autocast (accelerate's mixed_precision bf16); on CPU everything is fp32.
Tokens/s counts the real tokens (shared prefix included, padding not) of each step's examples, the same for every
variant; the first --warmup steps are not timed. MFU = FLOPs per token from the method table (6N full, 4N + 6 x
trainable adapters) x tokens/s over the device's dense bf16 peak (arxiv_ft.metrics.peak_flops or --peak-tflops).
Peak memory is arxiv_ft.metrics.peak_memory_bytes (CUDA: max allocated; CPU: peak RSS), reset before the first step.
With --processes per-variant (the default) every variant runs in a fresh process; with `shared`, consecutive
variants with the same mixed precision share one (fewer start-ups; the peak is reset between them).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import common
import torch

from arxiv_ft.data import IGNORE_INDEX
from arxiv_ft.methods import METHODS

IMPLS = ("project", "packed", "hf", "trl", "trl-pf")
LAUNCHES = {"single": None, "fsdp": "fsdp.yaml", "zero3": "zero3.yaml"}
BATCH_FILE = "bench-batch.safetensors"
RESULT = "RESULT "


# ------------------------------------------------------------------------------------------- one variant (child)


class LabelsLoss(torch.nn.Module):
    """The plain Hugging Face objective: the model called with `labels=` (full-vocabulary logits at every position,
    mean cross-entropy), returned as a sum over the targets so that train_step normalises it like the project's."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        loss = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        return loss * (labels[:, 1:] != IGNORE_INDEX).sum()


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


def train_config(args, method: str, impl: str):
    """train.py's config for this variant: its defaults, with the benchmark's batch, length, rank and steps."""
    from arxiv_ft.options import TrainConfig

    adapter = METHODS[method].adapter
    return TrainConfig(
        model=args.model,
        method=method,
        dtype=args.dtype,
        lora_rank=args.lora_rank,
        lora_alpha=2.0 * args.lora_rank,
        batch_size=args.batch_size,
        max_seq_tokens=args.max_seq_tokens,
        lr=args.lr or (4e-4 if adapter else 2e-5),
        max_steps=args.warmup + args.steps,
        packing=impl == "packed",
        seed=args.seed,
        eval_per_class=1,
        eval_before=False,
        probes=False,
        tfidf_baseline=False,
        checkpoint_every_steps=0,
        cpu_threads=args.threads,
        peak_tflops=args.peak_tflops,
        output_dir=str(Path(tempfile.gettempdir()) / "arxiv-ft-bench"),
    )


def make_setup(cfg, launch, task, trainable, impl: str):
    """The project's Setup; for `hf` the same one around the plain objective, right-padded and in random order."""
    from arxiv_ft import phases

    if impl != "hf":
        return phases.setup_fit(cfg, launch, task, trainable)
    plain = dataclasses.replace(trainable, objective=LabelsLoss(trainable.model), prefix=[])
    setup = phases.setup_fit(dataclasses.replace(cfg, group_by_length=False), launch, task, plain)
    setup.collate = functools.partial(right_padded, pad_id=task.tokenizer.pad_token_id)
    return setup


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def mean_loss(objective, batch: dict, accelerator) -> float:
    """The objective's mean loss per target on `batch`, dropout off."""
    from arxiv_ft.loss import target_token_count

    was_training = objective.training
    objective.eval()
    with torch.no_grad(), accelerator.autocast():
        loss = float(objective(**batch)) / target_token_count(batch["labels"])
    objective.train(was_training)
    return loss


def check_same_loss(setup, model, examples, pad_id: int, accelerator, strict: bool) -> dict:
    """The project's loss and the plain HF loss on one batch, dropout off: the speed-up must not change the loss.

    fp32 must agree within 1e-4 (else the variant fails); bf16 rounds the two paths' sums differently: 1% is reported.
    """
    ours = mean_loss(setup.train_model, to_device(setup.collate(examples), accelerator.device), accelerator)
    model.eval()
    with torch.no_grad(), accelerator.autocast():
        plain = float(model(**to_device(right_padded(examples, pad_id), accelerator.device)).loss)
    model.train()
    diff, tol = abs(ours - plain), 1e-4 if strict else 1e-2 * max(1.0, abs(plain))
    if strict and diff > tol:
        raise AssertionError(f"loss check failed: project {ours} vs plain HF {plain} (|diff| {diff:.2e} > {tol})")
    return {"project": ours, "hf": plain, "abs_diff": diff, "tolerance": tol, "ok": diff <= tol}


def time_steps(setup, n_steps: int, device) -> tuple[list[float], list[int], list[float]]:
    """Run train_step for steps 0..n_steps-1; per-step wall time (GPU synchronised), real tokens and loss."""
    from arxiv_ft.fit import train_step

    times, tokens, losses = [], [], []
    common.reset_peak_memory(device)
    for step in range(n_steps):
        common.sync(device)
        started = time.perf_counter()
        result = train_step(setup, step)
        common.sync(device)
        times.append(time.perf_counter() - started)
        tokens.append(result["tokens"])
        losses.append(result["loss"])
    return times, tokens, losses


def run_trl(cfg, launch, task, model, padding_free: bool, n_steps: int) -> tuple[list[float], list[int]]:
    """TRL's SFTTrainer on the same tokenised examples; per-step wall times (between step ends) and real tokens."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    examples = list(task.examples)
    data = Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]})
    device, ends = launch.device, []

    class StepClock(TrainerCallback):
        def on_step_end(self, *_, **__):
            common.sync(device)
            ends.append(time.perf_counter())

    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(
            output_dir=tmp, per_device_train_batch_size=cfg.batch_size, max_steps=n_steps, learning_rate=cfg.lr,
            max_grad_norm=cfg.max_grad_norm, optim="adamw_torch_fused" if cuda else "adamw_torch",  # as setup_fit
            gradient_checkpointing=False,  # TRL's default is True (~30% slower); the others do not checkpoint
            completion_only_loss=True, padding_free=padding_free, max_length=None,  # examples already fit
            bf16=launch.accelerator.mixed_precision == "bf16", use_cpu=not cuda,  # accelerate's state is shared
            save_strategy="no", report_to="none", logging_steps=n_steps, dataloader_num_workers=0, seed=cfg.seed,
        )  # fmt: skip
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=task.tokenizer)
        trainer.add_callback(StepClock())
        collate, counts = trainer.data_collator, []

        def counting_collator(features):  # batch i is the i-th one built (the dataloader may fetch ahead)
            counts.append(sum(len(f["input_ids"]) for f in features))
            return collate(features)

        trainer.data_collator = counting_collator
        common.reset_peak_memory(device)
        started = time.perf_counter()
        trainer.train()
    times = [b - a for a, b in zip([started, *ends[:-1]], ends)]
    return times, counts[: len(times)]


def save_trained(cfg, launch, task, trainable, setup, batch: dict, save_dir: str, loss_initial: float) -> dict:
    """The consolidated save train.py does (every process takes part), plus the batch the parent checks it on."""
    from safetensors.torch import save_file

    from arxiv_ft import phases

    folder = Path(save_dir)
    loss_trained = mean_loss(setup.train_model, batch, launch.accelerator)
    phases.save_weights(phases.Run(cfg, launch, task, trainable, setup), folder)
    if launch.is_main:
        save_file({k: v.detach().cpu().contiguous() for k, v in batch.items()}, folder / BATCH_FILE)
    launch.accelerator.wait_for_everyone()
    return {
        "dir": str(folder),
        "files": sorted(p.name for p in folder.glob("*.safetensors")),
        "prefix_ids": list(trainable.prefix),
        "dtype": str(launch.dtype).removeprefix("torch."),
        "mixed_precision": launch.accelerator.mixed_precision,
        "loss_initial": loss_initial,
        "loss_trained": loss_trained,
    }


def run_variant(args, method: str, impl: str, save_dir: str | None = None) -> dict:
    """Build one variant with the project's phases, time its steps, measure memory and MFU (and save, if asked)."""
    from arxiv_ft import phases
    from arxiv_ft.metrics import peak_flops, peak_memory_bytes

    began = time.perf_counter()
    cfg = train_config(args, method, impl)
    launch = phases.start(cfg)
    acc, device = launch.accelerator, launch.device
    try:
        task = phases.load_task(cfg, launch)
        trainable = phases.build(cfg, launch, task)
        out = {"method": method, "impl": impl, "launch": launch.kind, "dtype": str(launch.dtype).removeprefix("torch.")}
        out.update(mixed_precision=acc.mixed_precision, processes=acc.num_processes)
        out.update(trainable_params=trainable.n_trainable, total_params=trainable.n_total)
        n_steps = args.warmup + args.steps
        if impl.startswith("trl"):
            times, tokens = run_trl(cfg, launch, task, trainable.model, impl == "trl-pf", n_steps)
        else:
            setup = make_setup(cfg, launch, task, trainable, impl)
            first = setup.plan.step_batches(0)[0]
            batch = to_device(setup.collate(first), device)
            if impl == "project" and launch.kind == "single":
                strict = launch.dtype == torch.float32 and acc.mixed_precision == "no"
                pad = task.tokenizer.pad_token_id
                out["loss_check"] = check_same_loss(setup, trainable.model, first, pad, acc, strict)
            loss_initial = mean_loss(setup.train_model, batch, acc) if save_dir else None
            times, tokens, out["losses"] = time_steps(setup, n_steps, device)
        out["peak_memory_bytes"] = peak_memory_bytes(device)
        if not impl.startswith("trl") and save_dir:
            try:  # a failed save keeps the measurements above
                out["saved"] = save_trained(cfg, launch, task, trainable, setup, batch, save_dir, loss_initial)
            except Exception as exc:
                out["saved"] = {"error": failure(exc), "traceback": traceback.format_exc()[-4000:]}
    finally:
        acc.free_memory()  # the prepared model and optimizer, before the next variant of this process
    timed, timed_tokens = times[args.warmup :], sum(tokens[args.warmup :])
    tokens_per_s = timed_tokens / sum(timed)
    flops = launch.method.flops_per_token(trainable.n_total, trainable.n_trainable)
    compute = torch.bfloat16 if acc.mixed_precision == "bf16" else launch.dtype
    peak = args.peak_tflops * 1e12 or peak_flops(device, compute)
    out.update(step_s=timed, step_s_median=statistics.median(timed), warmup_s=times[: args.warmup])
    out.update(timed_tokens=timed_tokens, tokens_per_s=tokens_per_s, flops_per_token=flops)
    out.update(achieved_tflops=flops * tokens_per_s / 1e12, peak_flops=peak)
    out["mfu"] = flops * tokens_per_s / (peak * acc.num_processes) if peak else None
    save_error = out.get("saved", {}).get("error")
    out["status"] = f"failed: the consolidated save: {save_error}" if save_error else "ok"
    out["wall_s"] = time.perf_counter() - began  # set-up and saving included
    return out


def child(payload: str) -> None:
    """The variants of one process, each reported on a RESULT line (a failure too, with its traceback)."""
    spec = json.loads(payload)
    args = argparse.Namespace(**spec["args"])
    for method, impl, launch in spec["variants"]:
        # What an earlier variant of this process left allocated (it would inflate this one's peak): should be ~0.
        leftover = torch.cuda.memory_allocated() if torch.cuda.is_available() else None
        try:
            result = run_variant(args, method, impl, spec.get("save_dir"))
            result["cuda_allocated_before_bytes"] = leftover
        except (Exception, SystemExit) as exc:  # IncompatibleLaunch is a SystemExit
            result = {"method": method, "impl": impl, "launch": launch, "status": f"failed: {failure(exc)}"}
            result["traceback"] = traceback.format_exc()[-4000:]
        if int(os.environ.get("RANK", "0")) == 0:
            print(RESULT + json.dumps(result), flush=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")[:400]


# ---------------------------------------------------------------------------------------- the parent (orchestra)


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def mixed_precision(args, method: str) -> str:
    """accelerate's mixed precision for a method: bf16 autocast over fp32 weights for full fine-tuning on a GPU."""
    cuda = torch.cuda.is_available()
    return "bf16" if cuda and args.dtype == "auto" and not METHODS[method].adapter else "no"


def skip_reason(method: str, impl: str, launch: str) -> str | None:
    """Why a variant cannot run here (said in the results instead of failing), or None."""
    if impl.startswith("trl") and not installed("trl"):
        return "skipped: trl is not installed"
    if METHODS[method].quantized and not installed("bitsandbytes"):
        return "skipped: bitsandbytes is not installed"
    if launch != "single" and impl != "project":
        return "skipped: the sharded launches run the project's step only"
    if launch == "fsdp" and not torch.cuda.is_available():
        return "skipped: FSDP needs a GPU (accelerate never applies it on CPU; methods.py refuses that launch)"
    if launch == "zero3" and not installed("deepspeed"):
        return "skipped: deepspeed is not installed"
    return None


def variants_of(args) -> list[tuple[str, str, str]]:
    """(method, impl, launch) for every requested combination, in order."""
    methods, launches = args.methods.split(","), [lc for lc in args.launches.split(",") if lc != "single"]
    return [(m, i, "single") for m in methods for i in args.impls.split(",")] + [
        (m, "project", lc) for m in methods for lc in launches
    ]


def process_groups(args, variants):
    """Consecutive single-process variants with the same mixed precision share a process under --processes shared
    (accelerate's state, mixed precision included, is per process); every other variant gets its own."""
    groups: list[list] = []
    for v in variants:
        key = (v[2], mixed_precision(args, v[0]))
        if args.processes == "shared" and v[2] == "single" and groups and groups[-1][0] == key:
            groups[-1][1].append(v)
        else:
            groups.append([key, [v]])
    return [g[1] for g in groups]


def child_command(args, variants, launch: str, save_dir: str | None) -> tuple[list[str], dict]:
    """The command line and environment of the process running `variants` (accelerate launch for fsdp/zero3)."""
    keep = {k: v for k, v in vars(args).items() if k not in ("out",)}
    payload = json.dumps({"args": keep, "variants": variants, "save_dir": save_dir})
    mp = mixed_precision(args, variants[0][0])
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": mp}
    script = [str(Path(__file__).resolve()), "--child", payload]
    if LAUNCHES[launch] is None:
        return [sys.executable, *script], env
    if launch == "zero3" and not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"  # ../shared/notes/cpu-stack.md: DeepSpeed on CPU (gloo)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launcher += [str(common.ROOT / "accelerate_configs" / LAUNCHES[launch]), "--num_processes", "1"]
    launcher += ["--num_machines", "1", "--mixed_precision", mp, "--dynamo_backend", "no"]
    return [*launcher, "--main_process_port", str(common.free_port()), *script], env


def verify_saved(saved: dict) -> dict:
    """Reload a launch's consolidated save as infer.py would (RunDir.load_model) and compare its loss on the saved
    batch with the trained model's: a save of shards, stale or empty weights cannot pass."""
    from safetensors.torch import load_file

    from arxiv_ft.loss import AnswerLoss, target_token_count
    from arxiv_ft.rundir import RunDir

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = RunDir(saved["dir"]).load_model(getattr(torch, saved["dtype"])).to(device).eval()
    batch = to_device(load_file(Path(saved["dir"]) / BATCH_FILE), device)
    bf16 = saved["mixed_precision"] == "bf16" or saved["dtype"] == "bfloat16"
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=saved["mixed_precision"] == "bf16"):
        objective = AnswerLoss(model, saved["prefix_ids"]).to(device)
        loss = float(objective(**batch)) / target_token_count(batch["labels"])
    del model, objective
    trained = saved["loss_trained"]
    tol = (2e-2 if bf16 else 1e-4) * max(1.0, abs(trained))
    return {"loss_loaded": loss, "abs_diff": abs(loss - trained), "tolerance": tol, "ok": abs(loss - trained) <= tol}


def run_all(args, variants, deadline: common.Deadline, workdir: Path, min_group_s: float = 0.0) -> list[dict]:
    """Run `variants` in child processes within `deadline`; one result per variant, in order: measured, failed, or
    skipped with the reason (not runnable here, or no time left: a group still running then is killed)."""
    results = []
    for group in process_groups(args, variants):
        todo = []
        for method, impl, launch in group:
            reason = skip_reason(method, impl, launch)
            if reason is None and deadline.left() < min_group_s:
                reason = f"skipped: time budget spent ({deadline.left():.0f} s left)"
            if reason:
                results.append({"method": method, "impl": impl, "launch": launch, "status": reason})
                print(f"--- {method} / {impl} / {launch}: {reason}", file=sys.stderr, flush=True)
            else:
                todo.append([method, impl, launch])
        if not todo:
            continue
        launch = todo[0][2]
        save_dir = str(workdir / f"saved-{launch}-{todo[0][0]}") if launch != "single" else None
        names = ", ".join("/".join(v) for v in todo)
        print(f"--- {names} ({deadline.left():.0f} s left)", file=sys.stderr, flush=True)
        cmd, env = child_command(args, todo, launch, save_dir)
        started = time.time()
        code, stdout, stderr = common.run_process(cmd, deadline.left(), env)
        got = {}
        for line in stdout.splitlines():
            if line.startswith(RESULT):
                r = json.loads(line[len(RESULT) :])
                got[(r["method"], r["impl"])] = r
            elif line.strip():
                print(line, file=sys.stderr)
        for method, impl, lc in todo:
            r = got.get((method, impl))
            if r is None:
                why = lost(code, stderr, time.time() - started)
                r = {"method": method, "impl": impl, "launch": lc, "status": why, "stderr": stderr[-4000:]}
            elif r["status"] == "ok" and "dir" in r.get("saved", {}):
                try:
                    r["save_check"] = verify_saved(r["saved"])
                    if not r["save_check"]["ok"]:
                        r["status"] = "failed: the reloaded save does not give the trained model's loss"
                except Exception as exc:
                    r["status"] = f"failed: reloading the consolidated save: {failure(exc)}"
                    r["save_check"] = {"error": traceback.format_exc()[-4000:]}
                shutil.rmtree(r["saved"]["dir"], ignore_errors=True)
            r.setdefault("launch", lc)
            if r["status"] != "ok":
                print(f"{method}/{impl}/{lc}: {r['status']}\n{r.get('traceback', r.get('stderr', ''))[-3000:]}",
                      file=sys.stderr)  # fmt: skip
            results.append(r)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def lost(code: int | None, stderr: str, seconds: float) -> str:
    """Why a variant of a child process has no result: killed at the deadline, or the process failed."""
    if code is None:
        return f"skipped: time budget spent (killed after {seconds:.0f} s)"
    last = stderr.strip().splitlines()[-1][:300] if stderr.strip() else "no output"
    return f"failed: exit {code}: {last}"


def add_speedups(results: list[dict]) -> None:
    """speedup_vs_hf: tokens/s over the plain HF variant's of the same method (single process)."""
    base = {r["method"]: r["tokens_per_s"] for r in results if r["impl"] == "hf" and r.get("status") == "ok"}
    for r in results:
        if r.get("status") == "ok" and base.get(r["method"]):
            r["speedup_vs_hf"] = r["tokens_per_s"] / base[r["method"]]


def report(args, results: list[dict], machine: dict) -> None:
    add_speedups(results)
    header = ["method", "impl", "launch", "tokens/s", "step s (median)", "peak MiB", "TFLOP/s", "MFU", "vs hf"]
    header.append("status")
    rows = []
    for r in results:
        if "tokens_per_s" not in r:  # not measured (a launch whose save failed was)
            rows.append([r["method"], r["impl"], r["launch"], "—", "—", "—", "—", "—", "—", r["status"]])
            continue
        mfu = r["mfu"] and 100 * r["mfu"]
        row = [r["method"], r["impl"], r["launch"], f"{r['tokens_per_s']:,.0f}", f"{r['step_s_median']:.3f}"]
        row += [f"{r['peak_memory_bytes'] / 2**20:,.0f}", f"{r['achieved_tflops']:.3f}", common.fmt(mfu, ".1f%")]
        row += [common.fmt(r.get("speedup_vs_hf"), ".2fx"), r["status"]]
        rows.append(row)
    print(f"\nmodel {common.describe_model(args)}, batch {args.batch_size}, max_seq_tokens {args.max_seq_tokens}, "
          f"{machine['device']}\n")  # fmt: skip
    print(common.markdown_table(header, rows, right={3, 4, 5, 6, 7, 8}))
    for r in results:
        if "loss_check" in r:
            c = r["loss_check"]
            print(f"{r['method']}: same batch, mean loss project {c['project']:.6f} vs plain HF {c['hf']:.6f}")
    common.write_json({"args": vars(args), "machine": machine, "results": results}, args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(parser)
    parser.add_argument("--methods", default="lora", help="comma list of " + ", ".join(METHODS))
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {', '.join(IMPLS)}")
    parser.add_argument("--launches", default="single", help=f"comma list of {', '.join(LAUNCHES)} (1 process each)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1 for the TRL variants)")
    parser.add_argument("--lora-rank", type=int, default=16, help="alpha = 2 x rank, dropout 0.05, all linear layers")
    parser.add_argument("--lr", type=float, default=0.0, help="0 = 4e-4 for adapters, 2e-5 for full fine-tuning")
    parser.add_argument("--processes", default="per-variant", choices=("per-variant", "shared"))
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting variants after this many seconds")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a JSON spec: run these variants in this process
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.child:
        child(args.child)
        return
    unknown = [i for i in args.impls.split(",") if i not in IMPLS] + [
        lc for lc in args.launches.split(",") if lc not in LAUNCHES
    ]
    if unknown:
        raise SystemExit(f"unknown --impls/--launches: {', '.join(unknown)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = common.machine_info(device)
    print(f"machine: {machine}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        described = common.describe_model(args)
        args.model = common.model_path(args, Path(tmp))
        args.random_llama_1b = args.random_weights = False  # the children load the folder written above
        results = run_all(args, variants_of(args), common.Deadline(args.budget_s), Path(tmp))
        args.model = described
    machine["load_average_after"] = list(os.getloadavg())
    report(args, results, machine)


if __name__ == "__main__":
    main()
