"""Pictures of arrays: every tile is the normalised map it stands for, HTML is escaped."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from cnnkit.inspection.html import confusion_table, esc, page, table
from cnnkit.inspection.maps import normalize_map
from cnnkit.inspection.render import (
    GAP_GREY,
    data_uri,
    display_scale,
    heat_colours,
    map_grid,
    overlay,
    png_bytes,
    tile_grid,
    upscale,
    vector_strip,
)


def _tile(grid: np.ndarray, k: int, cols: int, h: int, w: int) -> np.ndarray:
    r, c = divmod(k, cols)
    top, left = 1 + r * (h + 1), 1 + c * (w + 1)
    return grid[top : top + h, left : left + w]


def test_map_grid_tiles_are_each_map_normalised() -> None:
    values = np.random.default_rng(0).normal(size=(5, 6, 6)).astype(np.float32)
    values[3] = 2.0  # a constant map shows black
    grid = map_grid(values, scale=3, cols=3)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 19 + 1, 3 * 19 + 1)
    for k in range(5):
        np.testing.assert_array_equal(
            _tile(grid, k, 3, 18, 18), upscale(normalize_map(values[k]), 3)
        )
    assert not _tile(grid, 3, 3, 18, 18).any()
    assert (_tile(grid, 5, 3, 18, 18) == GAP_GREY).all()  # the unused sixth cell


def test_vector_strip_and_tile_grid() -> None:
    strip = vector_strip(np.arange(40, dtype=np.float32), width=32, cell=1)
    assert strip.shape == (2, 32)
    assert strip[0, 0] == 0 and strip[1, 7] == 255 and (strip[1, 8:] == GAP_GREY).all()
    tiles = np.stack([np.full((2, 2), v, np.uint8) for v in (10, 20, 30)])
    grid = tile_grid(tiles)
    assert grid.shape == (7, 7) and grid[1, 1] == 10 and grid[1, 4] == 20 and grid[4, 1] == 30


def test_display_scale() -> None:
    assert display_scale(4) == 12 and display_scale(64) == 1 and display_scale(1) == 16


def test_heat_colours_and_overlay() -> None:
    heat = np.linspace(0, 1, 11, dtype=np.float32).reshape(1, 11)
    colours = heat_colours(heat)
    assert colours.shape == (1, 11, 3) and colours.dtype == np.uint8
    np.testing.assert_array_equal(colours[0, 0], [0, 0, 4])
    np.testing.assert_array_equal(colours[0, -1], [252, 255, 164])
    assert np.all(np.diff(colours[0].astype(int).sum(1)) > 0)  # brighter as heat grows
    grey = np.full((1, 11, 1), 100, np.uint8)
    mixed = overlay(grey, heat, alpha=0.5)
    assert mixed.shape == (1, 11, 3)
    np.testing.assert_array_equal(mixed[0, 0], np.rint((100 + np.array([0, 0, 4])) / 2))


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (5, 7, 3)])
def test_png_round_trip(shape: tuple[int, ...]) -> None:
    arr = np.random.default_rng(2).integers(0, 256, size=shape, dtype=np.uint8)
    back = np.asarray(Image.open(io.BytesIO(png_bytes(arr))))
    np.testing.assert_array_equal(back, arr.reshape(back.shape))
    uri = data_uri(arr)
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]) == png_bytes(arr)


def test_html_escapes_user_text() -> None:
    evil = "<script>alert('x')</script>&"
    assert esc(evil) == "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;"
    html = table(("class", "n"), [(evil, 1)]) + confusion_table([evil, "b"], np.eye(2, dtype=int))
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<script>" not in page(evil, "")
