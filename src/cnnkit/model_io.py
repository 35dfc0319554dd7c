"""The one place that saves a trained model and the one place that loads it.

A run directory is the contract between train, evaluate, predict, inspect, export and serve:

    RUN_DIR/model.safetensors   weights (safetensors: loading it cannot run code)
    RUN_DIR/model.json          classes, preprocessing, architecture, cnnkit version

Every file is written to a temporary name, flushed to disk and renamed, so a crash never
leaves a half-written file under its final name.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from cnnkit._version import __version__
from cnnkit.data.preprocessing import Preprocessing
from cnnkit.errors import CheckpointError, ConfigError, RunDirError
from cnnkit.files import atomic_write
from cnnkit.models.layers import infer_shapes, parse_layers
from cnnkit.models.limits import check_budget, check_layer_count
from cnnkit.models.network import Network

__all__ = ["ModelMeta", "load_model", "save_model"]

WEIGHTS = "model.safetensors"
META = "model.json"
MAX_META_BYTES = 16 << 20  # model.json: classes and layers; a real one is a few kilobytes
MAX_CLASSES = 100_000


@dataclass(frozen=True)
class ModelMeta:
    """Everything needed to rebuild a model and feed it exactly as in training."""

    classes: tuple[str, ...]
    preprocessing: Preprocessing  # size, channels, resize, mean, std
    architecture: tuple[dict[str, Any], ...]
    model_name: str = ""
    tta: bool = False  # average each image's prediction with its mirror image's
    cnnkit_version: str = __version__
    # Where the starting weights came from ({"source": "imagenet", "sha256": ...}), if any.
    weights: dict[str, str] | None = None

    def __post_init__(self) -> None:
        # Metadata comes from files a user may have been handed (``model.json``, an export's
        # metadata): refuse what cnnkit never writes (``Preprocessing`` checks its own).
        if not 2 <= len(self.classes) <= MAX_CLASSES:
            raise ConfigError(
                f"classes: expected 2 to {MAX_CLASSES:,} names, got {len(self.classes):,}"
            )
        if not all(isinstance(name, str) and name for name in self.classes):
            raise ConfigError("classes: expected non-empty names")

    def to_json(self) -> str:
        data = asdict(self)
        data["preprocessing"] = self.preprocessing.to_dict()
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelMeta:
        """Read what ``to_json`` writes, and the older form (see ``Preprocessing.of_model``)."""
        data = json.loads(text)
        return cls(
            classes=tuple(data["classes"]),
            preprocessing=Preprocessing.of_model(data),
            architecture=tuple(data["architecture"]),
            model_name=str(data.get("model_name", "")),
            tta=bool(data.get("tta", False)),
            cnnkit_version=str(data.get("cnnkit_version", "")),
            weights=dict(data["weights"]) if data.get("weights") else None,
        )


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
    if meta_path.stat().st_size > MAX_META_BYTES:
        raise RunDirError(f"{meta_path}: damaged (over {MAX_META_BYTES:,} bytes)")
    try:
        meta = ModelMeta.from_json(meta_path.read_text())  # checks every value
    except RecursionError:
        raise RunDirError(f"{meta_path}: damaged (nested too deeply)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise RunDirError(f"{meta_path}: damaged ({exc})") from None
    pre = meta.preprocessing
    in_shape = (pre.channels, pre.size, pre.size)
    try:
        check_layer_count(len(meta.architecture))
        layers = parse_layers(list(meta.architecture))
        infos = infer_shapes(layers, in_shape)
        check_budget(infos)  # before a single weight is allocated
    except ConfigError as exc:
        raise RunDirError(f"{meta_path}: architecture is invalid ({exc})") from None
    if infos[-1].out_shape != (len(meta.classes),):
        raise RunDirError(
            f"{meta_path}: lists {len(meta.classes)} classes, but the network's last layer "
            f"gives {infos[-1].out_shape} scores"
        )
    model = Network(layers, in_shape)
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
