"""Learning curves (issue 12): accuracy and macro-F1 against training papers per class and against training tokens,
for the default LLM recipe and TF-IDF + linear SVM on the same papers, on the same 420 validation papers.

    python tools/learning_curves.py commands                 # the train.py runs (10, 30, 100 papers a class x 2 seeds)
    python tools/learning_curves.py plot runs/curves docs/results/learning-curves

The 30-a-class runs are the same recipe, papers and validation set as the comparison's LoRA runs
(`presets/compare/lora.yaml`), so `runs/curves/n30-s<seed>` may be a link to `runs/compare/lora-seed<seed>`.

Every train.py run also fits TF-IDF on its own training papers, reading the text its prompt holds and the full
abstract, so both TF-IDF curves come from the same runs. TF-IDF on the whole 19,478-paper split (data/) is added as a
last point; the LLM's point there needs a GPU (presets/gpu/llama-3.2-1b.yaml is the recipe for it).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PER_CLASS = (10, 30, 100)
SEEDS = (0, 1)
FLAGS = ["--no-probes", "--eval-before", "false", "--eval-per-class", "20", "--checkpoint-every-steps", "0"]


def commands(out="runs/curves") -> list[str]:
    return [
        " ".join(
            [
                "python",
                "train.py",
                *FLAGS,
                "--train-per-class",
                str(n),
                "--seed",
                str(s),
                "--output-dir",
                f"{out}/n{n}-s{s}",
            ]
        )
        for n in PER_CLASS
        for s in SEEDS
    ]


def _train_tokens(texts: list[str], tokenizer) -> int:
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def _relative(path: str) -> str:
    """A path inside this repository as a repository-relative path (the committed files name no machine's paths)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else path


def collect(runs: Path) -> list[dict]:
    """One row per run: papers a class, seed, the LLM's and both TF-IDF scores, training tokens."""
    rows = []
    for path in sorted(runs.glob("n*-s*/metrics.json")):
        m = json.loads(path.read_text())
        n, seed = path.parent.name[1:].split("-s")
        rows.append(
            {
                "per_class": int(n),
                "seed": int(seed),
                "n_train": m["n_train_examples"],
                "llm": {k: m["after"]["score"][k] for k in ("accuracy", "macro_f1")},
                "tfidf_same_text": {k: m["tfidf"]["llm_text"][k] for k in ("accuracy", "macro_f1")},
                "tfidf_full_text": {k: m["tfidf"]["full_text"][k] for k in ("accuracy", "macro_f1")},
                "llm_tokens": m["train"]["tokens_seen"],
                "run": str(path.parent),
                # The papers the run's choices were made on (best/, recipes): never the test split.
                "eval_file": _relative(json.loads((path.parent / "train_config.json").read_text())["eval_file"]),
            }
        )
    return rows


def tfidf_full_split(eval_file: Path) -> dict:
    """TF-IDF on the whole balanced split (data/cs-train.jsonl.gz), scored on the curve's validation papers."""
    from arxiv_ft.baseline import fit_and_score
    from arxiv_ft.options import BaselineConfig
    from arxiv_ft.sources import load_papers, to_records

    cfg = BaselineConfig(
        train_file=str(ROOT / "data" / "cs-train.jsonl.gz"), eval_file=str(eval_file), eval_per_class=20
    )
    labels, train, evals = load_papers(cfg)
    train = to_records(train)
    full = fit_and_score(train, evals, labels)
    return {"n_train": len(train), "accuracy": full["accuracy"], "macro_f1": full["macro_f1"]}


CELLS = (("llm", "accuracy"), ("llm", "macro_f1"), ("tfidf_same_text", "accuracy"), ("tfidf_full_text", "accuracy"))


def _cell(rows, key, metric) -> str:
    values = [100 * r[key][metric] for r in rows]
    return f"{statistics.fmean(values):.1f}" + (f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else "")


def _series(rows, key, metric):
    out = []
    for n in sorted({r["per_class"] for r in rows}):
        values = [r[key][metric] for r in rows if r["per_class"] == n]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append((n, statistics.fmean(values), sd))
    return out


def plot(runs: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from arxiv_ft.modeling import load_tokenizer

    rows = collect(runs)
    if not rows:
        raise SystemExit(f"no runs under {runs}")
    full = tfidf_full_split(ROOT / "arxiv_ft" / "assets" / "cs-validation-sample.jsonl")
    tokenizer = load_tokenizer("smollm2-135m")
    # TF-IDF's training tokens: one pass over the text it read (counted with the LLM's tokenizer).
    from arxiv_ft.options import TrainConfig
    from arxiv_ft.sources import load_papers, to_records

    for row in rows:
        _, train, _ = load_papers(TrainConfig(train_per_class=row["per_class"], seed=row["seed"]))
        row["tfidf_full_tokens"] = _train_tokens([f"{r.title}. {r.abstract}" for r in to_records(train)], tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    labels = {
        "llm": "SmolLM2-135M, default recipe (LoRA)",
        "tfidf_same_text": "TF-IDF + SVM, the text the LLM reads",
        "tfidf_full_text": "TF-IDF + SVM, full abstract",
    }
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, name in ((axes[0], "accuracy", "accuracy"), (axes[1], "macro_f1", "macro-F1")):
        for key, label in labels.items():
            series = _series(rows, key, metric)
            xs, ys, sds = zip(*series)
            ax.errorbar(xs, [100 * y for y in ys], yerr=[100 * s for s in sds], marker="o", capsize=3, label=label)
        ax.scatter(
            [full["n_train"] / 21],
            [100 * full[metric]],
            marker="*",
            s=120,
            color="grey",
            label=f"TF-IDF, whole split ({full['n_train']:,} papers)",
        )
        ax.set_xscale("log")
        ax.set_xlabel("training papers per class")
        ax.set_ylabel(f"validation {name} (%), 420 papers")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    seeds = sorted({r["seed"] for r in rows})
    fig.suptitle(
        f"Learning curves: mean ± sd over seeds {seeds}\n(the seed also draws the training papers,"
        " except at 100 a class: the whole shipped sample)"
    )
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for key, tokens, label in (
        ("llm", "llm_tokens", labels["llm"]),
        ("tfidf_full_text", "tfidf_full_tokens", labels["tfidf_full_text"]),
    ):
        xs = [r[tokens] for r in rows]
        ax.scatter(xs, [100 * r[key]["accuracy"] for r in rows], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens (LLM: every token of every step; TF-IDF: one pass over its text)")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_tokens.png", dpi=120)
    plt.close(fig)
    (out / "curves.json").write_text(json.dumps({"runs": rows, "tfidf_whole_split": full}, indent=2) + "\n")
    lines = [
        "| papers a class | runs (seeds) | SmolLM2 LoRA accuracy % | macro-F1 % | TF-IDF same text acc % |"
        " TF-IDF full text acc % |",
        "|---|---|---|---|---|---|",
    ]
    for n in PER_CLASS:
        mine = [r for r in rows if r["per_class"] == n]
        if not mine:
            continue

        cells = [_cell(mine, key, metric) for key, metric in CELLS]
        seeds = ", ".join(str(r["seed"]) for r in mine)
        lines.append(f"| {n} | {seeds} | " + " | ".join(cells) + " |")
    lines.append(f"| whole split ({full['n_train']:,}) | — | needs a GPU | — | — | {100 * full['accuracy']:.1f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1:2] == ["commands"]:
        print("\n".join(commands()))
    elif sys.argv[1:2] == ["plot"] and len(sys.argv) == 4:
        plot(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        raise SystemExit(__doc__)
