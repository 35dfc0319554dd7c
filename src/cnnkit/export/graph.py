"""What an export contains: the network with its normalisation inside, and its metadata.

An exported model takes what ``load_image`` returns, stacked into a batch: uint8 pixels
``(B, S, S, C)`` (NHWC). Scaling to [0, 1], the per-channel mean and std and the switch to NCHW
happen inside the graph, through the same ``to_model_input`` training uses. The most common
reason an exported model "disagrees" with the original is a caller that forgot or re-did the
normalisation; here there is nothing to forget. The caller only decodes and resizes, and the
metadata says how (size, channels, resize mode).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnkit.config import RunConfig, load_yaml
from cnnkit.data.dataset import select_images
from cnnkit.data.folder import SPLIT_FILE, folder_problem
from cnnkit.errors import CheckpointError, CnnkitError
from cnnkit.model_io import ModelMeta
from cnnkit.models.network import Network

__all__ = [
    "INPUT_NAME",
    "MAX_BATCH",
    "OUTPUT_NAMES",
    "ExportModule",
    "meta_from_metadata",
    "metadata_for",
    "sample_images",
]

log = logging.getLogger("cnnkit")

INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "probabilities")
MAX_BATCH = 4096  # upper bound of the dynamic batch dimension
META_KEY = "cnnkit"  # the full ModelMeta as JSON, beside the readable keys


class ExportModule(nn.Module):
    """uint8 images ``(B, S, S, C)`` -> logits and probabilities ``(B, classes)``, in eval mode."""

    def __init__(self, model: Network, meta: ModelMeta) -> None:
        super().__init__()
        self.model = model.float().eval()
        self.preprocessing = meta.preprocessing

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.preprocessing.to_model_input(image)  # (B, C, S, S) float32
        logits = self.model(x)  # (B, classes)
        return logits, torch.softmax(logits, dim=1)


def metadata_for(meta: ModelMeta) -> dict[str, str]:
    """String key/values stored in the exported file: enough to feed it from any language."""
    return {
        "classes": json.dumps(list(meta.classes)),
        "input_name": INPUT_NAME,
        "input_layout": "NHWC",
        "input_dtype": "uint8",
        "preprocessing": json.dumps(meta.preprocessing.to_dict()),  # as in model.json
        "normalization": "inside the graph: x = (pixel / 255 - mean) / std, then NCHW",
        "outputs": ", ".join(OUTPUT_NAMES),
        "model_name": meta.model_name,
        "cnnkit_version": meta.cnnkit_version,
        META_KEY: meta.to_json(),
    }


def meta_from_metadata(props: dict[str, str], where: str) -> ModelMeta:
    """The ``ModelMeta`` an export carries; ``CheckpointError`` when it is not a cnnkit export."""
    if META_KEY not in props:
        raise CheckpointError(
            f"{where}: has no cnnkit metadata (export a run directory with "
            "'cnnkit export RUN_DIR --format onnx')"
        )
    try:
        meta = ModelMeta.from_json(props[META_KEY])  # a size of 30,000 pixels is refused
    except RecursionError:
        raise CheckpointError(f"{where}: cnnkit metadata is damaged (nested too deeply)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{where}: cnnkit metadata is damaged ({exc})") from None
    return meta


def sample_images(
    run_dir: str | Path, meta: ModelMeta, count: int = 64, seed: int = 0
) -> tuple[np.ndarray, str]:
    """Up to ``count`` uint8 images ``(N, S, S, C)`` to compare an export with its original.

    The run's own validation images (as its ``split.csv`` lists them) when its data folder
    is still there, else seeded random images. Returns the images and, in words, which
    they are and why (a check on random images says so, and for what reason).
    """
    size, channels = meta.preprocessing.size, meta.preprocessing.channels
    config = Path(run_dir) / "config.yaml"
    why = f"{config} is missing"
    if config.is_file():
        try:
            data = RunConfig.from_dict(load_yaml(config)).data
            why = folder_problem(data.path) or ""
            if not why:
                chosen = select_images(
                    data.path,
                    "val",
                    meta.classes,
                    data,
                    size,
                    channels,
                    split_file=Path(run_dir) / SPLIT_FILE,
                )
                val = chosen.images
                if len(val):
                    rows = np.linspace(0, len(val) - 1, num=min(count, len(val))).astype(np.int64)
                    images = np.ascontiguousarray(val.images[np.unique(rows)])
                    return images, f"{len(images)} validation images of the run from {chosen.root}"
                why = f"{chosen.root} has no usable validation images"
        except CnnkitError as exc:
            why = f"its validation images cannot be read: {exc}"
    log.info("export check: validation images unavailable (%s); using random ones", why)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, *meta.preprocessing.shape), dtype=np.uint8)
    return images, f"{count} random images, because {why}"
