"""Evaluation: scores on a labelled folder that agree with prediction image for image."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnkit.data.shapes import SHAPE_CLASSES, generate_shapes
from cnnkit.errors import DataError, RunDirError
from cnnkit.evaluation import EvalResult, classification_report, evaluate
from cnnkit.inference import load
from cnnkit.training.loop import TrainResult

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def run(fast_trained_run: tuple[Path, TrainResult]) -> Path:
    return fast_trained_run[0]


@pytest.fixture(scope="module")
def val_result(run: Path, shapes_dir: Path) -> EvalResult:
    return evaluate(run, shapes_dir, split="val", precision="fp32", plot=False)


def test_validation_scores(val_result: EvalResult) -> None:
    r = val_result
    assert r.classes == SHAPE_CLASSES
    assert r.count == 120 == len(r.paths) == len(r.labels)
    assert r.accuracy >= 0.85
    assert r.confusion.shape == (3, 3) and r.confusion.sum() == 120
    assert r.confusion.sum(axis=1).tolist() == [40, 40, 40]  # stratified: 40 per class
    assert r.accuracy == pytest.approx(np.trace(r.confusion) / 120)
    assert r.probabilities.shape == (120, 3)
    labels = np.asarray(r.labels)
    expected_loss = -np.log(r.probabilities[np.arange(120), labels]).mean()
    assert r.loss == pytest.approx(expected_loss, rel=1e-4)


def test_evaluate_agrees_with_predict(run: Path, val_result: EvalResult) -> None:
    probs = load(run, device="cpu", precision="fp32").predict_proba(list(val_result.paths))
    np.testing.assert_allclose(probs, val_result.probabilities, atol=1e-5)
    assert (probs.argmax(1) == val_result.probabilities.argmax(1)).all()


def test_evaluate_agrees_with_predict_at_default_precision(run: Path, shapes_dir: Path) -> None:
    result = evaluate(run, shapes_dir, split="val", plot=False)
    probs = load(run).predict_proba(list(result.paths))
    np.testing.assert_allclose(probs, result.probabilities, atol=1e-3)


def test_per_class_scores_and_mistakes(val_result: EvalResult) -> None:
    r = val_result
    predicted = r.probabilities.argmax(1)
    for i, row in enumerate(r.per_class):
        tp = int(((predicted == i) & (r.labels == i)).sum())
        precision = tp / max(1, int((predicted == i).sum()))
        recall = tp / int((r.labels == i).sum())
        assert row["class"] == SHAPE_CLASSES[i] and row["support"] == 40
        assert row["precision"] == pytest.approx(precision, abs=1e-6)
        assert row["recall"] == pytest.approx(recall, abs=1e-6)
        if precision + recall:
            f1 = 2 * precision * recall / (precision + recall)
            assert row["f1"] == pytest.approx(f1, abs=1e-6)
    wrong = int((predicted != r.labels).sum())
    assert len(r.most_wrong) == min(wrong, 8)
    confidences = [w["confidence"] for w in r.most_wrong]
    assert confidences == sorted(confidences, reverse=True)
    for w in r.most_wrong:
        i = r.paths.index(w["path"])
        assert w["true"] == SHAPE_CLASSES[r.labels[i]] != w["predicted"]
        assert w["predicted"] == SHAPE_CLASSES[predicted[i]]


def test_splits(run: Path, shapes_dir: Path) -> None:
    counts = {
        split: evaluate(run, shapes_dir, split=split, plot=False).count
        for split in ("all", "train", "val", "auto")
    }
    # auto on the folder the run trained on: its validation part, never a training image
    assert counts == {"all": 600, "train": 480, "val": 120, "auto": 120}
    with pytest.raises(DataError, match="unknown split 'dev'"):
        evaluate(run, shapes_dir, split="dev", plot=False)
    with pytest.raises(DataError, match=f"^{shapes_dir}: has no 'test' split"):
        evaluate(run, shapes_dir, split="test", plot=False)


def test_split_layouts(run: Path, tmp_path: Path) -> None:
    generate_shapes(tmp_path / "train", count=2, size=32, seed=5)
    generate_shapes(tmp_path / "val", count=3, size=32, seed=6)
    generate_shapes(tmp_path / "test", count=4, size=32, seed=7)
    assert evaluate(run, tmp_path, plot=False).count == 6 + 9 + 12  # auto: other data, all
    assert evaluate(run, tmp_path, split="test", plot=False).count == 12
    assert evaluate(run, tmp_path, split="val", plot=False).count == 9
    assert evaluate(run, tmp_path, split="all", plot=False).count == 6 + 9 + 12
    shutil.rmtree(tmp_path / "test")
    assert evaluate(run, tmp_path, plot=False).count == 6 + 9
    with pytest.raises(DataError, match="has no 'test' split"):
        evaluate(run, tmp_path, split="test", plot=False)
    shutil.rmtree(tmp_path / "val")
    generate_shapes(tmp_path / "test", count=4, size=32, seed=7)
    # train/ + test/ (as MNIST and CIFAR-10 come): "val" is what training validated on
    assert evaluate(run, tmp_path, split="val", plot=False).count == 12


def test_a_folder_with_some_of_the_classes(run: Path, tmp_path: Path) -> None:
    generate_shapes(tmp_path, count=3, size=32, seed=8)
    shutil.rmtree(tmp_path / "circle")
    result = evaluate(run, tmp_path, plot=False)
    assert result.count == 6 and result.confusion.shape == (3, 3)
    assert result.confusion[0].sum() == 0  # no circles: labels follow the model's classes
    assert sorted(set(result.labels.tolist())) == [1, 2]


def test_unknown_class_and_unusable_folders(run: Path, tmp_path: Path) -> None:
    generate_shapes(tmp_path / "d", count=1, size=32, seed=8)
    (tmp_path / "d" / "star").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "d" / "star" / "s.png")
    with pytest.raises(DataError) as info:
        evaluate(run, tmp_path / "d", plot=False)
    assert str(info.value) == (
        f"{tmp_path / 'd'}: class 'star' is not one the model knows (circle, square, triangle)"
    )
    for name in ("circle", "square"):
        (tmp_path / "bad" / name).mkdir(parents=True)
        (tmp_path / "bad" / name / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match=f"^{tmp_path / 'bad'}: no usable images to evaluate$"):
        evaluate(run, tmp_path / "bad", plot=False)
    with pytest.raises(RunDirError):
        evaluate(tmp_path, tmp_path / "d", plot=False)


def test_writes_its_results_beside_what_training_wrote(
    run: Path, shapes_dir: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "evaluation.json").write_text("training's")  # what training or the demo wrote
    (copy / "confusion_matrix.png").write_text("training's")
    result = evaluate(copy, shapes_dir, split="val")
    assert result.saved_to == copy / "evaluations" / f"{shapes_dir.name}-val"
    assert (result.saved_to / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = json.loads((result.saved_to / "evaluation.json").read_text())
    assert written == json.loads(json.dumps(result.to_dict()))
    assert set(written) == {
        "data",
        "split",
        "scored",
        "count",
        "accuracy",
        "loss",
        "classes",
        "per_class",
        "confusion_matrix",
        "most_wrong",
    }
    assert written["data"] == str(shapes_dir) and written["split"] == "val"
    assert written["count"] == 120 and written["scored"] == f"validation part of {shapes_dir}"
    assert (copy / "evaluation.json").read_text() == "training's"
    assert (copy / "confusion_matrix.png").read_text() == "training's"


def test_preprocessing_comes_from_the_model_without_config_yaml(run: Path, tmp_path: Path) -> None:
    """A run directory holding only the model files must evaluate as it predicts."""
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("model.json", "model.safetensors"):
        shutil.copy(run / name, copy / name)
    meta = json.loads((copy / "model.json").read_text())
    meta["preprocessing"]["resize"] = "pad"
    (copy / "model.json").write_text(json.dumps(meta))
    data = tmp_path / "wide"
    generate_shapes(data, count=3, size=32, seed=9)
    for path in data.rglob("*.png"):
        Image.open(path).resize((64, 32)).save(path)  # not square: crop and pad differ
    result = evaluate(copy, data, precision="fp32", plot=False)
    probs = load(copy, device="cpu", precision="fp32").predict_proba(list(result.paths))
    np.testing.assert_allclose(probs, result.probabilities, atol=1e-5)


def test_classification_report_by_hand() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 0, 0])
    confusion, rows = classification_report(labels, predicted, ("a", "b", "c"))
    assert confusion.tolist() == [[2, 1, 0], [1, 1, 0], [1, 0, 0]]
    assert rows[0] == {
        "class": "a",
        "precision": 0.5,
        "recall": 0.666667,
        "f1": 0.571429,
        "support": 3,
    }
    assert rows[1] == {"class": "b", "precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert rows[2] == {"class": "c", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
