"""``cnnkit demo``: the whole journey on the learning material's shapes, in under a minute.

Generate circles, squares and triangles (once; cached), train the default model, evaluate it
on the held-out images and classify a shape it has never seen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnkit.config import AugmentConfig, DataConfig, RunConfig, TrainConfig
from cnnkit.data.cache import default_cache_root
from cnnkit.data.shapes import SHAPE_CLASSES, SHAPES_VERSION, draw_shape, generate_shapes
from cnnkit.evaluation import EvalResult, evaluate, evaluate_images
from cnnkit.files import write_file
from cnnkit.inference import Prediction, load
from cnnkit.training.loop import TrainResult
from cnnkit.training.plan import settle
from cnnkit.workflow import train_and_report

__all__ = ["DEMO_CONFIG", "DemoReport", "demo_data", "run_demo"]

DEMO_COUNT, DEMO_SIZE, DEMO_SEED = 400, 128, 0
# Shapes may be upside down, mirrored, skewed and turned: every augmentation is on.
DEMO_CONFIG = RunConfig(
    model="fast",
    augment=AugmentConfig(hflip=True, vflip=True, shear=10.0, rotate=15.0, scale=0.1),
    train=TrainConfig(epochs=15, batch_size=32, lr=4e-3),
)


@dataclass
class DemoReport:
    train: TrainResult
    evaluation: EvalResult
    new_shape: str
    prediction: Prediction
    seconds: float


def demo_data(root: Path | None = None) -> Path:
    """The demo's shapes (400 per class, 128x128), generated once into the cache folder."""
    folder = (root or default_cache_root()) / (
        f"shapes-v{SHAPES_VERSION}-{DEMO_COUNT}-{DEMO_SIZE}-{DEMO_SEED}"
    )
    done = folder / ".complete"
    if not done.is_file():
        # cnnkit's own cache folder: whatever an interrupted earlier generation left is replaced
        generate_shapes(folder, count=DEMO_COUNT, size=DEMO_SIZE, seed=DEMO_SEED, overwrite=True)
        done.write_text("ok\n")
    return folder


def run_demo(out: Path, progress: bool = True, data_root: Path | None = None) -> DemoReport:
    """Run the demo into ``out`` and return what happened.

    A run directory cnnkit wrote there before (a previous demo) is replaced; a folder
    holding anything else is refused, naming those files, and nothing is deleted.
    """
    started = time.perf_counter()
    data = demo_data(data_root)
    cfg = RunConfig(
        model=DEMO_CONFIG.model,
        data=DataConfig(path=str(data)),
        augment=DEMO_CONFIG.augment,
        train=DEMO_CONFIG.train,
    )
    trained = train_and_report(settle(cfg), out, overwrite=True, progress=progress)
    classifier = trained.classifier or load(out)  # (None only if the report could not load it)
    if trained.result.data is not None:  # the validation images are still in memory
        evaluation = evaluate_images(
            classifier,
            trained.result.data.val,
            run_dir=out,
            logits=trained.result.val_logits,
            data=trained.result.data.root,
        )
    else:
        evaluation = evaluate(out, data, split="val", classifier=classifier)
    rng = np.random.default_rng(int(time.time_ns() % 2**32))
    kind = SHAPE_CLASSES[int(rng.integers(len(SHAPE_CLASSES)))]
    image = draw_shape(kind, DEMO_SIZE, rng)
    write_file(out / "new_shape.png", lambda p: image.save(p, format="PNG"), overwrite=True)
    (prediction,) = classifier.predict([out / "new_shape.png"])
    return DemoReport(trained.result, evaluation, kind, prediction, time.perf_counter() - started)
