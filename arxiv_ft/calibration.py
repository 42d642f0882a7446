"""How far a classifier's probabilities can be trusted: temperature scaling fitted on validation papers, expected
calibration error, the out-of-set AUROC and the risk-coverage curve of abstaining below a confidence.

    arxiv-ft calibrate --model-dir runs/default            # fits T on the run's validation papers: RUN/calibration.json

infer.py then divides the label log-likelihoods by T before the softmax (its rows' `confidence` and `top_k` are the
calibrated probabilities; run.json records T, so a resumed output cannot mix two temperatures). Temperature scaling
(Guo et al. 2017) keeps every argmax: accuracy does not move, only how sure the model says it is.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from arxiv_ft.config import option

logger = logging.getLogger("arxiv_ft")
CALIBRATION = "calibration.json"


def nll(log_likelihoods: torch.Tensor, y: torch.Tensor, temperature: float) -> float:
    """Mean negative log-probability of the true label after dividing the scores by `temperature`."""
    log_probs = torch.log_softmax(log_likelihoods.double() / temperature, dim=-1)
    return float(-log_probs.gather(1, y[:, None]).mean())


def fit_temperature(log_likelihoods: torch.Tensor, y: torch.Tensor, lo: float = 0.05, hi: float = 20.0) -> float:
    """The T in [lo, hi] minimising the validation NLL: golden-section search on log T (the NLL is convex in 1/T),
    deterministic, to ~1e-4 relative."""
    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(log_likelihoods, y, math.exp(c)), nll(log_likelihoods, y, math.exp(d))
    while b - a > 1e-4:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(log_likelihoods, y, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(log_likelihoods, y, math.exp(d))
    return math.exp((a + b) / 2)


def expected_calibration_error(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    """ECE of the top-1 probability, as train's evaluation computes it (the `evaluate` metric's `calibration`)."""
    from arxiv_ft.evaluation.arxiv_classification import calibration

    return calibration(probs.double().tolist(), y.numpy(), probs.shape[-1], bins)["ece"]


def auroc(positive: list[float], negative: list[float]) -> float:
    """P(a positive's score > a negative's), ties counting half (scikit-learn's ROC AUC, positives labelled 1)."""
    from sklearn.metrics import roc_auc_score

    if not positive or not negative:
        raise ValueError("AUROC needs at least one score on each side")
    return float(roc_auc_score([1] * len(positive) + [0] * len(negative), list(positive) + list(negative)))


def risk_coverage(confidence: list[float], correct: list[bool], points: int = 20) -> list[dict]:
    """Accuracy of the papers kept when abstaining below each threshold, from keeping all to keeping the most sure
    1/points: [{"coverage", "accuracy", "threshold", "kept"}], coverage descending."""
    pairs = sorted(zip(confidence, correct), key=lambda p: -p[0])
    n, curve = len(pairs), []
    for k in range(points, 0, -1):
        kept = max(1, round(n * k / points))
        curve.append(
            {
                "coverage": kept / n,
                "accuracy": sum(c for _, c in pairs[:kept]) / kept,
                "threshold": pairs[kept - 1][0],
                "kept": kept,
            }
        )
    return curve


@dataclass(frozen=True)
class CalibrateConfig:
    model_dir: str = option("", "a train.py output folder (or best/, or a checkpoint): calibration.json goes there")
    input: str = option("", "validation papers (JSONL/Parquet); empty = the run's own validation papers")
    batch_size: int = option(16, "papers per forward pass")
    cpu_threads: int = option(0, "CPU only: torch threads (0 = usable cores)")

    def __post_init__(self):
        if not self.model_dir:
            raise ValueError("--model-dir is required")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")


def papers_file(cfg: CalibrateConfig, run) -> str:
    """The file T is fitted on (recorded as `selected_on`: a test checks no committed one is a test split)."""
    return cfg.input or str(run.config().get("eval_file", ""))


def validation_papers(cfg: CalibrateConfig, run) -> list:
    """The papers to fit T on: --input, else the validation papers the run was evaluated on (its eval file, sampled
    as train sampled it); never its test papers."""
    from arxiv_ft import records as rec
    from arxiv_ft import sources
    from arxiv_ft.options import DataOptions

    if cfg.input:
        return list(rec.read_records(cfg.input))
    trained = run.config()
    data = DataOptions(**{k: trained[k] for k in DataOptions.__dataclass_fields__ if k in trained})
    try:
        evals = sources.load_split(data.eval_file, data.eval_split, sources.Fields.of(data))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{run.path}: its validation papers cannot be read ({exc}): give --input") from None
    return sources.to_records(sources.sample(evals, data.eval_per_class, 0))


def calibrate(cfg: CalibrateConfig) -> dict:
    """Score the validation papers with the run's model, fit T, write RUN/calibration.json; return what it holds."""
    from arxiv_ft.classifier import Classifier
    from arxiv_ft.fileio import write_json
    from arxiv_ft.modeling import set_cpu_threads
    from arxiv_ft.rundir import RunDir

    run = RunDir(cfg.model_dir).check()
    set_cpu_threads(cfg.cpu_threads)
    classifier = Classifier.from_pretrained(run.path, device="cpu" if not torch.cuda.is_available() else None)
    papers = [p for p in validation_papers(cfg, run) if p.primary in set(classifier.labels)]
    if len(papers) < 2:
        raise SystemExit(f"{len(papers)} validation paper(s) with a label in the run's label set: too few to fit T")
    scores, y = classifier.log_likelihoods(papers, cfg.batch_size)
    temperature = fit_temperature(scores, y)
    before, after = torch.softmax(scores, -1), torch.softmax(scores / temperature, -1)
    result = {
        "temperature": temperature,
        "n": len(y),
        "accuracy": float((before.argmax(-1) == y).double().mean()),
        "nll_before": nll(scores, y, 1.0),
        "nll_after": nll(scores, y, temperature),
        "ece_before": expected_calibration_error(before, y),
        "ece_after": expected_calibration_error(after, y),
        "selected_on": papers_file(cfg, run),
    }
    write_json(Path(run.path) / CALIBRATION, result)
    logger.info(
        f"T = {temperature:.3f} on {len(y)} papers: ECE {result['ece_before']:.4f} -> {result['ece_after']:.4f}, "
        f"NLL {result['nll_before']:.4f} -> {result['nll_after']:.4f}; written to {Path(run.path) / CALIBRATION}"
    )
    return result


def read_temperature(folder) -> float:
    """The run's fitted temperature (1.0 when it was never calibrated)."""
    path = Path(folder) / CALIBRATION
    return float(json.loads(path.read_text())["temperature"]) if path.is_file() else 1.0


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    from arxiv_ft.config import parse_config
    from arxiv_ft.logs import setup_logging

    cfg = parse_config(CalibrateConfig, argv, __doc__, prog)
    setup_logging()
    calibrate(cfg)


if __name__ == "__main__":
    main()
