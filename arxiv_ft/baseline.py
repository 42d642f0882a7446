"""The classical baseline every fine-tune must beat: TF-IDF + a linear classifier, tuned the way a practitioner
tunes it (word 1-2-grams and char_wb 2-5-grams, C chosen by 5-fold cross-validation on the training papers alone).

    arxiv-ft baseline --train-per-class 30 --eval-per-class 10 --out runs/tfidf/ledger.json
    arxiv-ft baseline --train-per-class 30 --eval-per-class 10 --text llm --same-text-as runs/default \\
        --out runs/tfidf-llm-text/ledger.json      # read each paper exactly as that run's prompt shows it
    arxiv-ft baseline --features word --c 1 ...    # the untuned baseline of earlier results (word 1-2-grams, C=1)

Trains on title + abstract (or the run's prompt text), evaluates with the same metrics as the LLM runs, and writes a
ledger (the schema `arxiv_ft.report` reads) with `metrics.json` beside it. `--train-per-class` / `--eval-per-class`
pick the same papers train picks for the same values and seed. Every train run also fits this baseline on its own
papers (both texts, tuned and untuned) and reports it beside its own scores. The evaluation papers never take part in
choosing C: only the training papers' folds do.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from arxiv_ft import records as rec
from arxiv_ft.options import BaselineConfig

# C is searched on this grid (LinearSVC's useful range for sublinear TF-IDF features); 0 in a config means "search".
C_GRID = (0.1, 0.3, 1.0, 3.0, 10.0)
CV_FOLDS = 5


def paper_text(record: rec.Record) -> str:
    """What the classifier reads by default: title and abstract, in full."""
    return f"{record.title}. {record.abstract}"


def build_features(features: str = "word+char", ngram_max: int = 2, min_df: int = 1):
    """TF-IDF features: word 1..ngram_max-grams, plus char_wb 2-5-grams for 'word+char' (sublinear tf, both)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_union

    words = TfidfVectorizer(ngram_range=(1, ngram_max), sublinear_tf=True, min_df=min_df)
    if features == "word":
        return words
    chars = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=min_df)
    return make_union(words, chars)


def build_classifier(
    classifier: str = "svm",
    c: float = 1.0,
    ngram_max: int = 2,
    min_df: int = 1,
    seed: int = 0,
    features: str = "word",
):
    """A scikit-learn pipeline: TF-IDF features then the linear classifier."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import LinearSVC

    model = LinearSVC(C=c, random_state=seed) if classifier == "svm" else LogisticRegression(C=c, max_iter=2000)
    return make_pipeline(build_features(features, ngram_max, min_df), model)


def choose_c(texts: list[str], targets: list[str], grid=C_GRID, folds: int = CV_FOLDS, seed: int = 0, **args):
    """C by stratified k-fold cross-validation on the training papers (features refitted on each fold's training
    part, so no fold sees its held-out papers' vocabulary); returns (best C, {C: mean fold accuracy})."""
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold

    folds = min(folds, min(targets.count(t) for t in set(targets)))
    if folds < 2:
        return 1.0, {}
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    template = build_classifier(seed=seed, **args)

    def fold_accuracy(x_fit, y_fit, x_held, y_held, c) -> float:
        model = clone(template[-1]).set_params(C=c)
        return float((model.fit(x_fit, y_fit).predict(x_held) == y_held).mean())

    jobs = []
    for fit_idx, held_idx in splitter.split(texts, targets):
        features = clone(template[0])
        x_fit = features.fit_transform([texts[i] for i in fit_idx])
        x_held = features.transform([texts[i] for i in held_idx])
        y_fit, y_held = [targets[i] for i in fit_idx], [targets[i] for i in held_idx]
        jobs += [(x_fit, y_fit, x_held, y_held, c) for c in grid]
    # liblinear releases the GIL: the fold x C fits (most of the time) run on every core this process may use.
    with ThreadPoolExecutor(max_workers=max(1, min(len(os.sched_getaffinity(0)), 4))) as pool:
        accuracies = list(pool.map(lambda job: fold_accuracy(*job), jobs))
    scores = {c: sum(a for (*_, jc), a in zip(jobs, accuracies) if jc == c) / folds for c in grid}
    return max(grid, key=lambda c: (scores[c], -c)), scores  # ties: the stronger regularisation


def fit_and_score(
    train: list[rec.Record],
    evals: list[rec.Record],
    labels: list[str],
    text: Callable[[rec.Record], str] = paper_text,
    **classifier_args,
) -> dict:
    """Fit on `train`, predict `evals`; the task metrics (with per-paper outcomes) and the fit's seconds.

    `c=0` chooses C by cross-validation on `train` (its seconds are part of the fit's)."""
    return fit_and_score_sets(train, {"eval": evals}, labels, text, **classifier_args)["eval"]


def fit_and_score_sets(
    train: list[rec.Record],
    eval_sets: dict[str, list[rec.Record]],
    labels: list[str],
    text: Callable[[rec.Record], str] = paper_text,
    **classifier_args,
) -> dict[str, dict]:
    """One fit on `train` (C chosen on `train` alone when `c=0`), scored on each named evaluation set."""
    from arxiv_ft.metrics import classification_metrics

    classifier_args = dict(classifier_args)
    started = time.perf_counter()
    texts, targets = [text(r) for r in train], [r.primary for r in train]
    cv_scores = None
    if not classifier_args.get("c", 1.0):
        args = {k: v for k, v in classifier_args.items() if k != "c"}
        classifier_args["c"], cv_scores = choose_c(texts, targets, **args)
    pipeline = build_classifier(**classifier_args)
    pipeline.fit(texts, targets)
    fit_seconds = time.perf_counter() - started
    out = {}
    for name, evals in eval_sets.items():
        predicted = list(pipeline.predict([text(r) for r in evals]))
        metrics = classification_metrics([r.primary for r in evals], predicted, labels)
        metrics["ids"] = [r.id for r in evals]
        metrics["correct"] = [int(r.primary == p) for r, p in zip(evals, predicted)]
        metrics["fit_seconds"] = fit_seconds
        metrics["n_weights"] = int(pipeline[-1].coef_.size + pipeline[-1].intercept_.size)
        metrics["c"] = classifier_args.get("c", 1.0)
        metrics["features"] = classifier_args.get("features", "word")
        if cv_scores is not None:
            metrics["cv_accuracy"] = {str(c): round(acc, 6) for c, acc in cv_scores.items()}
        out[name] = metrics
    return out


# The TF-IDF rows a train run reports beside its own scores: name -> (text read, classifier settings).
TFIDF_ROWS = {
    "tuned_llm_text": ("llm", {"features": "word+char", "c": 0.0}),
    "tuned_full_text": ("full", {"features": "word+char", "c": 0.0}),
    "llm_text": ("llm", {}),
    "full_text": ("full", {}),
}


def tfidf_rows(train: list[rec.Record], eval_sets: dict[str, list], labels: list[str], llm_text) -> dict:
    """Every TF-IDF row of TFIDF_ROWS, fitted once on a run's training papers and scored on each evaluation set:
    {set name: {row name: metrics}}. The tuned rows (word + char n-grams, C by cross-validation on the training
    papers) are the baseline a practitioner would run; the untuned ones (word 1-2-grams, C=1) are kept as rows."""
    out: dict[str, dict] = {name: {} for name in eval_sets}
    for row, (which, args) in TFIDF_ROWS.items():
        scored = fit_and_score_sets(train, eval_sets, labels, llm_text if which == "llm" else paper_text, **args)
        for name, metrics in scored.items():
            out[name][row] = metrics
    return out


def llm_text(run_dir: str | Path) -> Callable[[rec.Record], str]:
    """Each paper's text as the prompt of the run in `run_dir` shows it (title + the abstract as shortened)."""
    from arxiv_ft.data import PromptBuilder
    from arxiv_ft.rundir import RunDir

    run = RunDir(run_dir).check()
    builder = PromptBuilder.from_spec(run.load_tokenizer(), run.prompt(), run.labels())
    return builder.visible_text


def _describe(cfg: BaselineConfig, metrics: dict) -> str:
    """The ledger's model name: the features, the classifier, how C was chosen, the text read."""
    return (
        f"tfidf(word 1-{cfg.ngram_max}{' + char_wb 2-5' if cfg.features == 'word+char' else ''})"
        + f"+{'LinearSVC' if cfg.classifier == 'svm' else 'LogisticRegression'}"
        + (f" C={metrics['c']:g} by {CV_FOLDS}-fold CV" if not cfg.c else f" C={cfg.c:g}")
        + (" reading the LLM's text" if cfg.text == "llm" else "")
    )


def _cost(wall_seconds: float, metrics: dict) -> dict:
    """Wall time is real; device-hours, throughput and MFU describe accelerator runs and stay empty here."""
    return {
        "wall_seconds": wall_seconds,
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
    }


def run(cfg: BaselineConfig):
    """Train and evaluate; returns (ledger, full metrics)."""
    from arxiv_ft.config import to_dict
    from arxiv_ft.ledger import Ledger, git_revision, now, package_versions, scores
    from arxiv_ft.sources import load_papers, to_records

    started = time.perf_counter()
    labels, train, evals = load_papers(cfg)
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
        features=cfg.features,
    )
    method = f"tfidf-{cfg.classifier}"
    ledger = Ledger(
        run_id=f"{method}{'-word' if cfg.features == 'word' else ''}{'-llmtext' if cfg.text == 'llm' else ''}"
        f"-n{len(train)}-s{cfg.seed}",
        method=method,
        seed=cfg.seed,
        model=_describe(cfg, metrics),
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
        cost=_cost(time.perf_counter() - started, metrics),
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


def run_tfidf_rows(cfg, launch, task) -> dict | None:
    """TF-IDF + linear SVM on the same training papers, tuned (C by cross-validation on them) and untuned, reading
    the text the LLM's prompt holds and the full abstract: the bar the fine-tune must clear, measured in the run
    itself, on the validation and the test papers ({"validation": rows, "test": rows})."""
    if not cfg.tfidf_baseline:
        return None

    from arxiv_ft.sources import to_records

    train = to_records(task.train)
    seen = {r.id: task.builder.visible_text(r) for r in train + task.eval_records + task.test_records}
    sets = {"validation": task.eval_records} | ({"test": task.test_records} if task.test_records else {})
    rows = tfidf_rows(train, sets, task.labels, lambda r: seen[r.id])
    for name, scored in rows.items():
        launch.log(
            f"[{name}] TF-IDF on the same {len(train)} papers: tuned {scored['tuned_llm_text']['accuracy']:.4f} "
            f"reading the prompt's text, {scored['tuned_full_text']['accuracy']:.4f} the full abstract; untuned "
            f"{scored['llm_text']['accuracy']:.4f} / {scored['full_text']['accuracy']:.4f}"
        )
    return rows
