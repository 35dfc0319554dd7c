"""Why one value of a feature map is what it is, with the model's own numbers.

The learning material explains a convolution by one worked example: a 3x3 patch times a
kernel, the nine products summed to 155, ReLU, then the map normalised to 0-255 to be seen.
``explain_pixel`` writes out that arithmetic for any value of any layer of a trained model,
for one image: the input patch of every input map, the kernel, each product, the sum, the
bias, the value before and after the activation that follows, and the grey level the value
gets on the 0-255 display scale of its map. Pooling shows the window and the winner,
batchnorm its formula with the learnt numbers, a dense output its largest contributions,
the logit and the softmax.

The value is recomputed in float64 from the numbers the float32 forward pass used (the
layer's real input, from ``Network.feature_maps``) and checked against the model's own output
at that position: ``model_value``, ``difference`` and ``tolerance`` travel with it. The
tolerance is ``1e-5`` of the sum of the magnitudes the value was built from: float32 keeps
about 7 significant digits, summation order differs between kernels (oneDNN, AMX), and the
worst case of a float32 sum of n terms is about ``n * 6e-8`` of that magnitude sum while the
real error grows like ``sqrt(n)``; a wrong term, padding or bias would miss it by orders of
magnitude.

One function serves the CLI (``cnnkit explain pixel``), the explorer's JSON endpoint and
Python. The per-type arithmetic lives in ``pixel_rules`` (one entry per layer type).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnkit.errors import ConfigError
from cnnkit.inference import Classifier, ImageInput, load
from cnnkit.inspection.explain import format_number
from cnnkit.inspection.maps import LayerOutput, layer_outputs, normalize_map
from cnnkit.inspection.pixel_inner import find_inner, inner_value
from cnnkit.inspection.pixel_rules import (
    ACTIVATIONS,
    PIXEL_RULES,
    POSITIONWISE,
    NoPixelRule,
    PixelContext,
)
from cnnkit.models.network import Network

__all__ = [
    "RELATIVE_TOLERANCE",
    "NoPixelRule",
    "PixelExplanation",
    "cpu_classifier",
    "explain_pixel",
    "explain_value",
    "find_layer",
    "render_pixel",
]

RELATIVE_TOLERANCE = 1e-5  # of the sum of |terms| (see the module docstring)


@dataclass(frozen=True)
class PixelExplanation:
    """One value of one layer for one image, and the arithmetic that produced it."""

    layer: str
    type: str
    index: int  # the layer's position in the network
    map: int  # output map (channel) or, for a vector, the value's index
    at: tuple[int, int] | None  # (row, column) in the map; None for a vector
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    value: float  # the arithmetic, float64
    model_value: float  # the network's own float32 forward pass at this position
    tolerance: float
    parts: dict[str, Any]  # what the layer type computes: products, window, formula...
    lines: tuple[str, ...]  # the same as text
    pre_activation: float
    post_activation: float | None  # after the activation that follows (or softmax)
    activation: str | None  # the layer that applies it, "softmax", or None
    after: tuple[dict[str, Any], ...]  # position-wise layers from here to the activation
    display_value: int  # the grey level 0-255 of this value in its normalised map
    display_min: float
    display_max: float
    label: str | None = None  # the class name, for the network's output
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def difference(self) -> float:
        return abs(self.value - self.model_value)

    def __repr__(self) -> str:
        where = f"row {self.at[0]}, column {self.at[1]}" if self.at is not None else "a vector"
        label = f" ({self.label})" if self.label else ""
        after = (
            f", after {self.activation} {format_number(self.post_activation)}"
            if self.post_activation is not None
            else ""
        )
        return (
            f"PixelExplanation({self.layer} ({self.type}), map {self.map}{label}, {where}: "
            f"{format_number(self.value)} (the model's {format_number(self.model_value)})"
            f"{after}, display {self.display_value})"
        )

    def _repr_html_(self) -> str:
        """The worked arithmetic as ``cnnkit explain pixel`` prints it, in a notebook cell."""
        from cnnkit.inspection.html import esc, fragment

        check = "equals" if self.matches else "DIFFERS FROM"
        body = (
            f"<pre>{esc(render_pixel(self))}</pre><p class='note'>The arithmetic {check} the "
            f"model's own forward pass (difference {self.difference:.1e}, float32 tolerance "
            f"{self.tolerance:.1e}).</p>"
        )
        return fragment(f"Why {self.layer} has this value", body)

    @property
    def matches(self) -> bool:
        """The arithmetic equals the forward pass within float32 tolerance."""
        return self.difference <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the common fields, then the layer type's parts at the top level."""
        return {
            "layer": self.layer,
            "type": self.type,
            "index": self.index,
            "map": self.map,
            "at": None if self.at is None else list(self.at),
            "in_shape": list(self.in_shape),
            "out_shape": list(self.out_shape),
            "label": self.label,
            **self.parts,
            "value": self.value,
            "model_value": self.model_value,
            "difference": self.difference,
            "tolerance": self.tolerance,
            "matches": self.matches,
            "pre_activation": self.pre_activation,
            "post_activation": self.post_activation,
            "activation": self.activation,
            "after": list(self.after),
            "display_value": self.display_value,
            "display_range": [self.display_min, self.display_max],
            "lines": list(self.lines),
            "notes": list(self.notes),
        }


# ----------------------------------------------------------------------------- entry points


def cpu_classifier(classifier: Classifier) -> Classifier:
    """``classifier`` itself when it runs on the CPU, else a CPU copy: explanations compare
    against a plain float32 forward pass (a GPU's convolutions may use TF32)."""
    if classifier.device.type == "cpu":
        return classifier
    model = copy.deepcopy(classifier.model).to("cpu")
    return Classifier(model, classifier.meta, device="cpu", precision="fp32")


def explain_pixel(
    model: str | Path | Classifier,
    image: ImageInput,
    layer: str,
    map: int,
    at: tuple[int, int] | Sequence[int] | None = None,
) -> PixelExplanation:
    """The arithmetic behind ``layer``'s map ``map`` at ``at`` = (row, column) for ``image``.

    ``model`` is a run directory or a loaded ``Classifier``; ``image`` anything
    ``Classifier.preprocess`` takes. For layers that output a vector (flatten, global
    pooling, dense), ``map`` is the value's index and ``at`` stays None.
    """
    classifier = (
        load(model, device="cpu", precision="fp32") if isinstance(model, str | Path) else model
    )
    classifier = cpu_classifier(classifier)
    meta = classifier.meta
    pixels = classifier.preprocess(image)  # (S, S, C) uint8, exactly as in training
    x = meta.preprocessing.to_model_input(torch.from_numpy(pixels[None].copy()))
    return explain_value(
        classifier.model,
        x.contiguous(),
        layer,
        map,
        at,
        pixels=pixels,
        mean=meta.preprocessing.mean,
        std=meta.preprocessing.std,
        classes=meta.classes,
    )


def find_layer(network: Network, layer: str) -> int:
    """The index of the layer called ``layer`` (a clear error naming the choices)."""
    names = [info.name for info in network.infos]
    if layer not in names:
        inside = " (or a layer inside a block, as cnnkit model summary lists them)" * any(
            info.inner for info in network.infos
        )
        raise ConfigError(
            f"layer: unknown layer {layer!r}, expected one of: {', '.join(names)}{inside}"
        )
    return names.index(layer)


def explain_value(
    network: Network,
    x: torch.Tensor,
    layer: str,
    map: int,
    at: tuple[int, int] | Sequence[int] | None = None,
    *,
    pixels: np.ndarray | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    classes: Sequence[str] | None = None,
    outputs: list[LayerOutput] | None = None,
) -> PixelExplanation:
    """``explain_pixel`` for a network and its preprocessed input ``x`` ``(1, C, H, W)``.

    ``pixels`` (uint8 ``(H, W, C)``), ``mean`` and ``std`` let the first layer show the image's
    own pixel values; ``classes`` names the outputs; ``outputs`` reuses a forward pass.
    """
    if layer not in (i.name for i in network.infos) and (found := find_inner(network, layer)):
        return _inner(network, x, *found, map, at, outputs)
    index = find_layer(network, layer)
    info = network.infos[index]
    rule = PIXEL_RULES.get(info.spec.type)
    if rule is None:
        raise NoPixelRule(
            f"layer {layer}: no pixel explanation for layer type {info.spec.type!r} yet"
        )
    position = _check_position(info.name, info.out_shape, map, at)
    outputs = outputs if outputs is not None else layer_outputs(network, x)
    first = index == 0
    inputs = x[0].detach().cpu().double().numpy() if first else outputs[index - 1].values
    before = network.infos[index - 1] if index > 0 else None
    ctx = PixelContext(
        info=info,
        module=network.layers[info.name],
        inputs=np.asarray(inputs, dtype=np.float64),
        input_name="the image" if first else outputs[index - 1].name,
        input_shape_before=tuple(before.in_shape)
        if before is not None and before.spec.type == "flatten"
        else None,
        map=map,
        at=position,
        pixels=pixels if first else None,
        mean=tuple(mean) if first and mean is not None else None,
        std=tuple(std) if first and std is not None else None,
    )
    with torch.no_grad():
        arithmetic = rule(ctx)
    own = outputs[index].values
    model_value = float(own[map] if position is None else own[map, position[0], position[1]])
    pre, post, activation, after = _activation(network, outputs, index, ctx, arithmetic.value)
    label = None
    if classes is not None and index == len(network.infos) - 1 and len(classes) == own.shape[0]:
        label = str(classes[map])
    drawn = own if position is None else own[map]  # a vector is drawn normalised as a whole
    grey = normalize_map(drawn)
    return PixelExplanation(
        layer=info.name,
        type=info.spec.type,
        index=index,
        map=map,
        at=position,
        in_shape=tuple(info.in_shape),
        out_shape=tuple(info.out_shape),
        value=arithmetic.value,
        model_value=model_value,
        tolerance=RELATIVE_TOLERANCE * arithmetic.scale + 1e-30,
        parts=arithmetic.parts,
        lines=tuple(arithmetic.lines),
        pre_activation=pre,
        post_activation=post,
        activation=activation,
        after=tuple(after),
        display_value=int(grey[map] if position is None else grey[position]),
        display_min=float(drawn.min()),
        display_max=float(drawn.max()),
        label=label,
    )


def _inner(network, x, block_index, info, map, at, outputs) -> PixelExplanation:
    """A layer inside a block (``pixel_inner``), as a ``PixelExplanation``."""
    position = _check_position(info.name, info.out_shape, map, at)
    outputs = outputs if outputs is not None else layer_outputs(network, x)
    got = inner_value(network, x, block_index, info, map, position, outputs)
    return PixelExplanation(
        layer=info.name, type=info.spec.type, index=block_index, map=map, at=position,
        in_shape=tuple(info.in_shape), out_shape=tuple(info.out_shape),
        tolerance=RELATIVE_TOLERANCE * got.pop("scale") + 1e-30, lines=tuple(got.pop("lines")),
        after=tuple(got.pop("after")), **got,
    )  # fmt: skip


def _check_position(
    name: str, shape: tuple[int, ...], map: int, at: tuple[int, int] | Sequence[int] | None
) -> tuple[int, int] | None:
    count = shape[0]
    if isinstance(map, bool) or not isinstance(map, int | np.integer) or not 0 <= map < count:
        what = "maps" if len(shape) == 3 else "values"
        raise ConfigError(f"map: {name} has {count} {what} (0 to {count - 1}), got {map!r}")
    if len(shape) == 1:
        if at is not None:
            raise ConfigError(
                f"at: {name} outputs a vector of {count} values, not maps: leave out at "
                "(map picks the value)"
            )
        return None
    if at is None:
        raise ConfigError(f"at: {name} outputs maps; give the (row, column) of the value")
    if len(at) != 2 or not all(
        isinstance(v, int | np.integer) and not isinstance(v, bool) for v in at
    ):
        raise ConfigError(f"at: expected two whole numbers (row, column), got {at!r}")
    row, col = int(at[0]), int(at[1])
    h, w = shape[1], shape[2]
    if not (0 <= row < h and 0 <= col < w):
        raise ConfigError(
            f"at: ({row}, {col}) is outside {name}'s {h}x{w} maps (rows 0 to {h - 1}, "
            f"columns 0 to {w - 1})"
        )
    return row, col


def _activation(
    network: Network,
    outputs: list[LayerOutput],
    index: int,
    ctx: PixelContext,
    value: float,
) -> tuple[float, float | None, str | None, list[dict[str, Any]]]:
    """(pre-activation, post-activation, what applies it, the steps in between).

    An activation layer's own value is its post-activation (its input the pre-activation).
    Otherwise follow the position-wise layers after this one (batchnorm, dropout, scale) to
    the first ReLU or GELU; reaching the end of the network instead means softmax."""
    infos = network.infos
    kind = infos[index].spec.type
    if kind in ACTIVATIONS:
        x = float(ctx.inputs[ctx.map] if ctx.at is None else ctx.inputs[ctx.map][ctx.at])
        return x, value, infos[index].name, []
    steps, current = [], value
    for j in range(index + 1, len(infos)):
        t = infos[j].spec.type
        if t not in POSITIONWISE:
            return value, None, None, []
        current, _, formula = POSITIONWISE[t](network.layers[infos[j].name], ctx.map, current)
        own = outputs[j].values
        model_value = float(own[ctx.map] if ctx.at is None else own[ctx.map][ctx.at])
        steps.append({"layer": infos[j].name, "type": t, "value": current,
                      "model_value": model_value, "formula": formula})  # fmt: skip
        if t in ACTIVATIONS:
            return value, current, infos[j].name, steps
    if ctx.at is not None:  # the network ends in maps: no classifier head to speak of
        return value, None, None, []
    logits = outputs[-1].values.astype(np.float64)
    logits[ctx.map] = current  # this explanation's own logit
    shifted = np.exp(logits - logits.max())
    probability = float(shifted[ctx.map] / shifted.sum())
    steps.append({"layer": "softmax", "type": "softmax", "value": probability,
                  "logits": logits.tolist(), "exp_sum": float(shifted.sum()),
                  "formula": f"exp({format_number(current)}) / sum of exp(logits) = "
                             f"{format_number(probability)}"})  # fmt: skip
    return value, probability, "softmax", steps


# ----------------------------------------------------------------------------- text


def render_pixel(ex: PixelExplanation) -> str:
    """The explanation as the material writes its example, for a terminal."""
    where = f"row {ex.at[0]}, column {ex.at[1]}" if ex.at is not None else f"value {ex.map}"
    what = f" ({ex.label})" if ex.label else ""
    head = f"{ex.layer} ({ex.type}), map {ex.map}{what}, {where}:"
    if ex.at is None:
        head = f"{ex.layer} ({ex.type}), {where}{what}:"
    out = [head, "", *ex.lines, f"= {format_number(ex.value)}"]
    out.append(
        f"  (the model's own forward pass: {format_number(ex.model_value)}; difference "
        f"{ex.difference:.1e}, float32 tolerance {ex.tolerance:.1e})"
    )
    for step in ex.after:
        out.append(f"then {step['layer']}: {step['formula']}")
    if ex.post_activation is not None:
        out.append(
            f"Before the activation {format_number(ex.pre_activation)}, after {ex.activation} "
            f"{format_number(ex.post_activation)}."
        )
    lo, hi = ex.display_min, ex.display_max
    drawn = "this map" if ex.at is not None else "this layer's values"
    if hi > lo:
        scaled = (ex.model_value - lo) * 255.0 / (hi - lo)
        out.append(
            f"On the 0-255 display scale of {drawn} (min {format_number(lo)} -> 0, max "
            f"{format_number(hi)} -> 255): ({format_number(ex.model_value)} - {_signed(lo)}) x "
            f"255 / {format_number(hi - lo)} = {format_number(round(scaled, 2))} -> "
            f"{ex.display_value}"
        )
    else:
        out.append(f"All of {drawn} are equal, so it is drawn black (display value 0).")
    return "\n".join(out)


def _signed(value: float) -> str:
    """A number to subtract: negative ones in brackets, ``x - (-2)``."""
    text = format_number(value)
    return f"({text})" if value < 0 else text
