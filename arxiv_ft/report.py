"""Compare runs: task gain against forgetting against cost, from the ledger each run leaves behind.

    python -m arxiv_ft.report runs/ --out reports/latest
    python -m arxiv_ft.report runs/lora-s0 runs/tfidf/ledger.json --out reports/x --price-per-device-hour 2.5

Each argument is a ledger file or a folder searched for `ledger.json` files. Writes `report.md` (one row per run,
one row per method with mean ± std over seeds, and a legend), `summary.json` (the same numbers), and three plots:
`accuracy_vs_cost.png`, `gain_vs_forgetting.png`, `loss_curves.png`.

Scores come from the test papers when every fine-tuning ledger has them (`--split auto`), else from the validation
papers, and the report says which. The tuned TF-IDF baseline each run fitted on its own training papers becomes a
row of its own, seed for seed. Differences between groups get a hierarchical bootstrap over seeds and papers
(`arxiv_ft.stats`), Holm-corrected over the report's comparisons.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from arxiv_ft import frontier
from arxiv_ft.fileio import json_digest
from arxiv_ft.ledger import LEDGER_VERSION, Ledger, LedgerError, known_methods
from arxiv_ft.options import ReportConfig

# Config keys that differ between seeds of one experiment; everything else must match to be averaged together.
# (same_text_as: the LLM run, of the same seed, whose prompts a baseline read.)
_PER_RUN_KEYS = (
    "seed",
    "output_dir",
    "out",
    "run_id",
    "run_name",
    "report_to",
    "cpu_threads",
    "resume",
    "same_text_as",
)
# Numbers averaged per group, in table order.
_GROUP_FIELDS = (
    "acc_before",
    "acc_after",
    "acc_gain",
    "f1_before",
    "f1_after",
    "f1_gain",
    "tfidf_acc",
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


def method_order() -> dict[str, int]:
    """Report order: zero-shot, the fine-tuning methods in their table's order, then the baselines."""
    return {m: i for i, m in enumerate(known_methods())}


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


# Files named in a config: compared by name (the same shipped file in two checkouts is the same data).
_FILE_KEYS = ("train_file", "eval_file", "test_file", "labels", "kl_text")
# Options that only mean something under one objective: an old ledger lacks them, a new one records their defaults.
_OBJECTIVE_KEYS = {"kl-regularised": ("kl_beta", "kl_text", "kl_windows", "kl_window_tokens")}


def comparable_config(ledger: dict) -> dict:
    """The config as it decides the numbers: per-run keys dropped, files by name (test_file `auto` by the file it
    chose), options of an objective the run did not use dropped."""
    config = {k: v for k, v in ledger["config"].items() if k not in _PER_RUN_KEYS}
    if config.get("test_file") == "auto":
        config["test_file"] = (ledger.get("data") or {}).get("test_file") or ""
    for key in _FILE_KEYS:
        if isinstance(config.get(key), str) and "/" in config[key]:
            config[key] = Path(config[key]).name
    for objective, keys in _OBJECTIVE_KEYS.items():
        if config.get("objective") != objective:
            config = {k: v for k, v in config.items() if k not in keys}
    return config


def group_key(ledger: dict) -> str:
    """Runs that differ only in seed share a key: method, model, data sizes and the rest of the config."""
    ident = [ledger["method"], ledger["model"], ledger["data"]["n_train"], ledger["data"]["n_eval"]]
    return json_digest([*ident, comparable_config(ledger)])[:8]


# What a run's own TF-IDF fit depends on: its papers and, reading the LLM's text, the prompt that cuts that text.
_PAPER_KEYS = ("train_file", "train_per_class", "eval_file", "eval_per_class", "test_file", "test_per_class", "labels")
_PROMPT_KEYS = ("template", "max_seq_tokens", "token_budget")


def baseline_key(ledger: dict, entry: str) -> str:
    """Runs of different methods with the same seed fit the same TF-IDF on the same papers: one group (and one row
    per seed, see build_report), not one per method."""
    config = comparable_config(ledger)
    keep = _PAPER_KEYS + (_PROMPT_KEYS if entry == "tfidf_tuned" else ())
    return json_digest([entry, ledger["data"]["n_train"], {k: config.get(k) for k in keep}])[:8]


def scored_section(ledger: dict, split: str) -> dict:
    """The ledger's scores on `split`: its test section, or its (validation) task section."""
    return ledger["task"] if split == "validation" else (ledger.get("test") or {})


def choose_split(ledgers: list[dict], split: str) -> str:
    """`auto`: test where every ledger has test scores, else validation; an explicit split must be in every ledger."""
    has_test = all(d.get("test") for d in ledgers)
    if split == "auto":
        return "test" if has_test else "validation"
    if split == "test" and not has_test:
        missing = [d["run_id"] for d in ledgers if not d.get("test")]
        raise LedgerError(f"--split test: {len(missing)} ledger(s) hold no test scores (e.g. {missing[0]})")
    return split


# A run's own tuned TF-IDF fits become rows of their own (same training papers, same seed, same evaluation papers).
IN_RUN_BASELINES = {
    "tfidf_tuned": "TF-IDF tuned (word+char, C by CV), LLM's text",
    "tfidf_tuned_full_text": "TF-IDF tuned (word+char, C by CV), full abstract",
}


def in_run_baseline_rows(ledger: dict, split: str) -> list[dict]:
    """Rows for the tuned TF-IDF fits a train run made on its own papers (grouped across seeds by the run's group)."""
    rows = []
    for entry, label in IN_RUN_BASELINES.items():
        scores = scored_section(ledger, split).get(entry)
        if not scores:
            continue
        row = dict.fromkeys(run_row(ledger, split=split))  # a run's columns, empty: a baseline fills a few
        row |= {
            "run_id": f"{ledger['run_id']}:{entry}",
            "method": "tfidf-svm",
            "seed": ledger["seed"],
            "model": label,
            "group": baseline_key(ledger, entry),
            "n_train": ledger["data"]["n_train"],
            "n_eval": scores["n"],
            "acc_after": scores["accuracy"],
            "f1_after": scores["macro_f1"],
            "loss_curve": [],
            "outcomes": dict(zip(scores["ids"], scores["correct"])) if scores.get("ids") is not None else None,
        }
        rows.append(row)
    return rows


def run_row(ledger: dict, price_per_device_hour: float | None = None, split: str = "validation") -> dict:
    """One run's figures, flat; None where the ledger has none (a baseline has no forgetting or device cost)."""
    section = scored_section(ledger, split)
    before, after = section.get("before"), section["after"]
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
        "config": comparable_config(ledger),
        "n_train": ledger["data"]["n_train"],
        "n_eval": after.get("n", ledger["data"]["n_eval"]),
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
        "ppl_change_pct": delta.get("ppl_change_pct"),
        "forgetting_ci95": delta.get("ci95"),
        "mc_probe_items": delta.get("mc_items"),
        "ppl_probe_tokens": delta.get("ppl_tokens"),
        "wall_seconds": cost.get("wall_seconds"),
        "train_seconds": cost.get("train_seconds"),
        "device_type": cost.get("device_type"),
        "device_count": cost.get("device_count"),
        "device_hours": cost.get("device_hours"),
        "tokens_per_second": cost.get("tokens_per_second"),
        "tokens_seen": cost.get("tokens_seen"),
        "mfu": cost.get("mfu"),
        "peak_memory_bytes": cost.get("peak_memory_bytes"),
        "trainable_parameters": cost.get("trainable_parameters"),
        "cost": money,
        "loss_curve": ledger["train"].get("loss_curve", []),
    }
    row["acc_gain"] = _diff(row["acc_after"], row["acc_before"])
    row["f1_gain"] = _diff(row["f1_after"], row["f1_before"])
    tfidf = section.get("tfidf_tuned") or section.get("tfidf")
    row["tfidf_acc"] = tfidf["accuracy"] if tfidf else None
    # Per-paper outcomes (when the ledger has them): what the paired bootstrap resamples.
    row["outcomes"] = dict(zip(after["ids"], after["correct"])) if after.get("ids") is not None else None
    return row


def _mean_std(values: list) -> tuple[float | None, float | None, int]:
    present = [v for v in values if v is not None]
    if not present:
        return None, None, 0
    std = statistics.stdev(present) if len(present) > 1 else None
    return statistics.fmean(present), std, len(present)


def distinguishing_settings(configs: dict[str, dict], plain: dict[str, str]) -> dict[str, str]:
    """For groups whose plain labels clash, the settings that tell them apart ("lr=0.002, epochs=1"), not a config
    hash; the hash only where more than three settings differ."""
    out = {}
    for label in {x for x in plain.values() if list(plain.values()).count(x) > 1}:
        members = [g for g in plain if plain[g] == label]
        keys = sorted({k for g in members for k in configs[g]})
        values = {k: {json.dumps(configs[g].get(k), sort_keys=True, default=str) for g in members} for k in keys}
        differ = [k for k in keys if len(values[k]) > 1]
        for g in members:
            shown = [f"{k}={configs[g].get(k)}" for k in differ[:3]]
            out[g] = ", ".join(shown) + (f", … (cfg {g})" if len(differ) > 3 or not differ else "")
    return out


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per group of runs that differ only by seed: mean, sample std (n > 1) and count of each figure."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    # A label reads "method · model · n_train"; the config hash joins it only where two groups would look alike.
    plain = {g: f"{r[0]['method']} · {r[0]['model']} · n={r[0]['n_train']}" for g, r in groups.items()}
    names = distinguishing_settings({g: r[0].get("config") or {} for g, r in groups.items()}, plain)
    out = []
    for g, members in groups.items():
        label = plain[g] + (f" · {names[g]}" if names.get(g) else "")
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
    order = method_order()
    return sorted(out, key=lambda e: (order.get(e["method"], len(order)), e["label"]))


# ---------------------------------------------------------------------------------------------- significance


def compare_groups(rows: list[dict], groups: list[dict], samples: int = 2000, seed: int = 0) -> list[dict]:
    """Every pair of groups evaluated on the same papers: the accuracy difference, its 95% interval and p-value from
    a hierarchical bootstrap (seeds within each side, then the shared papers), Holm-adjusted over all pairs, and the
    smallest difference the design could detect.

    A difference is called significant only when both sides have at least two seeds (else the seed variance is
    unknown) and the Holm-adjusted p-value is below 0.05 (the corrected interval excludes 0).
    """
    import numpy as np

    from arxiv_ft.stats import hierarchical_bootstrap, holm, minimum_detectable_effect

    by_group: dict[str, list[dict]] = {}
    for row in rows:
        if row["outcomes"] is not None:
            by_group.setdefault(row["group"], []).append(row)
    usable = [g for g in groups if g["group"] in by_group]
    rng = np.random.default_rng(seed)
    out = []
    for i, a in enumerate(usable):
        for b in usable[i + 1 :]:
            runs_a, runs_b = by_group[a["group"]], by_group[b["group"]]
            papers = set.intersection(*(set(r["outcomes"]) for r in runs_a + runs_b))
            if len(papers) < 10:
                continue
            ids = sorted(papers)
            outcomes_a = np.array([[r["outcomes"][p] for p in ids] for r in runs_a])
            outcomes_b = np.array([[r["outcomes"][p] for p in ids] for r in runs_b])
            test = hierarchical_bootstrap(outcomes_a, outcomes_b, samples, int(rng.integers(2**31)))
            sd_a, sd_b = a["acc_after"]["std"], b["acc_after"]["std"]
            seed_sd = math.hypot(sd_a or 0.0, sd_b or 0.0) if sd_a is not None or sd_b is not None else None
            out.append(
                {
                    "a": a["label"],
                    "b": b["label"],
                    "papers": len(ids),
                    "seeds": test["seeds"],
                    "difference": test["difference"],
                    "ci95": list(test["ci95"]),
                    "p_value": test["p_value"],
                    "se": test["se"],
                    "seed_sd": seed_sd,
                    "seeds_counted": test["seeds_counted"],
                }
            )
    adjusted = holm([c["p_value"] for c in out])
    for c, p_holm in zip(out, adjusted):
        c["p_holm"] = p_holm
        # The smallest effect found at the strictest level Holm may apply (Bonferroni's 0.05 / comparisons).
        c["mde"] = minimum_detectable_effect(c["se"], alpha=0.05 / len(out))
        c["significant"] = bool(c["seeds_counted"] and p_holm < 0.05)
    return out


def significance_table(comparisons: list[dict]) -> str:
    """The comparisons as a Markdown table with a one-line verdict each."""
    header = ["A", "B", "papers", "seeds (A, B)", "acc A − B", "95% CI (seeds × papers)", "p", "p (Holm)", "verdict"]
    body = []
    for c in comparisons:
        if c["significant"]:
            verdict = "A better" if c["difference"] > 0 else "B better"
        elif not c.get("seeds_counted", True):
            verdict = "no verdict: one seed on a side"
        else:
            verdict = f"no difference detected (would detect ±{100 * c['mde']:.1f} pp)"
        body.append(
            [
                c["a"],
                c["b"],
                str(c["papers"]),
                f"{c['seeds'][0]}, {c['seeds'][1]}",
                _pct(c["difference"], signed=True),
                f"[{_pct(c['ci95'][0], signed=True)}, {_pct(c['ci95'][1], signed=True)}]",
                f"{c['p_value']:.3f}",
                f"{c['p_holm']:.3f}",
                verdict,
            ]
        )
    return _table(header, body)


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


def forgetting_table(rows: list[dict]) -> str | None:
    """Per run: each forgetting figure with its 95% paired bootstrap interval (None when no run has intervals)."""
    measured = [r for r in rows if r.get("forgetting_ci95")]
    if not measured:
        return None

    def cell(value, ci, scale, unit, digits=1):
        if value is None:
            return DASH
        span = f" [{ci[0] * scale:+.{digits}f}, {ci[1] * scale:+.{digits}f}]" if ci else ""
        return f"{value * scale:+.{digits}f}{unit}{span}"

    header = ["run", "seed", "perplexity change (tokens)", "KL(base ‖ tuned), nats/token", "MC accuracy Δ (items)"]
    body = []
    for r in measured:
        ci = r["forgetting_ci95"]
        kl = DASH
        if r["kl"] is not None:
            kl = f"{r['kl']:.4f}" + (f" [{ci['kl'][0]:.4f}, {ci['kl'][1]:.4f}]" if ci.get("kl") else "")
        body.append(
            [
                r["run_id"],
                str(r["seed"]),
                cell(r["ppl_change_pct"], ci.get("ppl_change_pct"), 1, "%") + f" ({_count(r['ppl_probe_tokens'])})",
                kl,
                cell(r["mc_delta"], ci.get("mc_delta"), 100, " pp") + f" ({r['mc_probe_items']})",
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


def scores_line(rows: list[dict], split: str) -> str:
    """Which papers the scores are on, and a warning where runs were scored on different numbers of papers."""
    line = {
        "test": "Scores are on the **test** papers (no choice was made on them).",
        "validation": "Scores are on the **validation** papers (the papers choices were made on: not a final number).",
    }[split]
    sizes = sorted({r["n_eval"] for r in rows if r.get("n_eval")})
    if len(sizes) > 1:  # a run scored on 21 papers beside one scored on 210: say so
        line += (
            f" **The runs were scored on different numbers of papers ({', '.join(map(str, sizes))})**: their accuracies"
            " are not on the same papers; the comparisons below resample only the papers both sides share."
        )
    return line


def significance_section(comparisons: list[dict] | None) -> list[str]:
    """The report's significance table with how to read it (empty without comparisons)."""
    if not comparisons:
        return []
    return [
        "## Are the differences real? (hierarchical bootstrap over seeds and papers, Holm-corrected)",
        "",
        significance_table(comparisons),
        "",
        "Each resample draws each side's seeds with replacement, then the shared evaluation papers with "
        "replacement (paired), and recomputes the difference of mean accuracies: the interval counts both "
        "sources of variance. p-values are two-sided bootstrap p-values; *p (Holm)* corrects them for the "
        f"{len(comparisons)} comparisons of this report. A side is called better only with at least two seeds "
        "on each side and a Holm-adjusted p below 0.05; otherwise the verdict gives the smallest difference "
        "this design would detect (80% power at the Bonferroni level 0.05 / comparisons).",
        "",
    ]


def render_markdown(
    rows: list[dict],
    groups: list[dict],
    currency: str,
    plots: list[str],
    sources: list[dict],
    comparisons: list[dict] | None = None,
    split: str = "validation",
    frontier_part: list[str] | None = None,
) -> str:
    """The whole report.md text."""
    significance = significance_section(comparisons)
    split_line = scores_line(rows, split)
    forgetting = forgetting_table(rows)
    forgetting_part = []
    if forgetting:
        forgetting_part = [
            "## Forgetting, per run (95% paired bootstrap intervals over windows or items)",
            "",
            forgetting,
            "",
        ]
    parts = [
        "# Fine-tuning report: task gain, forgetting, cost",
        "",
        f"{len(rows)} runs from {len(sources)} ledger files. {split_line}",
        "",
        "## By method (mean ± std over seeds)",
        "",
        group_table(groups, currency),
        "",
        *significance,
        *forgetting_part,
        *(frontier_part or []),
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
    known = list(known_methods())
    methods = known + sorted({r["method"] for r in rows} - set(known))
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


def read_ledgers(paths: list[str | Path], skip_invalid: bool) -> tuple[list[dict], list[dict], list[str]]:
    """(ledgers, their sources with any note, the problems of those skipped); an invalid ledger raises unless
    `skip_invalid`, and no valid one at all raises."""
    ledgers, sources, skipped = [], [], []
    for path in find_ledgers(paths):
        try:
            ledger = Ledger.read(path).to_json()
            ledgers.append(ledger)
            # A ledger's free-text note (a fixture says it is fabricated) travels into the report.
            sources.append({"path": str(path), "note": ledger.get("_note")})
        except LedgerError as exc:
            if not skip_invalid:
                raise
            skipped.append(str(exc))
    if not ledgers:
        raise LedgerError(f"no valid ledger among {', '.join(map(str, paths))}")
    return ledgers, sources, skipped


def frontier_section(pts: list[dict], out: Path, plots: list[str]) -> list[str]:
    """The frontier plot (appended to `plots`) and the matched-accuracy table with its verdicts, where there are two
    or more frontier points."""
    if len(pts) < 2:
        return []
    plots.append(frontier.plot(pts, out / "frontier.png"))
    table, verdicts = frontier.matched_table(pts, frontier.targets(pts))
    return [
        "## Frontier: accuracy against forgetting (learning rates and WiSE-FT α; `frontier.png`)",
        "",
        "Forgetting and cost at matched accuracy, read along each method's own Pareto front (linear between its "
        "two points around the accuracy; intervals interpolated alike; device-seconds: the training run that reaches "
        "it, whose WiSE-FT points share its cost):",
        "",
        table,
        "",
        *[f"- {v}" for v in verdicts],
        "",
    ]


def build_report(
    paths: list[str | Path],
    out_dir: str | Path,
    price_per_device_hour: float | None = None,
    currency: str = "USD",
    cost_axis: str = "auto",
    skip_invalid: bool = False,
    bootstrap_samples: int = 2000,
    split: str = "auto",
) -> dict:
    """Read the ledgers, write report.md, summary.json and the plots into `out_dir`; returns the summary."""
    import matplotlib
    from tqdm.auto import tqdm

    matplotlib.use("Agg")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ledgers, sources, skipped = read_ledgers(paths, skip_invalid)
    order = method_order()
    split = choose_split(ledgers, split)
    made = [run_row(d, price_per_device_hour, split) for d in ledgers]
    baselines = {}  # the same seed's TF-IDF fit, made again by each method's run: one row
    for row in (row for d in ledgers for row in in_run_baseline_rows(d, split)):
        baselines.setdefault((row["group"], row["seed"]), row)
    made += baselines.values()
    rows = sorted(made, key=lambda r: (order.get(r["method"], len(order)), r["group"], r["seed"], r["run_id"]))
    groups = aggregate(rows)
    with tqdm(total=4, desc="report", unit="part", leave=False) as bar:
        comparisons = compare_groups(rows, groups, bootstrap_samples)
        bar.update()
        plots = [plot_accuracy_vs_cost(rows, out / "accuracy_vs_cost.png", cost_axis)]
        bar.update()
        plots.append(plot_gain_vs_forgetting(rows, out / "gain_vs_forgetting.png"))
        bar.update()
        plots.append(plot_loss_curves(rows, out / "loss_curves.png"))
        bar.update()
    pts = frontier.points(rows)
    frontier_part = frontier_section(pts, out, plots)
    markdown = render_markdown(rows, groups, currency, plots, sources, comparisons, split, frontier_part)
    (out / "report.md").write_text(markdown, encoding="utf-8")
    summary = {
        "ledger_version": LEDGER_VERSION,
        "sources": sources,
        "skipped": skipped,
        "price_per_device_hour": price_per_device_hour,
        "currency": currency,
        "split": split,
        "runs": [{k: v for k, v in r.items() if k not in ("loss_curve", "outcomes")} for r in rows],
        "groups": groups,
        "comparisons": comparisons,
        "plots": [Path(p).name for p in plots],
        "frontier": pts,
    }
    (out / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2) + "\n", encoding="utf-8")
    return summary


def main(argv: list[str] | None = None, prog: str | None = None) -> dict:
    """The command line: `arxiv-ft report LEDGERS_OR_FOLDERS... --out DIR`."""
    from arxiv_ft.config import parse_config

    cfg = parse_config(ReportConfig, argv, __doc__, prog)
    try:
        summary = build_report(
            [p for p in cfg.paths.split(",") if p],
            cfg.out,
            cfg.price_per_device_hour or None,
            cfg.currency,
            cfg.cost_axis,
            cfg.skip_invalid,
            cfg.bootstrap_samples,
            cfg.split,
        )
    except (LedgerError, FileNotFoundError) as exc:
        raise SystemExit(f"arxiv-ft report: error: {exc}") from None
    for problem in summary["skipped"]:
        print(f"skipped: {problem}", file=sys.stderr)
    print(f"{len(summary['runs'])} runs, {len(summary['groups'])} groups -> {Path(cfg.out) / 'report.md'}")
    return summary


if __name__ == "__main__":
    main()
