"""What both export formats share: the report, the reference model, the output path, quiet."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnkit.checkpoint import ModelMeta
from cnnkit.engine import batched_logits
from cnnkit.errors import ExportError
from cnnkit.export.verify import Logits, Parity
from cnnkit.models.network import Network

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
        what = f"{self.format}, opset {self.opset}" if self.opset else self.format
        return (
            f"exported {self.path} ({what}, {self.size_bytes / 1e6:.2f} MB) in "
            f"{self.seconds:.1f}s; {self.parity.summary()}"
        )


def reference_logits(model: Network, meta: ModelMeta) -> Logits:
    """The PyTorch model in fp32 on the CPU, fed exactly as ``cnnkit predict`` feeds it."""
    cpu = torch.device("cpu")

    def run(images: np.ndarray) -> np.ndarray:
        return batched_logits(model, images, meta.mean, meta.std, cpu, "fp32").numpy()

    return run


def output_path(run_dir: str | Path, out: str | Path | None, suffix: str) -> Path:
    """``out`` or ``RUN_DIR/model<suffix>``; the suffix is checked so files say what they are."""
    path = Path(out) if out is not None else Path(run_dir) / f"model{suffix}"
    if path.suffix != suffix:
        raise ExportError(f"--out {path}: expected a file name ending in {suffix}")
    if path.is_dir():
        raise ExportError(f"--out {path}: is a folder, expected a file name ending in {suffix}")
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
