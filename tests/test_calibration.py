"""Temperature scaling, calibration error, AUROC and risk-coverage against independent computations."""

from __future__ import annotations

import pytest
import torch

from arxiv_ft import calibration as cal


def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4000, 21, generator=gen) * 3
    y = torch.multinomial(torch.softmax(scores / 2.5, -1), 1, generator=gen)[:, 0]  # labels drawn at T = 2.5
    t = cal.fit_temperature(scores, y)
    assert t == pytest.approx(2.5, rel=0.08)
    grid = [cal.nll(scores, y, x) for x in (t * 0.9, t, t * 1.1)]
    assert grid[1] <= min(grid[0], grid[2])  # a minimum, not just near the truth


def test_expected_calibration_error_by_hand():
    # Two bins used: 0.9-sure papers (2 of 2 right: gap 0.1) and 0.6-sure papers (1 of 2 right: gap 0.1).
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    y = torch.tensor([0, 0, 0, 1])
    assert cal.expected_calibration_error(probs, y, bins=10) == pytest.approx(0.1)
    assert cal.expected_calibration_error(torch.tensor([[1.0, 0.0]]), torch.tensor([0])) == 0.0


def test_auroc_equals_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    pos, neg = [0.9, 0.8, 0.8, 0.3, 0.5], [0.8, 0.2, 0.1, 0.5, 0.4, 0.4]
    want = roc_auc_score([1] * len(pos) + [0] * len(neg), pos + neg)
    assert cal.auroc(pos, neg) == pytest.approx(want)
    with pytest.raises(ValueError, match="each side"):
        cal.auroc(pos, [])


def test_risk_coverage_keeps_the_most_confident_first():
    confidence = [0.9, 0.2, 0.8, 0.1]
    correct = [True, False, True, True]
    curve = cal.risk_coverage(confidence, correct, points=4)
    assert [(p["coverage"], p["accuracy"]) for p in curve] == [(1.0, 0.75), (0.75, 2 / 3), (0.5, 1.0), (0.25, 1.0)]
    assert [p["threshold"] for p in curve] == [0.1, 0.2, 0.8, 0.9]
