"""The arithmetic of a residual block's output value (``residual``, ``basic_block``,
``bottleneck``, ``inverted_residual``): what its layers computed at that position, plus
what the shortcut brings there, then the activation after the addition.

The block's own layers run on the block's real input (float32, as in the forward pass), so
the two addends are the model's own numbers; the sum and the activation are recomputed in
float64.
"""

from __future__ import annotations

import math

import torch

from cnnkit.inspection.pixel_rules import (
    Arithmetic,
    NoPixelRule,
    PixelContext,
    _num,
    _value_at,
    pixel_rule,
)
from cnnkit.models.blocks import Residual

ACTIVATION_FORMULAS = {
    "relu": lambda v: (max(v, 0.0), f"ReLU({_num(v)}) = max(0, {_num(v)})"),
    "relu6": lambda v: (min(max(v, 0.0), 6.0), f"ReLU6({_num(v)}) = min(max(0, {_num(v)}), 6)"),
    "gelu": lambda v: (
        v * 0.5 * (1.0 + math.erf(v / math.sqrt(2.0))),
        f"GELU({_num(v)}) = {_num(v)} x Phi({_num(v)})",
    ),
}


@pixel_rule("residual", "basic_block", "bottleneck", "inverted_residual")
def residual_value(ctx: PixelContext) -> Arithmetic:
    """activation(main path + shortcut) at one position."""
    block = ctx.module
    if not isinstance(block, Residual) or ctx.at is None:
        raise NoPixelRule(f"no pixel explanation for a {type(block).__name__} block yet")
    x = torch.from_numpy(ctx.inputs).float()[None].contiguous()  # (1, C, H, W), as received
    _, maps = block.maps(x)
    outputs = {name: t[0].double().numpy() for name, t in maps}
    last = block.main[-1]
    main = _value_at(outputs[last], ctx.map, ctx.at)
    if block.shortcut == "identity":
        shortcut = _value_at(ctx.inputs, ctx.map, ctx.at)
        source = f"the block's input ({ctx.input_name})"
    elif block.shortcut == "projection":
        *_, final = (name for name, _ in maps if name.startswith("downsample."))
        shortcut = _value_at(outputs[final], ctx.map, ctx.at)
        source = "the block's input through its projection (1x1 convolution, batchnorm)"
    else:
        shortcut, source = 0.0, "nothing (this block has no shortcut: its shape changes)"
    total = main + shortcut
    where = f"row {ctx.at[0]}, column {ctx.at[1]}"
    lines = [
        f"The block's layers end in {last}, whose map {ctx.map} at {where} is {_num(main)}.",
        f"The shortcut adds {source}: {_num(shortcut)}.",
        f"  {_num(main)} + {_num(shortcut)} = {_num(total)}",
    ]
    value = total
    if block.activation is not None:
        value, formula = ACTIVATION_FORMULAS[block.activation](total)
        lines.append(f"  {formula} = {_num(value)}")
    parts = {
        "main_layer": last, "main": main, "shortcut": block.shortcut,
        "shortcut_value": shortcut, "sum": total, "block_activation": block.activation,
    }  # fmt: skip
    return Arithmetic(value, abs(main) + abs(shortcut), parts, lines)
