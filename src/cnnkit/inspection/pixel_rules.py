"""The arithmetic of one output value, one rule per layer type (``PIXEL_RULES``).

A rule gets a ``PixelContext`` (the layer, its torch module, the input it received and the
position asked for) and returns ``Arithmetic``: the value recomputed in float64 from the
model's own numbers, the parts a page or a reader needs (patch, kernel, products, window,
formula...) and the same arithmetic as text lines laid out like the learning material.

A new layer type or block adds its explanation as one entry: decorate a function with
``@pixel_rule("mytype")``. The position-wise types (ReLU, GELU, dropout, scale, batchnorm) are
here; the types that read a window or a whole vector are in ``pixel_windows``. Layer types
without a rule are refused by ``explain_pixel`` with a clear message, never explained wrongly.
Rules read the module's own attributes (stride, padding, groups, running statistics...)
rather than the layer spec, so what they compute is what the module computes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnkit.errors import ConfigError
from cnnkit.inspection.explain import format_number
from cnnkit.models.layers import LayerInfo

__all__ = [
    "ACTIVATIONS",
    "PIXEL_RULES",
    "POSITIONWISE",
    "Arithmetic",
    "NoPixelRule",
    "PixelContext",
    "pixel_rule",
]


class NoPixelRule(ConfigError):
    """The layer's type (or this configuration of its module) has no pixel explanation."""


@dataclass(frozen=True)
class PixelContext:
    """What a rule needs: one layer of one network, for one image and one position."""

    info: LayerInfo
    module: nn.Module
    inputs: np.ndarray  # float64, what the layer received: (C, H, W) maps or an (N,) vector
    input_name: str  # the layer the input came from, or "the image"
    input_shape_before: tuple[int, ...] | None  # a flatten's input shape, for dense inputs
    map: int  # output channel (maps) or index (vectors)
    at: tuple[int, int] | None  # (row, column) in the output map; None for vectors
    pixels: np.ndarray | None  # uint8 (H, W, C) when the input is the image itself
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None


@dataclass(frozen=True)
class Arithmetic:
    """A rule's answer: the value, the sum of the magnitudes it was built from (which sets the
    float32 tolerance of the model's own result), the parts and the text."""

    value: float
    scale: float
    parts: dict[str, Any]
    lines: list[str]


Rule = Callable[[PixelContext], Arithmetic]
PIXEL_RULES: dict[str, Rule] = {}


def pixel_rule(*types: str) -> Callable[[Rule], Rule]:
    """Register ``fn`` as the explanation of the given layer types."""

    def register(fn: Rule) -> Rule:
        for kind in types:
            PIXEL_RULES[kind] = fn
        return fn

    return register


# ----------------------------------------------------------------------------- helpers


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def _item(t: torch.Tensor | None, i: int, default: float) -> float:
    """``t[i]`` as a float (a learnt parameter or buffer), ``default`` when ``t`` is None."""
    return default if t is None else float(t.detach()[i])


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[-1]))


def _num(v: float) -> str:
    return format_number(float(v))


def _minus(v: float) -> str:
    """A number to subtract: negative ones in brackets, ``x - (-2)``."""
    return f"({_num(v)})" if v < 0 else _num(v)


def _span(start: int, length: int, step: int = 1) -> str:
    end = start + (length - 1) * step
    return f"{start}" if length == 1 else f"{start} to {end}"


def _grid(values: np.ndarray, inside: np.ndarray) -> list[list[float | None]]:
    """JSON rows; cells outside the input (padding) as None."""
    return [
        [float(v) if ok else None for v, ok in zip(row, mask, strict=True)]
        for row, mask in zip(values, inside, strict=True)
    ]


def _window(
    source: np.ndarray, top: int, left: int, size: tuple[int, int], step: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The ``size`` cells of a 2-D ``source`` from (top, left) every ``step`` (dilation):
    values (0 outside the map) and the mask of cells inside it."""
    h, w = source.shape
    rows = top + step[0] * np.arange(size[0])
    cols = left + step[1] * np.arange(size[1])
    inside = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
    values = source[np.ix_(np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1))] * inside
    return values, inside


def _value_at(array: np.ndarray, index: int, at: tuple[int, int] | None) -> float:
    return float(array[index] if at is None else array[index, at[0], at[1]])


# ----------------------------------------------------------------------------- position-wise

Scalar = Callable[[nn.Module, int, float], tuple[float, float, str]]
POSITIONWISE: dict[str, Scalar] = {}  # value -> (result, scale, formula), one position at a time
ACTIVATIONS = frozenset({"relu", "relu6", "gelu"})


def _relu(_: nn.Module, __: int, x: float) -> tuple[float, float, str]:
    y = max(x, 0.0)
    return y, abs(x), f"ReLU({_num(x)}) = max(0, {_num(x)}) = {_num(y)}"


def _relu6(_: nn.Module, __: int, x: float) -> tuple[float, float, str]:
    y = min(max(x, 0.0), 6.0)
    return y, abs(x), f"ReLU6({_num(x)}) = min(max(0, {_num(x)}), 6) = {_num(y)}"


def _gelu(module: nn.Module, _: int, x: float) -> tuple[float, float, str]:
    if getattr(module, "approximate", "none") != "none":
        raise NoPixelRule("no pixel explanation for the tanh approximation of GELU yet")
    phi = 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))
    y = x * phi
    return (
        y,
        abs(x),
        f"GELU({_num(x)}) = {_num(x)} x Phi({_num(x)}) = {_num(x)} x {_num(phi)} = {_num(y)}",
    )


def _identity(_: nn.Module, __: int, x: float) -> tuple[float, float, str]:
    return x, abs(x), f"{_num(x)} (dropout passes values through when the model predicts)"


def _scale(module: nn.Module, _: int, x: float) -> tuple[float, float, str]:
    factor = float(module.factor)
    y = x * factor
    return y, abs(y), f"{_num(x)} x {_num(factor)} = {_num(y)}"


def _batchnorm_numbers(module: nn.Module, channel: int) -> dict[str, float]:
    if module.running_mean is None or module.running_var is None:
        raise NoPixelRule("no pixel explanation for batchnorm without running statistics")
    return {
        "running_mean": _item(module.running_mean, channel, 0.0),
        "running_var": _item(module.running_var, channel, 1.0),
        "eps": float(module.eps),
        "gamma": _item(module.weight, channel, 1.0),
        "beta": _item(module.bias, channel, 0.0),
    }


def _batchnorm(module: nn.Module, channel: int, x: float) -> tuple[float, float, str]:
    n = _batchnorm_numbers(module, channel)
    std = math.sqrt(n["running_var"] + n["eps"])
    normalised = (x - n["running_mean"]) / std
    y = normalised * n["gamma"] + n["beta"]
    a = abs(n["gamma"]) / std
    scale = abs(x) * a + abs(n["running_mean"]) * a + abs(n["beta"])
    formula = (
        f"({_num(x)} - {_minus(n['running_mean'])}) / sqrt({_num(n['running_var'])} + "
        f"{_num(n['eps'])}) x {_num(n['gamma'])} + {_num(n['beta'])} = {_num(normalised)} x "
        f"{_num(n['gamma'])} + {_num(n['beta'])} = {_num(y)}"
    )
    return y, scale, formula


POSITIONWISE.update(
    relu=_relu,
    relu6=_relu6,
    gelu=_gelu,
    dropout=_identity,
    dropout2d=_identity,
    scale=_scale,
    batchnorm=_batchnorm,
)


@pixel_rule(*POSITIONWISE)
def positionwise_value(ctx: PixelContext) -> Arithmetic:
    """ReLU, ReLU6, GELU, dropout, scale and batchnorm: the same position of the same map, one
    formula. Batchnorm's formula carries the learnt numbers (running mean and variance,
    gamma, beta, eps)."""
    kind = ctx.info.spec.type
    x = _value_at(ctx.inputs, ctx.map, ctx.at)
    y, scale, formula = POSITIONWISE[kind](ctx.module, ctx.map, x)
    parts: dict[str, Any] = {"input": x}
    if kind == "batchnorm":
        parts.update(_batchnorm_numbers(ctx.module, ctx.map))
        parts["formula"] = "(x - running_mean) / sqrt(running_var + eps) x gamma + beta"
    where = "" if ctx.at is None else f" at row {ctx.at[0]}, column {ctx.at[1]}"
    lines = [f"The same position of {ctx.input_name}'s map {ctx.map}{where} is {_num(x)}:"]
    lines.append(f"  {formula}")
    return Arithmetic(y, scale, parts, lines)


from cnnkit.inspection import pixel_blocks, pixel_windows  # noqa: E402, F401 - the other rules
