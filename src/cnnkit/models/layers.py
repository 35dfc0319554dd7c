"""A network's layers as a validated list, and the shapes they produce.

A network is a list of layers; each entry in YAML is a bare name (``relu``), a one-key
mapping (``conv: {filters: 12, kernel: 3}``) or a mapping with ``type``; any entry may carry
a ``name`` (its module's name, so its state-dict key). ``parse_layers`` checks every field
and says which layer, field and value are wrong; ``infer_shapes`` walks the list with an
input shape and gives each layer's output shape, parameters and FLOPs.

Every rule of a layer type lives in its record (``layer_base.LayerType``, registered in
``LAYER_TYPES``): this module only loops over them.
"""

from __future__ import annotations

from typing import Any

from cnnkit.errors import ConfigError
from cnnkit.models import blocks as _blocks  # noqa: F401  (registers the blocks)
from cnnkit.models import layer_types as _layer_types  # noqa: F401  (registers the types)
from cnnkit.models import whiten as _whiten  # noqa: F401  (registers whiten)
from cnnkit.models.layer_base import (
    ALIASES,
    LAYER_TYPES,
    LayerInfo,
    LayerSpec,
    infer_list,
    parse_list,
)

__all__ = [
    "ALIASES",
    "LAYER_FIELDS",
    "LAYER_TYPES",
    "LayerInfo",
    "LayerSpec",
    "explain_layer",
    "infer_shapes",
    "parse_layers",
    "with_head",
]


# type -> {field: default}; a default of ... means required (read from the records).
LAYER_FIELDS: dict[str, dict[str, Any]] = {k: dict(r.fields) for k, r in LAYER_TYPES.items()}


def explain_layer(kind: str) -> str:
    """The plain-words sentence for a layer type (empty for an unknown type)."""
    record = LAYER_TYPES.get(kind)
    return record.explain if record is not None else ""


def parse_layers(raw: Any) -> list[LayerSpec]:
    """Validate a list of layer entries (see the module docstring) into ``LayerSpec``s."""
    return parse_list(raw)


def _types(layers: list[LayerSpec]) -> list[str]:
    """Every layer type in the list, looking inside sequences."""
    out = []
    for s in layers:
        out += _types(list(s.params["layers"])) if s.type == "sequence" else [s.type]
    return out


def _ends_in_dense(layers: list[LayerSpec]) -> bool:
    last = layers[-1]
    if last.type == "sequence":
        return _ends_in_dense(list(last.params["layers"]))
    return last.type == "dense" or (
        last.type == "scale" and len(layers) >= 2 and layers[-2].type == "dense"
    )


def with_head(layers: list[LayerSpec], classes: int) -> list[LayerSpec]:
    """Size the last dense layer to ``classes``, appending flatten and dense when missing.

    The last dense layer may sit at the end of a ``sequence`` (torchvision's ``classifier``)."""
    layers = list(layers)
    last = layers[-1]
    if last.type == "sequence" and _ends_in_dense(list(last.params["layers"])):
        inner = with_head(list(last.params["layers"]), classes)
        layers[-1] = LayerSpec("sequence", {**last.params, "layers": tuple(inner)}, last.name)
        return layers
    if last.type == "dense":
        units = last.params.get("units")
        if units not in (None, classes):
            raise ConfigError(
                f"layer {len(layers)} (dense): units: the last dense layer outputs one score per "
                f"class ({classes}); leave units out, got {units!r}"
            )
        layers[-1] = LayerSpec("dense", {"units": classes}, last.name)
        return layers
    if last.type == "scale" and len(layers) >= 2 and layers[-2].type == "dense":
        return [*with_head(layers[:-1], classes), last]
    if not any(t in ("flatten", "gap", "gmp") for t in _types(layers)):
        layers.append(LayerSpec("flatten", {}))
    layers.append(LayerSpec("dense", {"units": classes}))
    return layers


def infer_shapes(layers: list[LayerSpec], in_shape: tuple[int, int, int]) -> list[LayerInfo]:
    """Each layer's output shape, parameter count and FLOPs for one ``(C, H, W)`` image."""
    return infer_list(layers, tuple(in_shape))
