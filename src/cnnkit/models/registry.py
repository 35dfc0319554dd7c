"""Presets by name, layer files by path: one way to turn ``--model X`` into a ``Network``.

``--model auto`` (the default) picks the preset and its input size from measurable facts of
the data (``cnnkit.data.facts``): how large the images typically are, whether they are
greyscale and how many will train, never from the folder's name.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnkit.config import (
    INPUT_SIDES_TEXT,
    RunConfig,
    TrainConfig,
    input_side_ok,
    load_yaml,
    parse_yaml,
)
from cnnkit.errors import ConfigError
from cnnkit.models.layers import LayerSpec, infer_shapes, parse_layers, with_head
from cnnkit.models.limits import check_budget
from cnnkit.models.network import Network

if TYPE_CHECKING:
    from cnnkit.data.facts import DataFacts

__all__ = [
    "AUTO",
    "AutoChoice",
    "ModelSpec",
    "build_network",
    "choose_model",
    "list_presets",
    "load_model_spec",
]

log = logging.getLogger("cnnkit")
RECOMMENDABLE = ("augment", "train")  # the sections a model may recommend settings for

DEFAULT_INPUT_SIZE = 128

AUTO = "auto"
# The mnist and cifar presets were built for images of at most 32 pixels a side, which they
# take at their native size; larger images go to the general preset.
SMALL_SIDE = 32
# Their recipes train for few, large steps: one epoch of 60,000 digits (468 steps of 128) and
# seven of 50,000 photos (350 steps of 1000). With under 300 steps their short schedules end
# before the network has learnt, so smaller data sets go to the general preset (20 epochs,
# stopped early by patience) instead.
MIN_RECIPE_STEPS = 300
# Three 2x2 poolings must leave a feature map of at least 2x2 pixels.
MIN_SIDE = 16


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
    # Training settings for a run that starts from weights (``train.weights``): fine-tuning
    # (``training.phases``). They replace ``recommended``'s, section by section, field by field.
    finetune: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, hash=False)

    def settings(self, from_weights: bool = False) -> dict[str, dict[str, Any]]:
        """The recommended settings by section, with ``finetune``'s over them when the run
        starts from weights."""
        out = {section: dict(values) for section, values in self.recommended.items()}
        for section, values in (self.finetune if from_weights else {}).items():
            out.setdefault(section, {}).update(values)
        return out

    def recommended_settings(
        self, skip: set[str] | frozenset[str] = frozenset(), from_weights: bool = False
    ) -> list[str]:
        """``["train.epochs=1", ...]``, leaving out the dotted names in ``skip``."""
        return [
            f"{section}.{name}={value}"
            for section, values in self.settings(from_weights).items()
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
    allowed = (
        "name", "description", "input_size", "layers", "recommended", "pretrained", "finetune",
    )  # fmt: skip
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(f"{origin}: unknown field {unknown[0]!r} (allowed: {', '.join(allowed)})")
    size = raw.get("input_size", DEFAULT_INPUT_SIZE)
    if not input_side_ok(size):
        raise ConfigError(f"{origin}: input_size: {INPUT_SIDES_TEXT}, got {size!r}")
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
        _recommended(raw.get("finetune"), origin, "finetune"),
    )


def _pretrained(raw: Any, origin: str) -> dict[str, dict[str, Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not all(isinstance(v, Mapping) for v in raw.values()):
        raise ConfigError(f"{origin}: pretrained: expected a mapping of weight names, got {raw!r}")
    return {str(name): dict(values) for name, values in raw.items()}


def _recommended(raw: Any, origin: str, key: str = "recommended") -> dict[str, dict[str, Any]]:
    """Validated recommended settings: each must make a valid config section."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{origin}: {key}: expected a mapping of sections, got {raw!r}")
    unknown = sorted(set(raw) - set(RECOMMENDABLE))
    if unknown:
        raise ConfigError(
            f"{origin}: {key}: unknown section {unknown[0]!r}, "
            f"expected {' or '.join(RECOMMENDABLE)}"
        )
    try:
        RunConfig.from_dict(dict(raw))  # every field known, every value in range
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {key}: {exc}") from None
    return {section: dict(values or {}) for section, values in raw.items()}


@dataclass(frozen=True)
class AutoChoice:
    """What ``--model auto`` chose for a data set, and why, in one sentence."""

    model: str
    image_size: int
    why: str

    def describe(self) -> str:
        return f"model auto: {self.model} at {self.image_size}x{self.image_size} px ({self.why})"


def _recipe_steps(spec: ModelSpec, train_images: int) -> int:
    """Optimiser steps the preset's recommended recipe takes on ``train_images`` images."""
    train = {**dataclasses.asdict(TrainConfig()), **spec.recommended.get("train", {})}
    return int(train["epochs"]) * (train_images // int(train["batch_size"]))


def choose_model(
    facts: DataFacts, image_size: int | None = None, channels: int | None = None
) -> AutoChoice:
    """The preset and input size for data with these ``facts``.

    Small images (at most 32 px, or ``image_size`` when given) keep their native size: the
    ``mnist`` preset when greyscale, ``cifar`` when in colour, if there are enough images for
    that preset's recipe (``MIN_RECIPE_STEPS``). Everything else trains ``fast``, at 64 px or
    the images' own size when smaller (never upscaled, except to ``MIN_SIDE``).
    """
    side = image_size or facts.side
    grey = facts.greyscale if channels is None else channels == 1
    described = facts.describe()
    if side is None:
        fast = load_model_spec("fast").input_size
        return AutoChoice("fast", fast, f"{described}: the general preset at its own size")
    if side <= SMALL_SIDE:
        preset = "mnist" if grey else "cifar"
        steps = _recipe_steps(load_model_spec(preset), facts.train_images)
        size = image_size or max(MIN_SIDE, side)
        kind = "greyscale" if grey else "colour"
        regime = f"small {kind} images" if image_size is None else f"{kind} at {side} px"
        if steps >= MIN_RECIPE_STEPS:
            why = f"{described}: {regime}, enough for {preset}'s recipe ({steps} steps)"
            return AutoChoice(preset, size, why)
        why = (
            f"{described}: {regime}, too few for {preset}'s recipe ({steps} of "
            f"{MIN_RECIPE_STEPS} steps), so the general preset at their own size"
        )
        return AutoChoice("fast", size, why)
    fast = load_model_spec("fast").input_size
    size = image_size or min(fast, side)
    own = "at their own size" if size == side else f"scaled to {size} px"
    return AutoChoice("fast", size, f"{described}: the general preset, {own}")


@functools.cache
def _preset(name: str) -> ModelSpec:
    """A built-in preset, parsed once per process (the files ship with cnnkit)."""
    origin = f"preset {name!r}"
    return _from_mapping(parse_yaml(_preset_files()[name].read_bytes(), origin), origin)


def load_model_spec(name_or_path: str) -> ModelSpec:
    """A preset by name (``seed``, ``fast``, ...) or a YAML file of layers."""
    if name_or_path in _preset_files():
        return _preset(name_or_path)
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
    full, in_shape = with_head(list(layers), classes), (channels, size, size)
    check_budget(infer_shapes(full, in_shape))  # before a single weight is allocated
    return Network(full, in_shape)
