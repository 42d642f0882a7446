"""Frontiers: task accuracy against forgetting, one curve per method, from the report's run rows.

A point is a method (with its objective, where that is not the default) at one learning rate and one WiSE-FT α
(arxiv_ft/interpolate.py), averaged over its seeds: accuracy on the report's papers, and each forgetting measure with
an interval (one seed: its paired bootstrap interval; several: the envelope of their intervals). A point is on the
Pareto front when no other point is at least as accurate and forgets no more, one of them strictly. "At matched
accuracy" reads each method's own front, interpolated linearly between the two points around the accuracy asked for
(none outside its range): the least forgetting that method reached at that accuracy, with the interval bounds
interpolated alike, and what training it cost (the run at the upper point: WiSE-FT points share their run's training).
"""

from __future__ import annotations

from pathlib import Path

# (row key, axis label, scale to the shown unit, whether larger means more forgetting)
MEASURES = (
    ("ppl_change_pct", "WikiText-2 perplexity change (%)", 1.0, True),
    ("kl", "KL(base ‖ model), nats/token", 1.0, True),
    ("mc_delta", "multiple-choice change (pp)", 100.0, False),
)


def points(rows: list[dict]) -> list[dict]:
    """Fine-tuning rows with forgetting figures, grouped by (method, lr, α) over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        config = row.get("config") or {}
        if row.get("kl") is None and row.get("ppl_change_pct") is None or "lr" not in config:
            continue  # a baseline, or a run without probes
        key = (curve(row["method"], config), config["lr"], config.get("wise_alpha", 1.0))
        groups.setdefault(key, []).append(row)
    out = []
    for (method, lr, alpha), members in sorted(groups.items()):
        point = {"method": method, "lr": lr, "alpha": alpha, "seeds": sorted(r["seed"] for r in members)}
        point["accuracy"] = _mean([r["acc_after"] for r in members])
        point["device_seconds"] = _mean([_device_seconds(r) for r in members])
        point["tokens"] = _mean([r.get("tokens_seen") for r in members])
        point["peak_memory_bytes"] = _mean([r.get("peak_memory_bytes") for r in members])
        for key, _, scale, _ in MEASURES:
            values = [r[key] for r in members if r.get(key) is not None]
            bounds = [(r.get("forgetting_ci95") or {}).get(key) for r in members]
            bounds = [b for b in bounds if b]
            point[key] = scale * _mean(values) if values else None
            point[f"{key}_ci"] = (
                [scale * min(b[0] for b in bounds), scale * max(b[1] for b in bounds)] if bounds else None
            )
        point["label"] = f"lr {lr:g}" + (f", α {alpha:g}" if alpha != 1.0 else "")
        out.append(point)
    return out + shared_base(out)


def curve(method: str, config: dict) -> str:
    """The curve a run belongs to: its method, and its objective where that is not the default (a forgetting penalty
    is a curve of its own, so that the report shows whether it moves the front; a penalty on another text, another)."""
    from arxiv_ft.options import TrainConfig  # the defaults an older ledger did not record

    objective = config.get("objective") or TrainConfig.objective
    if objective == TrainConfig.objective:
        return method
    if objective == "kl-regularised":
        text = Path(config.get("kl_text") or TrainConfig.kl_text).stem  # a checkout's path differs, the file does not
        on = "" if text == Path(TrainConfig.kl_text).stem else f" on {text.removeprefix('general_text_')}"
        return f"{method} + KL β {config.get('kl_beta', TrainConfig.kl_beta):g}{on}"
    return f"{method} ({objective})"


def shared_base(pts: list[dict]) -> list[dict]:
    """α = 0 is the base model whatever the method (θ_base + 0·Δ): a measured α = 0 point starts the curve of every
    other method on the same unquantised base that has none of its own (QLoRA's base is its 4-bit copy: not shared)."""
    from arxiv_ft.methods import METHODS

    bases = [p for p in pts if p["alpha"] == 0 and not getattr(METHODS.get(p["method"]), "quantized", False)]
    have = {p["method"] for p in pts if p["alpha"] == 0}
    methods = [m for m in dict.fromkeys(p["method"] for p in pts) if m not in have]
    shareable = [m for m in methods if not getattr(METHODS.get(m), "quantized", False)]
    shared = {"label": "base (α 0)", "shared": True, "device_seconds": 0.0}  # no training
    return [base | shared | {"method": m} for base in bases[:1] for m in shareable]


def _mean(values):
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _device_seconds(row: dict):
    wall, count = row.get("wall_seconds"), row.get("device_count") or 1
    return None if wall is None else wall * count


def _worse(key: str, more_is_worse: bool):
    """Forgetting as a number where larger is worse."""
    return (lambda p: p[key]) if more_is_worse else (lambda p: -p[key])


def pareto(pts: list[dict], key: str, more_is_worse: bool = True) -> list[dict]:
    """The points no other point beats on both accuracy and this forgetting measure, by accuracy."""
    usable = [p for p in pts if p.get(key) is not None and p.get("accuracy") is not None]
    worse = _worse(key, more_is_worse)

    def beaten(p: dict) -> bool:
        return any(
            q["accuracy"] >= p["accuracy"]
            and worse(q) <= worse(p)
            and (q["accuracy"] > p["accuracy"] or worse(q) < worse(p))
            for q in usable
        )

    return sorted((p for p in usable if not beaten(p)), key=lambda p: p["accuracy"])


def _mix(a, b, t: float):
    return None if a is None or b is None else a + t * (b - a)


def at_accuracy(pts: list[dict], target: float, key: str, more_is_worse: bool = True) -> dict | None:
    """One method's least forgetting at `target` accuracy along its own front (None outside its range)."""
    front = pareto(pts, key, more_is_worse)
    for lo, hi in zip(front, front[1:]):
        if lo["accuracy"] <= target <= hi["accuracy"]:
            span = hi["accuracy"] - lo["accuracy"]
            t = (target - lo["accuracy"]) / span if span > 0 else 0.0
            a, b = lo[f"{key}_ci"], hi[f"{key}_ci"]
            return {
                "value": _mix(lo[key], hi[key], t),
                "ci": [_mix(a[0], b[0], t), _mix(a[1], b[1], t)] if a and b else None,
                # What reaching it costs: the training run at the upper end (a WiSE-FT point shares its run).
                "device_seconds": hi["device_seconds"],
            }
    for p in front:
        if abs(p["accuracy"] - target) < 1e-9:
            return {"value": p[key], "ci": p[f"{key}_ci"], "device_seconds": p["device_seconds"]}
    return None


def matched_table(pts: list[dict], targets: list[float], key: str = "ppl_change_pct") -> tuple[str, list[str]]:
    """Markdown: forgetting and cost of each method at each target accuracy; and one sentence per target saying which
    method forgets least there, or that the intervals overlap."""
    name = next(label for k, label, _, _ in MEASURES if k == key)
    more_is_worse = next(w for k, _, _, w in MEASURES if k == key)
    methods = list(dict.fromkeys(p["method"] for p in pts))
    lines = ["| accuracy | " + " | ".join(f"{m}: {name} | {m}: device-s" for m in methods) + " |"]
    lines.append("|---|" + "---|---|" * len(methods))
    verdicts = []
    for target in targets:
        cells, found = [], {}
        for method in methods:
            got = at_accuracy([p for p in pts if p["method"] == method], target, key, more_is_worse)
            if got is None:
                cells += ["—", "—"]
                continue
            found[method] = got
            ci = f" [{got['ci'][0]:+.1f}, {got['ci'][1]:+.1f}]" if got["ci"] else ""
            seconds = "—" if got["device_seconds"] is None else f"{got['device_seconds']:,.0f}"
            cells += [f"{got['value']:+.2f}{ci}", seconds]
        lines.append(f"| {100 * target:.0f}% | " + " | ".join(cells) + " |")
        verdicts.append(_verdict(target, found, more_is_worse))
    return "\n".join(lines), verdicts


def _verdict(target: float, found: dict, more_is_worse: bool) -> str:
    at = f"At {100 * target:.0f}% accuracy"
    if len(found) < 2:
        return f"{at}: fewer than two methods reach it; nothing to compare."
    sign = 1 if more_is_worse else -1
    best = min(found, key=lambda m: sign * found[m]["value"])
    others = [m for m in found if m != best]

    def clear_of(m: str) -> bool:  # the best method's interval lies wholly on the better side of m's
        a, b = found[best]["ci"], found[m]["ci"]
        return bool(a and b) and (a[1] < b[0] if more_is_worse else a[0] > b[1])

    clear = [m for m in others if clear_of(m)]
    overlap = [m for m in others if m not in clear]
    if not overlap:
        return f"{at}, {best} forgets least, and its interval is clear of {', '.join(others)}'s."
    also = f" (it is clear of {', '.join(clear)}'s)" if clear else ""
    overlaps = f"but its interval overlaps {', '.join(overlap)}'s"
    return f"{at}, {best} forgets least, {overlaps}: no method dominates here{also}."


def targets(pts: list[dict], step: float = 0.05, most: int = 3) -> list[float]:
    """The `most` highest accuracies (multiples of `step`) that at least two methods' points span: where matching
    means something, near what training reaches."""
    spans = {}
    for p in pts:
        lo, hi = spans.get(p["method"], (1.0, 0.0))
        spans[p["method"]] = (min(lo, p["accuracy"]), max(hi, p["accuracy"]))
    grid = [round(i * step, 4) for i in range(1, int(1 / step))]
    return [t for t in grid if sum(lo <= t <= hi for lo, hi in spans.values()) >= 2][-most:]


def plot(pts: list[dict], path: Path) -> str:
    """Accuracy (x) against each forgetting measure (y), one curve per method, intervals as error bars, labelled
    points, the Pareto front ringed."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MEASURES), figsize=(5 * len(MEASURES), 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(p["method"] for p in pts))
    for ax, (key, label, _, more_is_worse) in zip(axes, MEASURES):
        for i, method in enumerate(methods):
            mine = [p for p in pts if p["method"] == method and p.get(key) is not None]
            mine.sort(key=lambda p: p["accuracy"])
            if not mine:
                continue
            xs, ys = [100 * p["accuracy"] for p in mine], [p[key] for p in mine]
            bounds = [p[f"{key}_ci"] or [y, y] for p, y in zip(mine, ys)]
            err = [[y - b[0] for b, y in zip(bounds, ys)], [b[1] - y for b, y in zip(bounds, ys)]]
            ax.errorbar(xs, ys, yerr=err, color=colors[i % len(colors)], marker="o", capsize=3, label=method)
            for p, x, y in zip(mine, xs, ys):
                ax.annotate(p["label"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        front = pareto(pts, key, more_is_worse)
        ax.scatter(
            [100 * p["accuracy"] for p in front],
            [p[key] for p in front],
            s=160,
            facecolors="none",
            edgecolors="black",
            label="Pareto front",
        )
        ax.set_xlabel("test accuracy (%)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Accuracy against forgetting: one curve per method (learning rates, WiSE-FT α)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
