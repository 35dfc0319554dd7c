"""Presets by name, layer files by path: one way to turn ``--model X`` into a ``Network``.

``--model auto`` (the default) picks the preset and its input size from measurable facts of
the data (``cnnkit.data.facts``): how large the images typically are, whether they are
greyscale and how many will train, never from the folder's name.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnkit.config import RunConfig, TrainConfig, load_yaml, merge_overrides, parse_yaml
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
    "resolve_model",
    "resolve_run_config",
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
    facts: DataFacts, image_size: int | None = None, channels: str = "auto"
) -> AutoChoice:
    """The preset and input size for data with these ``facts``.

    Small images (at most 32 px, or ``image_size`` when given) keep their native size: the
    ``mnist`` preset when greyscale, ``cifar`` when in colour, if there are enough images for
    that preset's recipe (``MIN_RECIPE_STEPS``). Everything else trains ``fast``, at 64 px or
    the images' own size when smaller (never upscaled, except to ``MIN_SIDE``).
    """
    side = image_size or facts.side
    grey = facts.greyscale if str(channels) == "auto" else str(channels) == "1"
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


def resolve_model(config: RunConfig) -> RunConfig:
    """``config`` with model ``auto`` replaced by the preset and input size chosen from its
    data (logged in one line); any other model unchanged. Training settings are kept: see
    ``resolve_run_config`` for the chosen preset's recommended ones."""
    if config.model != AUTO:
        return config
    if config.train.weights is not None:
        return _model_of_weights(config)
    from cnnkit.data.facts import measure_data  # (data and models are siblings: no cycle)

    if not config.data.path:
        raise ConfigError("model auto chooses from the data: data.path is required")
    facts = measure_data(config.data.path, config.data.val_split)
    choice = choose_model(facts, config.data.image_size, config.data.channels)
    if config.train.weights:  # weights that do not exist are the one line such a run prints
        from cnnkit.models.weights import plan_weights  # (it imports this module)

        plan_weights(config.train.weights, load_model_spec(choice.model))
    log.info("%s", choice.describe())
    # Starting from weights, the input size is theirs unless given (``weights.fit_config``).
    size = config.data.image_size if config.train.weights else choice.image_size
    return dataclasses.replace(
        config, model=choice.model, data=dataclasses.replace(config.data, image_size=size)
    )


DEFAULT_PRETRAINED = "efficientnet_lite0"  # its ImageNet weights install with cnnkit


def _network_of_run(run: Path) -> str:
    """The model (preset name or layer file) a run directory was trained with."""
    import json

    try:
        if (run / "model.json").stat().st_size <= 16 << 20:
            name = json.loads((run / "model.json").read_text()).get("model_name")
            if name in list_presets():
                return str(name)
        if (run / "config.yaml").is_file():
            return RunConfig.from_dict(load_yaml(run / "config.yaml")).model
    except (OSError, ValueError, AttributeError, RecursionError, ConfigError) as exc:
        raise ConfigError(f"--weights {run}: cannot tell its network ({exc})") from None
    raise ConfigError(f"--weights {run}: cannot tell its network; name it with --model")


def _model_of_weights(config: RunConfig) -> RunConfig:
    """Model ``auto`` with starting weights: the network those weights are for (a run
    directory's own model; ``imagenet``: the backbone whose weights need no download); a
    file or URL must be told which network it fits."""
    weights = config.train.weights or ""
    run = Path(weights).expanduser()
    if (run / "model.json").is_file():
        model = _network_of_run(run)
        log.info("model auto: %s, the network of the run whose weights start this one", model)
    elif weights == "imagenet":
        model = DEFAULT_PRETRAINED
        log.info("model auto: %s, whose ImageNet weights come with cnnkit", model)
    elif weights.startswith(("http://", "https://")) or run.is_file():
        with_weights = [n for n in list_presets() if load_model_spec(n).pretrained]
        raise ConfigError(
            f"--weights {weights}: say which network the weights are for with --model "
            f"(e.g. {', '.join(with_weights)})"
        )
    else:
        raise ConfigError(f"--weights {weights}: not a file, URL, run directory or 'imagenet'")
    return dataclasses.replace(config, model=model)


def resolve_run_config(raw: Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> RunConfig:
    """The settings of a new run, each from the first that gives it: ``overrides`` (flags,
    keyword arguments; None is "not given"), the config file ``raw``, the model's
    recommended settings, cnnkit's defaults. Says which recommended settings it applied.

    Model ``auto`` (the default) is resolved first, from the data the settings name, so the
    chosen preset's recommended settings apply as if it had been named."""
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(f"config: expected a mapping of sections, got {type(raw).__name__}")
    raw = raw or {}
    model = overrides.get("model") or raw.get("model") or RunConfig().model
    chosen: RunConfig | None = None
    if model == AUTO:
        draft = merge_overrides(RunConfig.from_dict(raw), overrides)
        chosen = resolve_model(dataclasses.replace(draft, model=AUTO))
        model = chosen.model
        overrides = {**overrides, "model": model}
        raw = {**raw, "model": model}
    defaults = None
    train_raw = raw.get("train") if isinstance(raw.get("train"), Mapping) else {}
    from_weights = bool(overrides.get("train.weights") or train_raw.get("weights"))
    if isinstance(model, str):  # (anything else: from_dict below says what is wrong)
        spec = load_model_spec(model)
        defaults = RunConfig.from_dict({"model": model, **spec.settings(from_weights)})
        given = {f"{sec}.{k}" for sec in RECOMMENDABLE for k in (raw.get(sec) or {})}
        given |= {k for k, v in overrides.items() if v is not None}
        applied = spec.recommended_settings(skip=given, from_weights=from_weights)
        if applied:
            what = " for fine-tuning" if from_weights and spec.finetune else ""
            log.info("%s's recommended settings%s: %s", spec.name, what, ", ".join(applied))
    config = merge_overrides(RunConfig.from_dict(raw, defaults=defaults), overrides)
    if chosen is not None and config.data.image_size is None and not from_weights:
        config = dataclasses.replace(
            config, data=dataclasses.replace(config.data, image_size=chosen.data.image_size)
        )
    return config


def load_model_spec(name_or_path: str) -> ModelSpec:
    """A preset by name (``seed``, ``fast``, ...) or a YAML file of layers."""
    presets = _preset_files()
    if name_or_path in presets:
        origin = f"preset {name_or_path!r}"
        return _from_mapping(parse_yaml(presets[name_or_path].read_bytes(), origin), origin)
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
