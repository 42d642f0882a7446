"""The phases of a training run, in the order `arxiv_ft.train.train` calls them:

    launch -> task -> build the method -> evaluate -> fit -> evaluate -> probes -> save the run -> ledger

Each phase is a function of the config and what earlier phases returned; none keeps hidden state. The heavy
libraries load here, not where the command line is parsed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType
from accelerate.utils import InitProcessGroupKwargs, TorchDynamoPlugin, broadcast_object_list, set_seed
from safetensors.torch import load_file, save_file

from arxiv_ft import baseline
from arxiv_ft import checkpoints as ckpt
from arxiv_ft import records as rec
from arxiv_ft.card import model_card, push_run, upload_failed
from arxiv_ft.classifier import Classifier, evaluate
from arxiv_ft.config import to_dict
from arxiv_ft.data import (
    BatchPlan,
    ChatTemplateError,
    PromptBuilder,
    tokenize_dataset,
)
from arxiv_ft.fileio import FolderLock, cached_json, fsync_dir, fsync_tree, read_json, write_json
from arxiv_ft.fit import Setup, Stopped, TrainState, lr_schedule
from arxiv_ft.forgetting import ProbeConfig, base_probes_cached, describe_forgetting, forgetting_delta, run_probes
from arxiv_ft.ledger import Ledger, git_revision, now, package_versions, scored_as, scores
from arxiv_ft.merge import merge_run
from arxiv_ft.methods import Method, get_method
from arxiv_ft.metrics import format_report, model_flops_utilisation, peak_flops, peak_memory_bytes
from arxiv_ft.modeling import (
    ModelSource,
    cache_dir,
    count_parameters,
    estimate_memory,
    load_tokenizer,
    model_config,
    parameter_bytes,
    register_in_hub_cache,
    resolve_dtype,
    set_cpu_threads,
)
from arxiv_ft.objectives import get_objective
from arxiv_ft.options import TrainConfig
from arxiv_ft.prompts import PromptSpec, chat_date_string, resolve_chat_template
from arxiv_ft.rundir import RunDir
from arxiv_ft.scoring import check_scoring_memory
from arxiv_ft.sources import SourceError, load_test, to_records
from arxiv_ft.sources import load_task as load_papers

logger = logging.getLogger("arxiv_ft")

# Options that may change between a run and its resumption; any other difference makes a checkpoint unusable.
RESUMABLE_CHANGES = {
    "batch_size",  # with grad_accum_steps and the process count: only their product (checked) must stay
    "grad_accum_steps",
    "resume",
    "output_dir",
    "overwrite_output_dir",
    "log_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "eval_batch_size",
    "eval_mode",
    "expect_processes",
    "report_to",
    "run_name",
    "cpu_threads",
    "push_to_hub",
    "merge",
}


# ------------------------------------------------------------------------------------------------------ launch


@dataclass
class Launch:
    """What the launcher gave this process, checked: the accelerator, the launch kind, device and dtype."""

    accelerator: Accelerator
    kind: str  # a row of the compatibility matrix: single, ddp, zero2, zero3, zero3-offload, fsdp
    method: Method
    dtype: torch.dtype
    trackers: list[str] = field(default_factory=list)
    revision: str | None = None  # the package's git commit when the run started (what ran, whatever is committed later)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def log(self, message: str) -> None:
        """An INFO line from each machine's main process (every node's log shows its progress)."""
        if self.accelerator.is_local_main_process:
            logger.info(message)


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


def start(cfg: TrainConfig) -> Launch:
    """Set up accelerate, check the launch and the method x launch x device cell, seed; before any data or model."""
    method = get_method(cfg.method)
    # gloo on CPU: without it accelerate + DeepSpeed miscount CPU processes (../shared/notes/cpu-stack.md).
    distributed_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    trackers = [t for t in cfg.report_to.split(",") if t and t != "none"]
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum_steps,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if distributed_cpu else [],
        log_with=trackers or None,
        project_dir=str(Path(cfg.output_dir) / "logs"),
        # Regional compilation: one graph compiled once and reused by every decoder layer (a shorter cold start).
        dynamo_plugin=TorchDynamoPlugin(backend="inductor", use_regional_compilation=True) if cfg.compile else None,
    )
    check_launch(accelerator, cfg.expect_processes)
    if accelerator.device.type == "cpu":
        set_cpu_threads(cfg.cpu_threads)
    dtype = resolve_dtype(cfg.dtype_name, accelerator.device, trains_every_weight=not method.adapter)
    kind = launch_kind(accelerator)
    method.check(kind, accelerator.device.type, cfg.bnb_quant_storage, "bf16" if dtype == torch.bfloat16 else "fp32")
    if trackers:
        name = cfg.run_name or Path(cfg.output_dir).name
        accelerator.init_trackers("arxiv-ft", config=to_dict(cfg), init_kwargs={"wandb": {"name": name}})
    set_seed(cfg.seed)
    return Launch(accelerator, kind, method, dtype, trackers, git_revision())


# -------------------------------------------------------------------------------------------------------- task


@dataclass
class Task:
    """The label set, the papers, the tokenizer and prompt, and the tokenised training examples."""

    labels: list[str]
    train: object  # datasets.Dataset of the sampled training papers (sources.normalise's columns)
    eval_records: list[rec.Record]
    test_records: list[rec.Record]  # scored once after training; never used for a choice
    source: ModelSource
    tokenizer: object
    prompt: PromptSpec
    builder: PromptBuilder
    examples: object  # data.TokenizedExamples: Arrow-backed, shared by every process
    tokenize_stats: dict
    has_prefix: bool  # every prompt starts with the shared prefix


def load_task(cfg: TrainConfig, launch: Launch) -> Task:
    """Labels first, so an unknown label in the data fails before any model is loaded; then tokenise (cached)."""
    try:
        labels, train, evals = load_papers(cfg)
        test = load_test(cfg, labels)
    except (SourceError, rec.RecordError, ValueError) as exc:
        raise SystemExit(str(exc)) from None
    if not evals:
        raise SystemExit(f"{cfg.eval_file}: no evaluation papers (with --eval-per-class {cfg.eval_per_class})")
    check_test_unseen(cfg, test, evals, train)
    source = ModelSource(cfg.model, cfg.model_revision or None)
    tokenizer = load_tokenizer(source, cfg.trust_remote_code)
    resolve_chat_template(tokenizer, cfg.chat_template, cfg.model)
    chat_kwargs = {"date_string": pinned_chat_date(cfg, launch)}
    prompt = PromptSpec(cfg.template, cfg.max_seq_tokens, cfg.token_budget, cfg.system_role, chat_kwargs)
    try:
        builder = PromptBuilder.from_spec(tokenizer, prompt, labels)
    except ChatTemplateError as exc:
        raise SystemExit(f"--model {cfg.model}: {exc}") from None
    cache = cache_dir() / "datasets"
    examples, stats, has_prefix = tokenize_dataset(builder, train, cache, launch.accelerator.main_process_first)
    if not len(examples):
        raise SystemExit(f"no trainable examples in {cfg.train_file}: {stats}")
    launch.log(
        f"labels: {len(labels)}; train: {len(examples)} examples ({stats}); validation: {len(evals)} papers; "
        f"test: {len(test)} papers"
    )
    return Task(labels, train, evals, test, source, tokenizer, prompt, builder, examples, stats, has_prefix)


def check_test_unseen(cfg: TrainConfig, test: list[rec.Record], evals: list[rec.Record], train) -> None:
    """A test paper that is also a validation or training paper would turn the test number into a selection (or
    training) number: refused, naming one such paper."""
    if not test:
        return
    test_ids = {r.id for r in test}
    for name, ids in (("--eval-file", {r.id for r in evals}), ("--train-file", set(train["id"]))):
        shared = sorted(test_ids & ids)
        if shared:
            raise SystemExit(
                f"--test-file {cfg.test_path}: {len(shared)} test paper(s) are also in {name} (e.g. {shared[0]}); "
                "test papers must take no part in training or selection"
            )


def pinned_chat_date(cfg: TrainConfig, launch: Launch) -> str:
    """The date chat templates print in this run's prompts (Llama 3's "Today Date"), saved in prompt.json.

    --chat-date if given; else the date of the checkpoint being resumed (a run resumed days later keeps training on the
    prompts it started with); else today as the main process sees it (processes started either side of midnight
    would tokenise different prompts).
    """
    if cfg.chat_date:
        return cfg.chat_date
    for path in ckpt.find_resume(cfg.output_dir, cfg.resume):
        saved = RunDir(path).prompt().chat_kwargs.get("date_string") if (path / "prompt.json").is_file() else None
        if saved:
            return saved
    day = [chat_date_string()]
    if launch.accelerator.num_processes > 1:
        broadcast_object_list(day)
    return day[0]


# -------------------------------------------------------------------------------------------------------- build


@dataclass
class Trainable:
    """The model being trained, its objective (model + loss in one module) and what it shares across rows."""

    model: torch.nn.Module
    objective: torch.nn.Module
    head: torch.nn.Module | None  # the cls-head objective's classification head
    prefix: list[int]
    n_trainable: int
    n_total: int


def build(cfg: TrainConfig, launch: Launch, task: Task) -> Trainable:
    """Load the base, apply the method, and wrap model + loss as the objective asks."""
    log_memory_estimate(cfg, launch, task)
    check_label_memory(cfg, launch, task)
    model = launch.method.build(task.source, cfg, launch.dtype, launch.device, launch.accelerator.local_process_index)
    n_trainable, n_total = count_parameters(model)
    launch.log(f"{cfg.method}: {n_trainable:,} trainable of {n_total:,} parameters")
    # The system turn every prompt shares runs once per micro-batch instead of once per example. (Gradient
    # checkpointing drops the KV cache the shared prefix lives in.)
    prefix = task.builder.shared_prefix_ids() if cfg.share_prefix and not cfg.gradient_checkpointing else []
    if prefix and not task.has_prefix:
        launch.log("not every prompt starts with the shared prefix: prefix sharing off")
        prefix = []
    objective, head = get_objective(cfg.objective).build(cfg, model, task.builder, task.labels, prefix, launch.device)
    return Trainable(model, objective, head, prefix, n_trainable + (head_size(head)), n_total + head_size(head))


def log_memory_estimate(cfg: TrainConfig, launch: Launch, task: Task) -> None:
    """Before the base loads (main process): what its weights, gradients, AdamW states and adapters will take."""
    if not launch.is_main:
        return
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        # Building even a meta model under ZeRO-3 enters deepspeed.zero.Init, whose collectives the other processes
        # never join; and the estimate is of one unsharded copy, which ZeRO-3 is there to avoid.
        launch.log("memory estimate: not made under ZeRO-3 (weights, gradients and AdamW states are sharded)")
        return
    try:
        config = model_config(task.source, cfg.trust_remote_code)
        if config is None:
            launch.log(f"memory estimate: no config of {cfg.model} here (not a folder, cached, or in KNOWN_MODELS)")
            return
        targets = cfg.lora_targets.split(",")
        estimate = estimate_memory(config, launch.method, launch.dtype, cfg.lora_rank, targets, cfg.lora_layers)
    except Exception as exc:  # an estimate is advice: a model it cannot build on the meta device still trains
        launch.log(f"memory estimate for {cfg.model} failed: {exc}")
        return
    launch.log(f"memory estimate for {cfg.model} ({cfg.method}, {launch.dtype}): {estimate.describe()}")


def check_label_memory(cfg: TrainConfig, launch: Launch, task: Task) -> None:
    """Before the base loads: a label set whose trie cannot be scored (or trained through) in this device's memory is
    refused now, not after training (see scoring.check_scoring_memory)."""
    objective = get_objective(cfg.objective)
    try:
        config = model_config(task.source, cfg.trust_remote_code)
    except Exception:  # no config here: the estimate is skipped, as log_memory_estimate's is
        config = None
    if config is None:
        return
    if cfg.eval_mode != "generate" and not objective.scores_with_head:
        check_scoring_memory(task.builder, config, cfg.eval_batch_size, launch.device, "--eval-batch-size")
    if objective.trie_in_training:
        check_scoring_memory(task.builder, config, cfg.batch_size, launch.device, "--batch-size", factor=3)


def head_size(head) -> int:
    return 0 if head is None else sum(p.numel() for p in head.parameters())


def setup_fit(cfg: TrainConfig, launch: Launch, task: Task, trainable: Trainable) -> Setup:
    """Batch plan, optimizer, schedule; accelerate prepares the objective and optimizer."""
    acc, world = launch.accelerator, launch.accelerator.num_processes
    plan = BatchPlan(
        task.examples,
        cfg.batch_size * world * cfg.grad_accum_steps,
        cfg.grad_accum_steps,
        cfg.epochs,
        cfg.max_steps,
        cfg.seed,
        cfg.group_by_length,
    )
    trainable_params = [p for p in trainable.objective.parameters() if p.requires_grad]
    # Fused AdamW: one kernel per step on CUDA instead of a loop over parameters.
    optimizer = torch.optim.AdamW(
        trainable_params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=launch.device.type == "cuda"
    )
    if acc.distributed_type == DistributedType.DEEPSPEED:
        # The DeepSpeed config says "auto" for these: they come from this config, so they cannot disagree.
        ds_config = acc.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
        ds_config["gradient_clipping"] = cfg.max_grad_norm
    train_model, optimizer = acc.prepare(trainable.objective, optimizer)
    scheduler = schedule(cfg, optimizer, plan.steps)
    objective = get_objective(cfg.objective)
    collate = objective.collate(cfg, task.tokenizer.pad_token_id, len(trainable.prefix), task.builder)
    units = objective.units(cfg, task.builder)
    return Setup(acc, train_model, optimizer, scheduler, plan, collate, units, cfg.max_grad_norm, cfg.seed)


def schedule(cfg: TrainConfig, optimizer, total_steps: int, step: int = 0):
    """The learning-rate schedule the config asks for, positioned at `step`."""
    warmup = min(total_steps, math.ceil(cfg.warmup_ratio * total_steps))
    return lr_schedule(optimizer, cfg.lr_schedule, warmup, total_steps, cfg.min_lr_ratio, step)


# ---------------------------------------------------------------------------------------------------- evaluate


def zero_shot_evaluation(cfg: TrainConfig, launch: Launch, task: Task, trainable: Trainable) -> dict:
    """The base model's scores on the evaluation papers, computed once per base model, papers, prompt and numerics
    and then read from the cache (like the base probes): every run of a comparison shares its zero-shot row."""
    papers = hashlib.sha256(json.dumps([r.to_json() for r in task.eval_records]).encode()).hexdigest()
    key = {
        "version": 1,
        "base": {k: task.source.record()[k] for k in ("name", "hub_id", "revision", "fingerprint")},
        "papers": papers,
        "labels": task.labels,
        "prompt": task.prompt.to_json(),
        "mode": cfg.eval_mode,
        "numerics": [str(launch.dtype), launch.device.type, launch.method.quantized],
    }
    compute = lambda: run_evaluation(cfg, launch, task, trainable, "zero-shot")  # noqa: E731
    result, cached = cached_json(cache_dir() / "zero-shot", "zero-shot", key, compute, write=launch.is_main)
    if cached:
        score = scored_as(result)
        launch.log(f"[zero-shot] accuracy {score['accuracy']:.4f} macro-F1 {score['macro_f1']:.4f} (cached)")
    return result


def run_evaluation(
    cfg: TrainConfig, launch: Launch, task: Task, trainable: Trainable, name: str, test: bool = False
) -> dict:
    """Score the validation papers (or with `test`, the test papers) with the model as it is now; log accuracy and
    macro-F1; return the metrics."""
    acc = launch.accelerator
    model = acc.unwrap_model(trainable.model)
    was_training = model.training
    model.eval()
    head = trainable.head if name != "zero-shot" else None
    if head is not None:
        head.eval()
    try:
        classifier = Classifier(model, task.tokenizer, task.builder, head)
        with torch.no_grad():
            records = task.test_records if test else task.eval_records
            result = evaluate(classifier, records, acc, cfg.eval_mode, cfg.eval_batch_size)
    finally:
        model.train(was_training)
        if head is not None:
            head.train(was_training)
    for mode in ("score", "generate"):
        if mode in result:
            m = result[mode]
            launch.log(f"[{name}] {mode}: accuracy {m['accuracy']:.4f} macro-F1 {m['macro_f1']:.4f} (n={m['n']})")
    return result


# ------------------------------------------------------------------------------------------------ checkpoints


def resume(cfg: TrainConfig, launch: Launch, setup: Setup, trainable: Trainable) -> tuple[TrainState, dict | None]:
    """The newest usable checkpoint's state (model and optimizer restored) and its zero-shot scores, or a fresh
    state."""
    for path in ckpt.find_resume(cfg.output_dir, cfg.resume):
        problem = ckpt.verify(path)
        if problem:
            launch.log(f"skipping checkpoint {path}: {problem}")
            continue
        saved = ckpt.read_state(path)
        check_resumable(saved.get("config", {}), to_dict(cfg))
        global_batch = saved.get("global_batch", setup.plan.step_size)
        if global_batch != setup.plan.step_size:
            world = launch.accelerator.num_processes
            raise SystemExit(
                f"{path} was trained with {global_batch} examples per optimizer step; this launch makes "
                f"{setup.plan.step_size} ({cfg.batch_size} per micro-batch x {world} processes x "
                f"{cfg.grad_accum_steps} accumulation steps): choose --batch-size / --grad-accum-steps so the "
                "product is the same, and the same global batches follow"
            )
        if saved.get("format") == "accelerate" and saved.get("world_size") != launch.accelerator.num_processes:
            raise SystemExit(
                f"{path} holds {saved.get('world_size')} DeepSpeed/FSDP shards, this launch has "
                f"{launch.accelerator.num_processes} processes: resume with the same number (DeepSpeed cannot "
                "re-shard them), or from a checkpoint of a DDP/single-process run"
            )
        load_checkpoint(launch, setup, trainable, path, saved)
        state = TrainState.from_json(saved["state"])
        setup.scheduler = schedule(cfg, setup.optimizer, setup.plan.steps, state.step)
        changed = saved.get("world_size") != launch.accelerator.num_processes
        launch.log(
            f"resumed from {path} at step {state.step}/{setup.plan.steps}"
            + (f" (saved by {saved.get('world_size')} processes; the same global batches follow)" if changed else "")
        )
        return state, saved.get("before")
    return TrainState(), None


def check_resumable(saved: dict, current: dict) -> None:
    """Refuse to resume a checkpoint made with a different training configuration."""
    changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise SystemExit(
            f"checkpoint was made with a different config ({details}); use --resume none or a new output dir"
        )


def _uses_accelerate_state(acc) -> bool:
    return acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def _gathered_state_dict(acc, train_model) -> dict | None:
    """Full weights where they exist only sharded (ZeRO-3, FSDP2): every rank takes part, the main one gets them.

    (FSDP2's parameters are DTensors; `save_pretrained` on them fails, their gathered state dict saves.)"""
    plugin = acc.state.deepspeed_plugin
    if (plugin is not None and plugin.zero_stage == 3) or acc.distributed_type == DistributedType.FSDP:
        full = acc.get_state_dict(train_model)
        return {k.removeprefix("model."): v for k, v in full.items()} if full is not None else None
    return None


def save_weights(cfg, launch: Launch, task: Task, trainable: Trainable, setup: Setup | None, folder: Path) -> None:
    """Write a loadable run folder's weights and task files into `folder` (every process calls this)."""
    acc = launch.accelerator
    state_dict = _gathered_state_dict(acc, setup.train_model) if setup is not None else None
    if acc.is_main_process:
        run = RunDir(folder)
        model = acc.unwrap_model(trainable.model)
        head = trainable.head.state_dict() if trainable.head is not None else None
        if state_dict is not None and head is not None:
            head = {k.removeprefix("head."): v for k, v in state_dict.items() if k.startswith("head.")}
        run.write_weights(launch.method, model, state_dict=state_dict, head_state=head)
        run.write_task(to_dict(cfg), task.labels, task.prompt, task.source.record())
        run.write_tokenizer(task.tokenizer)  # every loadable folder carries its own tokenizer and chat template
        hub_id = task.source.hub_id()
        run.fix_adapter_base(hub_id)
        if hub_id and launch.method.adapter:  # so plain peft finds the base by that id offline, here
            register_in_hub_cache(task.source.path(), hub_id)


def save_checkpoint(
    cfg, launch: Launch, task: Task, trainable: Trainable, setup: Setup, state: TrainState, before: dict | None
) -> Path:
    """A resumable, loadable checkpoint of `state.step` (see arxiv_ft/checkpoints.py)."""
    acc = launch.accelerator
    root = ckpt.checkpoint_root(cfg.output_dir)
    partial, final = root / f"step-{state.step:08d}.partial", root / f"step-{state.step:08d}"
    if acc.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # a leftover of a crash while saving this same step
        partial.mkdir(parents=True)
    acc.wait_for_everyone()
    save_weights(cfg, launch, task, trainable, setup, partial)
    sharded = _uses_accelerate_state(acc)
    if sharded:
        acc.save_state(str(partial / ckpt.ACCELERATE_STATE))
    acc.wait_for_everyone()
    if acc.is_main_process:
        if not sharded:
            tensors, meta = ckpt.optimizer_tensors(setup.optimizer)
            save_file(tensors, partial / ckpt.OPTIMIZER_FILE)
            write_json(partial / ckpt.OPTIMIZER_META, meta)
        ckpt.write_state(
            partial,
            {
                "format": "accelerate" if sharded else "safetensors",
                "world_size": acc.num_processes,
                "global_batch": setup.plan.step_size,
                "config": to_dict(cfg),
                "state": state.to_json(),
                "before": before,
            },
        )
        ckpt.publish(partial, final, state.step)
        ckpt.rotate(cfg.output_dir, cfg.keep_checkpoints)
    acc.wait_for_everyone()
    return final


def load_checkpoint(launch: Launch, setup: Setup, trainable: Trainable, path: Path, saved: dict) -> None:
    """Restore trained weights and optimizer state from a checkpoint (every process)."""
    acc = launch.accelerator
    if saved.get("format") == "accelerate":
        acc.load_state(str(path / ckpt.ACCELERATE_STATE))
        return
    model = acc.unwrap_model(trainable.model)
    if launch.method.adapter:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    else:
        weights = {}
        for file in sorted(path.glob("model*.safetensors")):
            weights.update(load_file(file))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or {})
        if unexpected or [k for k in missing if k not in tied]:
            raise SystemExit(
                f"{path}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
    if trainable.head is not None:
        trainable.head.load_state_dict(load_file(path / "classifier_head.safetensors"))
    ckpt.load_optimizer(setup.optimizer, load_file(path / ckpt.OPTIMIZER_FILE), read_json(path / ckpt.OPTIMIZER_META))


def save_best(cfg, launch: Launch, task: Task, trainable: Trainable, setup: Setup, metrics: dict, step: int) -> None:
    """Replace best/ with the model as it is now (every process; the swap is atomic on the main one)."""
    out = Path(cfg.output_dir)
    partial, best, old = out / "best.partial", out / "best", out / "best.old"
    if launch.is_main:
        shutil.rmtree(partial, ignore_errors=True)
    launch.accelerator.wait_for_everyone()
    save_weights(cfg, launch, task, trainable, setup, partial)
    if launch.is_main:
        RunDir(partial).write_metrics({"step": step, "eval": metrics})
        fsync_tree(partial)
        shutil.rmtree(old, ignore_errors=True)
        if best.exists():
            os.replace(best, old)
        os.replace(partial, best)
        shutil.rmtree(old, ignore_errors=True)
        fsync_dir(out)
    launch.accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------------------------- cost


def cost_figures(cfg, launch: Launch, trainable: Trainable, state: TrainState, started: float) -> dict:
    """Wall and training time, device-hours, money, throughput, MFU, memory and parameter counts."""
    acc, world = launch.accelerator, launch.accelerator.num_processes
    wall = time.perf_counter() - started
    device_hours = wall * world / 3600
    tokens_per_second = state.tokens_seen / state.train_seconds if state.train_seconds else None
    flops = launch.method.flops_per_token(trainable.n_total, trainable.n_trainable)
    # Full fine-tuning keeps fp32 weights and computes in bf16 under mixed precision: the peak is bf16's.
    compute = torch.bfloat16 if acc.mixed_precision == "bf16" else launch.dtype
    peak = cfg.peak_tflops * 1e12 or peak_flops(launch.device, compute)
    mfu = model_flops_utilisation(flops, tokens_per_second / world if tokens_per_second else None, peak)

    return {
        "wall_seconds": wall,
        "train_seconds": state.train_seconds,
        "device_type": torch.cuda.get_device_name(launch.device) if launch.device.type == "cuda" else "cpu",
        "device_count": world,
        "device_hours": device_hours,
        "tokens_seen": state.tokens_seen,
        "tokens_per_second": tokens_per_second,
        "flops_per_token": flops,
        "mfu": mfu,
        "peak_memory_bytes": peak_memory_bytes(launch.device),  # this process's (every rank holds the same shapes)
        "trainable_parameters": trainable.n_trainable,
        "total_parameters": trainable.n_total,
        "parameter_bytes": parameter_bytes(acc.unwrap_model(trainable.model)),
        "price_per_device_hour": cfg.price_per_device_hour or None,
        "cost": device_hours * cfg.price_per_device_hour if cfg.price_per_device_hour else None,
    }


def ensure_checkpoint(cfg, launch, task, trainable, setup, state: TrainState, before) -> None:
    """A checkpoint of the step reached, unless the newest one already is."""
    done = ckpt.complete_checkpoints(cfg.output_dir)
    if not (done and ckpt._step_of(done[-1]) == state.step):
        save_checkpoint(cfg, launch, task, trainable, setup, state, before)


def stop_if_asked(should_stop, cfg, launch, task, trainable, setup, state: TrainState, before) -> None:
    """Between the phases after training: a stop signal saves (if needed) and stops, instead of being swallowed."""
    if should_stop():
        ensure_checkpoint(cfg, launch, task, trainable, setup, state, before)
        raise Stopped(state.step)


def evaluate_and_keep_best(cfg, launch: Launch, task: Task, trainable: Trainable, setup: Setup, state) -> None:
    """A periodic evaluation: log it, track it, and keep best/ by macro-F1."""
    result = run_evaluation(cfg, launch, task, trainable, f"step {state.step}")
    score = scored_as(result)
    entry = {"step": state.step, "accuracy": score["accuracy"], "macro_f1": score["macro_f1"]}
    state.evals.append(entry)
    launch.accelerator.log({"eval/accuracy": entry["accuracy"], "eval/macro_f1": entry["macro_f1"]}, step=state.step)
    if state.best is None or entry["macro_f1"] > state.best["macro_f1"]:
        state.best = entry
        save_best(cfg, launch, task, trainable, setup, entry, state.step)
        launch.log(f"best so far (macro-F1 {entry['macro_f1']:.4f}) saved to {Path(cfg.output_dir) / 'best'}")


# ------------------------------------------------------------------------------------------ output folder


class _NoLock:
    def release(self) -> None:
        pass


def claim_output(cfg: TrainConfig, launch: Launch):
    """Lock the output folder for this run and refuse to mix runs in it (see RunDir.prepare); every process stops
    alike when the main one refuses."""
    problem, lock = [None], _NoLock()
    if launch.is_main:
        try:
            RunDir(cfg.output_dir).refuse_overlap(read_inputs(cfg))
            lock = FolderLock(cfg.output_dir).acquire("train")
            RunDir(cfg.output_dir).prepare(cfg.resume, cfg.overwrite_output_dir)
        except SystemExit as exc:
            lock.release()
            problem = [str(exc)]
    if launch.accelerator.num_processes > 1:
        broadcast_object_list(problem)
    if problem[0]:
        raise SystemExit(problem[0])
    return lock


def read_inputs(cfg: TrainConfig) -> dict[str, str]:
    """The local paths a run reads (its output folder must not overlap them): base model folder, data, labels."""
    named = {"--model": cfg.model, "--train-file": cfg.train_file, "--eval-file": cfg.eval_file, "--labels": cfg.labels}
    return {option: path for option, path in named.items() if path and Path(path).exists()}


# ------------------------------------------------------------------------------------------------ probes


def probe_config(cfg: TrainConfig):

    return ProbeConfig(n_windows=cfg.probe_windows, mc_items=cfg.probe_mc_items, kl=cfg.probe_kl)


def probe_base(cfg: TrainConfig, launch: Launch, task: Task, trainable: Trainable) -> dict | None:
    """The base model's probe results (cached per base model + probe config: probed once, not once per run).

    Probed before training, through the model being trained: LoRA and DoRA adapters start as the identity.
    """
    if not cfg.probes:
        return None

    key = base_probe_key(launch.dtype, launch.device, launch.method)
    model = launch.accelerator.unwrap_model(trainable.model)
    return base_probes_cached(
        task.source, task.tokenizer, lambda: model, probe_config(cfg), cache_dir() / "probes", key
    )


def base_probe_key(dtype, device, method: Method) -> dict:
    """What besides the base and the probe config changes the base's probe numbers (their cache key's extra part)."""
    key = {"dtype": str(dtype), "device": device.type, "quantized": method.quantized}
    if method.quantized:  # the base is probed through the kernel training uses (see prepare_for_kbit)
        key["kernel"] = "dequantize-matmul"
    return key


def probe_tuned(cfg, launch: Launch, task: Task, trainable: Trainable, base: dict | None) -> dict | None:
    """The tuned model's probes and the difference from the base."""
    if not cfg.probes:
        return None

    model = launch.accelerator.unwrap_model(trainable.model)
    # KL needs the base's next-token distributions: an adapter switched off is the base; full fine-tuning has
    # changed every weight, so the base is loaded again (a second copy, for the probe only).
    reference, probes = None, probe_config(cfg)
    if cfg.probe_kl and not hasattr(model, "disable_adapter"):
        if launch.kind in ("zero3", "zero3-offload", "fsdp"):
            # A second, unsharded copy is what sharding is there to avoid (and loading it would enter ZeRO-3's
            # partitioning): KL is left out here, and the perplexity and multiple-choice probes still run.
            launch.log("forgetting: KL(base || tuned) is not measured for full fine-tuning under ZeRO-3/FSDP")
            probes = replace(probes, kl=False)
        else:
            from arxiv_ft.modeling import load_model

            reference = load_model(task.source, launch.dtype, cfg.trust_remote_code).to(launch.device)
    tuned = run_probes(model, task.tokenizer, probes, base_model=reference)
    del reference
    delta = forgetting_delta(base, tuned)
    launch.log("forgetting: " + describe_forgetting(delta))
    return {"base": base, "tuned": tuned, "delta": delta}


# -------------------------------------------------------------------------------------------- baselines


def tfidf_rows(cfg: TrainConfig, launch: Launch, task: Task) -> dict | None:
    """TF-IDF + linear SVM on the same training papers, tuned (C by cross-validation on them) and untuned, reading
    the text the LLM's prompt holds and the full abstract: the bar the fine-tune must clear, measured in the run
    itself, on the validation and the test papers ({"validation": rows, "test": rows})."""
    if not cfg.tfidf_baseline:
        return None

    train = to_records(task.train)
    seen = {r.id: task.builder.visible_text(r) for r in train + task.eval_records + task.test_records}
    sets = {"validation": task.eval_records} | ({"test": task.test_records} if task.test_records else {})
    rows = baseline.tfidf_rows(train, sets, task.labels, lambda r: seen[r.id])
    for name, scored in rows.items():
        launch.log(
            f"[{name}] TF-IDF on the same {len(train)} papers: tuned {scored['tuned_llm_text']['accuracy']:.4f} "
            f"reading the prompt's text, {scored['tuned_full_text']['accuracy']:.4f} the full abstract; untuned "
            f"{scored['llm_text']['accuracy']:.4f} / {scored['full_text']['accuracy']:.4f}"
        )
    return rows


# ------------------------------------------------------------------------------------------- the run folder


def collect_metrics(cfg, launch, task, trainable, state: TrainState, scored: dict, forgetting, started):
    """Everything measured, as metrics.json holds it. `scored`: "before", "after" (validation), "test" (the test
    papers' scores, or None) and "tfidf" ({"validation": rows, "test": rows}, or None)."""
    tokens_seen = state.tokens_seen
    tfidf = scored["tfidf"] or {}
    return {
        "labels": task.labels,
        "n_train_examples": len(task.examples),
        "tokenize": task.tokenize_stats,
        "before": scored["before"],
        "after": scored["after"],
        "tfidf": tfidf.get("validation"),
        "test": {"after": scored["test"], "tfidf": tfidf.get("test"), "n": len(task.test_records)}
        if scored["test"] is not None
        else None,
        "forgetting": forgetting,
        "train": {
            "steps": state.step,
            "epochs": state.step * (setup_step_size(cfg, launch)) / len(task.examples),
            "loss_curve": state.loss_curve,
            "lr_curve": state.lr_curve,
            "evals": state.evals,
            "best": state.best,
            "tokens_seen": tokens_seen,
            "target_tokens_seen": state.target_tokens_seen,
            "train_seconds": state.train_seconds,
            "tokens_per_second": tokens_seen / state.train_seconds if state.train_seconds else None,
        },
        "cost": cost_figures(cfg, launch, trainable, state, started),
    }


def setup_step_size(cfg, launch) -> int:
    return cfg.batch_size * cfg.grad_accum_steps * launch.accelerator.num_processes


def save_run(cfg, launch: Launch, task: Task, trainable: Trainable, setup: Setup, metrics: dict) -> None:
    """The run folder: weights, tokenizer, task files, metrics and the model card (every process calls this)."""
    out = Path(cfg.output_dir)
    launch.accelerator.wait_for_everyone()
    save_weights(cfg, launch, task, trainable, setup, out)
    if launch.is_main:
        run = RunDir(out)
        run.write_tokenizer(task.tokenizer)
        metrics["cost"]["saved_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        run.write_metrics(metrics)

        run.write_card(model_card(cfg, task, metrics, run.base_record(), sys_argv(), launch.revision))
        final, where = (metrics["test"]["after"], "test") if metrics["test"] else (metrics["after"], "validation")
        if "score" in (final or {}):
            launch.log(f"per class, {where} papers:\n" + format_report(final["score"], task.labels))
    launch.accelerator.wait_for_everyone()


def sys_argv() -> str:

    return " ".join(shlex.quote(a) for a in sys.argv)


def write_ledger(cfg, launch: Launch, task: Task, metrics: dict) -> None:
    """The typed record of the run, written last: a folder with ledger.json holds a finished run."""
    if not launch.is_main:
        return

    cost = dict(metrics["cost"])
    for key in ("flops_per_token", "parameter_bytes"):
        cost.pop(key, None)
    ledger = Ledger(
        run_id=Path(cfg.output_dir).name,
        method=cfg.method,
        seed=cfg.seed,
        model=cfg.model,
        config=to_dict(cfg),
        data={
            "train_file": cfg.train_file,
            "eval_file": cfg.eval_file,
            "test_file": cfg.test_path or None,
            "n_test": len(task.test_records),
            "n_train": len(task.examples),
            "n_eval": len(task.eval_records),
            "labels": task.labels,
        },
        task={
            "before": scores(scored_as(metrics["before"])),
            "after": scores(scored_as(metrics["after"])),
            **tfidf_scores(metrics["tfidf"]),
        },
        test=None
        if metrics["test"] is None
        else {"after": scores(scored_as(metrics["test"]["after"])), **tfidf_scores(metrics["test"]["tfidf"])},
        forgetting=metrics["forgetting"],
        cost=cost,
        train={"loss_curve": metrics["train"]["loss_curve"], "steps": metrics["train"]["steps"]},
        versions=package_versions("torch", "transformers", "accelerate", "peft", "deepspeed", "bitsandbytes"),
        git_revision=launch.revision,
        created=now(),
        run_name=cfg.run_name or Path(cfg.output_dir).name,
    )
    ledger.write(Path(cfg.output_dir) / "ledger.json")


def tfidf_scores(rows: dict | None) -> dict:
    """A run's TF-IDF rows as ledger task entries (tfidf = untuned on the prompt's text, as in ledger version 1)."""
    rows = rows or {}
    names = {"tfidf": "llm_text", "tfidf_full_text": "full_text"}
    names |= {"tfidf_tuned": "tuned_llm_text", "tfidf_tuned_full_text": "tuned_full_text"}
    return {entry: scores(rows.get(row)) for entry, row in names.items()}


def run_test(cfg: TrainConfig, launch: Launch, task: Task, trainable: Trainable) -> dict | None:
    """The final model on the test papers (none without --test-file): scored once, never used for a choice."""
    return run_evaluation(cfg, launch, task, trainable, "test", test=True) if task.test_records else None


def finish(cfg: TrainConfig, launch: Launch, metrics: dict) -> None:
    """Trackers get the final figures; --merge and --push-to-hub run on the main process."""
    out = Path(cfg.output_dir)
    figures = {}
    for when in ("before", "after"):
        score = (metrics.get(when) or {}).get("score")
        if score:
            figures |= {f"eval_{when}/accuracy": score["accuracy"], f"eval_{when}/macro_f1": score["macro_f1"]}
    delta = (metrics.get("forgetting") or {}).get("delta") or {}
    figures |= {f"forgetting/{k}": v for k, v in delta.items() if isinstance(v, (int, float))}
    figures |= {f"cost/{k}": v for k, v in metrics["cost"].items() if isinstance(v, (int, float))}
    launch.accelerator.log(figures, step=metrics["train"]["steps"])
    if launch.is_main:
        if cfg.merge and launch.method.adapter:
            launch.log(f"merged model saved to {merge_run(out, out / 'merged')}")
        launch.log(f"saved to {out}")
        if cfg.push_to_hub:
            try:
                launch.log(f"uploaded {out} to {push_run(out, cfg.push_to_hub)}")
            except Exception as exc:  # offline, no token, a server error: the run is done; the upload can be retried
                raise SystemExit(upload_failed(out, cfg.push_to_hub, exc)) from None
