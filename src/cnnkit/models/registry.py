"""Presets by name, layer files by path: one way to turn ``--model X`` into a ``Network``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from cnnkit.config import RunConfig, load_yaml, merge_overrides
from cnnkit.errors import ConfigError
from cnnkit.models.layers import LayerSpec, parse_layers, with_head
from cnnkit.models.network import Network

__all__ = [
    "ModelSpec",
    "build_network",
    "list_presets",
    "load_model_spec",
    "resolve_run_config",
]

log = logging.getLogger("cnnkit")
RECOMMENDABLE = ("augment", "train")  # the sections a model may recommend settings for

DEFAULT_INPUT_SIZE = 128


@dataclass(frozen=True)
class ModelSpec:
    """A named layer list and the input size it was designed for."""

    name: str
    input_size: int
    layers: tuple[LayerSpec, ...]
    description: str = ""
    # Training settings the model was designed with ({"train": {"epochs": 1}, ...}): they
    # replace cnnkit's defaults, and a config file or flag still overrides each of them.
    recommended: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, hash=False)
    # Weights published for this network, by name (``imagenet``): where they come from and
    # the preprocessing they expect (read by ``cnnkit.models.weights``).
    pretrained: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, hash=False)

    def recommended_settings(self, skip: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """``["train.epochs=1", ...]``, leaving out the dotted names in ``skip``."""
        return [
            f"{section}.{name}={value}"
            for section, values in self.recommended.items()
            for name, value in values.items()
            if f"{section}.{name}" not in skip
        ]


def _preset_files() -> dict[str, Any]:
    folder = resources.files("cnnkit") / "presets"
    return {p.name.removesuffix(".yaml"): p for p in folder.iterdir() if p.name.endswith(".yaml")}


def list_presets() -> list[str]:
    """Names of the built-in presets."""
    return sorted(_preset_files())


def _from_mapping(raw: Any, origin: str) -> ModelSpec:
    if isinstance(raw, list):
        raw = {"layers": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: expected a mapping with 'layers' (or a list of layers)")
    allowed = ("name", "description", "input_size", "layers", "recommended", "pretrained")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(f"{origin}: unknown field {unknown[0]!r} (allowed: {', '.join(allowed)})")
    size = raw.get("input_size", DEFAULT_INPUT_SIZE)
    if isinstance(size, bool) or not isinstance(size, int) or not 4 <= size <= 1024:
        raise ConfigError(f"{origin}: input_size: expected 4 to 1024 pixels, got {size!r}")
    try:
        layers = parse_layers(raw.get("layers"))
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    return ModelSpec(
        str(raw.get("name", origin)),
        size,
        tuple(layers),
        str(raw.get("description", "")),
        _recommended(raw.get("recommended"), origin),
        _pretrained(raw.get("pretrained"), origin),
    )


def _pretrained(raw: Any, origin: str) -> dict[str, dict[str, Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not all(isinstance(v, Mapping) for v in raw.values()):
        raise ConfigError(f"{origin}: pretrained: expected a mapping of weight names, got {raw!r}")
    return {str(name): dict(values) for name, values in raw.items()}


def _recommended(raw: Any, origin: str) -> dict[str, dict[str, Any]]:
    """Validated recommended settings: each must make a valid config section."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{origin}: recommended: expected a mapping of sections, got {raw!r}")
    unknown = sorted(set(raw) - set(RECOMMENDABLE))
    if unknown:
        raise ConfigError(
            f"{origin}: recommended: unknown section {unknown[0]!r}, "
            f"expected {' or '.join(RECOMMENDABLE)}"
        )
    try:
        RunConfig.from_dict(dict(raw))  # every field known, every value in range
    except ConfigError as exc:
        raise ConfigError(f"{origin}: recommended: {exc}") from None
    return {section: dict(values or {}) for section, values in raw.items()}


def resolve_run_config(raw: Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> RunConfig:
    """The settings of a new run, each from the first that gives it: ``overrides`` (flags,
    keyword arguments; None is "not given"), the config file ``raw``, the model's
    recommended settings, cnnkit's defaults. Says which recommended settings it applied."""
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(f"config: expected a mapping of sections, got {type(raw).__name__}")
    raw = raw or {}
    model = overrides.get("model") or raw.get("model") or RunConfig().model
    defaults = None
    if isinstance(model, str):  # (anything else: from_dict below says what is wrong)
        spec = load_model_spec(model)
        defaults = RunConfig.from_dict({"model": model, **spec.recommended})
        given = {f"{sec}.{k}" for sec in RECOMMENDABLE for k in (raw.get(sec) or {})}
        given |= {k for k, v in overrides.items() if v is not None}
        applied = spec.recommended_settings(skip=given)
        if applied:
            log.info("%s's recommended settings: %s", spec.name, ", ".join(applied))
    return merge_overrides(RunConfig.from_dict(raw, defaults=defaults), overrides)


def load_model_spec(name_or_path: str) -> ModelSpec:
    """A preset by name (``seed``, ``fast``, ...) or a YAML file of layers."""
    presets = _preset_files()
    if name_or_path in presets:
        raw = yaml.safe_load(presets[name_or_path].read_text())
        return _from_mapping(raw, f"preset {name_or_path!r}")
    path = Path(name_or_path)
    if path.suffix.lower() in (".yaml", ".yml", ".json") or path.exists():
        if not path.is_file():
            raise ConfigError(f"model file not found: {path}")
        return _from_mapping(load_yaml(path), str(path))
    raise ConfigError(
        f"unknown model {name_or_path!r}: not a preset "
        f"({', '.join(list_presets())}) nor a YAML file"
    )


def build_network(
    layers: tuple[LayerSpec, ...] | list[LayerSpec], classes: int, channels: int, size: int
) -> Network:
    """The network for ``classes`` outputs on ``channels`` x ``size`` x ``size`` images."""
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
        raise ConfigError(f"classes: expected at least 2, got {classes!r}")
    return Network(with_head(list(layers), classes), (channels, size, size))
