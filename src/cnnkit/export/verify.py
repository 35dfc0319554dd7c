"""Check an exported model against the PyTorch original on the same images.

Both run on identical uint8 batches; the export is run at several batch sizes (1, 7, 32 by
default) so a batch dimension that was baked in by mistake fails here, not in production.
The check fails when any logit differs by more than the tolerance (which also bounds how far
apart two logits must be for the two models to pick different classes: a near tie).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cnnkit.errors import ExportError

__all__ = ["DEFAULT_BATCH_SIZES", "DEFAULT_TOLERANCE", "Parity", "check_parity"]

DEFAULT_TOLERANCE = 1e-3  # on fp32 logits; observed differences are around 1e-5
DEFAULT_BATCH_SIZES = (1, 7, 32)

Logits = Callable[[np.ndarray], np.ndarray]  # uint8 (B, S, S, C) -> float (B, classes)


@dataclass(frozen=True)
class Parity:
    """How closely an export reproduces the original."""

    images: int
    source: str
    batch_sizes: tuple[int, ...]
    max_abs_diff: float  # largest |logit difference| over all images and batch sizes
    top1_agreement: float  # fraction of (image, batch size) pairs with the same class
    tolerance: float

    def summary(self) -> str:
        """Two lines: what it was checked on, and how close it came."""
        sizes = ", ".join(str(b) for b in self.batch_sizes)
        return (
            f"verified on {self.source}, batch sizes {sizes}\n"
            f"max abs difference {self.max_abs_diff:.2e} (tolerance {self.tolerance:g}), "
            f"top-1 agreement {100 * self.top1_agreement:.2f}%"
        )


def check_parity(
    reference: Logits,
    candidate: Logits,
    images: np.ndarray,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    source: str = "",
    what: str = "export",
) -> Parity:
    """Compare ``candidate`` with ``reference`` on ``images``; ``ExportError`` beyond tolerance."""
    if len(images) == 0:
        raise ExportError(f"{what}: no images to check the export on")
    if tolerance <= 0:
        raise ExportError(f"{what}: tolerance must be positive, got {tolerance}")
    expected = np.asarray(reference(images), dtype=np.float64)  # (N, classes)
    ref_top = expected.argmax(1)
    worst, agree, total = 0.0, 0, 0
    for size in batch_sizes:
        parts = [
            np.asarray(candidate(images[i : i + size]), dtype=np.float64)
            for i in range(0, len(images), size)
        ]
        got = np.concatenate(parts)  # (N, classes)
        if got.shape != expected.shape:
            raise ExportError(
                f"{what}: output shape {got.shape} at batch size {size}, expected {expected.shape}"
            )
        if not np.isfinite(got).all():
            raise ExportError(f"{what}: non-finite outputs at batch size {size}")
        diff = float(np.abs(got - expected).max())
        same = got.argmax(1) == ref_top
        worst = max(worst, diff)
        agree += int(same.sum())
        total += len(same)
        if diff > tolerance:
            raise ExportError(
                f"{what}: differs from the PyTorch model by up to {diff:.3g} at batch size "
                f"{size} (tolerance {tolerance:g}); same class for {int(same.sum())} of "
                f"{len(same)} images"
            )
    return Parity(
        images=len(images),
        source=source or f"{len(images)} images",
        batch_sizes=tuple(batch_sizes),
        max_abs_diff=worst,
        top1_agreement=agree / total,
        tolerance=tolerance,
    )
