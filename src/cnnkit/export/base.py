"""What both export formats share: the report, the reference model, the output path, quiet."""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnkit.errors import ExportError
from cnnkit.export.graph import MAX_BATCH, ExportModule, sample_images
from cnnkit.export.verify import Logits, Parity, check_parity
from cnnkit.files import check_output, write_file
from cnnkit.model_io import ModelMeta, load_model
from cnnkit.models.network import Network
from cnnkit.runtime import batched_logits

__all__ = ["ExportReport", "output_path", "quiet_exporter", "reference_logits"]


@dataclass(frozen=True)
class ExportReport:
    """Where an export went and how well it matches the original."""

    path: Path
    format: str  # onnx or pt2
    parity: Parity
    size_bytes: int
    seconds: float
    opset: int | None = None

    def summary(self) -> str:
        """Three lines, as ``cnnkit export`` prints them: the file, then ``Parity.summary``."""
        what = f"{self.format}, opset {self.opset}" if self.opset else self.format
        return (
            f"exported {self.path} ({what}, {self.size_bytes / 1e6:.2f} MB) in "
            f"{self.seconds:.1f}s\n{self.parity.summary()}"
        )


def reference_logits(model: Network, meta: ModelMeta) -> Logits:
    """The PyTorch model in fp32 on the CPU, fed exactly as ``cnnkit predict`` feeds it
    (mirror-averaged for a model trained with ``--tta``, as the exports' predictors do)."""
    cpu = torch.device("cpu")

    def run(images: np.ndarray) -> np.ndarray:
        pre = meta.preprocessing
        return batched_logits(model, images, pre.mean, pre.std, cpu, "fp32", tta=meta.tta).numpy()

    return run


def output_path(
    run_dir: str | Path, out: str | Path | None, suffix: str, overwrite: bool = False
) -> Path:
    """``out`` or ``RUN_DIR/model<suffix>``; the suffix is checked so files say what they are.

    An ``out`` that exists and was not written by cnnkit is refused unless ``overwrite``
    (before any work); the run directory's own ``model<suffix>`` is cnnkit's to replace.
    """
    path = Path(out) if out is not None else Path(run_dir) / f"model{suffix}"
    if path.suffix != suffix:
        raise ExportError(
            "{setting} {path}: expected a file name ending in {suffix}",
            setting="out",
            path=path,
            suffix=suffix,
        )
    if path.is_dir():
        raise ExportError(
            "{setting} {path}: is a folder, expected a file name ending in {suffix}",
            setting="out",
            path=path,
            suffix=suffix,
        )
    if out is not None:
        check_output(path, overwrite=overwrite)
    return path


@contextlib.contextmanager
def quiet_exporter() -> Iterator[io.StringIO]:
    """Silence the exporters' progress prints, warnings and log lines (they go to the buffer)."""
    buffer = io.StringIO()
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(buffer),
            contextlib.redirect_stderr(buffer),
        ):
            warnings.simplefilter("ignore")
            yield buffer
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def write_verified(
    path: Path,
    run_dir: str | Path,
    model: Network,
    meta: ModelMeta,
    *,
    fmt: str,
    label: str,
    write: Callable[[Path], Logits],
    check_images: int,
    tolerance: float,
    batch_sizes: tuple[int, ...],
    started: float,
    opset: int | None = None,
) -> ExportReport:
    """Write an export with ``write(tmp)`` (which returns the written file's logits function),
    compare it with PyTorch before it takes its final name, and report.

    A failed comparison raises ``ExportError`` and leaves no file at ``path``.
    """
    images, source = sample_images(run_dir, meta, check_images)
    result: dict[str, Parity] = {}

    def write_and_verify(tmp: Path) -> None:
        result["parity"] = check_parity(
            reference_logits(model, meta),
            write(tmp),
            images,
            tolerance=tolerance,
            batch_sizes=batch_sizes,
            source=source,
            what=f"{label} export of {run_dir}",
        )

    write_file(path, write_and_verify, overwrite=True)  # output_path checked it was ours
    return ExportReport(
        path=path,
        format=fmt,
        parity=result["parity"],
        size_bytes=path.stat().st_size,
        seconds=time.perf_counter() - started,
        opset=opset,
    )


def export_inputs(
    run_dir: str | Path,
) -> tuple[Network, ModelMeta, ExportModule, torch.Tensor, torch.export.Dim]:
    """What every exporter traces: the run's model in eval mode wrapped with its
    preprocessing, an example uint8 batch ``(2, S, S, C)`` and the dynamic batch dimension."""
    model, meta = load_model(run_dir)  # eval mode
    module = ExportModule(model, meta).eval()
    example = torch.zeros((2, *meta.preprocessing.shape), dtype=torch.uint8)
    return model, meta, module, example, torch.export.Dim("batch", min=1, max=MAX_BATCH)
