"""What a layer type is: one record that owns all of its rules, and the loops that use them.

Each layer type (``conv``, ``relu``, ... and the blocks built from them) is one ``LayerType``
subclass registered in ``LAYER_TYPES``. The record owns:

- ``fields``: its settings and their defaults (``...`` means required), and ``aliases``;
- ``check``: validation and normalisation of those settings, with messages that name the
  layer, the field and the value received (``layer 1 (conv): filters: expected a positive
  integer, got 0``);
- ``infer``: its output shape, parameters and FLOPs for a given input shape;
- ``build``: the torch module;
- ``explain``: the plain-words sentence the report and the inspect pages show.

``parse_list``, ``infer_list`` and the ``Network`` are loops over these records, so a new
layer or block is one new record and nothing else changes. FLOPs count a multiply-add as two
operations (conv, dense) and one operation per output value for elementwise layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from cnnkit.errors import ConfigError

__all__ = [
    "LAYER_TYPES",
    "Fields",
    "Inferred",
    "LayerInfo",
    "LayerSpec",
    "LayerType",
    "build_modules",
    "infer_list",
    "parse_entry",
    "parse_list",
    "register",
]

Shape = tuple[int, ...]  # (C, H, W) feature maps or (N,) a vector


@dataclass(frozen=True)
class LayerSpec:
    """One validated layer: its type, every field with defaults filled in, and an optional
    name (the module's name, and so its state-dict key; None: named by position)."""

    type: str
    params: dict[str, Any] = field(default_factory=dict)
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data that ``parse_layers`` turns back into this spec."""
        params = {
            k: [s.to_dict() for s in v] if _is_spec_list(v) else v for k, v in self.params.items()
        }
        named = {"name": self.name} if self.name is not None else {}
        return {"type": self.type, **named, **params}


def _is_spec_list(value: Any) -> bool:
    return isinstance(value, tuple | list) and bool(value) and isinstance(value[0], LayerSpec)


@dataclass(frozen=True)
class LayerInfo:
    """What a layer does to one image: shapes (C, H, W) or (N,), parameters and FLOPs.

    ``name`` is the layer's module path in the network (``conv1``, ``layer1.0``,
    ``features.3``): with ``layers.`` before it, the prefix of its state-dict keys. A block
    lists its own sub-layers in ``inner`` (their parameters and FLOPs are already counted in
    the block's, so totals sum the top-level infos only)."""

    name: str
    spec: LayerSpec
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    params: int
    flops: int
    inner: tuple[LayerInfo, ...] = ()


@dataclass(frozen=True)
class Inferred:
    """A layer type's answer for one input shape."""

    out: Shape
    params: int = 0
    flops: int = 0
    inner: tuple[LayerInfo, ...] = ()


class Fields:
    """A layer's settings being validated: the checks raise with the layer, field and value.

    ``where`` reads ``layer 3 (conv)`` (nested layers: ``layer 5 (basic_block): layer 1
    (conv)``); ``values`` is the settings dict, normalised in place."""

    def __init__(self, where: str, values: dict[str, Any]) -> None:
        self.where, self.values = where, values

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def __setitem__(self, name: str, value: Any) -> None:
        self.values[name] = value

    def fail(self, name: str, why: str) -> ConfigError:
        return ConfigError(f"{self.where}: {name}: {why}")

    def wrong(self, name: str, want: str) -> ConfigError:
        return self.fail(name, f"expected {want}, got {self.values[name]!r}")

    def int(self, name: str, lo: int = 1) -> int:
        value = self.values[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise self.wrong(name, "a positive integer" if lo == 1 else f"an integer >= {lo}")
        return value

    def bool(self, name: str) -> bool:
        if not isinstance(self.values[name], bool):
            raise self.wrong(name, "true or false")
        return self.values[name]

    def number(self, name: str, want: str, ok: Any) -> float:
        """A real number for which ``ok(value)`` holds; ``want`` says which, for the error."""
        value = self.values[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not ok(value)
        ):
            raise self.wrong(name, want)
        return float(value)

    def choice(self, name: str, choices: Sequence[str]) -> str:
        if self.values[name] not in choices:
            raise self.wrong(name, f"one of {', '.join(choices)}")
        return self.values[name]


class LayerType:
    """The rules of one layer type. Subclasses set the class attributes and override what
    differs; ``register`` puts one instance in ``LAYER_TYPES``."""

    kind: ClassVar[str]
    fields: ClassVar[Mapping[str, Any]] = {}
    aliases: ClassVar[tuple[str, ...]] = ()
    explain: ClassVar[str] = ""
    # True when the input must be (C, H, W) feature maps, not a vector.
    needs_maps: ClassVar[bool] = False
    # A group (``sequence``) defines ``flatten(spec, shape, where, path) -> [LayerInfo]``:
    # its layers' infos stand in its place, and it has no module of its own.
    flatten: ClassVar[Any] = None

    def check(self, f: Fields) -> None:
        """Validate and normalise ``f.values`` in place (fields are already known and filled)."""

    def infer(self, spec: LayerSpec, shape: Shape, where: str, path: str) -> Inferred:
        """Output shape, parameters and FLOPs for one image of ``shape``. Default: the shape
        is unchanged and each output value costs one operation."""
        return Inferred(shape, 0, math.prod(shape))

    def build(self, info: LayerInfo) -> nn.Module:
        raise NotImplementedError(f"{self.kind}: no module")


LAYER_TYPES: dict[str, LayerType] = {}
ALIASES: dict[str, str] = {}


def register(record: type[LayerType]) -> type[LayerType]:
    """Class decorator: add one instance of ``record`` to ``LAYER_TYPES`` (and its aliases)."""
    instance = record()
    LAYER_TYPES[record.kind] = instance
    for alias in record.aliases:
        ALIASES[alias] = record.kind
    return record


# --------------------------------------------------------------------------- parsing


def _split_entry(where: str, raw: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(raw, str):
        return raw, {}
    if isinstance(raw, Mapping) and "type" in raw:
        return raw["type"], {k: v for k, v in raw.items() if k != "type"}
    if isinstance(raw, Mapping) and len(raw) == 1:
        ((kind, given),) = raw.items()
        if given is None:
            return kind, {}
        if not isinstance(given, Mapping):
            raise ConfigError(f"{where} ({kind}): expected a mapping of settings, got {given!r}")
        return kind, dict(given)
    raise ConfigError(
        f"{where}: expected a layer name or a mapping like 'conv: {{filters: 12}}', got {raw!r}"
    )


def _check_name(where: str, name: Any) -> str:
    ok = isinstance(name, str) and name != "" and name.replace("_", "a").isalnum()
    if ok and (name.isascii() and not hasattr(nn.Module, name)):
        return name
    raise ConfigError(
        f"{where}: name: expected letters, digits and underscores (not a torch.nn.Module "
        f"attribute), got {name!r}"
    )


def parse_entry(where: str, raw: Any) -> LayerSpec:
    """One layer entry (``relu``, ``conv: {filters: 12}``, ``{type: conv, filters: 12}``)."""
    kind, given = _split_entry(where, raw)
    if not isinstance(kind, str):
        raise ConfigError(f"{where}: type: expected a layer name, got {kind!r}")
    kind = ALIASES.get(kind.lower(), kind.lower())
    if kind not in LAYER_TYPES:
        raise ConfigError(
            f"{where}: unknown layer type {kind!r}, expected one of {', '.join(LAYER_TYPES)}"
        )
    record = LAYER_TYPES[kind]
    where = f"{where} ({kind})"
    name = _check_name(where, given.pop("name")) if "name" in given else None
    for key in given:
        if key not in record.fields:
            allowed = ", ".join(record.fields) or "no settings"
            raise ConfigError(f"{where}: unknown field {key!r} (allowed: {allowed})")
    values = {**record.fields, **given}
    missing = [k for k, v in values.items() if v is ...]
    if missing:
        raise ConfigError(f"{where}: {missing[0]}: required")
    record.check(Fields(where, values))
    return LayerSpec(kind, values, name)


def parse_list(raw: Any, where: str = "") -> list[LayerSpec]:
    """Validate a list of layer entries; ``where`` prefixes the messages of nested lists."""
    label = f"{where}: layers" if where else "layers"
    if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
        raise ConfigError(f"{label}: expected a non-empty list of layers, got {raw!r}")
    prefix = f"{where}: " if where else ""
    specs = [parse_entry(f"{prefix}layer {i + 1}", entry) for i, entry in enumerate(raw)]
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        if spec.name is not None and spec.name in seen:
            raise ConfigError(
                f"{prefix}layer {i + 1} ({spec.type}): name: {spec.name!r} is already taken"
            )
        seen.add(spec.name or "")
    return specs


# --------------------------------------------------------------------------- shapes


def layer_names(specs: Sequence[LayerSpec], by_index: bool) -> list[str]:
    """Each layer's name: its own, else ``str(position)`` (``by_index``, as in
    ``nn.Sequential``) or type and count (``conv1``, ``relu2``), skipping names taken."""
    taken = {s.name for s in specs if s.name is not None}
    counts: dict[str, int] = {}
    names = []
    for i, spec in enumerate(specs):
        if spec.name is not None:
            names.append(spec.name)
            continue
        if by_index:
            names.append(str(i))
            continue
        while True:
            counts[spec.type] = counts.get(spec.type, 0) + 1
            candidate = f"{spec.type}{counts[spec.type]}"
            if candidate not in taken:
                break
        taken.add(candidate)
        names.append(candidate)
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"name: {twice!r} names two layers; give each layer its own name")
    return names


def infer_list(
    specs: Sequence[LayerSpec],
    shape: Shape,
    where: str = "",
    path: str = "",
    by_index: bool = False,
) -> list[LayerInfo]:
    """Every layer's ``LayerInfo`` in order for one image of ``shape``. A ``sequence`` is
    transparent: its layers appear in its place, named under its path."""
    infos: list[LayerInfo] = []
    prefix = f"{where}: " if where else ""
    for i, (spec, name) in enumerate(zip(specs, layer_names(specs, by_index), strict=True)):
        here = f"{prefix}layer {i + 1} ({spec.type})"
        full = f"{path}.{name}" if path else name
        record = LAYER_TYPES[spec.type]
        if record.needs_maps and len(shape) != 3:
            raise ConfigError(
                f"{here}: needs feature maps (C, H, W) as input, got a vector of {shape[0]} "
                "after a flatten"
            )
        if record.flatten is not None:  # a sequence: its layers stand in its place
            inner = record.flatten(spec, shape, here, full)
            infos += inner
            shape = inner[-1].out_shape
            continue
        got = record.infer(spec, shape, here, full)
        infos.append(
            LayerInfo(full, spec, tuple(shape), tuple(got.out), got.params, got.flops, got.inner)
        )
        shape = got.out
    return infos


# --------------------------------------------------------------------------- modules


def build_modules(infos: Sequence[LayerInfo], root: nn.Module, prefix: str = "") -> None:
    """Put each layer's module at its dotted name (less ``prefix``) under ``root``; the
    groups on the way are ``nn.Sequential`` (``features.0.0`` is ``root.features[0][0]``,
    as in torchvision)."""
    for info in infos:
        *groups, last = info.name.removeprefix(prefix).split(".")
        parent = root
        for part in groups:
            child = parent._modules.get(part)
            if child is None:
                child = nn.Sequential()
                parent.add_module(part, child)
            parent = child
        parent.add_module(last, LAYER_TYPES[info.spec.type].build(info))
