"""The classical baseline every fine-tune must beat: TF-IDF (word 1-2-grams, sublinear tf) + a linear classifier.

    arxiv-ft baseline --train-per-class 30 --eval-per-class 10 --out runs/tfidf/ledger.json
    arxiv-ft baseline --train-per-class 30 --eval-per-class 10 --text llm --same-text-as runs/default \\
        --out runs/tfidf-llm-text/ledger.json      # read each paper exactly as that run's prompt shows it

Trains on title + abstract (or the run's prompt text), evaluates with the same metrics as the LLM runs, and writes a
ledger (the schema `arxiv_ft.report` reads) with `metrics.json` beside it. `--train-per-class` / `--eval-per-class`
pick the same papers train picks for the same values and seed. Every train run also fits this baseline on its own
papers (both texts) and reports it beside its own scores.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from arxiv_ft import records as rec
from arxiv_ft.options import BaselineConfig


def paper_text(record: rec.Record) -> str:
    """What the classifier reads by default: title and abstract, in full."""
    return f"{record.title}. {record.abstract}"


def build_classifier(classifier: str = "svm", c: float = 1.0, ngram_max: int = 2, min_df: int = 1, seed: int = 0):
    """A scikit-learn pipeline: TF-IDF features then the linear classifier."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import LinearSVC

    vectorizer = TfidfVectorizer(ngram_range=(1, ngram_max), sublinear_tf=True, min_df=min_df)
    model = LinearSVC(C=c, random_state=seed) if classifier == "svm" else LogisticRegression(C=c, max_iter=2000)
    return make_pipeline(vectorizer, model)


def fit_and_score(
    train: list[rec.Record],
    evals: list[rec.Record],
    labels: list[str],
    text: Callable[[rec.Record], str] = paper_text,
    **classifier_args,
) -> dict:
    """Fit on `train`, predict `evals`; the task metrics (with per-paper outcomes) and the fit's seconds."""
    from arxiv_ft.metrics import classification_metrics

    pipeline = build_classifier(**classifier_args)
    started = time.perf_counter()
    pipeline.fit([text(r) for r in train], [r.primary for r in train])
    fit_seconds = time.perf_counter() - started
    predicted = list(pipeline.predict([text(r) for r in evals]))
    metrics = classification_metrics([r.primary for r in evals], predicted, labels)
    metrics["ids"] = [r.id for r in evals]
    metrics["correct"] = [int(r.primary == p) for r, p in zip(evals, predicted)]
    metrics["fit_seconds"] = fit_seconds
    metrics["n_weights"] = int(pipeline[-1].coef_.size + pipeline[-1].intercept_.size)
    return metrics


def llm_text(run_dir: str | Path) -> Callable[[rec.Record], str]:
    """Each paper's text as the prompt of the run in `run_dir` shows it (title + the abstract as shortened)."""
    from arxiv_ft.data import PromptBuilder
    from arxiv_ft.rundir import RunDir

    run = RunDir(run_dir).check()
    builder = PromptBuilder.from_spec(run.load_tokenizer(), run.prompt(), run.labels())
    return builder.visible_text


def run(cfg: BaselineConfig):
    """Train and evaluate; returns (ledger, full metrics)."""
    from arxiv_ft.config import to_dict
    from arxiv_ft.ledger import Ledger, git_revision, now, package_versions, scores
    from arxiv_ft.sources import load_task, to_records

    started = time.perf_counter()
    labels, train, evals = load_task(cfg)
    train = to_records(train)
    text = llm_text(cfg.same_text_as) if cfg.text == "llm" else paper_text
    metrics = fit_and_score(
        train,
        evals,
        labels,
        text,
        classifier=cfg.classifier,
        c=cfg.c,
        ngram_max=cfg.ngram_max,
        min_df=cfg.min_df,
        seed=cfg.seed,
    )
    method = f"tfidf-{cfg.classifier}"
    ledger = Ledger(
        run_id=f"{method}{'-llmtext' if cfg.text == 'llm' else ''}-n{len(train)}-s{cfg.seed}",
        method=method,
        seed=cfg.seed,
        model=f"tfidf(1-{cfg.ngram_max})+{'LinearSVC' if cfg.classifier == 'svm' else 'LogisticRegression'}"
        + (" reading the LLM's text" if cfg.text == "llm" else ""),
        config=to_dict(cfg),
        data={
            "train_file": cfg.train_file,
            "eval_file": cfg.eval_file,
            "n_train": len(train),
            "n_eval": len(evals),
            "labels": labels,
        },
        task={"before": None, "after": scores(metrics)},
        forgetting=None,
        # Wall time is real; device-hours, throughput and MFU describe accelerator runs and stay empty here.
        cost={
            "wall_seconds": time.perf_counter() - started,
            "train_seconds": metrics["fit_seconds"],
            "device_type": "cpu",
            "device_count": 1,
            "device_hours": None,
            "tokens_seen": None,
            "tokens_per_second": None,
            "mfu": None,
            "peak_memory_bytes": None,
            "trainable_parameters": metrics["n_weights"],
            "total_parameters": metrics["n_weights"],
            "saved_bytes": None,
            "price_per_device_hour": None,
            "cost": None,
        },
        train={"loss_curve": [], "steps": 0},
        versions=package_versions("scikit-learn", "numpy"),
        git_revision=git_revision(),
        created=now(),
    )
    return ledger, metrics


def main(argv: list[str] | None = None, prog: str | None = None):
    """The command line: fit, evaluate, write the ledger and metrics.json; returns the ledger as a dict."""
    from arxiv_ft.config import parse_config
    from arxiv_ft.fileio import write_json
    from arxiv_ft.logs import setup_logging

    cfg = parse_config(BaselineConfig, argv, __doc__, prog)
    setup_logging()
    ledger, metrics = run(cfg)
    out = Path(cfg.out)
    ledger.write(out)
    write_json(out.with_name("metrics.json"), metrics)
    after = ledger.task["after"]
    print(
        f"{ledger.method}: train {ledger.data['n_train']} eval {ledger.data['n_eval']} "
        f"accuracy {after['accuracy']:.4f} macro-F1 {after['macro_f1']:.4f} "
        f"({ledger.cost['wall_seconds']:.1f} s) -> {out}"
    )
    return ledger.to_json()


if __name__ == "__main__":
    main(sys.argv[1:])
