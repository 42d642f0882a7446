"""Compare runs: task gain against forgetting against cost, from the ledger each run leaves behind.

    python -m arxiv_ft.report runs/ --out reports/latest
    python -m arxiv_ft.report runs/lora-s0 runs/tfidf/ledger.json --out reports/x --price-per-device-hour 2.5

Each argument is a ledger file or a folder searched for `ledger.json` files. Writes `report.md` (one row per run,
one row per method with mean ± std over seeds, and a legend), `summary.json` (the same numbers), and three plots:
`accuracy_vs_cost.png`, `gain_vs_forgetting.png`, `loss_curves.png`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
from pathlib import Path

LEDGER_VERSION = 1
KNOWN_METHODS = ("zero-shot", "lora", "qlora", "full", "tfidf-svm", "tfidf-logreg")
_REQUIRED = (
    "ledger_version",
    "run_id",
    "method",
    "seed",
    "model",
    "config",
    "data",
    "task",
    "forgetting",
    "cost",
    "train",
    "versions",
    "git_revision",
    "created",
)
# Config keys that differ between seeds of one experiment; everything else must match to be averaged together.
_PER_RUN_KEYS = ("seed", "output_dir", "out", "run_id")
# Numbers averaged per group, in table order.
_GROUP_FIELDS = (
    "acc_before",
    "acc_after",
    "acc_gain",
    "f1_before",
    "f1_after",
    "f1_gain",
    "ppl_before",
    "ppl_after",
    "ppl_delta",
    "mc_delta",
    "kl",
    "wall_seconds",
    "device_hours",
    "tokens_per_second",
    "mfu",
    "peak_memory_bytes",
    "trainable_parameters",
    "cost",
)


class LedgerError(ValueError):
    """A ledger file that is not a valid ledger; the message names the file and every problem."""


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate_ledger(d) -> list[str]:
    """Every problem with a ledger record, as short messages; an empty list means it is valid."""
    if not isinstance(d, dict):
        return ["not a JSON object"]
    problems = [f"missing key {k!r}" for k in _REQUIRED if k not in d]
    if problems:
        return problems
    if d["ledger_version"] != LEDGER_VERSION:
        problems.append(f"ledger_version {d['ledger_version']!r}, this reader knows {LEDGER_VERSION}")
    if not isinstance(d["run_id"], str) or not d["run_id"]:
        problems.append("run_id must be a non-empty string")
    if d["method"] not in KNOWN_METHODS:
        problems.append(f"method {d['method']!r} not one of {', '.join(KNOWN_METHODS)}")
    if not isinstance(d["seed"], int):
        problems.append("seed must be an integer")
    data = d["data"]
    if not isinstance(data, dict) or not all(_is_number(data.get(k)) for k in ("n_train", "n_eval")):
        problems.append("data must hold n_train and n_eval")
    task = d["task"]
    if not isinstance(task, dict) or not isinstance(task.get("after"), dict):
        problems.append("task.after is required")
    else:
        for when in ("before", "after"):
            scores = task.get(when)
            if scores is not None and not all(_is_number(scores.get(k)) for k in ("accuracy", "macro_f1")):
                problems.append(f"task.{when} needs numeric accuracy and macro_f1")
    forgetting = d["forgetting"]
    if forgetting is not None:
        parts = [forgetting.get(k) if isinstance(forgetting, dict) else None for k in ("base", "tuned", "delta")]
        delta = parts[2]
        if not all(isinstance(p, dict) for p in parts) or not all(
            _is_number(delta.get(k)) for k in ("ppl_delta", "mc_delta")
        ):
            problems.append("forgetting must be null or hold base, tuned and a delta with ppl_delta and mc_delta")
    cost = d["cost"]
    if cost is not None:
        if not isinstance(cost, dict):
            problems.append("cost must be an object or null")
        else:
            bad = [k for k, v in cost.items() if v is not None and k != "device_type" and not _is_number(v)]
            problems.extend(f"cost.{k} must be a number or null" for k in bad)
    train = d["train"]
    if not isinstance(train, dict) or not all(_is_number(x) for x in train.get("loss_curve", [])):
        problems.append("train.loss_curve must be a list of numbers")
    return problems


def package_versions(*names: str) -> dict:
    """Installed versions of the named distributions (None when absent), plus Python's: the ledger's `versions`."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def git_revision(folder: str | Path | None = None) -> str | None:
    """The commit checked out at `folder` (default: this package's), or None outside a git checkout."""
    import subprocess

    folder = Path(folder) if folder else Path(__file__).resolve().parent
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=folder, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def load_ledger(path: str | Path) -> dict:
    """Read and validate one ledger file; a problem is a LedgerError naming the file."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LedgerError(f"{path}: {exc}") from None
    problems = validate_ledger(d)
    if problems:
        raise LedgerError(f"{path}: " + "; ".join(problems))
    return d


def find_ledgers(paths: list[str | Path]) -> list[Path]:
    """Ledger files named directly, or every `ledger.json` under a folder; each file once, in argument order."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(p.rglob("ledger.json")))
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    unique = {f.resolve(): f for f in reversed(found)}
    return [f for f in found if unique.get(f.resolve()) is f]


# --------------------------------------------------------------------------------------------- rows, groups


def _diff(after, before):
    return None if after is None or before is None else after - before


def group_key(ledger: dict) -> str:
    """Runs that differ only in seed share a key: method, model, data sizes and the rest of the config."""
    config = {k: v for k, v in ledger["config"].items() if k not in _PER_RUN_KEYS}
    ident = [ledger["method"], ledger["model"], ledger["data"]["n_train"], ledger["data"]["n_eval"], config]
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_row(ledger: dict, price_per_device_hour: float | None = None) -> dict:
    """One run's figures, flat; None where the ledger has none (a baseline has no forgetting or device cost)."""
    before, after = ledger["task"].get("before"), ledger["task"]["after"]
    delta = (ledger["forgetting"] or {}).get("delta") or {}
    tuned_mc = ((ledger["forgetting"] or {}).get("tuned") or {}).get("multiple_choice") or {}
    cost = ledger["cost"] or {}
    price = price_per_device_hour if price_per_device_hour is not None else cost.get("price_per_device_hour")
    money = cost.get("cost")
    if price is not None and cost.get("device_hours") is not None:
        money = cost["device_hours"] * price
    row = {
        "run_id": ledger["run_id"],
        "method": ledger["method"],
        "seed": ledger["seed"],
        "model": ledger["model"],
        "group": group_key(ledger),
        "n_train": ledger["data"]["n_train"],
        "n_eval": ledger["data"]["n_eval"],
        "acc_before": before["accuracy"] if before else None,
        "acc_after": after["accuracy"],
        "f1_before": before["macro_f1"] if before else None,
        "f1_after": after["macro_f1"],
        "ppl_before": delta.get("ppl_before"),
        "ppl_after": delta.get("ppl_after"),
        "ppl_delta": delta.get("ppl_delta"),
        "ppl_ratio": delta.get("ppl_ratio"),
        "mc_before": delta.get("mc_before"),
        "mc_after": delta.get("mc_after"),
        "mc_delta": delta.get("mc_delta"),
        "mc_items": tuned_mc.get("n"),
        "mc_items_lost": delta.get("mc_items_lost"),
        "mc_items_gained": delta.get("mc_items_gained"),
        "kl": delta.get("kl"),
        "wall_seconds": cost.get("wall_seconds"),
        "train_seconds": cost.get("train_seconds"),
        "device_type": cost.get("device_type"),
        "device_count": cost.get("device_count"),
        "device_hours": cost.get("device_hours"),
        "tokens_per_second": cost.get("tokens_per_second"),
        "mfu": cost.get("mfu"),
        "peak_memory_bytes": cost.get("peak_memory_bytes"),
        "trainable_parameters": cost.get("trainable_parameters"),
        "cost": money,
        "loss_curve": ledger["train"].get("loss_curve", []),
    }
    row["acc_gain"] = _diff(row["acc_after"], row["acc_before"])
    row["f1_gain"] = _diff(row["f1_after"], row["f1_before"])
    return row


def _mean_std(values: list) -> tuple[float | None, float | None, int]:
    present = [v for v in values if v is not None]
    if not present:
        return None, None, 0
    std = statistics.stdev(present) if len(present) > 1 else None
    return statistics.fmean(present), std, len(present)


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per group of runs that differ only by seed: mean, sample std (n > 1) and count of each figure."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    # A label reads "method · model · n_train"; the config hash joins it only where two groups would look alike.
    plain = {g: f"{r[0]['method']} · {r[0]['model']} · n={r[0]['n_train']}" for g, r in groups.items()}
    clashes = {label for label in plain.values() if list(plain.values()).count(label) > 1}
    out = []
    for g, members in groups.items():
        label = plain[g] + (f" · cfg {g}" if plain[g] in clashes else "")
        entry = {
            "group": g,
            "label": label,
            "method": members[0]["method"],
            "model": members[0]["model"],
            "n_train": members[0]["n_train"],
            "runs": len(members),
            "seeds": sorted(r["seed"] for r in members),
        }
        for name in _GROUP_FIELDS:
            mean, std, n = _mean_std([r[name] for r in members])
            entry[name] = {"mean": mean, "std": std, "n": n}
        out.append(entry)
    order = {m: i for i, m in enumerate(KNOWN_METHODS)}
    return sorted(out, key=lambda e: (order.get(e["method"], len(order)), e["label"]))


# ---------------------------------------------------------------------------------------------- formatting

DASH = "—"


def _pct(x, signed: bool = False) -> str:
    if x is None:
        return DASH
    return f"{100 * x:+.1f} pp" if signed else f"{100 * x:.1f}%"


def _num(x, digits: int = 2, signed: bool = False) -> str:
    if x is None:
        return DASH
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _duration(seconds) -> str:
    if seconds is None:
        return DASH
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _bytes(n) -> str:
    return DASH if n is None else f"{n / 2**30:.2f} GiB"


def _count(n) -> str:
    if n is None:
        return DASH
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _before_after(before, after, fmt) -> str:
    if before is None:
        return fmt(after)
    return f"{fmt(before)} → {fmt(after)}"


def _agg(stat: dict, fmt) -> str:
    if stat["mean"] is None:
        return DASH
    if stat["std"] is None:
        return fmt(stat["mean"])
    return f"{fmt(stat['mean'])} ± {fmt(stat['std']).lstrip('+')}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _mc_cell(row: dict) -> str:
    if row["mc_delta"] is None:
        return DASH
    flips = ""
    if row["mc_items_lost"] is not None:
        flips = f" ({row['mc_items_lost']}↓ {row['mc_items_gained']}↑)"
    return _pct(row["mc_delta"], signed=True) + flips


def run_table(rows: list[dict], currency: str) -> str:
    """The per-run Markdown table."""
    header = [
        "run",
        "method",
        "seed",
        "train papers",
        "task acc before → after",
        "acc gain",
        "macro-F1 before → after",
        "F1 gain",
        "ppl before → after",
        "ppl Δ",
        "MC acc Δ (items lost/gained)",
        "wall time",
        "device-hours",
        "tokens/s",
        "MFU",
        "peak memory",
        "trainable params",
        f"cost ({currency})",
    ]
    body = []
    for r in rows:
        ppl = DASH if r["ppl_after"] is None else _before_after(r["ppl_before"], r["ppl_after"], _num)
        body.append(
            [
                r["run_id"],
                r["method"],
                str(r["seed"]),
                str(r["n_train"]),
                _before_after(r["acc_before"], r["acc_after"], _pct),
                _pct(r["acc_gain"], signed=True),
                _before_after(r["f1_before"], r["f1_after"], _pct),
                _pct(r["f1_gain"], signed=True),
                ppl,
                _num(r["ppl_delta"], signed=True),
                _mc_cell(r),
                _duration(r["wall_seconds"]),
                _num(r["device_hours"], 4),
                _num(r["tokens_per_second"], 0),
                _pct(r["mfu"]),
                _bytes(r["peak_memory_bytes"]),
                _count(r["trainable_parameters"]),
                _num(r["cost"], 2),
            ]
        )
    return _table(header, body)


def group_table(groups: list[dict], currency: str) -> str:
    """The per-method Markdown table: mean ± sample std over the seeds of each group."""
    header = [
        "method · model · train papers",
        "runs (seeds)",
        "task acc before → after",
        "acc gain",
        "macro-F1 before → after",
        "F1 gain",
        "ppl Δ",
        "MC acc Δ",
        "wall time",
        "device-hours",
        "tokens/s",
        "MFU",
        "peak memory",
        "trainable params",
        f"cost ({currency})",
    ]
    body = []
    for g in groups:
        acc_after = _agg(g["acc_after"], _pct)
        acc = acc_after if g["acc_before"]["mean"] is None else f"{_pct(g['acc_before']['mean'])} → {acc_after}"
        f1_after = _agg(g["f1_after"], _pct)
        f1 = f1_after if g["f1_before"]["mean"] is None else f"{_pct(g['f1_before']['mean'])} → {f1_after}"
        body.append(
            [
                g["label"],
                f"{g['runs']} ({', '.join(map(str, g['seeds']))})",
                acc,
                _agg(g["acc_gain"], lambda x: _pct(x, signed=True)),
                f1,
                _agg(g["f1_gain"], lambda x: _pct(x, signed=True)),
                _agg(g["ppl_delta"], lambda x: _num(x, signed=True)),
                _agg(g["mc_delta"], lambda x: _pct(x, signed=True)),
                _agg(g["wall_seconds"], _duration),
                _agg(g["device_hours"], lambda x: _num(x, 4)),
                _agg(g["tokens_per_second"], lambda x: _num(x, 0)),
                _agg(g["mfu"], _pct),
                _agg(g["peak_memory_bytes"], _bytes),
                _agg(g["trainable_parameters"], _count),
                _agg(g["cost"], lambda x: _num(x, 2)),
            ]
        )
    return _table(header, body)


LEGEND = """\
How to read the columns:
- **task acc / macro-F1 before → after**: accuracy and macro-F1 (the mean of per-class F1, so rare classes count
  as much as common ones) on the evaluation papers, for the base model (zero-shot, label scoring) and after
  fine-tuning. Baselines have no "before". **gain** is after minus before, in percentage points (pp).
- **ppl before → after, ppl Δ**: perplexity of the base and the tuned model on fixed WikiText-2 windows; a
  positive Δ means the model got worse at plain English text (forgetting). — where no probe was run.
- **MC acc Δ**: change in length-normalised multiple-choice accuracy on a fixed mix of ARC, HellaSwag, PIQA,
  WinoGrande, BoolQ and MMLU items, with the number of items the tuned model lost (↓) and gained (↑). With ~100
  items one item is ~1 pp: read a Δ smaller than a few items as noise.
- **wall time**: the whole run (loading, evaluation before and after, training, probes, saving).
- **device-hours**: accelerator time, wall time × number of devices. **cost**: device-hours × price per
  device-hour (from the ledger, or `--price-per-device-hour`).
- **tokens/s**: training tokens (padding excluded) per second of training. **MFU**: model FLOPs utilisation,
  achieved training FLOP/s over the devices' peak (— when the peak is unknown, e.g. on CPU).
- **peak memory**: peak accelerator memory allocated (peak RSS on CPU). **trainable params**: what the
  optimizer updates (LoRA adapters only, or every weight).
- Per-method rows: mean ± sample standard deviation over the runs that differ only by seed; a single run has
  no ±. A group's "before" is the mean zero-shot accuracy of its runs.
"""


def render_markdown(rows: list[dict], groups: list[dict], currency: str, plots: list[str], sources: list[dict]) -> str:
    """The whole report.md text."""
    parts = [
        "# Fine-tuning report: task gain, forgetting, cost",
        "",
        f"{len(rows)} runs from {len(sources)} ledger files.",
        "",
        "## By method (mean ± std over seeds)",
        "",
        group_table(groups, currency),
        "",
        "## Every run",
        "",
        run_table(rows, currency),
        "",
        LEGEND,
        "## Plots",
        "",
        *[f"![{Path(p).stem}]({Path(p).name})" for p in plots],
        "",
        "## Sources",
        "",
        *[f"- `{s['path']}`" + (f" — {s['note']}" if s["note"] else "") for s in sources],
        "",
    ]
    return "\n".join(parts)


# -------------------------------------------------------------------------------------------------- plots


def _colors(rows: list[dict]) -> dict[str, tuple]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    methods = list(KNOWN_METHODS) + sorted({r["method"] for r in rows} - set(KNOWN_METHODS))
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no runs with {what}", ha="center", va="center", transform=ax.transAxes)


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_accuracy_vs_cost(rows: list[dict], path: Path, cost_axis: str = "auto") -> str:
    """Task accuracy after training against device-hours (or wall seconds); runs without cost as lines."""
    import matplotlib.pyplot as plt

    if cost_axis == "auto":
        with_cost = [r for r in rows if r["wall_seconds"] is not None and r["acc_before"] is not None]
        has_hours = with_cost and all(r["device_hours"] is not None for r in with_cost)
        cost_axis = "device_hours" if has_hours else "wall_seconds"
    colors = _colors(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    # Baselines and runs without the chosen cost figure: a horizontal line at their accuracy.
    points = [r for r in rows if r[cost_axis] is not None and r["method"] not in ("tfidf-svm", "tfidf-logreg")]
    lines = [r for r in rows if r not in points]
    for method in dict.fromkeys(r["method"] for r in points):
        mine = [r for r in points if r["method"] == method]
        ax.scatter(
            [r[cost_axis] for r in mine], [100 * r["acc_after"] for r in mine], color=colors[method], label=method
        )
    for r in lines:
        ax.axhline(100 * r["acc_after"], color=colors[r["method"]], linestyle="--", linewidth=1, label=r["run_id"])
    before = [r["acc_before"] for r in rows if r["acc_before"] is not None]
    if before:
        ax.axhline(100 * statistics.fmean(before), color="grey", linestyle=":", linewidth=1, label="zero-shot (before)")
    if not points and not lines:
        _no_data(ax, "task accuracy")
    if points and max(r[cost_axis] for r in points) > 20 * min(r[cost_axis] for r in points) > 0:
        ax.set_xscale("log")
    ax.set_xlabel("device-hours" if cost_axis == "device_hours" else "wall time (s)")
    ax.set_ylabel("task accuracy after (%)")
    ax.set_title("Task accuracy vs cost")
    if points or lines or before:
        ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_gain_vs_forgetting(rows: list[dict], path: Path) -> str:
    """Task gain against perplexity delta (left) and multiple-choice accuracy delta (right), one point a run."""
    import matplotlib.pyplot as plt

    colors = _colors(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    usable = [r for r in rows if r["acc_gain"] is not None]
    for ax, key, xlabel, scale in (
        (axes[0], "ppl_delta", "WikiText-2 perplexity Δ (tuned − base)", 1.0),
        (axes[1], "mc_delta", "multiple-choice accuracy Δ (pp)", 100.0),
    ):
        mine = [r for r in usable if r[key] is not None]
        for method in dict.fromkeys(r["method"] for r in mine):
            pts = [r for r in mine if r["method"] == method]
            xs, ys = [scale * r[key] for r in pts], [100 * r["acc_gain"] for r in pts]
            ax.scatter(xs, ys, color=colors[method], label=method)
        if not mine:
            _no_data(ax, "forgetting probes")
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if mine:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("task accuracy gain (pp)")
    fig.suptitle("Task gain vs forgetting (forgot: perplexity Δ > 0, multiple-choice Δ < 0)")
    return _save(fig, path)


def plot_loss_curves(rows: list[dict], path: Path) -> str:
    """Training loss per optimizer step, one line a run, coloured by method."""
    import matplotlib.pyplot as plt

    colors = _colors(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labelled = set()
    curves = [r for r in rows if r["loss_curve"]]
    for r in curves:
        label = None if r["method"] in labelled else r["method"]
        labelled.add(r["method"])
        ax.plot(range(1, len(r["loss_curve"]) + 1), r["loss_curve"], color=colors[r["method"]], alpha=0.8, label=label)
    if curves:
        ax.legend(fontsize=8)
        if min(min(r["loss_curve"]) for r in curves) > 0:
            ax.set_yscale("log")
    else:
        _no_data(ax, "a loss curve")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean per target token)")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------ the report


def _json_safe(obj):
    # JSON has no NaN; a missing figure is null.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def build_report(
    paths: list[str | Path],
    out_dir: str | Path,
    price_per_device_hour: float | None = None,
    currency: str = "USD",
    cost_axis: str = "auto",
    skip_invalid: bool = False,
) -> dict:
    """Read the ledgers, write report.md, summary.json and the plots into `out_dir`; returns the summary."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ledgers, sources, skipped = [], [], []
    for path in find_ledgers(paths):
        try:
            ledger = load_ledger(path)
            ledgers.append(ledger)
            # A ledger's free-text note (a fixture says it is fabricated) travels into the report.
            sources.append({"path": str(path), "note": ledger.get("_note")})
        except LedgerError as exc:
            if not skip_invalid:
                raise
            skipped.append(str(exc))
    if not ledgers:
        raise LedgerError(f"no valid ledger among {', '.join(map(str, paths))}")
    order = {m: i for i, m in enumerate(KNOWN_METHODS)}
    rows = sorted(
        (run_row(d, price_per_device_hour) for d in ledgers),
        key=lambda r: (order.get(r["method"], len(order)), r["group"], r["seed"], r["run_id"]),
    )
    groups = aggregate(rows)
    plots = [
        plot_accuracy_vs_cost(rows, out / "accuracy_vs_cost.png", cost_axis),
        plot_gain_vs_forgetting(rows, out / "gain_vs_forgetting.png"),
        plot_loss_curves(rows, out / "loss_curves.png"),
    ]
    (out / "report.md").write_text(render_markdown(rows, groups, currency, plots, sources), encoding="utf-8")
    summary = {
        "ledger_version": LEDGER_VERSION,
        "sources": sources,
        "skipped": skipped,
        "price_per_device_hour": price_per_device_hour,
        "currency": currency,
        "runs": [{k: v for k, v in r.items() if k != "loss_curve"} for r in rows],
        "groups": groups,
        "plots": [Path(p).name for p in plots],
    }
    (out / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2) + "\n", encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="ledger files, or folders searched for ledger.json")
    parser.add_argument("--out", required=True, help="folder for report.md, summary.json and the plots")
    parser.add_argument("--price-per-device-hour", type=float, help="price of one device-hour (overrides ledgers)")
    parser.add_argument("--currency", default="USD", help="unit of that price (default: USD)")
    parser.add_argument(
        "--cost-axis", choices=("auto", "device_hours", "wall_seconds"), default="auto", help="x axis of the cost plot"
    )
    parser.add_argument("--skip-invalid", action="store_true", help="leave out invalid ledgers instead of failing")
    args = parser.parse_args(argv)
    try:
        summary = build_report(
            args.paths, args.out, args.price_per_device_hour, args.currency, args.cost_axis, args.skip_invalid
        )
    except (LedgerError, FileNotFoundError) as exc:
        parser.error(str(exc))
    for problem in summary["skipped"]:
        print(f"skipped: {problem}", file=sys.stderr)
    print(f"{len(summary['runs'])} runs, {len(summary['groups'])} groups -> {Path(args.out) / 'report.md'}")
    return summary


if __name__ == "__main__":
    main()
