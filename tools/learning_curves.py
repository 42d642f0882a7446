"""Learning curves: test accuracy against training papers per class and against training tokens, for the default LLM
recipe and the tuned TF-IDF baseline fitted on the same papers in the same runs, under the measurement protocol
(README "How we measure"): seeds that took no part in choosing the recipe, the 630 test papers, intervals over seeds
and papers, Holm-corrected.

    python tools/learning_curves.py commands          # the train.py runs: 10 and 100 papers a class, seeds 10-12
    python tools/learning_curves.py plot docs/results/learning-curves/ledgers/*.json \\
        docs/results/test-split/ledgers/lora-seed1?.json --out docs/results/learning-curves

The 30-a-class points are the test-split comparison's LoRA runs (`presets/compare/lora.yaml`, seeds 10-12): the same
recipe, papers and evaluation sets as the runs `commands` prints. Every run fits TF-IDF on its own training papers,
tuned (word + char n-grams, C by 5-fold cross-validation on those papers) and untuned, reading the text its prompt
holds and the full abstract, so every baseline curve comes from the same runs and is paired with the LLM paper by
paper. TF-IDF on the whole 19,478-paper split (data/) is added as a last point; the LLM's point there needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from arxiv_ft.report import significance_table  # noqa: E402
from arxiv_ft.stats import hierarchical_bootstrap, holm, minimum_detectable_effect  # noqa: E402

PER_CLASS = (10, 30, 100)
SEEDS = (10, 11, 12)  # the recipe was chosen with seeds 0 and 1
RECIPE = "presets/compare/lora.yaml"  # the default recipe, scored on all 420 validation and 630 test papers
FLAGS = ["--config", RECIPE, "--no-probes", "--eval-before", "false", "--cpu-threads", "1"]
# What each curve reads from a ledger's scored sections (the `task` section: validation; `test`: the test papers).
SCORES = {
    "llm": "after",
    "tfidf_tuned_same_text": "tfidf_tuned",
    "tfidf_tuned_full_text": "tfidf_tuned_full_text",
    "tfidf_same_text": "tfidf",
    "tfidf_full_text": "tfidf_full_text",
}
NAMES = {
    "llm": "SmolLM2-135M, default recipe (LoRA)",
    "tfidf_tuned_same_text": "TF-IDF tuned, the text the LLM reads",
    "tfidf_tuned_full_text": "TF-IDF tuned, full abstract",
    "tfidf_same_text": "TF-IDF untuned, the text the LLM reads",
    "tfidf_full_text": "TF-IDF untuned, full abstract",
}


def commands(out: str = "runs/curves") -> list[str]:
    """The train.py runs the curves need beyond the comparison's 30-a-class runs."""
    return [
        " ".join(["arxiv-ft", "train", *FLAGS, "--train-per-class", str(n), "--seed", str(s), "--output-dir"])
        + f" {out}/n{n}-s{s}"
        for n in PER_CLASS
        if n != 30
        for s in SEEDS
    ]


def _relative(path: str | Path) -> str:
    """A path inside this repository as a repository-relative path (the committed files name no machine's paths)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def _outcomes(section: dict) -> dict[str, int]:
    return dict(zip(section["ids"], section["correct"]))


def collect(ledgers: list[Path]) -> list[dict]:
    """One row per run ledger: papers a class, seed, every curve's test and validation scores with per-paper
    outcomes (kept in memory for the intervals, not written), training tokens and seconds."""
    rows = []
    for path in sorted(ledgers):
        ledger = json.loads(Path(path).read_text())
        if not ledger.get("test"):
            raise SystemExit(f"{path}: no test scores (the curves are reported on the test split)")
        row = {
            "per_class": int(ledger["config"]["train_per_class"]),
            "seed": int(ledger["seed"]),
            "n_train": ledger["data"]["n_train"],
            "llm_tokens": ledger["cost"]["tokens_seen"],
            "llm_train_seconds": ledger["cost"]["train_seconds"],
            "run": _relative(path),
            # The papers the run's choices were made on (best/, recipes): never the test split.
            "eval_file": _relative(ledger["data"]["eval_file"]),
            "test": {},
            "validation": {},
        }
        for key, entry in SCORES.items():
            for split, section in (("test", ledger["test"]), ("validation", ledger["task"])):
                scored = section[entry]
                row[split][key] = {"accuracy": scored["accuracy"], "macro_f1": scored["macro_f1"], "n": scored["n"]}
            row.setdefault("_outcomes", {})[key] = _outcomes(ledger["test"][entry])
        rows.append(row)
    return rows


def compare(rows: list[dict], samples: int = 2000) -> list[dict]:
    """At each training size, the LLM against the tuned TF-IDF reading the same text and the full abstract, on the
    test papers: hierarchical bootstrap over seeds and papers (both sides vary with the seed: it draws the training
    papers), Holm-corrected over every comparison of the curves."""
    out = []
    for n in sorted({r["per_class"] for r in rows}):
        mine = [r for r in rows if r["per_class"] == n]
        ids = sorted(set.intersection(*(set(r["_outcomes"]["llm"]) for r in mine)))
        llm = np.array([[r["_outcomes"]["llm"][p] for p in ids] for r in mine])
        for key in ("tfidf_tuned_same_text", "tfidf_tuned_full_text"):
            base = np.array([[r["_outcomes"][key][p] for p in ids] for r in mine])
            test = hierarchical_bootstrap(llm, base, samples, seed=n)
            out.append(
                {
                    "per_class": n,
                    "a": f"LLM, {n} a class",
                    "b": f"{NAMES[key]}, {n} a class",
                    **{k: test[k] for k in ("difference", "p_value", "se", "seeds", "papers", "seeds_counted")},
                    "ci95": list(test["ci95"]),
                }
            )
    for c, p in zip(out, holm([c["p_value"] for c in out])):
        c["p_holm"] = p
        c["mde"] = minimum_detectable_effect(c["se"], alpha=0.05 / len(out))
        c["significant"] = bool(c["seeds_counted"] and p < 0.05)
    return out


def tfidf_whole_split(test_file: Path) -> dict:
    """The tuned TF-IDF (C by 5-fold CV on the training papers) on the whole balanced split (data/cs-train.jsonl.gz),
    scored on the curves' 630 test papers; min_df 2 keeps the char n-gram vocabulary of 19k papers in memory."""
    from arxiv_ft.baseline import fit_and_score
    from arxiv_ft.options import BaselineConfig
    from arxiv_ft.sources import load_papers, to_records

    cfg = BaselineConfig(
        train_file=str(ROOT / "data" / "cs-train.jsonl.gz"),
        eval_file=str(test_file),
        train_per_class=0,
        eval_per_class=30,
    )
    labels, train, evals = load_papers(cfg)
    train = to_records(train)
    scored = fit_and_score(train, evals, labels, features="word+char", c=0.0, min_df=2)
    return {"n_train": len(train), "accuracy": scored["accuracy"], "macro_f1": scored["macro_f1"], "c": scored["c"]}


def _mean_sd(values: list[float]) -> str:
    return f"{100 * statistics.fmean(values):.1f}" + (
        f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else ""
    )


def _series(rows, key, split="test", metric="accuracy"):
    out = []
    for n in sorted({r["per_class"] for r in rows}):
        values = [r[split][key][metric] for r in rows if r["per_class"] == n]
        out.append((n, statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0))
    return out


def table(rows: list[dict], whole: dict | None) -> str:
    head = (
        "| papers a class | seeds | LLM test acc % | macro-F1 % | TF-IDF tuned, same text | TF-IDF tuned, full "
        "abstract | TF-IDF untuned, same / full | LLM validation acc % | LLM training, min on one core |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for n in sorted({r["per_class"] for r in rows}):
        mine = [r for r in rows if r["per_class"] == n]

        def cell(key, split="test", metric="accuracy", mine=mine):
            return _mean_sd([r[split][key][metric] for r in mine])

        minutes = statistics.fmean(r["llm_train_seconds"] for r in mine) / 60
        lines.append(
            f"| {n} | {', '.join(str(r['seed']) for r in mine)} | {cell('llm')} | {cell('llm', metric='macro_f1')} | "
            f"{cell('tfidf_tuned_same_text')} | {cell('tfidf_tuned_full_text')} | {cell('tfidf_same_text')} / "
            f"{cell('tfidf_full_text')} | {cell('llm', 'validation')} | {minutes:.0f} |"
        )
    if whole:
        acc = 100 * whole["accuracy"]
        lines.append(f"| whole split ({whole['n_train']:,}) | — | needs a GPU | — | — | {acc:.1f} | — | — | — |")
    return "\n".join(lines)


def plot(rows: list[dict], whole: dict | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, name in ((axes[0], "accuracy", "accuracy"), (axes[1], "macro_f1", "macro-F1")):
        for key in ("llm", "tfidf_tuned_same_text", "tfidf_tuned_full_text", "tfidf_full_text"):
            xs, ys, sds = zip(*_series(rows, key, metric=metric))
            style = {"linestyle": ":"} if key == "tfidf_full_text" else {}
            ax.errorbar(xs, [100 * y for y in ys], yerr=[100 * s for s in sds], marker="o", capsize=3,
                        label=NAMES[key], **style)  # fmt: skip
        if whole:
            ax.scatter([whole["n_train"] / 21], [100 * whole[metric]], marker="*", s=120, color="grey",
                       label=f"TF-IDF tuned, whole split ({whole['n_train']:,} papers)")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("training papers per class")
        ax.set_ylabel(f"test {name} (%), 630 papers")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    seeds = sorted({r["seed"] for r in rows})
    fig.suptitle(
        f"Learning curves on the test split: mean ± sd over seeds {seeds}\n(the seed also draws the training papers,"
        " except at 100 a class: the whole shipped sample)"
    )
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for key, tokens in (("llm", "llm_tokens"), ("tfidf_tuned_full_text", "tfidf_tokens")):
        ax.scatter([r[tokens] for r in rows], [100 * r["test"][key]["accuracy"] for r in rows], label=NAMES[key])
    ax.set_xscale("log")
    ax.set_xlabel("training tokens (LLM: every token of every step; TF-IDF: one pass over its text)")
    ax.set_ylabel("test accuracy (%), 630 papers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_tokens.png", dpi=120)
    plt.close(fig)

    # Where the default run sits on an accuracy-vs-CPU-minutes curve; TF-IDF fits in seconds, so it is a line a size.
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.scatter([r["llm_train_seconds"] / 60 for r in rows], [100 * r["test"]["llm"]["accuracy"] for r in rows],
               label=NAMES["llm"])  # fmt: skip
    for (n, acc, _), style in zip(_series(rows, "tfidf_tuned_full_text"), ("--", "-.", ":")):
        ax.axhline(100 * acc, color="grey", linestyle=style, label=f"{NAMES['tfidf_tuned_full_text']}, {n} a class")
    ax.set_xscale("log")
    ax.set_xlabel("LLM training minutes on one CPU core (ledger cost.train_seconds)")
    ax.set_ylabel("test accuracy (%), 630 papers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_cpu_minutes.png", dpi=120)
    plt.close(fig)


def tfidf_tokens(rows: list[dict]) -> None:
    """TF-IDF's training tokens: one pass over the full text of the run's training papers (the LLM's tokenizer)."""
    from arxiv_ft.modeling import load_tokenizer
    from arxiv_ft.options import TrainConfig
    from arxiv_ft.sources import load_papers, to_records

    tokenizer = load_tokenizer("smollm2-135m")
    for row in rows:
        _, train, _ = load_papers(TrainConfig(train_per_class=row["per_class"], seed=row["seed"]))
        texts = [f"{r.title}. {r.abstract}" for r in to_records(train)]
        row["tfidf_tokens"] = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("commands", help="print the train.py runs")
    c.add_argument("--out", default="runs/curves")
    p = sub.add_parser("plot", help="the table, the plots and curves.json from run ledgers")
    p.add_argument("ledgers", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "learning-curves")
    p.add_argument("--no-whole-split", action="store_true", help="skip TF-IDF on the whole split (needs data/)")
    p.add_argument("--whole-split-from", type=Path, help="reuse the whole-split TF-IDF of an earlier curves.json")
    args = ap.parse_args(argv)
    if args.command == "commands":
        print("\n".join(commands(args.out)))
        return
    rows = collect(args.ledgers)
    comparisons = compare(rows)
    if args.whole_split_from:  # minutes and GBs to refit: the earlier curves' fit, same split and test papers
        whole = json.loads(args.whole_split_from.read_text())["tfidf_whole_split"]
    elif args.no_whole_split:
        whole = None
    else:
        whole = tfidf_whole_split(ROOT / "arxiv_ft" / "assets" / "cs-test-sample.jsonl")
    tfidf_tokens(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(rows, whole, args.out)
    for row in rows:
        del row["_outcomes"]
    text = table(rows, whole) + "\n\n" + significance_table(comparisons) + "\n"
    (args.out / "table.md").write_text(text)
    result = {"split": "test", "runs": rows, "comparisons": comparisons, "tfidf_whole_split": whole}
    (args.out / "curves.json").write_text(json.dumps(result, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
