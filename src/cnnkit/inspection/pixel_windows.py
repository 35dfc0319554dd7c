"""Pixel rules for the layer types that read many input values: a convolution's patches,
a pooling window, a whole map (global pooling), a flatten's source and a dense layer's vector.
See ``pixel_rules`` for the registry these functions join."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from cnnkit.inspection.explain import format_matrix
from cnnkit.inspection.explain_text import side_by_side
from cnnkit.inspection.pixel_rules import (
    Arithmetic,
    NoPixelRule,
    PixelContext,
    _grid,
    _item,
    _np,
    _num,
    _pair,
    _span,
    _window,
    pixel_rule,
)

__all__ = ["conv_value", "dense_value", "flatten_value", "global_pool_value", "pool_value"]

SHOWN_CHANNELS = 3  # input maps written out term by term in the text; the rest as sums
SHOWN_CONTRIBUTIONS = 10  # dense inputs listed, largest |weight x input| first


# ----------------------------------------------------------------------------- convolution


def _conv_padding(conv: nn.Conv2d, kh: int, kw: int) -> tuple[int, int]:
    """Zeros before the first row and column (torch's ``"same"`` and TensorFlow's ``SAME``,
    a ``TFSameConv2d``'s ``pads``, put the odd one after)."""
    pads = getattr(conv, "pads", None)
    if pads is not None:  # (left, right, top, bottom), added before the convolution's own
        own = _pair(conv.padding) if not isinstance(conv.padding, str) else (0, 0)
        return pads[2] + own[0], pads[0] + own[1]
    if conv.padding == "valid":
        return 0, 0
    if conv.padding == "same":
        dh, dw = conv.dilation
        return dh * (kh - 1) // 2, dw * (kw - 1) // 2
    return _pair(conv.padding)


@pixel_rule("conv", "whiten")
def conv_value(ctx: PixelContext) -> Arithmetic:
    """The kernel over the patch of every input map: products, their sum, plus the bias."""
    conv = ctx.module
    if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros":
        raise NoPixelRule(
            f"no pixel explanation for a {type(conv).__name__} with padding mode "
            f"{getattr(conv, 'padding_mode', '?')!r} yet"
        )
    assert ctx.at is not None
    weight = _np(conv.weight)  # (F, C / groups, kh, kw)
    filters, per_group, kh, kw = weight.shape
    group = ctx.map // (filters // conv.groups)
    channels = list(range(group * per_group, (group + 1) * per_group))
    (sh, sw), (dh, dw) = _pair(conv.stride), _pair(conv.dilation)
    ph, pw = _conv_padding(conv, kh, kw)
    top, left = ctx.at[0] * sh - ph, ctx.at[1] * sw - pw
    patches, inside = [], None
    for c in channels:
        values, inside = _window(ctx.inputs[c], top, left, (kh, kw), (dh, dw))
        patches.append(values)
    patch = np.stack(patches)  # (C, kh, kw)
    kernel = weight[ctx.map]  # (C, kh, kw)
    products = patch * kernel
    sums = products.sum(axis=(1, 2))  # (C,)
    total = float(sums.sum())
    bias = _item(conv.bias, ctx.map, 0.0)
    value = total + bias
    assert inside is not None
    parts: dict[str, Any] = {
        "input_layer": ctx.input_name,
        "input_channels": channels,
        "origin": [top, left],  # the window's top-left cell in the input (negative: padding)
        "stride": [sh, sw],
        "padding": [ph, pw],
        "dilation": [dh, dw],
        "groups": conv.groups,
        "inside": inside.tolist(),  # False: the cell lies in the zero padding
        "patch": patch.tolist(),
        "kernel": kernel.tolist(),
        "products": products.tolist(),  # per input channel, row and column
        "channel_sums": sums.tolist(),
        "sum": total,
        "bias": bias,
        "has_bias": conv.bias is not None,
    }
    if ctx.pixels is not None and ctx.mean is not None and ctx.std is not None:
        pix = [_window(ctx.pixels[:, :, c].astype(np.float64), top, left, (kh, kw), (dh, dw))[0]
               for c in channels]  # fmt: skip
        parts["pixels"] = [_grid(p, inside) for p in pix]
        parts["normalisation"] = {
            "mean": [ctx.mean[c] for c in channels],
            "std": [ctx.std[c] for c in channels],
            "formula": "(pixel / 255 - mean) / std",
        }
    lines = _conv_lines(ctx, parts, patch, kernel, sums, inside)
    return Arithmetic(value, float(np.abs(products).sum()) + abs(bias), parts, lines)


def _conv_lines(ctx, parts, patch, kernel, sums, inside) -> list[str]:
    kh, kw = kernel.shape[1:]
    top, left = parts["origin"]
    (dh, dw), ph = parts["dilation"], parts["padding"][0]
    n = len(parts["input_channels"])
    lines = [
        f"A {kh}x{kw} kernel over {n} input map{'s' if n > 1 else ''} of {ctx.input_name} "
        f"(stride {parts['stride'][0]}, zero padding {ph}): its window covers rows "
        f"{_span(top, kh, dh)}, columns {_span(left, kw, dw)}."
    ]
    if not inside.all():
        lines.append("Cells outside the image are the padding: 0, as the material pads.")
    if "normalisation" in parts:
        lines.append(
            "The input is the image's pixels p scaled as the model was trained: "
            "(p / 255 - mean) / std per colour channel."
        )
    for i, c in enumerate(parts["input_channels"][:SHOWN_CHANNELS]):
        lines += ["", f"Input map {c}:", *side_by_side(patch[i], kernel[i], "x")]
        terms = [
            f"({_num(p)} x {_num(w)})"
            for p, w in zip(patch[i].ravel(), kernel[i].ravel(), strict=True)
        ]
        rows = [" + ".join(terms[k : k + kw]) for k in range(0, len(terms), kw)]
        lines += [("  = " if k == 0 else "    ") + r + (" +" if k < len(rows) - 1 else "")
                  for k, r in enumerate(rows)]  # fmt: skip
        lines.append(f"  = {_num(sums[i])}")
    if n > SHOWN_CHANNELS:
        rest = ", ".join(_num(s) for s in sums[SHOWN_CHANNELS:])
        lines += ["", f"Input maps {parts['input_channels'][SHOWN_CHANNELS]} to "
                  f"{parts['input_channels'][-1]} the same way: {rest}"]  # fmt: skip
    lines += ["", f"Sum of the {n} input maps: {_num(parts['sum'])}"]
    bias = parts["bias"] if parts["has_bias"] else "0 (this layer has no bias)"
    lines.append(f"+ bias {bias if isinstance(bias, str) else _num(bias)}")
    return lines


# ----------------------------------------------------------------------------- pooling


@pixel_rule("maxpool", "avgpool")
def pool_value(ctx: PixelContext) -> Arithmetic:
    """The window of the same map: its largest value (max) or its mean (average)."""
    pool = ctx.module
    if getattr(pool, "ceil_mode", False) or getattr(pool, "divisor_override", None):
        raise NoPixelRule("no pixel explanation for pooling with ceil_mode or a divisor yet")
    assert ctx.at is not None
    size = _pair(pool.kernel_size)
    stride = _pair(pool.stride or pool.kernel_size)
    pad = _pair(pool.padding)
    step = _pair(getattr(pool, "dilation", 1))
    top, left = ctx.at[0] * stride[0] - pad[0], ctx.at[1] * stride[1] - pad[1]
    values, inside = _window(ctx.inputs[ctx.map], top, left, size, step)
    parts: dict[str, Any] = {
        "input_layer": ctx.input_name,
        "origin": [top, left],
        "size": list(size),
        "stride": list(stride),
        "padding": list(pad),
        "dilation": list(step),
        "inside": inside.tolist(),
        "window": _grid(values, inside),
    }
    where = f"rows {_span(top, size[0], step[0])}, columns {_span(left, size[1], step[1])}"
    head = f"The {size[0]}x{size[1]} window over {ctx.input_name}'s map {ctx.map}, {where}:"
    shown = format_matrix(np.where(inside, values, np.nan)).replace("nan", "  -")
    lines = [head, *("  " + r for r in shown.splitlines())]
    if isinstance(pool, nn.MaxPool2d):
        masked = np.where(inside, values, -np.inf)
        r, c = np.unravel_index(int(np.argmax(masked)), masked.shape)
        value = float(masked[r, c])
        parts["winner"] = [top + int(r) * step[0], left + int(c) * step[1]]
        lines.append(f"  the largest value wins: {_num(value)} (row {parts['winner'][0]}, "
                     f"column {parts['winner'][1]})")  # fmt: skip
        scale = abs(value)
    else:
        divisor = size[0] * size[1] if pool.count_include_pad else int(inside.sum())
        total = float(values.sum())
        value = total / divisor
        parts.update(sum=total, divisor=divisor)
        lines.append(f"  mean = {_num(total)} / {divisor} = {_num(value)}")
        scale = float(np.abs(values).sum()) / divisor
    if not inside.all():
        role = "never wins" if isinstance(pool, nn.MaxPool2d) else "adds 0"
        lines.append(f"  (- is padding outside the map: it {role})")
    return Arithmetic(value, scale, parts, lines)


@pixel_rule("gap", "gmp")
def global_pool_value(ctx: PixelContext) -> Arithmetic:
    """A whole map reduced to one number: its mean (gap) or its largest value (gmp)."""
    fmap = ctx.inputs[ctx.map]  # (H, W)
    parts: dict[str, Any] = {"input_layer": ctx.input_name, "window": fmap.tolist()}
    h, w = fmap.shape
    head = f"All {h}x{w} values of {ctx.input_name}'s map {ctx.map}"
    if ctx.info.spec.type == "gmp":
        r, c = np.unravel_index(int(np.argmax(fmap)), fmap.shape)
        value = float(fmap[r, c])
        parts["winner"] = [int(r), int(c)]
        lines = [f"{head}: the largest is {_num(value)} (row {r}, column {c})."]
        return Arithmetic(value, abs(value), parts, lines)
    total = float(fmap.sum())
    value = total / fmap.size
    parts.update(sum=total, divisor=int(fmap.size))
    lines = [f"{head}: mean = {_num(total)} / {fmap.size} = {_num(value)}."]
    return Arithmetic(value, float(np.abs(fmap).sum()) / fmap.size, parts, lines)


@pixel_rule("flatten")
def flatten_value(ctx: PixelContext) -> Arithmetic:
    """Value ``map`` of the vector is one value of one input map, read row by row."""
    shape = ctx.inputs.shape
    where = [int(i) for i in np.unravel_index(ctx.map, shape)]
    value = float(ctx.inputs[tuple(where)])
    parts = {"input_layer": ctx.input_name, "source": where, "input": value}
    desc = (
        f"map {where[0]}, row {where[1]}, column {where[2]}"
        if len(where) == 3
        else f"value {where[0]}"
    )
    lines = [f"Value {ctx.map} of the vector is {ctx.input_name}'s {desc}: {_num(value)}."]
    return Arithmetic(value, abs(value), parts, lines)


# ----------------------------------------------------------------------------- dense


@pixel_rule("dense")
def dense_value(ctx: PixelContext) -> Arithmetic:
    """A weighted sum of every input: the largest contributions, their total and the bias."""
    dense = ctx.module
    weights = _np(dense.weight)[ctx.map]  # (N,)
    products = weights * ctx.inputs  # (N,)
    order = np.argsort(-np.abs(products), kind="stable")[:SHOWN_CONTRIBUTIONS]
    total = float(products.sum())
    bias = _item(dense.bias, ctx.map, 0.0)
    value = total + bias
    shape = ctx.input_shape_before
    contributions = []
    for i in order:
        entry: dict[str, Any] = {
            "index": int(i),
            "input": float(ctx.inputs[i]),
            "weight": float(weights[i]),
            "product": float(products[i]),
        }
        if shape is not None:  # the flatten's input: which map, row and column it was
            entry["source"] = [int(v) for v in np.unravel_index(int(i), shape)]
        contributions.append(entry)
    shown = float(products[order].sum())
    parts = {
        "input_layer": ctx.input_name,
        "inputs": int(products.size),
        "contributions": contributions,
        "others": {"count": int(products.size - len(order)), "sum": total - shown},
        "sum": total,
        "bias": bias,
        "has_bias": dense.bias is not None,
    }
    lines = [f"Output {ctx.map}: the weighted sum of all {products.size} values of "
             f"{ctx.input_name}; the largest contributions (input x weight):"]  # fmt: skip
    for e in contributions:
        src = (
            f" (map {e['source'][0]}, row {e['source'][1]}, column {e['source'][2]})"
            if "source" in e and len(e["source"]) == 3
            else ""
        )
        product = f"{_num(e['input'])} x {_num(e['weight'])} = {_num(e['product'])}"
        lines.append(f"  input {e['index']}{src}: {product}")
    if parts["others"]["count"]:
        lines.append(
            f"  the other {parts['others']['count']} together: {_num(parts['others']['sum'])}"
        )
    lines += [f"Sum: {_num(total)}", f"+ bias {_num(bias)}"]
    return Arithmetic(value, float(np.abs(products).sum()) + abs(bias), parts, lines)
