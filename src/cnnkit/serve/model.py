"""The one model a server answers with: loaded once at start, never because of a request.

``ServedModel`` wraps a run directory's ``Classifier`` or an exported ``OnnxClassifier`` or
``Pt2Classifier`` (all three ``Predictor``s) and adds what the HTTP layer needs: a
description for ``GET /model``, a warm-up, timed batch prediction on already-opened images,
and explanations (feature maps and Grad-CAM, run directories only: an exported file has no
PyTorch network to look inside).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cnnkit.export.runtime import OnnxClassifier, Pt2Classifier, load_predictor
from cnnkit.inference import Classifier, Predictor

__all__ = ["BatchResult", "ServedModel"]


@dataclass(frozen=True)
class BatchResult:
    """Probabilities ``(N, classes)`` for a request's images, and where the time went."""

    probabilities: np.ndarray
    decode_ms: float
    inference_ms: float
    batch_size: int  # images in the forward pass that computed them (several requests')


class ServedModel:
    """A loaded classifier plus what a server needs to describe, warm up and explain it."""

    def __init__(self, classifier: Predictor) -> None:
        self.classifier = classifier
        exported = {OnnxClassifier: "onnx", Pt2Classifier: "pt2"}
        self.format = exported.get(type(classifier), "run directory")

    @classmethod
    def load(cls, source: str | Path) -> ServedModel:
        """A run directory, a ``.onnx`` or a ``.pt2`` file (cnnkit's errors for anything else)."""
        return cls(load_predictor(source))

    @property
    def classes(self) -> tuple[str, ...]:
        return self.classifier.classes

    @property
    def can_explain(self) -> bool:
        """Feature maps and Grad-CAM need the PyTorch network of a run directory."""
        return isinstance(self.classifier, Classifier)

    def info(self) -> dict[str, Any]:
        """What ``GET /model`` returns: classes, preprocessing and architecture."""
        meta = self.classifier.meta
        return {
            "classes": list(meta.classes),
            "preprocessing": meta.preprocessing.to_dict(),  # as in model.json and the exports
            "model_name": meta.model_name,
            "architecture": list(meta.architecture),
            "format": self.format,
            "explain": self.can_explain,
        }

    def warm_up(self) -> None:
        """Run every code path once so the first real request is not the slow one."""
        pre = self.classifier.meta.preprocessing
        blank = Image.new("L" if pre.channels == 1 else "RGB", (pre.size, pre.size))
        self.predict([blank])
        if self.can_explain:
            self.explain(blank, max_maps=1)

    def decode(self, images: list[Image.Image]) -> np.ndarray:
        """Opened images to the uint8 ``(N, S, S, C)`` batch the model is fed (``load_image``)."""
        return np.stack([self.classifier.preprocess(image) for image in images])

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities ``(N, classes)`` of a decoded batch."""
        return self.classifier.logits(batch).float().softmax(dim=1).numpy()

    def predict(self, images: list[Image.Image]) -> BatchResult:
        """Decode and classify opened images as one batch."""
        start = time.perf_counter()
        batch = self.decode(images)  # (N, S, S, C)
        decoded = time.perf_counter()
        probs = self.infer(batch)  # (N, classes)
        done = time.perf_counter()
        return BatchResult(probs, 1000 * (decoded - start), 1000 * (done - decoded), len(batch))

    def explain(self, image: Image.Image, max_maps: int = 8) -> dict[str, Any]:
        """Feature maps layer by layer and the Grad-CAM overlay for one opened image."""
        from cnnkit.serve.explain import explain_image

        classifier = self.classifier
        if not isinstance(classifier, Classifier):
            raise RuntimeError("explain needs a run directory")  # callers check can_explain
        pixels = classifier.preprocess(image)  # (S, S, C) uint8
        return explain_image(classifier.model, classifier.meta, pixels, max_maps)
