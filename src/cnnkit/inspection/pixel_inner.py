"""The arithmetic of a value inside a block (``layer1.0.conv1``, ``features.3.conv.1.0``).

A block is one layer of ``Network.infos``; its own layers (``LayerInfo.inner``) compute a
chain inside it: the main path, and the projection shortcut (``downsample``). Their input
is the block's input or the previous layer of their chain, computed here by the block
itself (``Residual.maps``) on the block's real input, so each value is explained by the
rule of its own type with the model's own numbers, exactly as a top-level layer is.
"""

from __future__ import annotations

from typing import Any

import torch

from cnnkit.inspection.maps import LayerOutput, normalize_map
from cnnkit.inspection.pixel_rules import (
    ACTIVATIONS,
    PIXEL_RULES,
    POSITIONWISE,
    NoPixelRule,
    PixelContext,
)
from cnnkit.models.layers import LayerInfo
from cnnkit.models.network import Network

__all__ = ["find_inner", "inner_value"]


def find_inner(network: Network, layer: str) -> tuple[int, LayerInfo] | None:
    """(the block's index in ``infos``, the inner layer's info) for a layer inside a block."""
    for index, info in enumerate(network.infos):
        for inner in info.inner:
            if inner.name == layer:
                return index, inner
    return None


def inner_value(
    network: Network,
    x: torch.Tensor,
    block_index: int,
    info: LayerInfo,
    map: int,
    position: tuple[int, int] | None,
    outputs: list[LayerOutput],
) -> dict[str, Any]:
    """The fields of a ``PixelExplanation`` for ``info``, a layer inside block
    ``network.infos[block_index]``, for the preprocessed image ``x`` (1, C, H, W)."""
    rule = PIXEL_RULES.get(info.spec.type)
    if rule is None:
        kind = info.spec.type
        raise NoPixelRule(f"layer {info.name}: no pixel explanation for layer type {kind!r} yet")
    block_info = network.infos[block_index]
    block = network.layers[block_info.name]
    first = block_index == 0
    block_in = x[0].float() if first else torch.from_numpy(outputs[block_index - 1].values).float()
    with torch.no_grad():
        _, maps = block.maps(block_in[None].contiguous())
    got = {f"{block_info.name}.{name}": t[0].double().numpy() for name, t in maps}
    main = [f"{block_info.name}.{name}" for name in block.main]
    chain = main if info.name in main else [n for n in got if n not in main]
    k = chain.index(info.name)
    before = "the image" if first else outputs[block_index - 1].name
    ctx = PixelContext(
        info=info,
        module=network.layers[info.name],
        inputs=block_in.double().numpy() if k == 0 else got[chain[k - 1]],
        input_name=f"the block's input ({before})" if k == 0 else chain[k - 1],
        input_shape_before=None, map=map, at=position, pixels=None, mean=None, std=None,
    )  # fmt: skip
    with torch.no_grad():
        arithmetic = rule(ctx)
    own = got[info.name]
    model_value = float(own[map] if position is None else own[map][position])
    # the position-wise layers after it in its chain, to the first activation
    steps, current, activation, post = [], arithmetic.value, None, None
    if info.spec.type in ACTIVATIONS:
        activation, post = info.name, arithmetic.value
    for name in chain[k + 1 :] if activation is None else []:
        kind = next(i.spec.type for i in block_info.inner if i.name == name)
        if kind not in POSITIONWISE:
            break
        current, _, formula = POSITIONWISE[kind](network.layers[name], map, current)
        model = float(got[name][map][position])
        steps.append(
            {
                "layer": name,
                "type": kind,
                "value": current,
                "model_value": model,
                "formula": formula,
            }
        )
        if kind in ACTIVATIONS:
            activation, post = name, current
            break
    drawn = own[map]
    activated = activation == info.name
    return {
        "value": arithmetic.value,
        "model_value": model_value,
        "scale": arithmetic.scale,
        "parts": {**arithmetic.parts, "block": block_info.name},
        "lines": arithmetic.lines,
        "pre_activation": ctx.inputs[map][position] if activated else arithmetic.value,
        "post_activation": post,
        "activation": activation,
        "after": steps if post is not None else [],
        "display_value": int(normalize_map(drawn)[position]),
        "display_min": float(drawn.min()),
        "display_max": float(drawn.max()),
    }
