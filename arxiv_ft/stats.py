"""Intervals and tests for the numbers this project reports: pure functions over per-unit outcomes (numpy only).

Two sources of variance enter every comparison of fine-tuning runs: which evaluation papers were drawn, and which
seed trained the model (its training papers, initialisation, order, dropout). An interval over papers alone describes
the trained models at hand, not the method (a seed can move accuracy by 6 pp here), so `hierarchical_bootstrap`
resamples both: seeds within each side, then the shared papers, paired. Several comparisons in one report are
corrected with Holm's step-down method. Forgetting probes get paired bootstraps over their windows or items.
"""

from __future__ import annotations

from collections.abc import Callable
from statistics import NormalDist

import numpy as np

CONFIDENCE = 0.95
POWER = 0.8


def _interval(boot: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail])
    return float(low), float(high)


def _two_sided_p(boot: np.ndarray) -> float:
    """The bootstrap p-value of "the difference is 0": twice the smaller tail mass at 0 (at least one resample)."""
    n = len(boot)
    return min(1.0, 2 * min(((boot <= 0).sum() + 1) / (n + 1), ((boot >= 0).sum() + 1) / (n + 1)))


def hierarchical_bootstrap(a: np.ndarray, b: np.ndarray, samples: int = 2000, seed: int = 0) -> dict:
    """Mean(A) - mean(B) for outcomes a [seeds_a, papers] and b [seeds_b, papers] on the same papers (columns).

    Each resample draws seeds with replacement on each side, then papers with replacement (the same papers for both
    sides: paired), and recomputes the difference of means. Returns the difference, its interval, the two-sided
    p-value, the bootstrap standard error and the smallest difference this design would detect (`mde`: 80% power at
    the 5% level, (z_0.975 + z_0.8) x SE). A side with one seed contributes no seed variance: `seeds_counted` says
    whether both sides had at least two.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"outcomes must be [seeds, papers] on the same papers, got {a.shape} and {b.shape}")
    rng = np.random.default_rng(seed)
    n_papers = a.shape[1]
    rows_a = rng.integers(0, a.shape[0], size=(samples, a.shape[0]))
    rows_b = rng.integers(0, b.shape[0], size=(samples, b.shape[0]))
    papers = rng.integers(0, n_papers, size=(samples, n_papers))
    # Mean over resampled seeds first (a [samples, papers] matrix per side), then over resampled papers.
    per_paper_a = a[rows_a].mean(axis=1)
    per_paper_b = b[rows_b].mean(axis=1)
    diff = per_paper_a - per_paper_b
    boot = np.take_along_axis(diff, papers, axis=1).mean(axis=1)
    se = float(boot.std(ddof=1))
    return {
        "difference": float(a.mean() - b.mean()),
        "ci95": _interval(boot),
        "p_value": _two_sided_p(boot),
        "se": se,
        "mde": minimum_detectable_effect(se),
        "seeds": [int(a.shape[0]), int(b.shape[0])],
        "papers": int(n_papers),
        "seeds_counted": bool(a.shape[0] > 1 and b.shape[0] > 1),
    }


def minimum_detectable_effect(se: float, alpha: float = 1 - CONFIDENCE, power: float = POWER) -> float:
    """The smallest true difference a two-sided test at `alpha` detects with probability `power`, given its SE."""
    z = NormalDist()
    return (z.inv_cdf(1 - alpha / 2) + z.inv_cdf(power)) * se


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control), in the input order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def paired_bootstrap(
    before: np.ndarray, after: np.ndarray, statistic: Callable, samples: int = 2000, seed: int = 0
) -> dict:
    """`statistic(before[idx], after[idx])` with units (windows, items) resampled together: its value on all units
    and its interval. The units are the first axis of both arrays."""
    before, after = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if before.shape[0] != after.shape[0]:
        raise ValueError("paired outcomes must have the same units")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, before.shape[0], size=(samples, before.shape[0]))
    boot = np.array([statistic(before[i], after[i]) for i in idx])
    return {"value": float(statistic(before, after)), "ci95": _interval(boot)}


def bootstrap_mean(values: np.ndarray, samples: int = 2000, seed: int = 0) -> dict:
    """The mean of per-unit values and its bootstrap interval over the units."""
    values = np.asarray(values, dtype=float)
    return paired_bootstrap(values, values, lambda v, _: v.mean(), samples, seed)
