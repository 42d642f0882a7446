"""The classical baseline every fine-tune must beat: TF-IDF (word 1-2-grams, sublinear tf) + a linear classifier.

    python -m arxiv_ft.baseline --train-file data/cs-train.jsonl --eval-file data/cs-validation.jsonl \\
        --labels data/cs-labels.txt --out runs/tfidf/ledger.json

Trains on title + abstract, evaluates with the same metrics as the LLM runs, and writes a ledger record (the
schema `arxiv_ft.report` reads) with `metrics.json` (per-class figures, confusion matrix) beside it.
`--train-per-class` / `--eval-per-class` pick the same subsets train.py picks for the same values and seed.
"""

from __future__ import annotations

import datetime
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from arxiv_ft import config as cfglib
from arxiv_ft import records as rec
from arxiv_ft.config import option
from arxiv_ft.metrics import classification_metrics
from arxiv_ft.report import LEDGER_VERSION, git_revision, package_versions

ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass(frozen=True)
class BaselineConfig:
    train_file: str = option(str(ASSETS / "cs-train-sample.jsonl"), "training records (JSONL/.jsonl.gz)")
    eval_file: str = option(str(ASSETS / "cs-validation-sample.jsonl"), "evaluation records")
    labels: str = option(str(ASSETS / "cs-labels.txt"), "label file, comma-separated labels, or top:K of train file")
    train_per_class: int = option(0, "use at most this many training papers per class (0 = all)")
    eval_per_class: int = option(0, "evaluate on at most this many papers per class (0 = all)")
    classifier: str = option("svm", "linear SVM or logistic regression", ("svm", "logreg"))
    c: float = option(1.0, "inverse regularisation strength C")
    ngram_max: int = option(2, "word n-grams from 1 to this")
    min_df: int = option(1, "drop terms seen in fewer training papers (2 halves the vocabulary and the time)")
    seed: int = option(0, "seed for the per-class sample and the solver")
    out: str = option("runs/tfidf/ledger.json", "ledger file to write (metrics.json goes beside it)")


def paper_text(record: rec.Record) -> str:
    """What the classifier reads: title and abstract, as the LLM prompt shows them."""
    return f"{record.title}. {record.abstract}"


def build_classifier(cfg: BaselineConfig):
    """A scikit-learn pipeline: TF-IDF features then the linear classifier."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import LinearSVC

    vectorizer = TfidfVectorizer(ngram_range=(1, cfg.ngram_max), sublinear_tf=True, min_df=cfg.min_df)
    if cfg.classifier == "svm":
        model = LinearSVC(C=cfg.c, random_state=cfg.seed)
    else:
        model = LogisticRegression(C=cfg.c, max_iter=2000, random_state=cfg.seed)
    return make_pipeline(vectorizer, model)


def load_split(cfg: BaselineConfig) -> tuple[list[str], list[rec.Record], list[rec.Record]]:
    """Labels, training and evaluation records, sampled per class exactly as train.py samples them."""
    return rec.load_task(cfg.labels, cfg.train_file, cfg.eval_file, cfg.train_per_class, cfg.eval_per_class, cfg.seed)


def run(cfg: BaselineConfig) -> tuple[dict, dict]:
    """Train and evaluate; returns (ledger record, full metrics)."""
    started = time.perf_counter()
    labels, train, evals = load_split(cfg)
    pipeline = build_classifier(cfg)
    train_started = time.perf_counter()
    pipeline.fit([paper_text(r) for r in train], [r.primary for r in train])
    train_seconds = time.perf_counter() - train_started
    predicted = pipeline.predict([paper_text(r) for r in evals])
    metrics = classification_metrics([r.primary for r in evals], list(predicted), labels)
    n_weights = int(pipeline[-1].coef_.size + pipeline[-1].intercept_.size)
    ledger = {
        "ledger_version": LEDGER_VERSION,
        "run_id": f"tfidf-{cfg.classifier}-n{len(train)}-s{cfg.seed}",
        "method": f"tfidf-{cfg.classifier}",
        "seed": cfg.seed,
        "model": f"tfidf(1-{cfg.ngram_max})+{'LinearSVC' if cfg.classifier == 'svm' else 'LogisticRegression'}",
        "config": cfglib.to_dict(cfg),
        "data": {
            "train_file": cfg.train_file,
            "eval_file": cfg.eval_file,
            "n_train": len(train),
            "n_eval": len(evals),
            "labels": labels,
        },
        "task": {"before": None, "after": {k: metrics[k] for k in ("accuracy", "macro_f1", "n")}},
        "forgetting": None,
        # Wall time is real; device-hours, throughput and MFU describe accelerator runs and stay empty here.
        "cost": {
            "wall_seconds": time.perf_counter() - started,
            "train_seconds": train_seconds,
            "device_type": "cpu",
            "device_count": 1,
            "device_hours": None,
            "tokens_seen": None,
            "tokens_per_second": None,
            "mfu": None,
            "peak_memory_bytes": None,
            "trainable_parameters": n_weights,
            "total_parameters": n_weights,
            "saved_bytes": None,
            "price_per_device_hour": None,
            "cost": None,
        },
        "train": {"loss_curve": [], "steps": 0},
        "versions": package_versions("scikit-learn", "numpy"),
        "git_revision": git_revision(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return ledger, metrics


def main(cfg: BaselineConfig) -> dict:
    ledger, metrics = run(cfg)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfglib.save_json(ledger, out)
    cfglib.save_json(metrics, out.with_name("metrics.json"))
    after = ledger["task"]["after"]
    print(
        f"{ledger['method']}: train {ledger['data']['n_train']} eval {ledger['data']['n_eval']} "
        f"accuracy {after['accuracy']:.4f} macro-F1 {after['macro_f1']:.4f} "
        f"({ledger['cost']['wall_seconds']:.1f} s) -> {out}"
    )
    return ledger


if __name__ == "__main__":
    main(cfglib.parse_config(BaselineConfig, sys.argv[1:], __doc__))
