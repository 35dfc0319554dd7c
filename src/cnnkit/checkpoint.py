"""The one place that saves a trained model and the one place that loads it.

A run directory is the contract between train, evaluate, predict, inspect, export and serve:

    RUN_DIR/model.safetensors   weights (safetensors: loading it cannot run code)
    RUN_DIR/model.json          classes, preprocessing, architecture, cnnkit version

Every file is written to a temporary name, flushed to disk and renamed, so a crash never
leaves a half-written file under its final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from cnnkit import __version__
from cnnkit.errors import CheckpointError, ConfigError, RunDirError
from cnnkit.models.layers import parse_layers
from cnnkit.models.network import Network

__all__ = ["ModelMeta", "atomic_write", "load_model", "save_model"]

WEIGHTS = "model.safetensors"
META = "model.json"


@dataclass(frozen=True)
class ModelMeta:
    """Everything needed to rebuild a model and feed it exactly as in training."""

    classes: tuple[str, ...]
    channels: int
    image_size: int
    resize: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    architecture: tuple[dict[str, Any], ...]
    model_name: str = ""
    tta: bool = False  # average each image's prediction with its mirror image's
    cnnkit_version: str = __version__
    # Where the starting weights came from ({"source": "imagenet", "sha256": ...}), if any.
    weights: dict[str, str] | None = None

    def to_json(self) -> str:
        data = asdict(self)
        data["preprocessing"] = {
            "input_size": self.image_size,
            "channels": self.channels,
            "resize": self.resize,
            "scale": "pixel / 255",
            "mean": list(self.mean),
            "std": list(self.std),
            "layout": "NCHW float32, x = (pixel / 255 - mean) / std",
        }
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelMeta:
        data = json.loads(text)
        data.pop("preprocessing", None)
        return cls(
            classes=tuple(data["classes"]),
            channels=int(data["channels"]),
            image_size=int(data["image_size"]),
            resize=str(data["resize"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            architecture=tuple(data["architecture"]),
            model_name=str(data.get("model_name", "")),
            tta=bool(data.get("tta", False)),
            cnnkit_version=str(data.get("cnnkit_version", "")),
            weights=dict(data["weights"]) if data.get("weights") else None,
        )


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` for a temporary file beside ``path``, fsync it, rename it to ``path``.

    A full disk or an unwritable folder raises ``RunDirError``; ``path`` keeps its old contents.
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise RunDirError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


def save_model(run_dir: Path, model: Network, meta: ModelMeta) -> None:
    """Write ``model.safetensors`` and ``model.json`` into ``run_dir``."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(run_dir / WEIGHTS, lambda p: p.write_bytes(safetensors_bytes(tensors)))
    atomic_write(run_dir / META, lambda p: p.write_text(meta.to_json()))


def load_model(run_dir: str | Path) -> tuple[Network, ModelMeta]:
    """Rebuild the network of a run directory in eval mode, with its metadata."""
    root = Path(run_dir)
    if not root.is_dir():
        raise RunDirError(f"not a run directory: {root} does not exist")
    meta_path, weights_path = root / META, root / WEIGHTS
    if not meta_path.is_file() or not weights_path.is_file():
        missing = META if not meta_path.is_file() else WEIGHTS
        raise RunDirError(
            f"not a run directory: {root} has no {missing} (train one with "
            "'cnnkit train DATA --out RUN_DIR')"
        )
    try:
        meta = ModelMeta.from_json(meta_path.read_text())
    except (ValueError, KeyError, TypeError) as exc:
        raise RunDirError(f"{meta_path}: damaged ({exc})") from None
    try:
        layers = parse_layers(list(meta.architecture))
        model = Network(layers, (meta.channels, meta.image_size, meta.image_size))
    except ConfigError as exc:
        raise RunDirError(f"{meta_path}: architecture is invalid ({exc})") from None
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights_path}: not a valid safetensors file ({exc})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        why = first[1].strip() if len(first) > 1 else first[0]
        raise CheckpointError(
            f"{weights_path}: weights do not fit the architecture ({why})"
        ) from None
    model.eval()
    return model, meta


def weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """True when two modules hold identical tensors (used by tests and resume checks)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
