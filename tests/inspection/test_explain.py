"""The learning material's worked examples: exact numbers, and the same as torch computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cnnkit.errors import ConfigError
from cnnkit.inspection.explain import (
    MATERIAL_IMAGE,
    MATERIAL_KERNEL,
    explain_conv,
    explain_pool,
    format_matrix,
    parse_matrix,
    read_matrix_file,
)
from cnnkit.inspection.explain_text import render_conv, render_pool

# The matrices exactly as the learning material prints them.
RESULT = [[155, -155, 155, -155], [-155, 310, -155, 155], [310, 155, 310, 0], [-155, -155, -155, 0]]
PADDED = [
    [0, 0, 0, 0, 0, 0],
    [0, 155, -155, 155, -155, 0],
    [0, -155, 310, -155, 155, 0],
    [0, 310, 155, 310, 0, 0],
    [0, -155, -155, -155, 0, 0],
    [0, 0, 0, 0, 0, 0],
]
RELU = [
    [0, 0, 0, 0, 0, 0],
    [0, 155, 0, 155, 0, 0],
    [0, 0, 310, 0, 155, 0],
    [0, 310, 155, 310, 0, 0],
    [0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0],
]


def _torch_conv(image: np.ndarray, kernel: np.ndarray, stride: int = 1, pad=0) -> np.ndarray:
    x = torch.from_numpy(image)[None, None]  # (1, 1, H, W) float64
    w = torch.from_numpy(kernel)[None, None]
    return F.conv2d(x, w, stride=stride, padding=pad)[0, 0].numpy()


def test_material_example_exactly() -> None:
    ex = explain_conv()
    np.testing.assert_array_equal(ex.image, MATERIAL_IMAGE)
    np.testing.assert_array_equal(ex.kernel, [[1, -1, 1], [-1, 0, -1], [1, -1, 1]])
    first, second = ex.steps[0], ex.steps[1]
    assert first.terms == [
        (255, 1), (255, -1), (255, 1), (255, -1), (255, 0), (100, -1), (255, 1), (100, -1),
        (100, 1),
    ]  # fmt: skip
    assert first.sum == 155
    assert second.terms == [
        (255, 1), (255, -1), (255, 1), (255, -1), (100, 0), (255, -1), (100, 1), (100, -1),
        (100, 1),
    ]  # fmt: skip
    assert second.sum == -155
    assert len(ex.steps) == 16
    np.testing.assert_array_equal(ex.result, RESULT)
    np.testing.assert_array_equal(ex.padded, PADDED)
    np.testing.assert_array_equal(ex.relu, RELU)


def test_material_text_writes_sums_term_by_term() -> None:
    text = render_conv(explain_conv())
    assert "(255 x 1) + (255 x -1) + (255 x 1) +" in text
    assert "(255 x -1) + (255 x 0) + (100 x -1) +" in text
    assert "(255 x 1) + (100 x -1) + (100 x 1)\n  = 155" in text
    assert "(255 x -1) + (100 x 0) + (255 x -1) +" in text
    assert "(100 x 1) + (100 x -1) + (100 x 1)\n  = -155" in text
    assert "14 more positions" in text
    assert format_matrix(np.array(RESULT), "  ") in text
    assert format_matrix(np.array(PADDED), "  ") in text
    assert format_matrix(np.array(RELU), "  ") in text
    everything = render_conv(explain_conv(), all_steps=True)
    assert everything.count("Step ") == 16 and "more positions" not in everything


def test_format_matrix_aligns_columns() -> None:
    assert format_matrix(np.array(RESULT)) == (
        " 155 -155  155 -155\n-155  310 -155  155\n 310  155  310    0\n-155 -155 -155    0"
    )
    assert format_matrix(np.array([[0.5, -2.0]])) == "0.5  -2"


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("padding", ["border", "zero"])
def test_conv_equals_torch_conv2d(stride: int, padding: str) -> None:
    rng = np.random.default_rng(stride)
    image = rng.integers(0, 256, size=(7, 9)).astype(np.float64)
    kernel = rng.normal(size=(3, 3))
    ex = explain_conv(image, kernel, stride=stride, padding=padding)
    pad = 1 if padding == "zero" else 0
    np.testing.assert_allclose(ex.result, _torch_conv(image, kernel, stride, pad), rtol=1e-12)
    for step in ex.steps:  # each written-out sum is the sum of its terms
        assert step.sum == pytest.approx(sum(p * w for p, w in step.terms))
    np.testing.assert_array_equal(ex.relu, np.maximum(ex.padded, 0))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("shape", [(2, 2), (2, 3), (4, 4), (5, 3)])
def test_zero_padding_equals_torch_same(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    image, kernel = rng.normal(size=(7, 8)), rng.normal(size=shape)
    ex = explain_conv(image, kernel, padding="zero")
    np.testing.assert_allclose(ex.result, _torch_conv(image, kernel, pad="same"), rtol=1e-12)
    assert ex.result.shape == image.shape


def test_material_example_equals_torch() -> None:
    np.testing.assert_array_equal(
        explain_conv().result, _torch_conv(MATERIAL_IMAGE, MATERIAL_KERNEL)
    )


def test_zero_padding_keeps_the_image_size() -> None:
    ex = explain_conv(padding="zero")
    assert ex.input.shape == (8, 8) and ex.result.shape == (6, 6)
    np.testing.assert_array_equal(ex.padded, ex.result)
    np.testing.assert_array_equal(ex.input[1:-1, 1:-1], MATERIAL_IMAGE)
    assert not ex.input[0].any() and not ex.input[:, -1].any()
    # The interior equals the material's result: zero padding only adds the edge values.
    np.testing.assert_array_equal(ex.result[1:-1, 1:-1], RESULT)


def test_border_pad_value_and_no_relu() -> None:
    ex = explain_conv(pad_value=-1, relu=False)
    assert ex.relu is None
    assert (ex.padded[0] == -1).all() and (ex.padded[:, 0] == -1).all()
    np.testing.assert_array_equal(ex.padded[1:5, 1:5], RESULT)
    assert "After ReLU" not in render_conv(ex)
    assert ex.to_dict()["relu"] is None


def test_json_dict_has_every_number() -> None:
    d = explain_conv().to_dict()
    assert d["image"][1] == [255, 255, 100, 255, 255, 255]
    assert d["kernel"] == [[1, -1, 1], [-1, 0, -1], [1, -1, 1]]
    assert d["steps"][0] == {
        "position": [0, 0],
        "origin": [0, 0],
        "terms": [[255, 1], [255, -1], [255, 1], [255, -1], [255, 0], [100, -1], [255, 1],
                  [100, -1], [100, 1]],
        "sum": 155,
    }  # fmt: skip
    assert d["steps"][1]["sum"] == -155
    assert d["result"] == RESULT and d["padded"] == PADDED and d["relu"] == RELU
    assert isinstance(d["result"][0][0], int)


def test_pool_material_example() -> None:
    ex = explain_pool()
    np.testing.assert_array_equal(ex.feature_map, RELU)
    first = ex.steps[0]
    np.testing.assert_array_equal(first.window, [[0, 0], [0, 155]])
    assert first.max == 155
    np.testing.assert_array_equal(ex.result, [[155, 155, 0], [310, 310, 155], [0, 0, 0]])
    ref = F.max_pool2d(torch.tensor(RELU, dtype=torch.float64)[None, None], 2)[0, 0].numpy()
    np.testing.assert_array_equal(ex.result, ref)
    text = render_pool(ex)
    assert "Window 1: rows 1-2, columns 1-2\n    0   0\n    0 155\n  max = 155" in text
    assert ex.to_dict()["steps"][0] == {
        "position": [0, 0],
        "origin": [0, 0],
        "window": [[0, 0], [0, 155]],
        "max": 155,
    }


@pytest.mark.parametrize(("size", "stride"), [(2, 1), (3, 2), (3, None)])
def test_pool_equals_torch(size: int, stride: int | None) -> None:
    fmap = np.random.default_rng(0).normal(size=(7, 8))
    ex = explain_pool(fmap, size=size, stride=stride)
    ref = F.max_pool2d(torch.from_numpy(fmap)[None, None], size, stride or size)[0, 0].numpy()
    np.testing.assert_array_equal(ex.result, ref)


def test_parse_matrix_inline_and_files(tmp_path: Path) -> None:
    np.testing.assert_array_equal(parse_matrix("1 2; 3 4"), [[1, 2], [3, 4]])
    np.testing.assert_array_equal(parse_matrix("1,2\n3, 4\n\n"), [[1, 2], [3, 4]])
    np.testing.assert_array_equal(parse_matrix("-1.5 2e2"), [[-1.5, 200]])
    csv = tmp_path / "k.csv"
    csv.write_text("1,-1,1\n-1,0,-1\n1,-1,1\n")
    np.testing.assert_array_equal(read_matrix_file(csv), MATERIAL_KERNEL)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1 2; 3", "--image: ragged rows: row 2 has 1 value, row 1 has 2"),
        ("1 x; 3 4", "--image: row 1, value 2: 'x' is not a number"),
        ("1 nan", "--image: row 1, value 2: 'nan' is not a finite number"),
        (" ; \n", "--image: no numbers given"),
    ],
)
def test_parse_matrix_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_matrix(text, "--image")
    assert str(info.value) == message


def test_missing_file_and_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.txt: no such file"):
        read_matrix_file(tmp_path / "nope.txt")
    cases = [
        (
            lambda: explain_conv([[1, 2], [3, 4]]),
            "kernel: the 3x3 kernel is larger than the 2x2 image",
        ),
        (lambda: explain_conv(stride=0), "stride: expected a positive integer, got 0"),
        (lambda: explain_conv(padding="same"), "padding: expected border or zero, got 'same'"),
        (
            lambda: explain_pool(np.ones((3, 3)), size=4),
            "size: the 4x4 window is larger than the 3x3 map",
        ),
        (lambda: explain_pool(stride=-1), "stride: expected a positive integer, got -1"),
    ]
    for call, message in cases:
        with pytest.raises(ConfigError) as info:
            call()
        assert str(info.value) == message
