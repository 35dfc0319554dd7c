"""Evaluate a trained model on a labelled folder: accuracy, per-class scores, confusions.

An evaluation says what it scored: by default the run's validation part of the folder it
trained on (never a training image) or all of any other folder; its results go to
``RUN_DIR/evaluations/<data>-<split>/`` with the data folder, split and image count, beside
(never over) what training wrote.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cnnkit.config import DataConfig, RunConfig, load_yaml
from cnnkit.data.dataset import ImageArray, select_images
from cnnkit.data.folder import SPLIT_FILE
from cnnkit.errors import DataError
from cnnkit.files import atomic_write, write_file
from cnnkit.inference import Classifier, load
from cnnkit.plots import plot_confusion

__all__ = ["EVALUATIONS", "EvalResult", "classification_report", "evaluate", "evaluate_images"]

EVALUATIONS = "evaluations"  # RUN_DIR/evaluations/<name>/: one folder per data set and split


@dataclass
class EvalResult:
    """Scores of a model on one set of labelled images."""

    classes: tuple[str, ...]
    accuracy: float
    loss: float
    confusion: np.ndarray  # (classes, classes): rows true, columns predicted
    per_class: list[dict[str, float]]
    most_wrong: list[dict[str, object]] = field(default_factory=list)
    count: int = 0
    probabilities: np.ndarray | None = None  # (N, classes)
    paths: tuple[str, ...] = ()
    labels: np.ndarray | None = None
    # What was scored. ``evaluate_images`` is handed training's validation images; ``evaluate``
    # sets these from the folder and split it chose.
    data: str = ""  # the data folder, absolute
    split: str = "val"  # all, train, val or test
    own: bool = True  # the folder the run trained on
    scored: str = ""  # in words, e.g. "validation part of /data/shapes"
    saved_to: Path | None = None  # the folder the results were written to

    def __repr__(self) -> str:
        what = self.scored or "images"
        return (
            f"EvalResult({what}: {self.count} images, accuracy {100 * self.accuracy:.2f}%, "
            f"loss {self.loss:.4f}, {len(self.classes)} classes)"
        )

    def _repr_html_(self) -> str:
        from cnnkit.inspection.html import confusion_table, esc, fragment, per_class_table

        body = (
            f"<p>{esc(self.scored or 'images')}: {self.count} images, accuracy "
            f"<b>{100 * self.accuracy:.2f}%</b>, loss {self.loss:.4f}.</p>"
            + per_class_table(self.per_class)
            + "<p class='note'>Confusion matrix (rows: true class, columns: predicted).</p>"
            + confusion_table(self.classes, self.confusion)
        )
        return fragment("Evaluation", body)

    @property
    def is_validation(self) -> bool:
        """Whether these are the run's own validation images (what training measured)."""
        return self.own and self.split == "val"

    def to_dict(self) -> dict[str, object]:
        return {
            "data": self.data,
            "split": self.split,
            "scored": self.scored,
            "count": self.count,
            "accuracy": round(self.accuracy, 6),
            "loss": round(self.loss, 6),
            "classes": list(self.classes),
            "per_class": self.per_class,
            "confusion_matrix": self.confusion.tolist(),
            "most_wrong": self.most_wrong,
        }


def classification_report(
    labels: np.ndarray, predicted: np.ndarray, classes: tuple[str, ...]
) -> tuple[np.ndarray, list[dict[str, float]]]:
    """Confusion matrix and per-class precision, recall, F1 and support."""
    n = len(classes)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    rows = []
    for i, name in enumerate(classes):
        tp = confusion[i, i]
        pred = confusion[:, i].sum()
        true = confusion[i].sum()
        precision = tp / pred if pred else 0.0
        recall = tp / true if true else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append(
            {
                "class": name,
                "precision": round(float(precision), 6),
                "recall": round(float(recall), 6),
                "f1": round(float(f1), 6),
                "support": int(true),
            }
        )
    return confusion, rows


def evaluate(
    run_dir: str | Path,
    data: str | Path,
    split: str = "auto",
    *,
    device: str = "auto",
    precision: str = "auto",
    worst: int = 8,
    plot: bool = True,
    classifier: Classifier | None = None,
) -> EvalResult:
    """Score the model in ``run_dir`` on the images of ``data`` (``classifier``: that model,
    already loaded).

    ``split`` as ``select_images`` reads it (``auto``: the validation part of the run's own
    folder, all of any other). With ``plot``, ``evaluation.json`` and
    ``confusion_matrix.png`` are written to ``RUN_DIR/evaluations/<name>/``.
    """
    classifier = classifier or load(run_dir, device, precision)
    meta = classifier.meta
    run = Path(run_dir)
    data_cfg = DataConfig()
    if (run / "config.yaml").is_file():  # the folder the run trained on, and its split
        data_cfg = RunConfig.from_dict(load_yaml(run / "config.yaml")).data
    pre = meta.preprocessing
    data_cfg = dataclasses.replace(data_cfg, resize=pre.resize)  # as the model was fed
    chosen = select_images(
        data,
        split,
        meta.classes,
        data_cfg,
        pre.size,
        pre.channels,
        split_file=run / SPLIT_FILE,
    )
    if len(chosen.images) == 0:
        raise DataError(f"{chosen.root}: no usable images to evaluate")
    result = evaluate_images(classifier, chosen.images, worst=worst)
    result.data, result.split, result.own = str(chosen.root), chosen.split, chosen.own
    result.scored = chosen.describe()
    if plot:
        result.saved_to = _save(run, result)
    return result


def _save(run: Path, result: EvalResult) -> Path:
    """Write ``evaluation.json`` and ``confusion_matrix.png`` into a folder of
    ``RUN_DIR/evaluations/`` named after the data folder and split (``shapes-val``); a
    different folder of the same name gets ``shapes-val-2``. Returns the folder."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{Path(result.data).name}-{result.split}")
    for n in itertools.count(1):
        folder = run / EVALUATIONS / (base if n == 1 else f"{base}-{n}")
        previous = folder / "evaluation.json"
        try:
            recorded = json.loads(previous.read_text()).get("data") if previous.is_file() else None
        except (OSError, ValueError, AttributeError):
            recorded = None  # unreadable: the same name is replaced
        if recorded in (None, result.data):
            break
    atomic_write(
        folder / "confusion_matrix.png",
        lambda p: plot_confusion(result.confusion, result.classes, p),
    )
    text = json.dumps(result.to_dict(), indent=2)
    atomic_write(folder / "evaluation.json", lambda p: p.write_text(text))
    return folder


def evaluate_images(
    classifier: Classifier,
    images: ImageArray,
    *,
    run_dir: str | Path | None = None,
    worst: int = 8,
    logits: torch.Tensor | None = None,
    data: str = "",
) -> EvalResult:
    """Score ``classifier`` on decoded, labelled images (already in the model's classes).

    Training and its report call this with the validation arrays still in memory (of the
    folder ``data``), so nothing is scanned or decoded twice, and with the logits training's
    validation computed for the saved weights (``logits``), so nothing is run twice either.
    With ``run_dir``, ``confusion_matrix.png`` and ``evaluation.json`` are written there.
    """
    if len(images) == 0:
        raise DataError("no images to evaluate")
    meta = classifier.meta
    if logits is None or tuple(logits.shape) != (len(images), len(meta.classes)):
        logits = classifier.logits(images.images)  # (N, classes)
    labels = torch.from_numpy(np.asarray(images.labels))
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    probs = torch.softmax(logits, dim=1).numpy()
    predicted = probs.argmax(1)
    confusion, per_class = classification_report(images.labels, predicted, meta.classes)
    wrong = np.flatnonzero(predicted != images.labels)
    wrong = wrong[np.argsort(-probs[wrong, predicted[wrong]])][:worst]
    most_wrong = [
        {
            "path": images.paths[i],
            "true": meta.classes[images.labels[i]],
            "predicted": meta.classes[predicted[i]],
            "confidence": round(float(probs[i, predicted[i]]), 6),
        }
        for i in wrong
    ]
    result = EvalResult(
        classes=meta.classes,
        accuracy=float((predicted == images.labels).mean()),
        loss=loss,
        confusion=confusion,
        per_class=per_class,
        most_wrong=most_wrong,
        count=len(images),
        probabilities=probs,
        paths=images.paths,
        labels=images.labels,
        data=data,
        scored=f"validation part of {data}" if data else "validation images",
    )
    if run_dir is not None:
        run = Path(run_dir)  # a run directory's own files: replaced whole, by a rename
        write_file(
            run / "confusion_matrix.png",
            lambda p: plot_confusion(confusion, meta.classes, p),
            overwrite=True,
        )
        text = json.dumps(result.to_dict(), indent=2)
        write_file(run / "evaluation.json", lambda p: p.write_text(text), overwrite=True)
    return result
