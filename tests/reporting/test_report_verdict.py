"""The report's verdict: "learned" only when a stated test says so, advice that fits the curves."""

from __future__ import annotations

from fractions import Fraction
from math import comb
from pathlib import Path

import numpy as np
import pytest

from cnnkit.evaluation import EvalResult
from cnnkit.models import load_model_spec
from cnnkit.models.registry import build_network
from cnnkit.reporting.sections import BUILDERS, Run
from cnnkit.reporting.verdict import SIGNIFICANCE, binomial_tail, curve_trend, learned
from conftest import model_meta

CLASSES = ("circle", "square", "triangle")


def exact_tail(k: int, n: int, p: Fraction) -> float:
    """The trusted reference: P(X >= k) summed in exact rational arithmetic."""
    return float(sum(comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


@pytest.mark.parametrize(
    ("k", "n", "p"),
    [(7, 15, Fraction(1, 3)), (0, 10, Fraction(1, 2)), (10, 10, Fraction(1, 2)),
     (60, 150, Fraction(1, 3)), (95, 100, Fraction(9, 10)), (301, 400, Fraction(7, 10))],
)  # fmt: skip
def test_binomial_tail_matches_exact_arithmetic(k: int, n: int, p: Fraction) -> None:
    assert binomial_tail(k, n, float(p)) == pytest.approx(exact_tail(k, n, p), rel=1e-9)


def test_binomial_tail_edges_and_large_counts() -> None:
    assert binomial_tail(11, 10, 0.5) == 0.0
    assert binomial_tail(5, 10, 1.0) == 1.0  # nothing beats a class that is every image
    assert 0.0 < binomial_tail(1400, 3000, 1 / 3) < 1e-40  # no overflow, no underflow to 0


def run_with(confusion: list[list[int]], metrics: list[dict[str, float]] | None = None) -> Run:
    """A report's ``Run`` with a given validation confusion matrix (rows: true class)."""
    matrix = np.array(confusion, dtype=np.int64)
    model = build_network(load_model_spec("fast").layers, len(CLASSES), 3, 16)
    evaluation = EvalResult(
        classes=CLASSES,
        accuracy=float(np.trace(matrix) / matrix.sum()),
        loss=1.0,
        confusion=matrix,
        per_class=[],
        count=int(matrix.sum()),
    )
    return Run(
        Path("run"), model, model_meta(model, CLASSES), evaluation=evaluation, metrics=metrics or []
    )


def summary(run: Run) -> str:
    return BUILDERS["summary"](run)


def test_46_percent_on_15_images_of_3_classes_is_not_called_learned() -> None:
    html = summary(run_with([[3, 1, 1], [2, 2, 1], [2, 1, 2]]))  # 7 of 15: 46.7%
    assert "The model learned" not in html and "class='good'" not in html
    assert "Not shown to have learned" in html
    assert "46.7% (7 of 15 images) against 33.3%" in html
    assert "one-sided exact binomial test, p = 0.2" in html
    assert f"learned means p &lt; {SIGNIFICANCE:g}" in html


def test_the_same_accuracy_on_many_images_is_learned() -> None:
    html = summary(run_with([[80, 10, 10], [30, 40, 30], [30, 30, 40]]))  # 160 of 300: 53.3%
    assert "<p class='good'>The model learned: validation accuracy 53.3%" in html
    test = learned(160, [100, 100, 100], CLASSES)
    assert test.significant and test.p_value < 1e-8


def test_always_answering_the_majority_class_is_not_learning() -> None:
    # 90 of 100 validation images are circles; the model calls everything a circle: 90%
    html = summary(run_with([[90, 0, 0], [5, 0, 0], [5, 0, 0]]))
    assert "Training did not work" in html and "class='good'" not in html
    assert "against 90.0% by always answering the most common class (circle)" in html


def rows(val_loss: list[float], val_acc: list[float], train_loss: list[float] | None = None):
    train = train_loss or [v * 0.9 for v in val_loss]
    return [
        {"epoch": i + 1, "train_loss": t, "val_loss": v, "train_acc": a, "val_acc": a}
        for i, (t, v, a) in enumerate(zip(train, val_loss, val_acc, strict=True))
    ]


def test_a_perfect_run_is_not_told_that_more_epochs_may_help() -> None:
    metrics = rows([0.5, 0.1, 0.02, 0.005, 0.001], [0.8, 0.97, 1.0, 1.0, 1.0])
    html = summary(run_with([[50, 0, 0], [0, 50, 0], [0, 0, 50]], metrics))
    assert "more epochs may help" not in html
    assert "Validation accuracy reached 100% at epoch 3: more epochs cannot raise it" in html


@pytest.mark.parametrize(
    ("val_loss", "val_acc", "train_loss", "kind"),
    [
        ([1.0, 0.7, 0.5, 0.4, 0.3, 0.2], [0.5, 0.6, 0.7, 0.75, 0.8, 0.85], None, "improving"),
        ([1.0, 0.5, 0.4, 0.6, 0.8, 0.9], [0.5, 0.8, 0.85, 0.84, 0.83, 0.82],
         [1.0, 0.5, 0.3, 0.2, 0.1, 0.05], "overfitting"),
        ([1.0, 0.5, 0.4, 0.4, 0.401, 0.4], [0.5, 0.8, 0.85, 0.85, 0.845, 0.85], None, "plateau"),
        ([1.0, 0.5], [0.5, 0.8], None, "short"),
        ([0.9, 0.4, 0.2, 0.1], [0.6, 0.9, 0.99, 1.0], None, "perfect"),
    ],
)  # fmt: skip
def test_the_advice_follows_the_curves(val_loss, val_acc, train_loss, kind) -> None:
    trend = curve_trend(rows(val_loss, val_acc, train_loss))
    assert trend.kind == kind, trend.advice
    assert ("more epochs may help" in trend.advice) == (kind == "improving")


def test_the_summary_carries_the_curves_advice() -> None:
    metrics = rows([1.0, 0.5, 0.4, 0.6, 0.8, 0.9], [0.5, 0.8, 0.85, 0.84, 0.83, 0.82])
    metrics = [
        dict(r, train_loss=t) for r, t in zip(metrics, [1, 0.5, 0.3, 0.2, 0.1, 0.05], strict=True)
    ]
    html = summary(run_with([[40, 5, 5], [5, 40, 5], [5, 5, 40]], metrics))
    assert "<p class='warn'>Overfitting: validation loss was lowest at epoch 3" in html
    assert "more epochs may help" not in html
