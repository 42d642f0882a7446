"""The phases of a training run, in the order `arxiv_ft.train.train` calls them:

    launch -> task -> build the method -> fit set-up -> [Run] -> evaluate -> fit -> evaluate -> probes -> save -> ledger

The first phases take the config and what earlier ones returned; from the fit set-up on, every phase takes one frozen
`Run` (config, launch, task, trainable, set-up) and the training state where it reads or changes it. The work lives in
the modules that own it: the launch (launch.py), checkpoints and best/ (checkpoints.py), cost (metrics.py), probes
(forgetting.py), TF-IDF (baseline.py), the ledger (ledger.py); this module only orders them. Mutable state: the
`TrainState` fit advances (periodic evaluations append to it), and the optimizer and schedule inside the set-up
(resume restores them).
"""

from __future__ import annotations

import logging
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import DistributedType
from accelerate.utils import broadcast_object_list

from arxiv_ft import checkpoints as ckpt
from arxiv_ft import records as rec
from arxiv_ft.baseline import run_tfidf_rows as tfidf_rows
from arxiv_ft.card import model_card, push_run, upload_failed
from arxiv_ft.checkpoints import ensure_checkpoint, resume, save_checkpoint, save_weights
from arxiv_ft.classifier import Classifier, evaluate
from arxiv_ft.data import BatchPlan, ChatTemplateError, PromptBuilder, tokenize_dataset
from arxiv_ft.fileio import FolderLock, cached_json, claim_on_main, json_digest
from arxiv_ft.fit import Setup, Stopped, TrainState, fit, schedule
from arxiv_ft.forgetting import probe_base, probe_tuned
from arxiv_ft.launch import Launch, start
from arxiv_ft.ledger import scored_as
from arxiv_ft.ledger import write_run_ledger as write_ledger
from arxiv_ft.merge import merge_run
from arxiv_ft.metrics import cost_figures, format_report
from arxiv_ft.modeling import ModelSource, cache_dir, count_parameters, estimate_memory, load_tokenizer, model_config
from arxiv_ft.objectives import get_objective
from arxiv_ft.options import TrainConfig, every_steps
from arxiv_ft.prompts import PromptSpec, chat_date_string, resolve_chat_template
from arxiv_ft.rundir import RunDir
from arxiv_ft.scoring import check_scoring_memory
from arxiv_ft.sources import SourceError, load_papers, load_test

# The phases train() calls that live with the modules owning their files (kept here so train() reads as one list).
__all__ = ["Launch", "start", "resume", "save_checkpoint", "ensure_checkpoint", "save_weights", "probe_base"]
__all__ += ["probe_tuned", "tfidf_rows", "write_ledger"]

logger = logging.getLogger("arxiv_ft")


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


@dataclass(frozen=True)
class Run:
    """What every phase after the set-up reads, fixed for the life of the run."""

    cfg: TrainConfig
    launch: Launch
    task: Task
    trainable: Trainable
    setup: Setup


# ---------------------------------------------------------------------------------------------------- evaluate


def zero_shot_evaluation(run: Run) -> dict:
    """The base model's scores on the evaluation papers, computed once per base model, papers, prompt and numerics
    and then read from the cache (like the base probes): every run of a comparison shares its zero-shot row."""
    cfg, launch, task = run.cfg, run.launch, run.task
    papers = json_digest([r.to_json() for r in task.eval_records])
    key = {
        "version": 1,
        "base": {k: task.source.record()[k] for k in ("name", "hub_id", "revision", "fingerprint")},
        "papers": papers,
        "labels": task.labels,
        "prompt": task.prompt.to_json(),
        "mode": cfg.eval_mode,
        "numerics": [str(launch.dtype), launch.device.type, launch.method.quantized],
    }
    compute = lambda: run_evaluation(run, "zero-shot")  # noqa: E731
    result, cached = cached_json(cache_dir() / "zero-shot", "zero-shot", key, compute, write=launch.is_main)
    if cached:
        score = scored_as(result)
        launch.log(f"[zero-shot] accuracy {score['accuracy']:.4f} macro-F1 {score['macro_f1']:.4f} (cached)")
    return result


def run_evaluation(run: Run, name: str, test: bool = False) -> dict:
    """Score the validation papers (or with `test`, the test papers) with the model as it is now; log accuracy and
    macro-F1; return the metrics."""
    cfg, launch, task, trainable = run.cfg, run.launch, run.task, run.trainable
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


# ------------------------------------------------------------------------------------------------------- cost


def fit_run(run: Run, state: TrainState, before: dict | None, should_stop) -> TrainState:
    """Train from `state` to the plan's end: checkpoints, periodic evaluations with best/, and stop signals as the
    config asks (fit.fit does the steps)."""
    cfg, steps = run.cfg, run.setup.plan.steps
    return fit(
        run.setup,
        state,
        log=run.launch.log,
        log_every=cfg.log_every_steps,
        checkpoint_every=every_steps(cfg.checkpoint_every_steps, steps),
        checkpoint=lambda state: save_checkpoint(run, state, before),
        eval_every=every_steps(cfg.eval_every_steps, steps),
        evaluate=lambda state: evaluate_and_keep_best(run, state),
        should_stop=should_stop,
        track=run.launch.accelerator.log,
    )


def stop_if_asked(run: Run, should_stop, state: TrainState, before) -> None:
    """Between the phases after training: a stop signal saves (if needed) and stops, instead of being swallowed."""
    if should_stop():
        ckpt.ensure_checkpoint(run, state, before)
        raise Stopped(state.step)


def evaluate_and_keep_best(run: Run, state: TrainState) -> None:
    """A periodic evaluation: log it, track it (in `state`), and keep best/ by macro-F1."""
    launch = run.launch
    result = run_evaluation(run, f"step {state.step}")
    score = scored_as(result)
    entry = {"step": state.step, "accuracy": score["accuracy"], "macro_f1": score["macro_f1"]}
    state.evals.append(entry)
    launch.accelerator.log({"eval/accuracy": entry["accuracy"], "eval/macro_f1": entry["macro_f1"]}, step=state.step)
    if state.best is None or entry["macro_f1"] > state.best["macro_f1"]:
        state.best = entry
        ckpt.save_best(run, entry, state.step)
        launch.log(f"best so far (macro-F1 {entry['macro_f1']:.4f}) saved to {Path(run.cfg.output_dir) / 'best'}")


# ------------------------------------------------------------------------------------------ output folder


def claim_output(cfg: TrainConfig, launch: Launch):
    """Lock the output folder for this run and refuse to mix runs in it (see RunDir.prepare); every process stops
    alike when the main one refuses."""

    def take() -> FolderLock:
        RunDir(cfg.output_dir).refuse_overlap(read_inputs(cfg))
        lock = FolderLock(cfg.output_dir).acquire("train")
        try:
            RunDir(cfg.output_dir).prepare(cfg.resume, cfg.overwrite_output_dir)
        except SystemExit:
            lock.release()
            raise
        return lock

    return claim_on_main(launch.accelerator, take)


def read_inputs(cfg: TrainConfig) -> dict[str, str]:
    """The local paths a run reads (its output folder must not overlap them): base model folder, data, labels."""
    named = {"--model": cfg.model, "--train-file": cfg.train_file, "--eval-file": cfg.eval_file, "--labels": cfg.labels}
    return {option: path for option, path in named.items() if path and Path(path).exists()}


# ------------------------------------------------------------------------------------------- the run folder


def collect_metrics(run: Run, state: TrainState, scored: dict, started: float) -> dict:
    """Everything measured, as metrics.json holds it. `scored`: "before", "after" (validation), "test" (the test
    papers' scores, or None), "tfidf" ({"validation": rows, "test": rows}, or None) and "forgetting"."""
    cfg, launch, task = run.cfg, run.launch, run.task
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
        "forgetting": scored["forgetting"],
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
        "cost": cost_figures(run, state, started),
    }


def setup_step_size(cfg, launch) -> int:
    return cfg.batch_size * cfg.grad_accum_steps * launch.accelerator.num_processes


def save_run(run: Run, metrics: dict) -> None:
    """The run folder: weights, tokenizer, task files, metrics (with the bytes saved) and the model card (every
    process calls this)."""
    cfg, launch, task = run.cfg, run.launch, run.task
    out = Path(cfg.output_dir)
    launch.accelerator.wait_for_everyone()
    ckpt.save_weights(run, out)
    if launch.is_main:
        folder = RunDir(out)
        metrics["cost"]["saved_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        folder.write_metrics(metrics)
        folder.write_card(model_card(cfg, task, metrics, folder.base_record(), sys_argv(), launch.revision))
        final, where = (metrics["test"]["after"], "test") if metrics["test"] else (metrics["after"], "validation")
        if "score" in (final or {}):
            launch.log(f"per class, {where} papers:\n" + format_report(final["score"], task.labels))
    launch.accelerator.wait_for_everyone()


def sys_argv() -> str:

    return " ".join(shlex.quote(a) for a in sys.argv)


def run_test(run: Run) -> dict | None:
    """The final model on the test papers (none without --test-file): scored once, never used for a choice."""
    return run_evaluation(run, "test", test=True) if run.task.test_records else None


def finish(run: Run, metrics: dict) -> None:
    """Trackers get the final figures; --merge and --push-to-hub run on the main process."""
    cfg, launch = run.cfg, run.launch
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
