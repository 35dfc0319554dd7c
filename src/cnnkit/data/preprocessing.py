"""How a model's images are fed: one record that travels from the data to every consumer.

A ``Preprocessing`` is made once, from the training data (``prepare_data``) or from the
weights a run starts from (``Pretrained.preprocessing``). The run's ``model.json`` stores it
as one ``"preprocessing"`` object; the ONNX and pt2 exports embed the same object, and the
server's ``GET /model`` answers with it, as timm's pretrained config travels with its weights.

An image is fed by ``load_image(source, size, channels, resize)`` (uint8, ``size`` x ``size``)
then ``to_model_input(batch, mean, std)``: ``x = (pixel / 255 - mean) / std`` per channel; the
record's methods of the same names call them with its own values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from cnnkit.config import INPUT_SIDES_TEXT, RESIZE_MODES, input_side_ok
from cnnkit.data.images import Source, load_image, to_model_input
from cnnkit.errors import ConfigError

__all__ = ["MIN_STD", "Preprocessing"]

MIN_STD = 1e-6  # a smaller normalisation std makes inputs overflow; training clamps at 1e-3


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects: ``size`` x ``size`` images of ``channels`` channels, brought to
    that size by ``resize`` (``crop``, ``squash`` or ``pad``), normalised per channel by
    ``mean`` and ``std`` (of pixels scaled to [0, 1])."""

    size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "crop"

    def __post_init__(self) -> None:
        # Lists from JSON become tuples of floats, so two equal descriptions compare equal.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        self._check_input()
        self._check_normalisation()

    def _check_input(self) -> None:
        """Refuse what cnnkit never writes. A description may come from a file a user was
        handed (``model.json``, an export's metadata): a size of 30,000 pixels or 7 channels
        would otherwise fail later, deep inside a resize or an allocation."""
        if self.channels not in (1, 3):
            raise ConfigError(f"channels: expected 1 or 3, got {self.channels}")
        if not input_side_ok(self.size):
            raise ConfigError(f"size: {INPUT_SIDES_TEXT}, got {self.size}")
        if self.resize not in RESIZE_MODES:
            raise ConfigError(
                f"resize: expected one of {', '.join(RESIZE_MODES)}, got {self.resize!r}"
            )

    def _check_normalisation(self) -> None:
        """Refuse a mean or std that would turn every input into NaN or infinity: a model
        that answers "nan%" is refused when it is loaded, not at its first prediction."""
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != self.channels:
                raise ConfigError(
                    f"normalisation {name} has {len(values)} values for {self.channels} channels"
                )
            for i, value in enumerate(values):
                if not math.isfinite(value):
                    raise ConfigError(f"normalisation {name}[{i}] is {value}: not a finite number")
                if name == "std" and value < MIN_STD:
                    raise ConfigError(
                        f"normalisation std[{i}] is {value}: every input would be divided by it "
                        f"(at least {MIN_STD:g} is needed; training writes at least 0.001)"
                    )

    @property
    def shape(self) -> tuple[int, int, int]:
        """The uint8 image one input is, ``(S, S, C)`` (HWC, as ``load_image`` returns)."""
        return (self.size, self.size, self.channels)

    def load_image(self, source: Source | Image.Image) -> np.ndarray:
        """One image (a path, bytes, a file or a PIL image) as the model is fed it: uint8
        ``(S, S, C)``."""
        return load_image(source, self.size, self.channels, self.resize)

    def to_model_input(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 images ``(B, S, S, C)`` to the normalised float ``(B, C, S, S)`` input."""
        return to_model_input(batch, self.mean, self.std)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``model.json``, the exports and ``GET /model`` carry."""
        return {
            "size": self.size,
            "channels": self.channels,
            "resize": self.resize,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """The inverse of ``to_dict``; ``ConfigError``, ``KeyError``, ``TypeError`` or
        ``ValueError`` for a damaged object (the caller names the file)."""
        return cls(
            size=int(data["size"]),
            channels=int(data["channels"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            resize=str(data["resize"]),
        )

    @classmethod
    def of_model(cls, meta: dict[str, Any]) -> Preprocessing:
        """The preprocessing a decoded ``model.json`` (or an export's copy of it) describes;
        ``ConfigError`` (a ``ValueError``) when it has none, as ``from_dict`` for a damaged one.

        Files written before this record existed keep it in top-level keys (``image_size``,
        ``channels``, ``resize``, ``mean``, ``std``), beside a ``"preprocessing"`` object that
        only repeated them (with ``input_size``): they are read as they were, and saved again
        in the new form."""
        if not isinstance(meta, dict):
            raise TypeError(f"expected a JSON object, got {type(meta).__name__}")
        if "image_size" in meta:  # the old form: cnnkit never writes this key now
            return cls.from_dict({**meta, "size": meta["image_size"]})
        if not isinstance(meta.get("preprocessing"), dict):
            raise ConfigError('no "preprocessing" object (size, channels, resize, mean, std)')
        return cls.from_dict(meta["preprocessing"])
