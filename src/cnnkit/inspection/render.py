"""Arrays to pictures: grids of feature maps and kernels, Grad-CAM overlays, PNG bytes.

Every map is scaled with ``normalize_map`` (its own minimum -> black, maximum -> white), so a
grid shows the pattern inside each map, not how maps compare in magnitude; the pages print
each layer's raw minimum and maximum next to the picture for that.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from cnnkit.inspection.maps import normalize_map

__all__ = [
    "data_uri",
    "display_scale",
    "heat_colours",
    "map_grid",
    "overlay",
    "png_bytes",
    "save_png",
    "tile_grid",
    "upscale",
    "vector_strip",
]

GAP_GREY = 128  # the lines between tiles, so black and white tiles stay apart


def display_scale(side: int, target: int = 48, most: int = 16) -> int:
    """Integer zoom so a ``side``-pixel map is drawn about ``target`` pixels wide."""
    return int(min(most, max(1, math.ceil(target / max(side, 1)))))


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour zoom by an integer factor: every value stays a visible square."""
    if factor <= 1:
        return image
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def tile_grid(tiles: np.ndarray, cols: int | None = None, gap: int = 1) -> np.ndarray:
    """(N, h, w) or (N, h, w, 3) uint8 tiles -> one uint8 image, row by row, grey between."""
    n, h, w = tiles.shape[:3]
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    shape = (rows * (h + gap) + gap, cols * (w + gap) + gap, *tiles.shape[3:])
    grid = np.full(shape, GAP_GREY, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        top, left = gap + r * (h + gap), gap + c * (w + gap)
        grid[top : top + h, left : left + w] = tiles[k]
    return grid


def map_grid(values: np.ndarray, scale: int | None = None, cols: int | None = None) -> np.ndarray:
    """(C, H, W) feature maps -> a greyscale grid, each map normalised on its own."""
    c, h, w = values.shape
    scale = scale or display_scale(max(h, w))
    tiles = np.stack([upscale(normalize_map(values[k]), scale) for k in range(c)])
    return tile_grid(tiles, cols)


def vector_strip(values: np.ndarray, width: int = 32, cell: int = 8) -> np.ndarray:
    """(N,) values -> rows of ``width`` grey cells (normalised together), for flat layers."""
    n = values.shape[0]
    rows = max(1, math.ceil(n / width))
    cells = np.full(rows * width, GAP_GREY, dtype=np.uint8)  # cells past the end: gap grey
    cells[:n] = normalize_map(values)
    grey = cells.reshape(rows, width)
    return upscale(grey, cell)


# Anchors of a perceptually ordered dark-blue -> red -> yellow map (close to "inferno").
_HEAT_ANCHORS = np.array(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
     [250, 193, 39], [252, 255, 164]],
    dtype=np.float64,
)  # fmt: skip


def heat_colours(heat: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours, dark (0) to bright yellow (1)."""
    h = np.clip(np.nan_to_num(heat.astype(np.float64)), 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
    lo = np.floor(h).astype(int).clip(0, len(_HEAT_ANCHORS) - 2)
    t = (h - lo)[..., None]
    rgb = _HEAT_ANCHORS[lo] * (1 - t) + _HEAT_ANCHORS[lo + 1] * t
    return np.rint(rgb).astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a uint8 image (H, W, C) with the colours of a heat map (H, W) in [0, 1]."""
    base = image if image.shape[-1] == 3 else np.repeat(image[..., :1], 3, axis=-1)
    mixed = (1 - alpha) * base.astype(np.float64) + alpha * heat_colours(heat)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def _pil(image: np.ndarray) -> Image.Image:
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(image), mode="L" if image.ndim == 2 else "RGB")


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 (H, W), (H, W, 1) or (H, W, 3) array as PNG bytes."""
    buffer = io.BytesIO()
    _pil(image).save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def save_png(image: np.ndarray, path: Path) -> Path:
    """Write ``image`` as a PNG file and return its path."""
    path.write_bytes(png_bytes(image))
    return path


def data_uri(image: np.ndarray | bytes) -> str:
    """A ``data:image/png;base64,...`` URI, so an HTML file carries its own images."""
    raw = image if isinstance(image, bytes) else png_bytes(image)
    return "data:image/png;base64," + base64.b64encode(raw).decode("ascii")
