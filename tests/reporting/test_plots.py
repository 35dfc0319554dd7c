"""The training curves PNG, drawn with Pillow: what it shows and that odd runs still draw."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnkit.plots import (
    CURVES_SIZE,
    NEGATIVE,
    POSITIVE,
    TRAIN_COLOUR,
    VAL_COLOUR,
    _nice_ticks,
    diverging_colours,
    kernel_figure,
    plot_curves,
)


def _rows(n: int) -> list[dict[str, float]]:
    return [
        {
            "epoch": e,
            "train_loss": 2 / (e + 1),
            "val_loss": 2.2 / (e + 1) + 0.05,
            "train_acc": 1 - 0.5 / (e + 1),
            "val_acc": 1 - 0.55 / (e + 1),
        }
        for e in range(1, n + 1)
    ]


def _where(image: np.ndarray, colour: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.nonzero(np.all(image == colour, axis=2))
    return ys, xs


def test_curves_show_falling_loss_and_rising_accuracy(tmp_path: Path) -> None:
    path = tmp_path / "curves.png"
    plot_curves(_rows(12), path)
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (CURVES_SIZE[1], CURVES_SIZE[0], 3)
    half = CURVES_SIZE[0] // 2
    for panel, falling in ((slice(0, half), True), (slice(half, None), False)):
        for colour in (TRAIN_COLOUR, VAL_COLOUR):
            ys, xs = _where(image[:, panel], colour)
            plotted = ys < CURVES_SIZE[1] - 60  # the curve, not the legend's sample line
            ys, xs = ys[plotted], xs[plotted]
            assert len(xs) > 50
            left, right = ys[xs < xs.min() + 4].mean(), ys[xs > xs.max() - 4].mean()
            # image rows grow downwards: a falling curve ends lower on the page
            assert (right > left) if falling else (right < left)


@pytest.mark.parametrize(
    "rows",
    [
        _rows(1),  # one point per series
        _rows(120),  # many epochs: thinned tick labels
        [{"epoch": 1, "train_loss": 0.5, "val_loss": math.nan, "train_acc": 0.8, "val_acc": 1}],
        [
            {"epoch": e, "train_loss": 1.0, "val_loss": 1.0, "train_acc": 0.5, "val_acc": 0.5}
            for e in (1, 2, 3)
        ],  # constant values
    ],
)
def test_odd_histories_still_draw(tmp_path: Path, rows: list[dict[str, float]]) -> None:
    path = tmp_path / "curves.png"
    plot_curves(rows, path)
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (CURVES_SIZE[1], CURVES_SIZE[0], 3)
    assert len(_where(image, TRAIN_COLOUR)[0]) > 20


def test_nice_ticks() -> None:
    assert _nice_ticks(0.0, 1.0) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert _nice_ticks(72.3, 97.9) == pytest.approx([75.0, 80.0, 85.0, 90.0, 95.0])
    assert _nice_ticks(0.05, 1.25) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.25])


def test_tick_labels_have_the_decimals_the_step_needs() -> None:
    from cnnkit.plots import _label

    assert [_label(v, 0.25) for v in (0.25, 0.5)] == ["0.25", "0.50"]
    assert _label(80.0, 5.0) == "80" and _label(0.4, 0.2) == "0.4"


# ----------------------------------------------------------------------------- kernels


def _tile(fig, key: tuple[int, str]) -> np.ndarray:
    left, top, right, bottom = fig.tiles[key]
    return fig.image[top:bottom, left:right]


@pytest.mark.parametrize(
    ("shape", "rgb"),
    [((16, 3, 3, 3), True), ((12, 1, 5, 5), False), ((4, 16, 3, 3), False), ((2, 3, 1, 1), True)],
)
def test_kernels_are_drawn_large_on_a_scale_centred_on_zero(shape, rgb) -> None:
    weight = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    weight[0, 0, 0, 0] = 0.0
    fig = kernel_figure(weight, rgb=rgb)
    f, c, kh, kw = shape
    assert fig.limit == pytest.approx(float(np.abs(weight).max()))
    names = ("R", "G", "B") if rgb else ("",) if c == 1 else tuple(f"in {j + 1}" for j in range(c))
    assert fig.columns == (("colour",) if rgb else ()) + names
    assert len(fig.tiles) == f * len(fig.columns)
    for (i, name), (left, top, right, bottom) in fig.tiles.items():
        assert right - left >= 24 and bottom - top >= 24, (i, name)  # readable, not 1-pixel cells
        tile = _tile(fig, (i, name))
        cell_h, cell_w = (bottom - top) // kh, (right - left) // kw
        centres = tile[cell_h // 2 :: cell_h, cell_w // 2 :: cell_w][:kh, :kw]  # (kh, kw, 3)
        if name == "colour":  # the colour pattern, normalised on its own
            span = weight[i].max() - weight[i].min()
            want = np.rint((weight[i] - weight[i].min()) / span * 255).transpose(1, 2, 0)
        else:
            want = diverging_colours(weight[i, names.index(name)], fig.limit)
        assert np.abs(centres.astype(int) - want.astype(int)).max() <= 1, (i, name)
    # the scale: zero is white, the extremes are the two end colours
    np.testing.assert_array_equal(diverging_colours(np.zeros(1), 2.0)[0], (255, 255, 255))
    np.testing.assert_array_equal(
        diverging_colours(np.array([-2.0, 2.0]), 2.0), [NEGATIVE, POSITIVE]
    )
    zero = _tile(fig, (0, names[0]))[1, 1]  # weight[0, 0, 0, 0] = 0: a white cell
    np.testing.assert_array_equal(zero, (255, 255, 255))
    height, width = fig.image.shape[:2]
    assert width / height < 12  # wraps into rows, not a long strip
