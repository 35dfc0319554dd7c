"""Typed, frozen configuration for a cnnkit run.

Each stage takes only the piece it uses (``DataConfig``, ``AugmentConfig``, ``TrainConfig``);
``RunConfig`` bundles them with the model description and is written, fully resolved, into
every run directory as ``config.yaml``. Values are checked in ``__post_init__`` so a bad value
fails where it is set, with a message naming the field and the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from cnnkit.errors import ConfigError

__all__ = [
    "AugmentConfig",
    "DataConfig",
    "Overrides",
    "RunConfig",
    "TrainConfig",
    "load_yaml",
    "parse_yaml",
]

RESIZE_MODES = ("crop", "squash", "pad")
OPTIMIZERS = ("adam", "adamw", "sgd", "muon")
SCHEDULES = ("onecycle", "cosine", "linear", "constant")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
# The input sides a model may be fed (its image size), for a setting, a preset or a model file.
INPUT_SIDES = (4, 1024)
INPUT_SIDES_TEXT = f"expected {INPUT_SIDES[0]} to {INPUT_SIDES[1]} pixels"


def input_side_ok(size: object) -> bool:
    """Whether ``size`` is an int (not a bool) within ``INPUT_SIDES``."""
    low, high = INPUT_SIDES
    return isinstance(size, int) and not isinstance(size, bool) and low <= size <= high


def _fail(section: str, name: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{section}.{name}: {why}, got {value!r}")


def _positive_int(section: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(section, name, value, "expected a positive integer")


# Bounds far above any real run, so a typo (10**20 epochs) is an error, not a run that never
# ends: a million images for 100,000 epochs is years of CPU time; 65,536 images of 1024x1024
# make a 200 GB batch.
MAX_EPOCHS = 100_000
MAX_BATCH_SIZE = 65_536


def _at_most(section: str, name: str, value: int, most: int) -> None:
    if value > most:
        raise _fail(section, name, value, f"expected at most {most:,}")


def _choice(section: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise _fail(section, name, value, f"expected one of {', '.join(choices)}")


def _bool(section: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _fail(section, name, value, "expected true or false")


def _number(section: str, name: str, value: Any, lo: float, hi: float) -> None:
    """Check lo <= value <= hi for a real number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(section, name, value, "expected a number")
    if not lo <= value <= hi:
        raise _fail(section, name, value, f"expected a number from {lo:g} to {hi:g}")


def channel_count(value: Any) -> int | None:
    """1, 3 or None (auto) from what a flag, a keyword or a YAML file gives: the numbers or
    their strings (config files written before channels were numbers hold ``"3"``), or
    ``"auto"``."""
    if value is None or value == "auto":
        return None
    if not isinstance(value, bool) and str(value) in ("1", "3"):
        return int(value)
    raise _fail("data", "channels", value, "expected one of auto, 1, 3")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how each is turned into the model's input.

    ``resize`` says how a non-square image reaches ``image_size`` x ``image_size``:
    ``crop`` scales the shorter side to the size and cuts the centre (the default, as
    fastai and Teachable Machine do); ``squash`` stretches the whole image (as Keras does);
    ``pad`` scales the longer side to the size and pads the rest with black.
    """

    path: str = ""
    image_size: int | None = None  # None: the model's own input size
    # 1 or 3; None (auto, also accepted as "auto"): 1 when every image is greyscale, else 3.
    # Only the decode can tell, so it stays None in the settled config unless given.
    channels: int | None = None
    resize: str = "crop"
    val_split: float = 0.2
    seed: int = 0
    strict: bool = False
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("path", "cache_dir"):  # a Path is welcome; it is stored (and saved) as str
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
            elif not isinstance(value, str) and (name == "path" or value is not None):
                raise _fail("data", name, value, "expected a folder path")
        if self.image_size is not None:
            _positive_int("data", "image_size", self.image_size)
            if not input_side_ok(self.image_size):
                raise _fail("data", "image_size", self.image_size, INPUT_SIDES_TEXT)
        object.__setattr__(self, "channels", channel_count(self.channels))
        _choice("data", "resize", self.resize, RESIZE_MODES)
        _number("data", "val_split", self.val_split, 0.0, 0.9)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise _fail("data", "seed", self.seed, "expected an integer")
        _bool("data", "strict", self.strict)


@dataclass(frozen=True)
class AugmentConfig:
    """Random changes drawn anew for every image in every epoch, applied per batch.

    The learning material's flips, mirroring and skewing, plus small rotation, scale and
    translation. Angles are in degrees; ``scale`` is the largest relative zoom (0.1: 90-110%);
    ``translate`` the largest shift as a fraction of the side.
    """

    enabled: bool = True
    hflip: bool = True  # mirror left-right
    vflip: bool = False  # upside down: on for shapes, off for digits and photos
    shear: float = 10.0  # skew, degrees
    rotate: float = 10.0
    scale: float = 0.1
    translate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("enabled", "hflip", "vflip"):
            _bool("augment", name, getattr(self, name))
        _number("augment", "shear", self.shear, 0.0, 45.0)
        _number("augment", "rotate", self.rotate, 0.0, 180.0)
        _number("augment", "scale", self.scale, 0.0, 0.9)
        _number("augment", "translate", self.translate, 0.0, 0.5)


@dataclass(frozen=True)
class TrainConfig:
    """How the optimiser walks: epochs, batches, learning rate and when to stop."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    optimizer: str = "adamw"
    muon_lr: float = 0.24  # optimizer muon: step size of the convolution filters' updates
    weight_decay: float = 5e-4
    momentum: float = 0.9  # SGD's Nesterov momentum; with muon, that of the filters
    schedule: str = "onecycle"
    label_smoothing: float = 0.0
    # Epochs without a better validation accuracy (or, below 100%, a lower validation loss at
    # the same accuracy) before stopping; 0 or None: never stop early.
    patience: int | None = 5
    target_accuracy: float | None = None  # stop once validation accuracy reaches this
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    checkpoint_every: int | None = None  # steps between mid-epoch checkpoints (and each epoch)
    deterministic: bool = False  # deterministic kernels: a resumed run matches bit for bit
    sync_bn: bool = False  # synchronise batchnorm statistics across processes (GPU)
    ema: float | None = None  # keep an exponential moving average of weights (e.g. 0.99)
    tta: bool = False  # validate on each image and its mirror image, averaged
    threads: int | None = None  # torch's CPU threads; None: as many as the CPUs free to use

    # Starting weights: imagenet (the preset's published ones), a .pth/.safetensors file, a
    # URL or a run directory (cnnkit.models.weights); None: random initialisation.
    weights: str | None = None
    weights_sha256: str | None = None  # the run records it; when given, the file must match
    # Fine-tuning from ``weights`` (``cnnkit.training.phases``): the first ``freeze_epochs``
    # of the ``epochs`` train only the layers after the backbone's global pooling (the new
    # head) on features computed once per image and cached; the epochs after them train the
    # whole network, the backbone at ``lr * backbone_lr_factor``, its batchnorm statistics
    # kept as the weights had them when ``freeze_bn``. Without weights nothing is frozen.
    freeze_epochs: int = 0
    backbone_lr_factor: float = 1.0
    freeze_bn: bool = False

    def __post_init__(self) -> None:
        _positive_int("train", "epochs", self.epochs)
        _at_most("train", "epochs", self.epochs, MAX_EPOCHS)
        if self.weights is not None and (not isinstance(self.weights, str) or not self.weights):
            raise _fail(
                "train",
                "weights",
                self.weights,
                "expected imagenet, a file, a URL or a run directory",
            )
        if self.weights_sha256 is not None and not (
            isinstance(self.weights_sha256, str)
            and len(self.weights_sha256) == 64
            and all(c in "0123456789abcdef" for c in self.weights_sha256)
        ):
            raise _fail("train", "weights_sha256", self.weights_sha256, "expected 64 hex digits")
        frozen = self.freeze_epochs
        if isinstance(frozen, bool) or not isinstance(frozen, int) or frozen < 0:
            raise _fail("train", "freeze_epochs", frozen, "expected 0 or more epochs")
        _at_most("train", "freeze_epochs", self.freeze_epochs, MAX_EPOCHS)
        _number("train", "backbone_lr_factor", self.backbone_lr_factor, 1e-6, 10.0)
        if self.checkpoint_every is not None:
            _positive_int("train", "checkpoint_every", self.checkpoint_every)
        if self.ema is not None:
            _number("train", "ema", self.ema, 0.0, 0.99999)
        for name in ("deterministic", "sync_bn", "tta", "freeze_bn"):
            _bool("train", name, getattr(self, name))
        _positive_int("train", "batch_size", self.batch_size)
        _at_most("train", "batch_size", self.batch_size, MAX_BATCH_SIZE)
        if not isinstance(self.lr, int | float) or isinstance(self.lr, bool) or not self.lr > 0:
            raise _fail("train", "lr", self.lr, "expected a positive number")
        _number("train", "lr", self.lr, 0.0, 10.0)
        _number("train", "muon_lr", self.muon_lr, 1e-9, 10.0)
        _choice("train", "optimizer", self.optimizer, OPTIMIZERS)
        _number("train", "weight_decay", self.weight_decay, 0.0, 1.0)
        _number("train", "momentum", self.momentum, 0.0, 0.999)
        _choice("train", "schedule", self.schedule, SCHEDULES)
        _number("train", "label_smoothing", self.label_smoothing, 0.0, 0.5)
        if self.patience is not None:  # 0: never stop early
            patience = self.patience
            if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
                raise _fail("train", "patience", patience, "expected 0 (never stop early) or more")
            _at_most("train", "patience", patience, MAX_EPOCHS)
        if self.threads is not None:
            _positive_int("train", "threads", self.threads)
        if self.target_accuracy is not None:
            _number("train", "target_accuracy", self.target_accuracy, 0.0, 1.0)
        _choice("train", "device", self.device, DEVICES)
        _choice("train", "precision", self.precision, PRECISIONS)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise _fail("train", "seed", self.seed, "expected an integer")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a training run; written to ``RUN_DIR/config.yaml``."""

    model: str = "auto"  # a preset name, a YAML file, or auto: chosen from the data
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], defaults: RunConfig | None = None) -> RunConfig:
        """Build from a plain mapping (a parsed YAML file); unknown keys are errors.

        What ``raw`` leaves out comes from ``defaults`` (the dataclasses' own defaults when
        None; a model's recommended settings when given).
        """
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config: expected a mapping of sections, got {type(raw).__name__}")
        known = {"model", "data", "augment", "train"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(
                f"config: unknown section {unknown[0]!r}, expected {', '.join(sorted(known))}"
            )
        base = defaults or cls()
        model = raw.get("model", base.model)
        if not isinstance(model, str):
            raise ConfigError(f"config.model: expected a preset name or file, got {model!r}")
        return cls(
            model=model,
            data=_section(base.data, "data", raw.get("data")),
            augment=_section(base.augment, "augment", raw.get("augment")),
            train=_section(base.train, "train", raw.get("train")),
        )

    def save(self, path: Path) -> None:
        path.write_text(yaml.dump(self.to_dict(), Dumper=_PlainDumper, sort_keys=False))


SECTIONS: dict[str, type] = {"data": DataConfig, "augment": AugmentConfig, "train": TrainConfig}


def _section(base: Any, name: str, raw: Any) -> Any:
    """``base`` (a section dataclass) with the fields that ``raw`` sets; every value is checked
    by the section's own ``__post_init__``."""
    if raw is None:
        return base
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config.{name}: expected a mapping, got {raw!r}")
    names = {f.name for f in fields(base)}
    for key in raw:
        if key not in names:
            raise ConfigError(
                f"config.{name}: unknown field {key!r}, expected one of {', '.join(sorted(names))}"
            )
    try:
        return dataclasses.replace(base, **raw)
    except TypeError as exc:  # the one place a value of an impossible type would surface
        raise ConfigError(f"config.{name}: {exc}") from None


def _owners() -> dict[str, str]:
    """Each setting's section by its name; ``seed`` (data and train) and ``enabled``
    (augment: the ``augment`` argument) are set by ``Overrides.of``'s own arguments."""
    owners: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            if f.name not in ("seed", "enabled"):
                owners[f.name] = section
    return owners


@dataclass(frozen=True)
class Overrides:
    """Settings given by name, with their own types: what ``cnnkit train``'s flags or
    ``cnnkit.train``'s keyword arguments set, above the config file, the model's
    recommended settings and the defaults. Holds only the settings given."""

    model: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    augment: Mapping[str, Any] = field(default_factory=dict)
    train: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        *,
        model: str | None = None,
        seed: int | None = None,
        augment: bool | None = None,
        **settings: Any,
    ) -> Overrides:
        """By the names ``cnnkit train`` knows them (``epochs=3``, ``image_size=64``,
        ``path="shapes/"``); None is "not given". ``seed`` seeds the split and the training,
        ``augment`` turns augmentation on or off."""
        owners = _owners()
        sections: dict[str, dict[str, Any]] = {"data": {}, "augment": {}, "train": {}}
        for name, value in settings.items():
            if name not in owners:
                close = difflib.get_close_matches(name, owners, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"unknown setting {name!r}{hint}")
            if value is not None:
                sections[owners[name]][name] = value
        if seed is not None:
            sections["data"]["seed"] = sections["train"]["seed"] = seed
        if augment is not None:
            sections["augment"]["enabled"] = augment
        return cls(model, **sections)

    def given(self) -> set[str]:
        """The settings given, as ``section.name``."""
        return {f"{s}.{k}" for s in SECTIONS for k in getattr(self, s)}

    def apply(self, config: RunConfig) -> RunConfig:
        """``config`` with these settings in place of its own."""
        return RunConfig(
            model=self.model or config.model,
            **{s: _section(getattr(config, s), s, getattr(self, s)) for s in SECTIONS},
        )


# Bounds on every YAML file cnnkit reads (configs, run directories, presets, model files).
# A real config is a few hundred bytes and a layer file a few kilobytes (1,000 layers, the
# most cnnkit builds, fit in 64 KB); PyYAML reads about 150 KB a second on a busy core.
# The deepest nesting a model file needs is five levels (file, layers, layer, settings).
MAX_YAML_BYTES = 256 << 10
MAX_YAML_DEPTH = 64


class _Refused(yaml.YAMLError):
    """What ``_StrictLoader`` refuses, with the line it found it on."""

    def __init__(self, why: str, mark: Any) -> None:
        super().__init__(why)
        self.why, self.problem_mark = why, mark


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader without anchors and aliases, and with a bounded nesting depth.

    An alias makes a node appear again wherever it is named, so a 1 KB file of aliases of
    aliases expands into billions of nodes (an "alias bomb"): refusing the first anchor or
    alias, before anything is built, costs nothing. cnnkit writes neither. The depth bound
    turns a file of ten thousand ``[`` into an error instead of a ``RecursionError``.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused("anchors and aliases (&name, *name) are not accepted", event.start_mark)
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise _Refused(f"nested deeper than {MAX_YAML_DEPTH} levels", event.start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _PlainDumper(yaml.SafeDumper):
    """Writes every value in full: no anchors, so ``_StrictLoader`` reads back what it wrote."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def parse_yaml(data: bytes | str, origin: str) -> Any:
    """Parse YAML text through cnnkit's one loader: safe tags only, no anchors or aliases,
    at most ``MAX_YAML_BYTES`` and ``MAX_YAML_DEPTH`` levels. ``origin`` names the source in
    the one-line ``ConfigError`` a bad file gets."""
    size = len(data.encode() if isinstance(data, str) else data)
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"{origin}: over {MAX_YAML_BYTES:,} bytes, too large for a YAML file")
    try:
        loader = _StrictLoader(data)  # reads the first bytes already: may raise ReaderError
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except _Refused as exc:
        line = exc.problem_mark.line + 1
        raise ConfigError(f"{origin}: {exc.why} (line {line})") from None
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"{origin}: not valid YAML{line}") from None
    except ValueError:  # Python's int() refuses integers of more than 4,300 digits
        raise ConfigError(f"{origin}: not valid YAML (a number too long to read)") from None


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file through ``parse_yaml``, with a one-line error for a missing, oversized
    or malformed file. Reads at most one byte past the limit, whatever the file claims."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc.strerror or exc}") from None
    return parse_yaml(data, str(p))
