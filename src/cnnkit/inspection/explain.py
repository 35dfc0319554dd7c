"""The learning material's worked examples, computed step by step in plain numpy.

``explain_conv()`` with no arguments reproduces the material exactly: a 3x3 kernel slid over a
6x6 image, each weighted sum written out term by term (155, -155, ...), the 4x4 result of the
positions where the kernel fits, the 6x6 map with a zero border, and that map after ReLU.
``explain_pool()`` does the same for 2x2 max pooling of that ReLU map.

Like the material (and ``torch.nn.functional.conv2d``) the "convolution" is a
cross-correlation: the kernel is laid over the image as it is, not flipped.

Two ways to handle the edge:

- ``border`` (the material's): compute only where the kernel fits, then frame the result with
  ``pad_value`` so that, with stride 1, the map has the image's size;
- ``zero`` (what ``conv: {padding: same}`` does): pad the image with zeros first, so every
  pixel gets a value: ``kernel // 2`` on each side for an odd kernel; an even kernel gets the
  extra row and column at the bottom and right, as ``F.conv2d(padding="same")`` does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnkit.errors import ConfigError

__all__ = [
    "MATERIAL_IMAGE",
    "MATERIAL_KERNEL",
    "ConvExplanation",
    "ConvStep",
    "PoolExplanation",
    "PoolStep",
    "explain_conv",
    "explain_pool",
    "format_matrix",
    "format_number",
    "parse_matrix",
    "read_matrix_file",
]

MATERIAL_IMAGE = np.array(
    [
        [255, 255, 255, 255, 255, 255],
        [255, 255, 100, 255, 255, 255],
        [255, 100, 100, 100, 255, 255],
        [100, 100, 100, 100, 100, 255],
        [255, 255, 255, 255, 255, 255],
        [255, 255, 255, 255, 255, 255],
    ],
    dtype=np.float64,
)
MATERIAL_KERNEL = np.array([[1, -1, 1], [-1, 0, -1], [1, -1, 1]], dtype=np.float64)
PADDINGS = ("border", "zero")
MAX_SIDE = 256  # a worked example is for reading; larger matrices belong to ``inspect``


# ----------------------------------------------------------------------------- parsing


def parse_matrix(text: str, what: str = "matrix") -> np.ndarray:
    """Rows separated by ``;`` or newlines, values by spaces or commas -> float (rows, cols).

    ``what`` names where the text came from in error messages (a file name, a flag).
    """
    rows = [r for r in (line.replace(",", " ").split() for line in _lines(text)) if r]
    if not rows:
        raise ConfigError(f"{what}: no numbers given")
    width = len(rows[0])
    values: list[list[float]] = []
    for i, row in enumerate(rows, start=1):
        if len(row) != width:
            raise ConfigError(
                f"{what}: ragged rows: row {i} has {_count(len(row))}, row 1 has {width}"
            )
        parsed = []
        for j, token in enumerate(row, start=1):
            try:
                value = float(token)
            except ValueError:
                raise ConfigError(
                    f"{what}: row {i}, value {j}: {token!r} is not a number"
                ) from None
            if not np.isfinite(value):
                raise ConfigError(f"{what}: row {i}, value {j}: {token!r} is not a finite number")
            parsed.append(value)
        values.append(parsed)
    if len(values) > MAX_SIDE or width > MAX_SIDE:
        raise ConfigError(
            f"{what}: {len(values)}x{width} is too large to explain step by step "
            f"(at most {MAX_SIDE}x{MAX_SIDE})"
        )
    return np.array(values, dtype=np.float64)


def _count(n: int) -> str:
    return f"{n} value" if n == 1 else f"{n} values"


def _lines(text: str) -> list[str]:
    return [part for line in text.splitlines() for part in line.split(";")]


def read_matrix_file(path: str | Path) -> np.ndarray:
    """A matrix from a text or CSV file (one row per line, values split by spaces or commas)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except UnicodeDecodeError:  # an image or other binary file, given where numbers go
        raise ConfigError(
            f"{path}: not a text file of numbers (one row per line, values split by spaces "
            "or commas); to look at an image, use 'cnnkit inspect RUN_DIR IMAGE'"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return parse_matrix(text, str(path))


# ----------------------------------------------------------------------------- formatting


def format_number(value: float) -> str:
    """155.0 -> '155', 0.5 -> '0.5', -0.0 -> '0': numbers as the material writes them."""
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.4g}"


def format_matrix(matrix: np.ndarray, indent: str = "") -> str:
    """Rows of right-aligned numbers, every column as wide as the widest number."""
    cells = [[format_number(v) for v in row] for row in np.asarray(matrix)]
    width = max((len(c) for row in cells for c in row), default=1)
    return "\n".join(indent + " ".join(c.rjust(width) for c in row) for row in cells)


def _plain(matrix: np.ndarray) -> list[list[float | int]]:
    """JSON-ready rows: whole numbers as ints, others as floats."""
    return [[int(v) if float(v).is_integer() else float(v) for v in row] for row in matrix]


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def _worked(title: str, text: str, result: np.ndarray) -> str:
    """A worked example for a notebook: the text, and the result as a 0-255 picture."""
    from cnnkit.inspection.html import esc, fragment, picture
    from cnnkit.inspection.maps import normalize_map
    from cnnkit.inspection.render import display_scale, upscale

    grey = upscale(normalize_map(result), display_scale(max(result.shape), target=96))
    shown = picture(grey, "the result normalised to 0-255")
    body = (
        f"<div class='row'><pre>{esc(text)}</pre><figure>{shown}<figcaption class='note'>"
        "The result normalised to 0-255 (its minimum black, its maximum white), as an "
        "image.</figcaption></figure></div>"
    )
    return fragment(title, body)


# ----------------------------------------------------------------------------- convolution


@dataclass(frozen=True)
class ConvStep:
    """One kernel position: where it sits, the products it adds up, and their sum."""

    position: tuple[int, int]  # (row, col) in the result
    origin: tuple[int, int]  # (row, col) of the window's top-left cell in the input
    window: np.ndarray  # (kh, kw) the input values under the kernel
    kernel: np.ndarray  # (kh, kw)
    sum: float

    @property
    def terms(self) -> list[tuple[float, float]]:
        """(pixel, weight) pairs, row by row, as the material writes them."""
        return list(zip(self.window.ravel().tolist(), self.kernel.ravel().tolist(), strict=True))

    def to_dict(self) -> dict[str, Any]:
        return {
            "position": list(self.position),
            "origin": list(self.origin),
            "terms": [[_number(p), _number(w)] for p, w in self.terms],
            "sum": _number(self.sum),
        }


@dataclass(frozen=True)
class ConvExplanation:
    """Everything the worked example shows, computed for any image and kernel."""

    image: np.ndarray  # (H, W)
    kernel: np.ndarray  # (kh, kw)
    stride: int
    padding: str  # border or zero
    pad_value: float
    input: np.ndarray  # what the kernel slides over: the image, or the zero-padded image
    steps: tuple[ConvStep, ...]
    result: np.ndarray  # (Ho, Wo) the weighted sums
    padded: np.ndarray  # the feature map: border -> result framed by pad_value; zero -> result
    relu: np.ndarray | None  # max(padded, 0), or None with relu=False

    def __repr__(self) -> str:
        (h, w), (kh, kw) = self.image.shape, self.kernel.shape
        first = format_number(self.steps[0].sum) if self.steps else "-"
        return (
            f"ConvExplanation({h}x{w} image, {kh}x{kw} kernel, stride {self.stride}, "
            f"{self.padding} padding: {len(self.steps)} sums, the first {first}; "
            f"feature map {self.padded.shape[0]}x{self.padded.shape[1]})"
        )

    def _repr_html_(self) -> str:
        """The worked example as ``cnnkit explain conv`` prints it, with the feature map
        drawn as the material says to see it: normalised to 0-255."""
        from cnnkit.inspection.explain_text import render_conv

        final = self.relu if self.relu is not None else self.padded
        return _worked("A convolution, step by step", render_conv(self), final)

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": _plain(self.image),
            "kernel": _plain(self.kernel),
            "stride": self.stride,
            "padding": self.padding,
            "pad_value": _number(self.pad_value),
            "input": _plain(self.input),
            "steps": [s.to_dict() for s in self.steps],
            "result": _plain(self.result),
            "padded": _plain(self.padded),
            "relu": None if self.relu is None else _plain(self.relu),
        }


def _check_stride(stride: int, setting: str = "stride") -> None:
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ConfigError(
            "{setting}: expected a positive integer, got {value!r}", setting=setting, value=stride
        )


def _windows(
    source: np.ndarray, kh: int, kw: int, stride: int
) -> Iterator[tuple[tuple[int, int], tuple[int, int], np.ndarray]]:
    """Each window a kernel or pooling window of ``kh`` x ``kw`` visits, row by row:
    (output cell, top-left input cell, a copy of the window). Convolution and pooling
    slide the same way; only what they compute from a window differs."""
    for i in range((source.shape[0] - kh) // stride + 1):
        for j in range((source.shape[1] - kw) // stride + 1):
            r, c = i * stride, j * stride
            yield (i, j), (r, c), source[r : r + kh, c : c + kw].copy()


def explain_conv(
    image: np.ndarray | Sequence[Sequence[float]] | None = None,
    kernel: np.ndarray | Sequence[Sequence[float]] | None = None,
    *,
    stride: int = 1,
    padding: str = "border",
    pad_value: float = 0.0,
    relu: bool = True,
) -> ConvExplanation:
    """Slide ``kernel`` over ``image`` and keep every step (defaults: the material's example)."""
    img = MATERIAL_IMAGE.copy() if image is None else _matrix(image, "image")
    ker = MATERIAL_KERNEL.copy() if kernel is None else _matrix(kernel, "kernel")
    _check_stride(stride)
    if padding not in PADDINGS:
        raise ConfigError(
            "{setting}: expected border or zero, got {value!r}", setting="padding", value=padding
        )
    if not np.isfinite(pad_value):
        raise ConfigError(
            "{setting}: expected a finite number, got {value!r}",
            setting="pad_value",
            value=pad_value,
        )
    (h, w), (kh, kw) = img.shape, ker.shape
    if kh > h or kw > w:
        raise ConfigError(
            "{setting}: the {value} kernel is larger than the {limit} image",
            setting="kernel",
            value=f"{kh}x{kw}",
            limit=f"{h}x{w}",
        )
    if padding == "zero":
        # "same" padding: (k - 1) // 2 zeros before, the rest after (torch's convention).
        top, left = (kh - 1) // 2, (kw - 1) // 2
        source = np.pad(img, ((top, kh - 1 - top), (left, kw - 1 - left)))
        pad_value = 0.0
    else:
        source = img
    ho = (source.shape[0] - kh) // stride + 1
    wo = (source.shape[1] - kw) // stride + 1
    result = np.zeros((ho, wo), dtype=np.float64)
    steps = []
    for out, at, window in _windows(source, kh, kw, stride):
        total = float((window * ker).sum())
        result[out] = total
        steps.append(ConvStep(out, at, window, ker, total))
    if padding == "border":
        # The result belongs to the centre cells of its windows; the edge gets pad_value.
        top, left = (kh - 1) // 2, (kw - 1) // 2
        padded = np.full((ho + kh - 1, wo + kw - 1), float(pad_value))
        padded[top : top + ho, left : left + wo] = result
    else:
        padded = result.copy()
    return ConvExplanation(
        image=img,
        kernel=ker,
        stride=stride,
        padding=padding,
        pad_value=float(pad_value),
        input=source,
        steps=tuple(steps),
        result=result,
        padded=padded,
        relu=np.maximum(padded, 0.0) if relu else None,
    )


def _matrix(value: np.ndarray | Sequence[Sequence[float]], setting: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 2 or arr.size == 0:
        raise ConfigError(
            "{setting}: expected a 2-D matrix, got shape {value}", setting=setting, value=arr.shape
        )
    if not np.isfinite(arr).all():
        raise ConfigError("{setting}: every value must be a finite number", setting=setting)
    return arr


# ----------------------------------------------------------------------------- pooling


@dataclass(frozen=True)
class PoolStep:
    """One pooling window and the largest value in it."""

    position: tuple[int, int]  # (row, col) in the result
    origin: tuple[int, int]  # (row, col) of the window's top-left cell in the input
    window: np.ndarray  # (size, size)
    max: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "position": list(self.position),
            "origin": list(self.origin),
            "window": _plain(self.window),
            "max": _number(self.max),
        }


@dataclass(frozen=True)
class PoolExplanation:
    """Max pooling of a feature map, window by window."""

    feature_map: np.ndarray  # (H, W)
    size: int
    stride: int
    steps: tuple[PoolStep, ...]
    result: np.ndarray  # (Ho, Wo)

    def __repr__(self) -> str:
        (h, w), (ho, wo) = self.feature_map.shape, self.result.shape
        return (
            f"PoolExplanation({h}x{w} map, {self.size}x{self.size} max pooling, stride "
            f"{self.stride}: {len(self.steps)} windows -> {ho}x{wo})"
        )

    def _repr_html_(self) -> str:
        from cnnkit.inspection.explain_text import render_pool

        return _worked("Max pooling, window by window", render_pool(self), self.result)

    def to_dict(self) -> dict[str, Any]:
        return {
            "feature_map": _plain(self.feature_map),
            "size": self.size,
            "stride": self.stride,
            "steps": [s.to_dict() for s in self.steps],
            "result": _plain(self.result),
        }


def explain_pool(
    feature_map: np.ndarray | Sequence[Sequence[float]] | None = None,
    *,
    size: int = 2,
    stride: int | None = None,
) -> PoolExplanation:
    """Max pooling, every window kept (default: the material's ReLU map, 2x2, stride 2).

    Windows that would run past the right or bottom edge are left out, as in
    ``torch.nn.functional.max_pool2d``.
    """
    if feature_map is None:
        default = explain_conv()
        assert default.relu is not None
        fmap = default.relu
    else:
        fmap = _matrix(feature_map, "feature_map")
    _check_stride(size, "size")
    stride = size if stride is None else stride
    _check_stride(stride)
    h, w = fmap.shape
    if size > h or size > w:
        raise ConfigError(
            "{setting}: the {value}x{value} window is larger than the {limit} map",
            setting="size",
            value=size,
            limit=f"{h}x{w}",
        )
    ho, wo = (h - size) // stride + 1, (w - size) // stride + 1
    result = np.zeros((ho, wo), dtype=np.float64)
    steps = []
    for out, at, window in _windows(fmap, size, size, stride):
        result[out] = window.max()
        steps.append(PoolStep(out, at, window, float(result[out])))
    return PoolExplanation(fmap, size, stride, tuple(steps), result)
