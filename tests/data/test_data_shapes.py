"""The shapes generator: deterministic per seed, the promised classes, counts and sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnkit.data.shapes import SHAPE_CLASSES, draw_shape, generate_shapes
from cnnkit.errors import ConfigError


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_same_seed_same_bytes_different_seed_different(tmp_path: Path) -> None:
    a = _files(generate_shapes(tmp_path / "a", count=4, size=16, seed=7))
    b = _files(generate_shapes(tmp_path / "b", count=4, size=16, seed=7))
    c = _files(generate_shapes(tmp_path / "c", count=4, size=16, seed=8))
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[name] != c[name] for name in a)  # every image is drawn anew


def test_classes_counts_names_and_sizes(tmp_path: Path) -> None:
    root = generate_shapes(tmp_path / "s", count=5, size=24, seed=0)
    assert root == tmp_path / "s"
    listed = sorted(p.name for p in root.iterdir())
    assert listed == sorted([*SHAPE_CLASSES, ".cnnkit-manifest"])  # the record of what it wrote
    for kind in SHAPE_CLASSES:
        names = sorted(p.name for p in (root / kind).iterdir())
        assert names == [f"{kind}_{i:05d}.png" for i in range(5)]
        for name in names:
            with Image.open(root / kind / name) as im:
                assert (im.format, im.mode, im.size) == ("PNG", "RGB", (24, 24))


def test_regenerating_replaces_files(tmp_path: Path) -> None:
    generate_shapes(tmp_path, count=2, size=16, seed=1)
    first = _files(tmp_path)
    generate_shapes(tmp_path, count=2, size=16, seed=2)
    second = _files(tmp_path)
    assert first.keys() == second.keys() and first != second


def test_images_within_a_class_differ(tmp_path: Path) -> None:
    files = _files(generate_shapes(tmp_path, count=6, size=16, seed=0))
    assert len(set(files.values())) == len(files)


@pytest.mark.parametrize("kind", SHAPE_CLASSES)
def test_draw_shape_has_two_contrasting_colours_and_a_clear_border(kind: str) -> None:
    image = np.asarray(draw_shape(kind, 32, np.random.default_rng(3))).astype(float)
    again = np.asarray(draw_shape(kind, 32, np.random.default_rng(3))).astype(float)
    assert np.array_equal(image, again)
    luma = image @ np.array([0.299, 0.587, 0.114])  # (32, 32)
    corners = [luma[0, 0], luma[0, -1], luma[-1, 0], luma[-1, -1]]
    assert np.ptp(corners) < 1  # the shape never touches the corners: all background
    differs = np.abs(luma - corners[0]) > 30
    assert 0.03 < differs.mean() < 0.7  # a shape of a plausible size is there


def test_the_three_classes_differ_in_shape() -> None:
    # A circle fills pi r^2 of its bounding box; a square and a triangle fill different shares.
    filled = {}
    for kind in SHAPE_CLASSES:
        shares = []
        for seed in range(8):
            img = np.asarray(draw_shape(kind, 64, np.random.default_rng(seed))).astype(float)
            luma = img @ np.array([0.299, 0.587, 0.114])
            mask = np.abs(luma - luma[0, 0]) > 30
            ys, xs = np.nonzero(mask)
            box = (np.ptp(ys) + 1) * (np.ptp(xs) + 1)
            shares.append(mask.sum() / box)
        filled[kind] = float(np.median(shares))
    assert filled["circle"] == pytest.approx(np.pi / 4, abs=0.08)
    assert filled["triangle"] < 0.6 < filled["circle"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"count": 0}, "count: expected a positive integer, got 0"),
        ({"count": True}, "count: expected a positive integer, got True"),
        ({"count": "3"}, "count: expected a positive integer, got '3'"),
        ({"size": 7}, "size: expected 8 to 1024 pixels, got 7"),
        ({"size": 2000}, "size: expected 8 to 1024 pixels, got 2000"),
        ({"size": 16.0}, "size: expected 8 to 1024 pixels, got 16.0"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"count": 2, "size": 16, "seed": 0, **kwargs}
    with pytest.raises(ConfigError, match=f"^{message}$"):
        generate_shapes(tmp_path, **args)
    assert not any(tmp_path.iterdir())  # nothing written before the check


def test_unknown_shape() -> None:
    with pytest.raises(
        ConfigError, match=r"^unknown shape 'hexagon', expected one of circle, square, triangle$"
    ):
        draw_shape("hexagon", 16, np.random.default_rng(0))


# ------------------------------------------------------- the learning material's drawing


def _box(image: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The non-white pixels of ``image`` (H, W, 3) and their bounding box (y0, x0, y1, x1)."""
    mask = (image != 255).any(axis=2)
    ys, xs = np.nonzero(mask)
    return mask, (ys.min(), xs.min(), ys.max(), xs.max())


@pytest.mark.parametrize("kind", SHAPE_CLASSES)
def test_material_style_is_one_dark_upright_shape_on_white(kind: str) -> None:
    for seed in range(6):
        image = np.asarray(draw_shape(kind, 128, np.random.default_rng(seed), "material"))
        mask, (y0, x0, y1, x1) = _box(image)
        colours = np.unique(image.reshape(-1, 3), axis=0)
        assert len(colours) == 2  # white and one fill colour: no smoothing, no second shape
        fill = colours[(colours != 255).any(axis=1)][0]
        assert fill.max() <= 200  # each channel 0-200: darker than the white around it
        assert y0 == x0 and 10 <= x0 <= 40 and y1 == x1 and 60 <= x1 <= 101  # the box
        share = mask[y0 : y1 + 1, x0 : x1 + 1].mean()  # of its box the shape fills
        if kind == "square":
            assert share == 1.0
        elif kind == "circle":
            assert share == pytest.approx(np.pi / 4, abs=0.05)
        else:  # corners at the box's top-left, bottom-right and top-right: above the diagonal
            assert share == pytest.approx(0.5, abs=0.06)
            below = np.tril(mask[y0 : y1 + 1, x0 : x1 + 1], k=-2)
            assert not below.any()


def test_material_style_scales_with_the_size_and_differs_from_cnnkits() -> None:
    small = np.asarray(draw_shape("square", 64, np.random.default_rng(0), "material"))
    big = np.asarray(draw_shape("square", 128, np.random.default_rng(0), "material"))
    small_box, big_box = _box(small)[1], _box(big)[1]
    assert all(abs(s - b / 2) <= 1 for s, b in zip(small_box, big_box, strict=True))
    ours = np.asarray(draw_shape("square", 64, np.random.default_rng(0)))
    assert not np.array_equal(small, ours)


def test_generate_shapes_material_style(tmp_path: Path) -> None:
    a = _files(generate_shapes(tmp_path / "a", count=3, size=32, seed=5, style="material"))
    b = _files(generate_shapes(tmp_path / "b", count=3, size=32, seed=5, style="material"))
    c = _files(generate_shapes(tmp_path / "c", count=3, size=32, seed=5))
    assert a == b and a.keys() == c.keys() and all(a[n] != c[n] for n in a)
    with pytest.raises(
        ConfigError, match=r"^style: expected one of cnnkit, material, got 'photo'$"
    ):
        generate_shapes(tmp_path / "d", count=2, size=16, style="photo")
    assert not (tmp_path / "d").exists()  # nothing written before the check
    with pytest.raises(ConfigError, match=r"^style: expected one of cnnkit, material"):
        draw_shape("circle", 16, np.random.default_rng(0), "photo")
