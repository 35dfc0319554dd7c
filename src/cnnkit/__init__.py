"""cnnkit: train, understand and ship convolutional neural network image classifiers.

The Python API mirrors the CLI::

    import cnnkit
    result = cnnkit.train("shapes/", out="runs/shapes", epochs=10)
    model = cnnkit.load("runs/shapes")
    model.predict(["circle.png"])[0].label
    cnnkit.evaluate("runs/shapes", "shapes/").accuracy

See inside it: ``cnnkit.explain_conv()`` (the learning material's worked example),
``cnnkit.explain_pixel(run, image, layer, map, at)``, ``cnnkit.inspect(run, image, out)`` and
``cnnkit.report(run)``. In Jupyter the objects these return show themselves as tables and
pictures, and ``cnnkit.train`` draws a progress bar.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnkit._version import __version__
from cnnkit.errors import (
    CheckpointError,
    CnnkitError,
    ConfigError,
    DataError,
    ExportError,
    ImageError,
    OutputError,
    RunDirError,
    TrainingInterrupted,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from cnnkit.evaluation import EvalResult
    from cnnkit.inference import Classifier, ImageInput
    from cnnkit.inspection import ConvExplanation, InspectResult, PixelExplanation
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
    "TrainingInterrupted",
    "__version__",
    "evaluate",
    "explain_conv",
    "explain_pixel",
    "generate_shapes",
    "inspect",
    "load",
    "report",
    "train",
]


def train(
    data: str | Path,
    out: str | Path,
    *,
    model: str | None = None,
    seed: int = 0,
    augment: bool | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    config: str | Path | None = None,
    live: bool = False,
    **options: Any,
) -> TrainResult:
    """Train on a folder of images; ``options`` are any ``cnnkit train`` setting by name.

    Settings left out come from the config file, then from the model's recommended settings
    (``augment=None``: augmentation as the model recommends, on by default). ``model="auto"``
    picks the preset and input size from the data; ``threads=N`` fixes torch's CPU threads.
    ``progress=None`` draws a progress bar in a Jupyter notebook and nothing elsewhere.
    ``live=True`` serves a page on 127.0.0.1 (its address is printed) that shows the curves
    and one validation image's feature maps after every epoch, as ``cnnkit train --live``.
    """
    from cnnkit.config import Overrides
    from cnnkit.training.plan import plan_run
    from cnnkit.workflow import train_and_report

    # The model's recommended settings, then the config file, then the arguments.
    overrides = Overrides.of(model=model, path=data, seed=seed, augment=augment, **options)
    plan = plan_run(overrides, file=config)
    if progress is None:
        from cnnkit.console import in_notebook

        progress = in_notebook()
    trained = train_and_report(plan, out, overwrite=overwrite, progress=progress, live=live)
    return trained.result


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


def explain_conv(
    image: Any = None,
    kernel: Any = None,
    *,
    stride: int = 1,
    padding: str = "border",
    pad_value: float = 0.0,
    relu: bool = True,
) -> ConvExplanation:
    """The learning material's convolution, step by step: with no arguments its 6x6 image and
    3x3 kernel (the first sum is 155); any 2-D ``image`` and ``kernel`` work the same way.

    ``padding="border"`` computes where the kernel fits and frames the map with
    ``pad_value``, as the material does; ``"zero"`` pads the image first (``padding: same``).
    """
    from cnnkit.inspection.explain import explain_conv as _explain_conv

    return _explain_conv(
        image, kernel, stride=stride, padding=padding, pad_value=pad_value, relu=relu
    )


def explain_pixel(
    model: str | Path | Classifier,
    image: ImageInput,
    layer: str,
    map: int,
    at: Sequence[int] | None = None,
) -> PixelExplanation:
    """The arithmetic behind one value of a trained model for one image: patch x kernel, the
    products summed, bias, activation and 0-255 display value for a convolution (pooling,
    batchnorm and dense layers likewise), checked against the model's own forward pass.

    ``model`` is a run directory or ``cnnkit.load(...)``'s classifier; ``at`` is
    (row, column) in the map, or None for a layer that outputs a vector.
    """
    from cnnkit.inspection.pixel import explain_pixel as _explain_pixel

    return _explain_pixel(model, image, layer, map, at)


def inspect(
    run_dir: str | Path,
    image: str | Path,
    out: str | Path,
    *,
    layers: Sequence[str] | None = None,
    class_name: str | None = None,
) -> InspectResult:
    """Every layer's feature maps, the kernels, Grad-CAM and the probabilities for one image,
    written to ``out`` (``index.html`` and PNGs) and returned (``cnnkit inspect``)."""
    from cnnkit.inspection.walkthrough import inspect_image

    return inspect_image(run_dir, image, out, layers=layers, class_name=class_name)


def report(
    run_dir: str | Path, data: str | Path | None = None, out: str | Path | None = None
) -> Path:
    """Write the run's self-contained ``report.html`` (into ``run_dir`` unless ``out``) and
    return its path; ``data`` scores another labelled folder, labelled as other data
    (``cnnkit report``)."""
    from cnnkit.reporting import write_report

    return write_report(run_dir, data, out)
