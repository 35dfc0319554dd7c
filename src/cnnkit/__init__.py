"""cnnkit: train, understand and ship convolutional neural network image classifiers.

The Python API mirrors the CLI::

    import cnnkit
    result = cnnkit.train("shapes/", out="runs/shapes", epochs=10)
    model = cnnkit.load("runs/shapes")
    model.predict(["circle.png"])[0].label
    cnnkit.evaluate("runs/shapes", "shapes/").accuracy
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from cnnkit.errors import (
    CheckpointError,
    CnnkitError,
    ConfigError,
    DataError,
    ExportError,
    ImageError,
    OutputError,
    RunDirError,
)

if TYPE_CHECKING:
    from cnnkit.evaluation import EvalResult
    from cnnkit.inference import Classifier
    from cnnkit.training.loop import TrainResult

__all__ = [
    "CheckpointError",
    "CnnkitError",
    "ConfigError",
    "DataError",
    "ExportError",
    "ImageError",
    "OutputError",
    "RunDirError",
    "__version__",
    "evaluate",
    "generate_shapes",
    "load",
    "train",
]


def train(
    data: str | Path,
    out: str | Path,
    *,
    model: str = "auto",
    seed: int = 0,
    augment: bool | None = None,
    overwrite: bool = False,
    progress: bool = False,
    config: str | Path | None = None,
    **options: Any,
) -> TrainResult:
    """Train on a folder of images; ``options`` are any ``cnnkit train`` setting by name.

    Settings left out come from the config file, then from the model's recommended settings
    (``augment=None``: augmentation as the model recommends, on by default). ``model="auto"``
    picks the preset and input size from the data; ``threads=N`` fixes torch's CPU threads.
    """
    import dataclasses

    from cnnkit.config import AugmentConfig, DataConfig, TrainConfig, load_yaml
    from cnnkit.models.registry import resolve_run_config
    from cnnkit.training.loop import train as _train

    overrides: dict[str, Any] = {
        "model": model,
        "data.path": str(data),
        "data.seed": seed,
        "train.seed": seed,
        "augment.enabled": augment,
    }
    # Every setting of the data, augment and train sections, by its name (the config
    # dataclasses are the single list; path, seed and enabled have their own arguments).
    sections = {
        section: {f.name for f in dataclasses.fields(cls)} - {"path", "seed", "enabled"}
        for section, cls in (
            ("data", DataConfig),
            ("augment", AugmentConfig),
            ("train", TrainConfig),
        )
    }
    for name, value in options.items():
        section = next((s for s, names in sections.items() if name in names), None)
        if section is None:
            raise ConfigError(f"train: unknown option {name!r}")
        overrides[f"{section}.{name}"] = value
    # The model's recommended settings, then the config file, then the arguments.
    cfg = resolve_run_config(load_yaml(config) if config else None, overrides)
    result = _train(cfg, out, overwrite=overwrite, progress=progress)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 writes the report
        from cnnkit.report import try_write_report

        # a failure is a warning: the model is already saved
        try_write_report(out, result.data, result.val_logits)
    return result


def load(run_dir: str | Path, device: str = "auto", precision: str = "auto") -> Classifier:
    """The trained classifier of a run directory: ``.predict(images)``."""
    from cnnkit.inference import load as _load

    return _load(run_dir, device, precision)


def evaluate(run_dir: str | Path, data: str | Path, split: str = "auto") -> EvalResult:
    """Accuracy, per-class scores and confusion matrix of a run on a labelled folder."""
    from cnnkit.evaluation import evaluate as _evaluate

    return _evaluate(run_dir, data, split)


def generate_shapes(
    out: str | Path,
    count: int = 400,
    size: int = 128,
    seed: int = 0,
    overwrite: bool = False,
    style: str = "cnnkit",
) -> Path:
    """Write the circles, squares and triangles data set to ``out`` (a folder holding files
    cnnkit did not write is refused unless ``overwrite``); ``style="material"`` draws them as
    the learning material does (one dark upright shape on white)."""
    from cnnkit.data.shapes import generate_shapes as _generate

    return _generate(out, count=count, size=size, seed=seed, overwrite=overwrite, style=style)
