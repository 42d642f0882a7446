"""Task metrics (accuracy, macro-F1, per-class report, confusion matrix, calibration) and cost figures.

The classification figures come from one Hugging Face `evaluate` metric shipped in the package
(`arxiv_ft/evaluation/arxiv_classification.py`), loaded by path: `evaluate.load("accuracy")` and friends live on
the hub and fail offline, a local script does not. It is loaded once per process, and `evaluate` is imported only
then: on a busy CPU core the import takes 6.5-7.5 s (it pulls in transformers.pipelines, still ~7 s when torch and
transformers are already imported), the load itself 0.015-0.03 s, a call ~0.004 s for 420 papers, 0.6 s for 200k.
"""

from __future__ import annotations

import functools
from pathlib import Path

METRIC_SCRIPT = Path(__file__).with_name("evaluation") / "arxiv_classification.py"


@functools.cache
def load_metric():
    """The package's `evaluate` classification metric, loaded offline by path, once per process."""
    import evaluate

    # In memory: the default writes an Arrow file and a lock under ~/.cache/huggingface/metrics named by the
    # experiment id, which every rank of a multi-process run on one machine would share.
    return evaluate.load(str(METRIC_SCRIPT), keep_in_memory=True)


def classification_metrics(
    y_true: list[str], y_pred: list[str | None], labels: list[str], probs: list[list[float]] | None = None
) -> dict:
    """Accuracy, macro-F1, per-class figures and confusion matrix over the label set; calibration from `probs`.

    A prediction of None (an unparseable generation) counts as wrong; it gets its own confusion column, `<none>`.
    Macro-F1 averages over the labels that occur in `y_true` or `y_pred`; `per_class` lists every label.
    `probs` holds each paper's probability of every label in label-set order; from it come `ece` (expected
    calibration error of the top-1 probability against the arg-max label, 15 equal-width bins, Guo et al. 2017),
    `mean_confidence` (mean top-1 probability) and `brier` (mean squared distance to the one-hot true label, 0-2);
    without it they are None.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    if probs is not None and len(probs) != len(y_true):
        raise ValueError(f"{len(y_true)} true labels but {len(probs)} probability rows")
    # evaluate's string column refuses None; the metric counts any prediction outside the label set as unparsed.
    pred = ["<none>" if p is None else p for p in y_pred]
    return load_metric().compute(predictions=pred, references=list(y_true), labels=list(labels), probabilities=probs)


def format_report(metrics: dict, labels: list[str]) -> str:
    """A per-class table as text, like scikit-learn's classification_report."""
    lines = [f"{'label':<12}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
    for label in labels:
        c = metrics["per_class"][label]
        lines.append(f"{label:<12}{c['precision']:>10.3f}{c['recall']:>10.3f}{c['f1']:>10.3f}{c['support']:>9d}")
    lines.append(f"accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  (n={metrics['n']})")
    if metrics.get("ece") is not None:  # absent from metrics saved before calibration was measured
        lines.append(
            f"ECE {metrics['ece']:.4f}  mean confidence {metrics['mean_confidence']:.4f}  Brier {metrics['brier']:.4f}"
        )
    return "\n".join(lines)


def model_flops_utilisation(flops_per_token: float, tokens_per_s: float | None, peak: float | None) -> float | None:
    """MFU: achieved model FLOP/s (FLOPs per token from the method table) over the device's peak; None when either
    is unknown (CPUs have no agreed peak)."""
    if not peak or not tokens_per_s:
        return None
    return flops_per_token * tokens_per_s / peak


# Dense bf16 peak FLOP/s of common training GPUs, for MFU (fp32 peaks are far lower; MFU is reported for bf16).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def peak_flops(device, dtype) -> float | None:
    """The device's dense bf16 peak FLOP/s when it is a known GPU computing in bf16; None otherwise (CPUs)."""
    import torch

    if torch.device(device).type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def peak_memory_bytes(device) -> int:
    """This process's peak memory: allocated on a GPU, resident (RSS) on a CPU. The one way it is measured."""
    import resource

    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cost_figures(run, state, started: float) -> dict:
    """A training run's cost (`run`: phases.Run; `state`: its fit.TrainState; `started`: perf_counter at its start):
    wall and training time, device-hours, money, throughput, MFU, memory and parameter counts."""
    import time

    import torch

    from arxiv_ft.modeling import parameter_bytes

    cfg, launch, trainable = run.cfg, run.launch, run.trainable
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
