"""The report's verdict: did the model learn, and what do its curves say to do next?

"Learned" is a claim about chance, so it is tested: a one-sided exact binomial test of the
number of correct validation images against the accuracy of always answering the most common
validation class (the majority-class rate), at p < 0.01. 46.7% on 15 images of 3 classes is
not evidence of learning (p = 0.22 against 33.3%); 46.7% on 3,000 images is.

The advice reads the curves the way a practitioner would: a perfect validation score leaves
nothing for more epochs to gain; a validation loss that climbs from its minimum while the
training loss keeps falling is overfitting; a recent real improvement says more epochs may
help; anything else has levelled off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "SIGNIFICANCE",
    "Learned",
    "Trend",
    "binomial_tail",
    "curve_trend",
    "learned",
]

SIGNIFICANCE = 0.01  # p-value below which the accuracy is not put down to chance
# What counts as a real change over the last epochs of a curve (see curve_trend).
ACC_STEP, LOSS_STEP, LOSS_RISE = 0.01, 0.02, 0.10


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exactly (summed in log space, no overflow)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    logs = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p
        + (n - i) * log_q
        for i in range(k, n + 1)
    ]  # fmt: skip
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(v - top) for v in logs))


@dataclass(frozen=True)
class Learned:
    """The test of validation accuracy against the majority-class rate."""

    correct: int
    count: int
    majority_class: str
    majority_rate: float
    p_value: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else float("nan")

    @property
    def significant(self) -> bool:
        return self.p_value < SIGNIFICANCE

    def sentence(self) -> str:
        """One sentence with the figures and the name of the test."""
        return (
            f"validation accuracy {100 * self.accuracy:.1f}% ({self.correct} of {self.count} "
            f"images) against {100 * self.majority_rate:.1f}% by always answering the most "
            f"common class ({self.majority_class}); one-sided exact binomial test, "
            f"p = {self.p_value:.2g} (learned means p < {SIGNIFICANCE:g})"
        )


def learned(correct: int, class_counts: Sequence[int], classes: Sequence[str]) -> Learned:
    """Test ``correct`` right answers out of ``sum(class_counts)`` validation images against
    the rate of the largest class (``class_counts``: validation images per true class)."""
    count = int(sum(class_counts))
    top = max(range(len(class_counts)), key=lambda i: class_counts[i]) if count else 0
    rate = class_counts[top] / count if count else 1.0
    return Learned(
        correct=int(correct),
        count=count,
        majority_class=classes[top] if classes else "",
        majority_rate=rate,
        p_value=binomial_tail(int(correct), count, rate),
    )


@dataclass(frozen=True)
class Trend:
    """What the curves say: ``kind`` is perfect, overfitting, improving, plateau or short."""

    kind: str
    advice: str


def curve_trend(rows: Sequence[dict[str, float]]) -> Trend:
    """Read ``metrics.csv`` rows (epoch, train_loss, val_loss, train_acc, val_acc).

    The last third of the epochs (at least two) is compared with everything before it.
    """
    rows = [r for r in rows if math.isfinite(r.get("val_loss", math.nan))]
    if len(rows) < 3:
        return Trend(
            "short", f"Only {len(rows)} epoch(s) with validation: too few to read a trend."
        )
    accs = [r.get("val_acc", math.nan) for r in rows]
    best_acc = max(accs)
    if best_acc >= 1.0:
        first = int(rows[accs.index(best_acc)]["epoch"])
        return Trend(
            "perfect",
            f"Validation accuracy reached 100% at epoch {first}: more epochs cannot raise it. "
            "Check the model on images it has never seen (a test split) before trusting it.",
        )
    window = max(2, len(rows) // 3)
    before, recent = rows[:-window], rows[-window:]
    acc_gain = max(r["val_acc"] for r in recent) - max(r["val_acc"] for r in before)
    low_before = min(r["val_loss"] for r in before)
    low_recent = min(r["val_loss"] for r in recent)
    best = min(range(len(rows)), key=lambda i: rows[i]["val_loss"])
    last = rows[-1]
    rising = (
        best < len(rows) - window
        and last["val_loss"] > (1 + LOSS_RISE) * rows[best]["val_loss"]
        and last["train_loss"] < rows[best]["train_loss"]
    )
    if acc_gain >= ACC_STEP or (low_recent < (1 - LOSS_STEP) * low_before and not rising):
        return Trend(
            "improving",
            f"Validation was still improving in the last {window} epochs "
            f"(accuracy {100 * acc_gain:+.1f} points, lowest loss {low_before:.4g} -> "
            f"{low_recent:.4g}): more epochs may help.",
        )
    if rising:
        return Trend(
            "overfitting",
            f"Overfitting: validation loss was lowest at epoch {int(rows[best]['epoch'])} "
            f"({rows[best]['val_loss']:.4g}) and rose to {last['val_loss']:.4g} while the "
            "training loss kept falling. More epochs will not help; more images, augmentation "
            "or dropout will (the weights kept are those of the best validation accuracy).",
        )
    return Trend(
        "plateau",
        f"Validation levelled off: no gain of {100 * ACC_STEP:.0f} point in accuracy or "
        f"{100 * LOSS_STEP:.0f}% in loss over the last {window} epochs. More epochs are "
        "unlikely to help; a larger model, more images or other augmentation may.",
    )
