"""The learning material's running example: circles, squares and triangles as PNG files.

Two styles, each drawn from a generator seeded by ``(seed, class, index)``, so the same seed
always gives the same files:

- ``cnnkit`` (the default): a random size, position, rotation, fill colour and background
  colour (a light background under a darker shape, as drawn on paper, so the outline always
  shows); drawn at 4x and downsampled, so edges are smooth like photographed ones. Harder than
  the material's: its exercise network does not reach 99% on it.
- ``material``: as the learning material draws them: one shape of a random dark colour (each
  channel 0-200) on a white background, its box from a corner at 10-40 px to one at 60-100 px
  of a 128 px image (scaled for other sizes), upright, aliased edges; the triangle's corners
  are the box's top-left, bottom-right and top-right. The exercise recipe reaches 99% on it,
  which makes it the data speed comparisons with that recipe use.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cnnkit.errors import ConfigError
from cnnkit.files import write_folder

__all__ = ["SHAPES_VERSION", "SHAPE_CLASSES", "SHAPE_STYLES", "draw_shape", "generate_shapes"]

SHAPE_CLASSES = ("circle", "square", "triangle")
SHAPE_STYLES = ("cnnkit", "material")
SUPERSAMPLE = 4
SHAPES_VERSION = 2  # bump when the drawing changes: cached demo data is then redrawn


def _luma(colour: tuple[int, int, int]) -> float:
    return 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]


def _colours(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A light background and a darker fill colour, both random (like shapes on paper)."""

    def pick(lo: float, hi: float) -> tuple[int, int, int]:
        while True:
            colour = (
                int(rng.integers(0, 256)),
                int(rng.integers(0, 256)),
                int(rng.integers(0, 256)),
            )
            if lo <= _luma(colour) <= hi:
                return colour

    return pick(170, 255), pick(0, 130)


def _check_style(style: object) -> None:
    if style not in SHAPE_STYLES:
        raise ConfigError(f"style: expected one of {', '.join(SHAPE_STYLES)}, got {style!r}")


def draw_shape(
    kind: str, size: int, rng: np.random.Generator, style: str = "cnnkit"
) -> Image.Image:
    """One RGB image of ``kind`` (circle, square or triangle), ``size`` x ``size`` pixels,
    drawn in ``style`` (see the module's docstring)."""
    if kind not in SHAPE_CLASSES:
        raise ConfigError(f"unknown shape {kind!r}, expected one of {', '.join(SHAPE_CLASSES)}")
    _check_style(style)
    if style == "material":
        return _draw_material(kind, size, rng)
    big = size * SUPERSAMPLE
    bg, fg = _colours(rng)
    image = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(image)
    radius = big * rng.uniform(0.15, 0.38)  # circumradius
    margin = radius + big * 0.02
    cx, cy = rng.uniform(margin, big - margin, 2)
    angle = rng.uniform(0, 2 * math.pi)
    if kind == "circle":
        r = radius * 0.85
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    else:
        corners = 4 if kind == "square" else 3
        points = [
            (
                cx + radius * math.cos(angle + 2 * math.pi * k / corners),
                cy + radius * math.sin(angle + 2 * math.pi * k / corners),
            )
            for k in range(corners)
        ]
        draw.polygon(points, fill=fg)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def _draw_material(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """The learning material's drawing: a dark upright shape on white (128 px coordinates)."""
    scale = size / 128
    xy1 = int(rng.integers(10, 41)) * scale  # top-left corner of the box, both axes
    xy2 = int(rng.integers(60, 101)) * scale  # bottom-right corner
    fill = tuple(int(c) for c in rng.integers(0, 201, 3))  # each channel 0-200: darker than white
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    if kind == "circle":
        draw.ellipse([(xy1, xy1), (xy2, xy2)], fill=fill)
    elif kind == "triangle":
        draw.polygon([(xy1, xy1), (xy2, xy2), (xy2, xy1)], fill=fill)
    else:
        draw.rectangle([(xy1, xy1), (xy2, xy2)], fill=fill)
    return image


def generate_shapes(
    out: str | Path,
    count: int = 400,
    size: int = 128,
    seed: int = 0,
    overwrite: bool = False,
    style: str = "cnnkit",
) -> Path:
    """Write ``count`` PNGs per class, drawn in ``style``, to ``out/<class>/``; return ``out``.

    Files are named ``<class>_<index>.png``. They are drawn into a temporary folder first,
    then take their names: shapes cnnkit generated there before are replaced (a kill leaves
    the old set or the new, never half of each); a folder holding anything else is refused
    unless ``overwrite`` (then only same-named files are replaced, nothing is deleted).
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"count: expected a positive integer, got {count!r}")
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 1024:
        raise ConfigError(f"size: expected 8 to 1024 pixels, got {size!r}")
    _check_style(style)

    def draw_all(root: Path) -> None:
        for label, kind in enumerate(SHAPE_CLASSES):
            folder = root / kind
            folder.mkdir()
            for i in range(count):
                rng = np.random.default_rng([seed, label, i])
                draw_shape(kind, size, rng, style).save(
                    folder / f"{kind}_{i:05d}.png", optimize=False
                )

    return write_folder(out, draw_all, overwrite=overwrite)
