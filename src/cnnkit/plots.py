"""Static figures written into run directories (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_confusion", "plot_curves"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(rows: Sequence[dict[str, float]], path: Path) -> None:
    """Loss and accuracy per epoch, training against validation, side by side."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], "o-", label="validation")
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.plot(epochs, [100 * r["train_acc"] for r in rows], "o-", label="train")
    ax_acc.plot(epochs, [100 * r["val_acc"] for r in rows], "o-", label="validation")
    ax_acc.set(title="Accuracy", xlabel="epoch", ylabel="%")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], path: Path) -> None:
    """The confusion matrix (rows: true class, columns: predicted) with counts in cells."""
    plt = _pyplot()
    n = len(classes)
    side = max(4.0, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    top = matrix.max() if matrix.size else 0
    for i in range(n):
        for j in range(n):
            colour = "white" if top and matrix[i, j] > top / 2 else "black"
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", color=colour)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
