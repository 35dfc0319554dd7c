"""Predict with an exported model, exactly as ``cnnkit.inference.Classifier`` does.

``OnnxClassifier`` and ``Pt2Classifier`` are ``Predictor``s, as the run directory's
``Classifier`` is: the preprocessing and prediction code is theirs too (``load_image`` with
the size, channels and resize mode stored in the file, softmax, ``Prediction``); only the
logits come from onnxruntime or the ``torch.export`` program instead of the run's network,
mirror-averaged for a model trained with ``--tta``. Both run in fp32 on the CPU, as a run
directory's classifier does by default, so all three give the same top-1. There is no
PyTorch network to look inside (no ``.model``). ``load_predictor`` picks the right one for a
path, so ``cnnkit predict`` and ``cnnkit serve`` take a run directory, a ``.onnx`` or a
``.pt2`` file.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path

import numpy as np
import torch

from cnnkit.errors import CheckpointError, first_line
from cnnkit.export.graph import INPUT_NAME
from cnnkit.export.onnx_check import MAX_ONNX_BYTES, check_onnx
from cnnkit.extras import require
from cnnkit.inference import Predictor, load
from cnnkit.model_io import ModelMeta
from cnnkit.threads import cap_threads

__all__ = ["OnnxClassifier", "Pt2Classifier", "is_onnx_file", "is_pt2_file", "load_predictor"]

CHUNK = 256  # images per onnxruntime call


class _ExportedClassifier(Predictor):
    """What both exports share: a file, fp32 on the CPU, ``logits`` from ``_run``."""

    path: Path
    device = torch.device("cpu")
    precision = "fp32"

    @abstractmethod
    def _run(self, batch: np.ndarray) -> np.ndarray:
        """Logits ``(N, classes)`` of contiguous uint8 images ``(N, S, S, C)``."""

    def logits(self, batch: np.ndarray) -> torch.Tensor:
        """Logits ``(N, classes)`` for preprocessed uint8 images ``(N, S, S, C)``."""
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        if not len(batch):
            return torch.zeros((0, len(self.classes)))
        logits = torch.from_numpy(np.asarray(self._run(batch), dtype=np.float32))
        if self.meta.tta:  # as runtime.batched_logits: averaged with the mirror image's
            mirrored = np.ascontiguousarray(batch[:, :, ::-1])  # W is axis 2 of NHWC
            logits = (logits + torch.from_numpy(np.asarray(self._run(mirrored), np.float32))) / 2
        return logits

    def _what(self) -> str:
        return str(self.path)

    def _size(self) -> str:
        return "no PyTorch network"


class OnnxClassifier(_ExportedClassifier):
    """An exported ``.onnx`` classifier: a ``Predictor``, so ``.classes``, ``.meta``,
    ``.preprocess``, ``.logits``, ``.predict_proba`` and ``.predict`` behave as for a run
    directory; ``.session`` is its onnxruntime session."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        ort = require("onnxruntime", "export", "predicting with an ONNX model")
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such ONNX file")
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_ONNX_BYTES + 1)
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot be read ({exc.strerror or exc})") from None
        # Checked before onnxruntime sees it, and the checked bytes are what it loads.
        self.meta: ModelMeta = check_onnx(data, str(self.path), max_batch=CHUNK)
        options = ort.SessionOptions()
        # 0: as many as the CPUs this process may use (onnxruntime's own default counts the
        # machine's cores, not a container's quota)
        options.intra_op_num_threads = threads or cap_threads()
        options.log_severity_level = 3  # errors only
        # Idle worker threads sleep instead of spinning: spinning burns the cores that the
        # decoding, the HTTP server or other processes need, for tiny gains on small models.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise CheckpointError(
                f"{self.path}: not a valid ONNX model ({first_line(exc, 200)})"
            ) from None

    def _run(self, batch: np.ndarray) -> np.ndarray:
        parts = [
            self.session.run(["logits"], {INPUT_NAME: batch[i : i + CHUNK]})[0]
            for i in range(0, len(batch), CHUNK)
        ]
        return np.concatenate(parts)


class Pt2Classifier(_ExportedClassifier):
    """A ``.pt2`` (``torch.export``) classifier, a ``Predictor`` like ``OnnxClassifier``,
    loaded through ``load_pt2`` (which refuses archives that could run code)."""

    def __init__(self, path: str | Path) -> None:
        from cnnkit.export.pt2_export import load_pt2

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such pt2 file")
        self._program, self.meta = load_pt2(self.path)
        cap_threads()

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self._program(batch)


def is_onnx_file(source: str | Path) -> bool:
    """True for a path that names an ONNX file (by its suffix), rather than a run directory."""
    return Path(source).suffix.lower() == ".onnx"


def is_pt2_file(source: str | Path) -> bool:
    """True for a path that names a ``torch.export`` file (by its suffix)."""
    return Path(source).suffix.lower() == ".pt2"


def load_predictor(source: str | Path, device: str = "auto", precision: str = "auto") -> Predictor:
    """A run directory's classifier, or an exported ``.onnx`` or ``.pt2`` file's (same
    interface); all in fp32 unless ``precision="bf16"`` for a run directory."""
    if is_onnx_file(source):
        return OnnxClassifier(source)
    if is_pt2_file(source):
        return Pt2Classifier(source)
    return load(source, device, precision)
