"""The layers of the learning material as a validated list, and the shapes they produce.

A network is a list of layers; each entry in YAML is a bare name (``relu``), a one-key
mapping (``conv: {filters: 12, kernel: 3}``) or a mapping with ``type``. ``parse_layers``
checks every field and says which layer, field and value are wrong; ``infer_shapes`` walks
the list with an input shape and gives each layer's output shape, parameters and FLOPs.

FLOPs count a multiply-add as two operations (conv, dense) and one operation per output value
for ReLU, GELU, batchnorm and dropout, ``kernel * kernel`` per output for pooling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cnnkit.errors import ConfigError

__all__ = ["LAYER_FIELDS", "LayerInfo", "LayerSpec", "infer_shapes", "parse_layers"]

# type -> {field: default}; a default of ... means required.
LAYER_FIELDS: dict[str, dict[str, Any]] = {
    "conv": {"filters": ..., "kernel": 3, "stride": 1, "padding": "same", "bias": True},
    "relu": {},
    "gelu": {},
    "maxpool": {"kernel": 2, "stride": None, "padding": 0},
    "avgpool": {"kernel": 2, "stride": None, "padding": 0},
    "gap": {},  # global average pooling: (C, H, W) -> (C,)
    "gmp": {},  # global max pooling: (C, H, W) -> (C,), "is this feature anywhere?"
    "dropout2d": {"rate": 0.2},
    "dropout": {"rate": 0.5},
    "batchnorm": {"momentum": 0.1, "eps": 1e-5, "scale": True},  # scale: learn the gain
    "flatten": {},
    "dense": {"units": None},
    "scale": {"factor": 1.0},  # multiply by a constant: tempers the logits of a fast model
    # Frozen patch whitening (the CIFAR-10 speed records' first layer): a kernel x kernel conv
    # whose filters are set from the training images' patch covariance, not learned.
    "whiten": {"kernel": 2, "eps": 5e-4},
}
ALIASES = {
    "conv2d": "conv",
    "linear": "dense",
    "fc": "dense",
    "pool": "maxpool",
    "maxpool2d": "maxpool",
    "batchnorm2d": "batchnorm",
    "bn": "batchnorm",
    "global_avgpool": "gap",
    "global_maxpool": "gmp",
}


@dataclass(frozen=True)
class LayerSpec:
    """One validated layer: its type and every field with defaults filled in."""

    type: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **self.params}


@dataclass(frozen=True)
class LayerInfo:
    """What a layer does to one image: shapes (C, H, W) or (N,), parameters and FLOPs."""

    name: str
    spec: LayerSpec
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    params: int
    flops: int


def _where(i: int, kind: str) -> str:
    return f"layer {i + 1} ({kind})"


def _int(i: int, kind: str, name: str, value: Any, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        want = "a positive integer" if lo == 1 else f"an integer >= {lo}"
        raise ConfigError(f"{_where(i, kind)}: {name}: expected {want}, got {value!r}")
    return value


def _rate(i: int, kind: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ConfigError(
            f"{_where(i, kind)}: rate: expected a number from 0 to below 1, got {value!r}"
        )
    return float(value)


def _one(i: int, raw: Any) -> LayerSpec:
    if isinstance(raw, str):
        kind, given = raw, {}
    elif isinstance(raw, Mapping) and "type" in raw:
        kind, given = raw["type"], {k: v for k, v in raw.items() if k != "type"}
    elif isinstance(raw, Mapping) and len(raw) == 1:
        ((kind, given),) = raw.items()
        if given is None:
            given = {}
        elif not isinstance(given, Mapping):
            raise ConfigError(
                f"layer {i + 1} ({kind}): expected a mapping of settings, got {given!r}"
            )
    else:
        raise ConfigError(
            f"layer {i + 1}: expected a layer name or a mapping like "
            f"'conv: {{filters: 12}}', got {raw!r}"
        )
    if not isinstance(kind, str):
        raise ConfigError(f"layer {i + 1}: type: expected a layer name, got {kind!r}")
    kind = ALIASES.get(kind.lower(), kind.lower())
    if kind not in LAYER_FIELDS:
        raise ConfigError(
            f"layer {i + 1}: unknown layer type {kind!r}, expected one of {', '.join(LAYER_FIELDS)}"
        )
    defaults = LAYER_FIELDS[kind]
    for key in given:
        if key not in defaults:
            allowed = ", ".join(defaults) or "no settings"
            raise ConfigError(f"{_where(i, kind)}: unknown field {key!r} (allowed: {allowed})")
    params = {**defaults, **given}
    missing = [k for k, v in params.items() if v is ...]
    if missing:
        raise ConfigError(f"{_where(i, kind)}: {missing[0]}: required")
    if kind == "conv":
        _int(i, kind, "filters", params["filters"])
        k = _int(i, kind, "kernel", params["kernel"])
        _int(i, kind, "stride", params["stride"])
        pad = params["padding"]
        if pad == "same":
            if k % 2 == 0:
                raise ConfigError(
                    f"{_where(i, kind)}: padding: 'same' needs an odd kernel, got kernel {k}"
                )
            params["padding"] = k // 2
        elif pad == "valid":
            params["padding"] = 0
        else:
            _int(i, kind, "padding", pad, lo=0)
        if not isinstance(params["bias"], bool):
            raise ConfigError(
                f"{_where(i, kind)}: bias: expected true or false, got {params['bias']!r}"
            )
    elif kind in ("maxpool", "avgpool"):
        k = _int(i, kind, "kernel", params["kernel"])
        if params["stride"] is None:
            params["stride"] = k
        _int(i, kind, "stride", params["stride"])
        _int(i, kind, "padding", params["padding"], lo=0)
        if params["padding"] * 2 > k:
            raise ConfigError(
                f"{_where(i, kind)}: padding: at most half the kernel ({k // 2}), "
                f"got {params['padding']}"
            )
    elif kind in ("dropout", "dropout2d"):
        params["rate"] = _rate(i, kind, params["rate"])
    elif kind == "dense" and params["units"] is not None:
        _int(i, kind, "units", params["units"])
    elif kind == "batchnorm":
        if not isinstance(params["scale"], bool):
            raise ConfigError(
                f"{_where(i, kind)}: scale: expected true or false, got {params['scale']!r}"
            )
        for name in ("momentum", "eps"):
            v = params[name]
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < 1:
                raise ConfigError(
                    f"{_where(i, kind)}: {name}: expected a number between 0 and 1, got {v!r}"
                )
    elif kind == "whiten":
        _int(i, kind, "kernel", params["kernel"])
        eps = params["eps"]
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
            raise ConfigError(f"{_where(i, kind)}: eps: expected a positive number, got {eps!r}")
    elif kind == "scale":
        v = params["factor"]
        if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
            raise ConfigError(f"{_where(i, kind)}: factor: expected a positive number, got {v!r}")
    return LayerSpec(kind, params)


def parse_layers(raw: Any) -> list[LayerSpec]:
    """Validate a list of layer entries (see the module docstring) into ``LayerSpec``s."""
    if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
        raise ConfigError(f"layers: expected a non-empty list of layers, got {raw!r}")
    return [_one(i, entry) for i, entry in enumerate(raw)]


def with_head(layers: list[LayerSpec], classes: int) -> list[LayerSpec]:
    """Size the last dense layer to ``classes``, appending flatten and dense when missing."""
    layers = list(layers)
    last = layers[-1]
    if last.type == "dense":
        units = last.params.get("units")
        if units not in (None, classes):
            raise ConfigError(
                f"layer {len(layers)} (dense): units: the last dense layer outputs one score per "
                f"class ({classes}); leave units out, got {units!r}"
            )
        layers[-1] = LayerSpec("dense", {"units": classes})
        return layers
    if last.type == "scale" and len(layers) >= 2 and layers[-2].type == "dense":
        return [*with_head(layers[:-1], classes), last]
    if not any(s.type in ("flatten", "gap", "gmp") for s in layers):
        layers.append(LayerSpec("flatten", {}))
    layers.append(LayerSpec("dense", {"units": classes}))
    return layers


def infer_shapes(layers: list[LayerSpec], in_shape: tuple[int, int, int]) -> list[LayerInfo]:
    """Each layer's output shape, parameter count and FLOPs for one ``(C, H, W)`` image."""
    infos: list[LayerInfo] = []
    shape: tuple[int, ...] = in_shape
    counts: dict[str, int] = {}
    for i, spec in enumerate(layers):
        p, kind = spec.params, spec.type
        counts[kind] = counts.get(kind, 0) + 1
        name = f"{kind}{counts[kind]}"
        params = flops = 0
        if (
            kind in ("conv", "maxpool", "avgpool", "batchnorm", "dropout2d", "gap", "gmp")
            and len(shape) != 3
        ):
            raise ConfigError(
                f"{_where(i, kind)}: needs feature maps (C, H, W) as input, got a "
                f"vector of {shape[0]} after a flatten"
            )
        if kind == "conv":
            c, h, w = shape
            k, s, pad = p["kernel"], p["stride"], p["padding"]
            ho, wo = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
            if ho < 1 or wo < 1:
                raise ConfigError(
                    f"{_where(i, kind)}: a {k}x{k} kernel does not fit the "
                    f"{h}x{w} input; use a larger image size or fewer layers"
                )
            out = (p["filters"], ho, wo)
            params = p["filters"] * c * k * k + (p["filters"] if p["bias"] else 0)
            flops = 2 * c * k * k * p["filters"] * ho * wo
        elif kind == "whiten":
            c, h, w = shape
            k = p["kernel"]
            ho, wo = h - k + 1, w - k + 1
            if ho < 1 or wo < 1:
                raise ConfigError(
                    f"{_where(i, kind)}: a {k}x{k} kernel does not fit the {h}x{w} input"
                )
            out = (2 * c * k * k, ho, wo)
            params = 2 * c * k * k * c * k * k  # frozen: set from the data, not trained
            flops = 2 * c * k * k * out[0] * ho * wo
        elif kind in ("maxpool", "avgpool"):
            c, h, w = shape
            k, s, pad = p["kernel"], p["stride"], p["padding"]
            ho, wo = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
            if ho < 1 or wo < 1:
                raise ConfigError(
                    f"{_where(i, kind)}: a {k}x{k} window does not fit the "
                    f"{h}x{w} input; use a larger image size or fewer layers"
                )
            out = (c, ho, wo)
            flops = c * ho * wo * k * k
        elif kind in ("gap", "gmp"):
            out = (shape[0],)
            flops = shape[0] * shape[1] * shape[2]
        elif kind == "flatten":
            n = 1
            for d in shape:
                n *= d
            out = (n,)
        elif kind == "dense":
            if len(shape) != 1:
                raise ConfigError(
                    f"{_where(i, kind)}: needs a vector as input; put a flatten "
                    f"or gap layer before it (input is {shape})"
                )
            units = p["units"]
            if units is None:
                raise ConfigError(
                    f"{_where(i, kind)}: units: required except on the last dense layer"
                )
            out = (units,)
            params = shape[0] * units + units
            flops = 2 * shape[0] * units
        else:  # relu, gelu, dropout, dropout2d, batchnorm, scale: shape unchanged
            out = shape
            n = 1
            for d in shape:
                n *= d
            flops = n * (2 if kind == "batchnorm" else 1)
            if kind == "batchnorm":
                params = 2 * shape[0]
        infos.append(LayerInfo(name, spec, tuple(shape), tuple(out), params, flops))
        shape = out
    return infos
