"""Presets by name, layer files by path: one way to turn ``--model X`` into a ``Network``."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from cnnkit.config import load_yaml
from cnnkit.errors import ConfigError
from cnnkit.models.layers import LayerSpec, parse_layers, with_head
from cnnkit.models.network import Network

__all__ = ["ModelSpec", "build_network", "list_presets", "load_model_spec"]

DEFAULT_INPUT_SIZE = 128


@dataclass(frozen=True)
class ModelSpec:
    """A named layer list and the input size it was designed for."""

    name: str
    input_size: int
    layers: tuple[LayerSpec, ...]
    description: str = ""


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
    unknown = sorted(set(raw) - {"name", "description", "input_size", "layers"})
    if unknown:
        raise ConfigError(
            f"{origin}: unknown field {unknown[0]!r} "
            "(allowed: name, description, input_size, layers)"
        )
    size = raw.get("input_size", DEFAULT_INPUT_SIZE)
    if isinstance(size, bool) or not isinstance(size, int) or not 4 <= size <= 1024:
        raise ConfigError(f"{origin}: input_size: expected 4 to 1024 pixels, got {size!r}")
    try:
        layers = parse_layers(raw.get("layers"))
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    return ModelSpec(
        str(raw.get("name", origin)), size, tuple(layers), str(raw.get("description", ""))
    )


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
