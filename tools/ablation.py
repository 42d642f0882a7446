"""The accuracy ablation of issue 12: each change to the old default measured alone, then combined, >= 2 seeds.

    python tools/ablation.py commands            # the train.py command of every run (run them in any order)
    python tools/ablation.py table RUNS_DIR      # collect RUNS_DIR/<name>-s<seed>/out/metrics.json into the table

Every run trains on the same 630 papers per seed (30 a class, sampled by the seed) and is scored on the same 210
validation papers (10 a class), without forgetting probes or the zero-shot evaluation (both identical across runs).
Rows marked with a commit were run at that commit (the old default's warm-up started at learning rate 0; the
current code's starts above it).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

BASE = ["--probes", "false", "--eval-before", "false", "--log-every-steps", "10"]
OLD = "c5203eb"  # before this issue: the old default and the existing flags
NEW = "06a2e40"  # the new knobs (objectives, paper budget, schedule floor, rsLoRA, top-N layers)

# name, what changed (vs the old default), flags, commit it ran at
RUNS = [
    ("b0", "old default (lr 4e-4, 1 epoch, 192 tokens in all, answer tokens, warm-up from lr 0)", [], OLD),
    ("b0n", "old default, warm-up starting above 0 (current code)", [], NEW),
    ("lr2e-3", "learning rate 2e-3", ["--lr", "2e-3"], OLD),
    ("ep2", "2 epochs", ["--epochs", "2"], OLD),
    ("const", "constant learning rate after the warm-up", ["--lr-schedule", "constant"], NEW),
    ("minlr", "cosine to 10% instead of 0", ["--min-lr-ratio", "0.1"], NEW),
    ("paper192", "192 tokens for the paper alone (system turn not counted)", ["--token-budget", "paper"], NEW),
    ("r64", "LoRA rank 64, alpha 128", ["--lora-rank", "64", "--lora-alpha", "128"], OLD),
    ("rslora", "rank-stabilised LoRA", ["--lora-rslora", "true"], NEW),
    ("attn", "LoRA on attention only (q,k,v,o)", ["--lora-targets", "q_proj,k_proj,v_proj,o_proj"], OLD),
    ("layers10", "LoRA on the top 10 of 30 layers", ["--lora-layers", "10"], NEW),
    ("bs4", "batch 4 (twice the steps)", ["--batch-size", "4"], OLD),
    ("dw", "loss: category token weighted x4", ["--objective", "decision-weighted"], NEW),
    ("ls", "loss: label-softmax (CE over the labels' sequence log-likelihoods)", ["--objective", "label-softmax"], NEW),
    ("head", "loss: classification head on the last token (+ LoRA)", ["--objective", "cls-head"], NEW),
]


# Combinations, scored on the 420 validation papers (20 a class) for a finer reading: name, what, flags, commit.
# Runs first scored on 210 papers were rescored on 420 by `infer.py --model-dir` (RUNS_DIR/eval420-<name>-s<seed>);
# `commands` gives them --eval-per-class 20, which scores the same 420 papers in the run itself.
C6 = ["--lr", "2e-3", "--token-budget", "paper", "--max-seq-tokens", "128", "--lora-layers", "15"]
R1 = ["--lr", "2e-3", "--epochs", "2", "--lora-layers", "15"]
COMBOS = [
    ("lr2e-3", "lr 2e-3 (the best single change)", ["--lr", "2e-3"], OLD),
    ("c1", "lr 2e-3 + 192 paper tokens", ["--lr", "2e-3", "--token-budget", "paper"], NEW),
    ("c4", "lr 2e-3 + label-softmax", ["--lr", "2e-3", "--objective", "label-softmax"], NEW),
    ("c6", "lr 2e-3 + 128 paper tokens + LoRA on the top 15 layers", C6, NEW),
    ("c5", "c6 + label-softmax", [*C6, "--objective", "label-softmax"], NEW),
    ("c7", "c6 + classification head", [*C6, "--objective", "cls-head"], NEW),
    ("r1", "lr 2e-3 + 2 epochs + LoRA on the top 15 layers (192 tokens in all: ~80 of the paper)", R1, "7cf4d31"),
    ("r3", "r1 + label-softmax", [*R1, "--objective", "label-softmax"], "7cf4d31"),
]


def commands(seeds=(0, 1)) -> list[str]:
    out = []
    for rows, extra in ((RUNS, []), (COMBOS, ["--eval-per-class", "20"])):
        for name, _, flags, commit in rows:
            for seed in seeds:
                out_dir = f"runs/ablation/{name}-s{seed}"
                argv = ["python", "train.py", *BASE, *flags, *extra, "--seed", str(seed), "--output-dir", out_dir]
                out.append(f"# at {commit}\n" + " ".join(argv))
    return out


def _result(seed: int, score: dict, train: dict) -> dict:
    return {
        "seed": seed,
        "accuracy": score["accuracy"],
        "macro_f1": score["macro_f1"],
        "steps": train["steps"],
        "tokens": train["tokens_seen"],
        "n": score["n"],
    }


def collect(runs_dir: Path, name: str) -> list[dict]:
    """A run's scores on the papers it evaluated itself, one per seed (RUNS_DIR/<name>-s<seed>/out/metrics.json)."""
    found = []
    for path in sorted(runs_dir.glob(f"{name}-s*/out/metrics.json")):
        m = json.loads(path.read_text())
        found.append(_result(int(path.parent.parent.name.rsplit("-s", 1)[1]), m["after"]["score"], m["train"]))
    return found


def collect420(runs_dir: Path, name: str) -> list[dict]:
    """A combination's scores on the 420 papers: its own evaluation if it had them, else its rescoring."""
    found = {r["seed"]: r for r in collect(runs_dir, name) if r["n"] == 420}
    for path in sorted(runs_dir.glob(f"eval420-{name}-s*/preds.jsonl.summary.json")):
        seed = int(path.parent.name.rsplit("-s", 1)[1])
        train = json.loads((runs_dir / f"{name}-s{seed}/out/metrics.json").read_text())["train"]
        found.setdefault(seed, _result(seed, json.loads(path.read_text())["metrics"], train))
    return [found[s] for s in sorted(found)]


def _cells(found: list[dict]) -> tuple[str, str, str, object, str]:
    """seeds, accuracy, macro-F1, steps, training tokens: the columns both tables share."""
    if not found:
        return "—", "—", "—", "—", "—"
    seeds = ", ".join(str(r["seed"]) for r in found)
    acc, f1 = _mean_sd([r["accuracy"] for r in found]), _mean_sd([r["macro_f1"] for r in found])
    return seeds, acc, f1, found[0]["steps"], f"{found[0]['tokens'] / 1000:.0f}k"


def combo_table(runs_dir: Path, rows=COMBOS) -> str:
    lines = [
        "| run | change | ran at | seeds | accuracy % | macro-F1 % | steps | training tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, what, _, commit in rows:
        seeds, acc, f1, steps, tokens = _cells(collect420(runs_dir, name))
        lines.append(f"| {name} | {what} | {commit} | {seeds} | {acc} | {f1} | {steps} | {tokens} |")
    return "\n".join(lines)


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "—"
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f}" + (f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else "")


def table(runs_dir: Path, rows=RUNS, reference: str = "b0") -> str:
    ref = collect(runs_dir, reference)
    ref_acc = statistics.fmean(r["accuracy"] for r in ref) if ref else None
    lines = [
        "| run | change | ran at | seeds | accuracy % | macro-F1 % | Δ acc vs old default (pp) | steps |"
        " training tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, what, _, commit in rows:
        found = collect(runs_dir, name)
        mean = statistics.fmean(r["accuracy"] for r in found) if found else None
        delta = f"{100 * (mean - ref_acc):+.1f}" if mean is not None and ref_acc is not None else "—"
        seeds, acc, f1, steps, tokens = _cells(found)
        lines.append(f"| {name} | {what} | {commit} | {seeds} | {acc} | {f1} | {delta} | {steps} | {tokens} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["commands"]:
        print("\n".join(commands()))
    elif sys.argv[1:2] == ["table"] and len(sys.argv) == 3:
        print(table(Path(sys.argv[2])))
    elif sys.argv[1:2] == ["combos"] and len(sys.argv) == 3:
        print(combo_table(Path(sys.argv[2])))
    else:
        raise SystemExit(__doc__)
