"""Static figures written into run directories and reports (no display needed): the training
curves and the kernels drawn with Pillow, the confusion matrix with matplotlib."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["KernelFigure", "diverging_colours", "kernel_figure", "plot_confusion", "plot_curves"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


TRAIN_COLOUR, VAL_COLOUR = (31, 119, 180), (255, 127, 14)  # matplotlib's first two colours
CURVES_SIZE = (1000, 380)


def plot_curves(rows: Sequence[dict[str, float]], path: Path) -> None:
    """Loss and accuracy per epoch, training against validation, side by side (a PNG).

    Drawn with Pillow, not matplotlib: importing matplotlib alone took 0.5-1.1 s of every
    training run, a tenth of a whole MNIST run.
    """
    epochs = [float(r["epoch"]) for r in rows]
    panels = [
        ("Loss", "cross-entropy", "train_loss", "val_loss", 1.0),
        ("Accuracy", "%", "train_acc", "val_acc", 100.0),
    ]
    image = Image.new("RGB", CURVES_SIZE, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    half = CURVES_SIZE[0] // 2
    for k, (title, ylabel, train, val, scale) in enumerate(panels):
        series = [
            ([scale * r.get(train, math.nan) for r in rows], TRAIN_COLOUR, "train"),
            ([scale * r.get(val, math.nan) for r in rows], VAL_COLOUR, "validation"),
        ]
        box = (k * half + 78, 34, (k + 1) * half - 20, CURVES_SIZE[1] - 52)
        _panel(image, draw, font, box, epochs, series, title, ylabel)
    image.save(path, format="PNG")


def _nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten) covering [lo, hi]."""
    raw = (hi - lo) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = min((m * power for m in (1, 2, 2.5, 5, 10)), key=lambda v: abs(v - raw))
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _label(value: float, step: float) -> str:
    """``value`` with as many decimals as the tick step needs (0.25 -> 2, 5 -> 0)."""
    decimals = next(d for d in range(8) if abs(round(step, d) - step) < 1e-9 or d == 7)
    return f"{value:.{decimals}f}"


def _panel(
    image: Image.Image,
    draw: ImageDraw.ImageDraw,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    box: tuple[int, int, int, int],
    epochs: list[float],
    series: list[tuple[list[float], tuple[int, int, int], str]],
    title: str,
    ylabel: str,
) -> None:
    x0, y0, x1, y1 = box
    finite = [v for values, _, _ in series for v in values if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    pad = (hi - lo) * 0.08 or max(abs(hi) * 0.05, 0.5)
    lo, hi = lo - pad, hi + pad
    first, last = (min(epochs), max(epochs)) if epochs else (0.0, 1.0)
    margin = 0.5 if last - first < 1 else (last - first) * 0.04
    first, last = first - margin, last + margin

    def px(epoch: float, value: float) -> tuple[float, float]:
        return (
            x0 + (epoch - first) / (last - first) * (x1 - x0),
            y1 - (value - lo) / (hi - lo) * (y1 - y0),
        )

    grid, ink = (228, 228, 228), (40, 40, 40)
    ticks = _nice_ticks(lo, hi)
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    for t in ticks:
        y = px(first, t)[1]
        draw.line([(x0, y), (x1, y)], fill=grid)
        draw.text((x0 - 6, y), _label(t, step), fill=ink, font=font, anchor="rm")
    span = int(last - first)
    every = max(1, math.ceil((span + 1) / 10))
    for e in range(math.ceil(first), math.floor(last) + 1, every):
        x = px(e, lo)[0]
        draw.line([(x, y0), (x, y1)], fill=grid)
        draw.text((x, y1 + 6), str(e), fill=ink, font=font, anchor="mt")
    draw.rectangle(box, outline=ink)
    draw.text(((x0 + x1) / 2, y0 - 10), title, fill=ink, font=font, anchor="ms")
    draw.text(((x0 + x1) / 2, y1 + 26), "epoch", fill=ink, font=font, anchor="mt")
    label = Image.new("RGB", (int(draw.textlength(ylabel, font=font)) + 4, 18), "white")
    ImageDraw.Draw(label).text((2, 1), ylabel, fill=ink, font=font)
    rotated = label.rotate(90, expand=True)
    image.paste(rotated, (x0 - 70, int((y0 + y1) / 2 - rotated.height / 2)))
    for values, colour, _ in series:
        points = [px(e, v) for e, v in zip(epochs, values, strict=True) if math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3.5, y - 3.5, x + 3.5, y + 3.5], fill=colour)
    # The legend goes in the inside corner that covers the fewest points.
    drawn = [px(e, v) for values, _, _ in series for e, v in zip(epochs, values, strict=True)]
    width, height = 116, 18 * len(series) + 8
    corners = [
        (x1 - width - 6, y0 + 6),
        (x1 - width - 6, y1 - height - 6),
        (x0 + 6, y0 + 6),
        (x0 + 6, y1 - height - 6),
    ]

    def covered(corner: tuple[float, float]) -> int:
        cx, cy = corner
        near = [(x, y) for x, y in drawn if cx - 8 <= x <= cx + width + 8]
        return sum(cy - 8 <= y <= cy + height + 8 for _, y in near)

    cx, cy = min(corners, key=covered)  # the first of equals: top right
    draw.rectangle([cx, cy, cx + width, cy + height], fill="white", outline=grid)
    lx, ly = cx + 6, cy + 4
    for i, (_, colour, name) in enumerate(series):
        y = ly + 7 + 18 * i
        draw.line([(lx, y), (lx + 20, y)], fill=colour, width=2)
        draw.text((lx + 26, y), name, fill=ink, font=font, anchor="lm")


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


# ----------------------------------------------------------------------------- kernels

KERNEL_TILE = 32  # smallest side of one drawn kernel, px: 3x3 weights become 11 px squares
NEGATIVE, ZERO, POSITIVE = (33, 102, 172), (255, 255, 255), (178, 24, 43)  # blue, white, red
FIGURE_WIDTH = 900  # kernels wrap to rows of about this many pixels


def diverging_colours(values: np.ndarray, limit: float) -> np.ndarray:
    """Weights to RGB on a scale centred on zero: -limit blue, 0 white, +limit red.

    One scale for a whole layer (``limit`` = its largest magnitude), so kernels compare: a
    pale kernel has small weights, not a lost contrast.
    """
    t = np.clip(np.nan_to_num(np.asarray(values, np.float64)) / (limit or 1.0), -1.0, 1.0)
    t = t[..., None]
    zero, neg, pos = (np.array(c, np.float64) for c in (ZERO, NEGATIVE, POSITIVE))
    rgb = np.where(t < 0, zero + (neg - zero) * -t, zero + (pos - zero) * t)
    return np.rint(rgb).astype(np.uint8)


@dataclass(frozen=True)
class KernelFigure:
    """A drawn layer of kernels and where each piece is (for tests and captions)."""

    image: np.ndarray  # (H, W, 3) uint8
    tiles: dict[tuple[int, str], tuple[int, int, int, int]]  # (kernel, column) -> box
    limit: float  # the colour scale runs from -limit to +limit
    columns: tuple[str, ...]  # what each tile of a kernel shows: "colour", "R", "in 1", ...


def kernel_figure(weight: np.ndarray, rgb: bool = False) -> KernelFigure:
    """Conv weights ``(F, C, kh, kw)`` as labelled tiles of at least ``KERNEL_TILE`` pixels.

    Each kernel is numbered and shows one tile per input channel on the layer's zero-centred
    colour scale (a colour bar at the bottom gives the values). With ``rgb`` (a first layer
    on colour images) a kernel starts with its colour pattern, normalised on its own: the
    colour it responds to most; then its red, green and blue weights.
    """
    f, c, kh, kw = weight.shape
    rgb = rgb and c == 3
    names = ("R", "G", "B") if rgb else ("",) if c == 1 else tuple(f"in {j + 1}" for j in range(c))
    columns = (("colour",) if rgb else ()) + names
    limit = float(np.abs(weight).max()) if weight.size else 0.0
    scale = math.ceil(KERNEL_TILE / max(kh, kw))
    th, tw = kh * scale, kw * scale
    font = ImageFont.load_default(size=12)
    gap, label_h = 4, (14 if len(columns) > 1 else 0)
    block_w = len(columns) * (tw + gap) + 14
    block_h = 16 + th + label_h + 8
    per_row = max(1, min(f, FIGURE_WIDTH // block_w))
    rows = math.ceil(f / per_row)
    bar_h = 44
    image = Image.new("RGB", (max(per_row * block_w + 8, 300), rows * block_h + bar_h + 8), "white")
    draw = ImageDraw.Draw(image)
    ink, frame = (40, 40, 40), (190, 190, 190)
    tiles: dict[tuple[int, str], tuple[int, int, int, int]] = {}
    for i in range(f):
        r, col = divmod(i, per_row)
        x, y = 8 + col * block_w, 4 + r * block_h
        draw.text((x, y), f"{i + 1}", fill=ink, font=font)
        for j, name in enumerate(columns):
            if name == "colour":
                span = weight[i].max() - weight[i].min()
                norm = (weight[i] - weight[i].min()) / (span or 1.0) * 255.0
                pixels = np.rint(norm).astype(np.uint8).transpose(1, 2, 0)  # (kh, kw, 3)
            else:
                pixels = diverging_colours(weight[i, j - len(columns) + c], limit)
            tile = Image.fromarray(np.ascontiguousarray(pixels)).resize((tw, th), Image.NEAREST)
            left, top = x + j * (tw + gap), y + 16
            image.paste(tile, (left, top))
            draw.rectangle([left - 1, top - 1, left + tw, top + th], outline=frame)
            tiles[(i, name)] = (left, top, left + tw, top + th)
            if label_h:
                draw.text((left + tw / 2, top + th + 2), name, fill=ink, font=font, anchor="mt")
    _colour_bar(image, draw, font, (36, rows * block_h + 8), limit)
    return KernelFigure(np.asarray(image), tiles, limit, columns)


def _colour_bar(
    image: Image.Image,
    draw: ImageDraw.ImageDraw,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    at: tuple[int, int],
    limit: float,
) -> None:
    """The zero-centred scale under the kernels: -limit, 0 and +limit marked."""
    x, y = at
    width, height = 256, 12
    ramp = diverging_colours(np.linspace(-limit, limit, width)[None, :].repeat(height, 0), limit)
    image.paste(Image.fromarray(ramp), (x, y))
    draw.rectangle([x - 1, y - 1, x + width, y + height], outline=(190, 190, 190))
    ink = (40, 40, 40)
    for frac, text in ((0.0, f"{-limit:.3g}"), (0.5, "0"), (1.0, f"+{limit:.3g}")):
        draw.text((x + frac * (width - 1), y + height + 3), text, fill=ink, font=font, anchor="mt")
    draw.text((x + width + 10, y + height / 2), "weight", fill=ink, font=font, anchor="lm")
