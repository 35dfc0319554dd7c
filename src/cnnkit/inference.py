"""Predict with a trained model: ``cnnkit.load(run_dir).predict(images)``.

Images go through ``load_image`` and ``to_model_input``, the same two functions training uses,
with the size, channels, resize mode, mean and std stored in the run directory.

Prediction runs in fp32 unless bf16 is asked for (``precision="bf16"``: then through a copy
of the network with batchnorm folded in, activations fused and bf16 throughout, as fast as
a CPU with native bf16 runs it). Training may use bf16 autocast for speed, but a run
directory must give the same answer as its ONNX and pt2 exports (fp32 graphs) and as the
server, and bf16 moves probabilities by up to about 1e-2, enough to flip the top-1 of an
image near a class boundary.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cnnkit.data.folder import _images_in
from cnnkit.data.images import IMAGE_SUFFIXES, Source, load_image
from cnnkit.errors import DataError, ImageError
from cnnkit.model_io import ModelMeta, load_model
from cnnkit.models.fold import inference_copy
from cnnkit.models.network import Network
from cnnkit.runtime import batched_logits, resolve_device, resolve_precision
from cnnkit.threads import cap_threads

__all__ = [
    "Classifier",
    "Prediction",
    "Predictor",
    "array_image",
    "expand_inputs",
    "inference_precision",
    "load",
]

ImageInput = Source | Image.Image | np.ndarray


def inference_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``fp32`` on every device, so a run directory answers as its exports do;
    ``bf16`` only when asked for (``runtime.resolve_precision`` checks the name)."""
    return resolve_precision("fp32" if precision == "auto" else precision, device)


def array_image(image: np.ndarray) -> Image.Image:
    """An array as a picture: uint8 as it is; floats in [0, 1] scaled to 0-255; other numbers
    taken as pixel values. (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ImageError(
            f"array of shape {image.shape}", "expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
        )
    if image.dtype == np.uint8:
        arr = image
    else:
        values = np.nan_to_num(image.astype(np.float64))
        if image.dtype.kind == "f" and values.size and values.max() <= 1.0:
            values = values * 255.0
        arr = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[arr.shape[2]]
    return Image.fromarray(arr[:, :, 0] if mode == "L" else arr, mode=mode)


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one image."""

    source: str
    label: str
    confidence: float
    probabilities: dict[str, float] = field(default_factory=dict)
    # What was classified (a path, bytes, a PIL image or an array), for Jupyter's picture of
    # it; a reference only, so a long list of predictions holds no copies of the images.
    image: object = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        top = ", ".join(f"{c} {100 * p:.1f}%" for c, p in self.top(3))
        more = (
            f", {len(self.probabilities) - 3} more classes" if len(self.probabilities) > 3 else ""
        )
        return f"Prediction({self.source!r}: {self.label}; {top}{more})"

    def _repr_html_(self) -> str:
        from cnnkit.inspection.html import bars, esc, fragment, picture

        shown = ""
        if self.image is not None:
            try:  # the whole image, fitted into a square (it may be gone or unreadable now)
                image = self.image
                image = array_image(image) if isinstance(image, np.ndarray) else image
                shown = picture(load_image(image, 128, 3, "pad"), self.source, 128)
            except (ImageError, OSError, ValueError):
                shown = "<p class='note'>(the image cannot be read any more)</p>"
        body = (
            f"<div class='row'>{shown}<div><p>{esc(self.label)} "
            f"({100 * self.confidence:.1f}%)</p>{bars(self.probabilities)}</div></div>"
        )
        return fragment(f"Prediction for {self.source}", body)

    def top(self, k: int) -> list[tuple[str, float]]:
        return sorted(self.probabilities.items(), key=lambda kv: -kv[1])[:k]

    def to_dict(self, top_k: int | None = None) -> dict[str, object]:
        probs = dict(self.top(top_k)) if top_k else self.probabilities
        return {
            "source": self.source,
            "label": self.label,
            "confidence": round(self.confidence, 6),
            "probabilities": {k: round(v, 6) for k, v in probs.items()},
        }


class Predictor(ABC):
    """A loaded model with its preprocessing, ready to classify images, whatever computes
    its logits: what ``cnnkit predict``, the server and the Python API call.

    ``Classifier`` runs a run directory's PyTorch network; ``OnnxClassifier`` and
    ``Pt2Classifier`` (``cnnkit.export.runtime``) run exported files. Each brings ``meta``,
    ``device``, ``precision``, ``logits`` and ``_size``; preprocessing, probabilities,
    predictions and the displays are written once, here, so every format answers alike.
    """

    meta: ModelMeta
    device: torch.device
    precision: str

    @property
    def classes(self) -> tuple[str, ...]:
        return self.meta.classes

    def preprocess(self, image: ImageInput) -> np.ndarray:
        """One image to the uint8 ``(S, S, C)`` array the model is fed."""
        if isinstance(image, np.ndarray):
            image = array_image(image)
        return self.meta.preprocessing.load_image(image)

    @abstractmethod
    def logits(self, batch: np.ndarray) -> torch.Tensor:
        """Logits ``(N, classes)`` for preprocessed uint8 images ``(N, S, S, C)``."""

    def predict_proba(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Class probabilities ``(N, classes)``; each row sums to 1."""
        batch = (
            np.stack([self.preprocess(im) for im in images])
            if len(images)
            else np.zeros((0, *self.meta.preprocessing.shape), np.uint8)
        )
        if not len(batch):
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return torch.softmax(self.logits(batch), dim=1).numpy()

    def predict(self, images: ImageInput | Sequence[ImageInput]) -> list[Prediction]:
        """Predict one image or a list of them (paths, bytes, PIL images or arrays)."""
        if isinstance(images, str | Path | bytes | Image.Image | np.ndarray):
            images = [images]
        probs = self.predict_proba(images)
        return [self._prediction(_describe(im), p, im) for im, p in zip(images, probs, strict=True)]

    def _prediction(self, source: str, probs: np.ndarray, image: object = None) -> Prediction:
        best = int(np.argmax(probs))
        return Prediction(
            source=source,
            label=self.classes[best],
            confidence=float(probs[best]),
            probabilities={c: float(p) for c, p in zip(self.classes, probs, strict=True)},
            image=image,
        )

    def __repr__(self) -> str:
        meta, pre = self.meta, self.meta.preprocessing
        classes = ", ".join(meta.classes[:8]) + (", ..." if len(meta.classes) > 8 else "")
        return (
            f"{type(self).__name__}({self._what()}, {len(meta.classes)} classes: {classes}; "
            f"input {pre.size}x{pre.size}x{pre.channels} ({pre.resize}); "
            f"{self._size()}; {self.device.type}, {self.precision})"
        )

    def _what(self) -> str:
        """The model's name (an exported file: its path), for the displays."""
        return self.meta.model_name or "custom"

    @abstractmethod
    def _size(self) -> str:
        """What computes the logits, in a few words (``12,345 parameters``), for the repr."""

    def _layers_html(self) -> str:
        """The layer table of ``_repr_html_``; none where there is no network to list."""
        return ""

    def _repr_html_(self) -> str:
        from cnnkit.inspection.html import fragment, table

        meta, pre = self.meta, self.meta.preprocessing
        facts = [
            ("classes", f"{len(meta.classes)}: {', '.join(meta.classes)}"),
            ("input", f"{pre.size}x{pre.size}, {pre.channels} channel(s), resized by {pre.resize}"),
            ("runs on", f"{self.device.type}, {self.precision}"),
        ]  # fmt: skip
        return fragment(
            f"cnnkit classifier: {self._what()}", table(None, facts) + self._layers_html()
        )


class Classifier(Predictor):
    """A run directory's trained network with its preprocessing, ready to classify images.

    ``precision="auto"`` is fp32 (see ``inference_precision``); pass ``"bf16"`` for autocast.
    """

    def __init__(
        self, model: Network, meta: ModelMeta, device: str = "auto", precision: str = "auto"
    ) -> None:
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            cap_threads()  # no more threads than the CPUs this process may use
        self.precision = inference_precision(precision, self.device)
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.meta = meta
        self._fast: torch.nn.Module | None = None  # bf16: models.fold's copy, made once

    def logits(self, batch: np.ndarray) -> torch.Tensor:
        """Logits for preprocessed uint8 images ``(N, S, S, C)``. In bf16 (asked for speed)
        through a copy with batchnorm folded in and activations fused (``models.fold``)."""
        model = self.model
        if self.precision == "bf16":
            if self._fast is None:
                self._fast = inference_copy(self.model, self.device, "bf16")
            model = self._fast
        return batched_logits(
            model,
            batch,
            self.meta.preprocessing.mean,
            self.meta.preprocessing.std,
            self.device,
            self.precision,
            tta=self.meta.tta,
        )

    def _size(self) -> str:
        return f"{sum(p.numel() for p in self.model.parameters()):,} parameters"

    def _layers_html(self) -> str:
        from cnnkit.inspection.html import model_table

        return model_table(self.model)


def _describe(image: object) -> str:
    if isinstance(image, str | Path):
        return str(image)
    return f"<{type(image).__name__}>"


def load(run_dir: str | Path, device: str = "auto", precision: str = "auto") -> Classifier:
    """The classifier saved in ``run_dir`` (see ``cnnkit.model_io``); fp32 unless
    ``precision="bf16"``."""
    model, meta = load_model(run_dir)
    return Classifier(model, meta, device, precision)


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders expanded to the images inside them (sorted)."""
    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = _images_in(path)
            if not found:
                raise DataError(
                    f"{path}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
                )
            out.extend(Path(p) for p in found)
        else:
            out.append(path)
    return out
