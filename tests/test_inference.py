"""Prediction: every kind of input, probabilities, and the same preprocessing as training."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnkit.config import RunConfig, load_yaml
from cnnkit.data.dataset import prepare_data
from cnnkit.data.images import load_image
from cnnkit.data.shapes import SHAPE_CLASSES, generate_shapes
from cnnkit.errors import DataError, ImageError, RunDirError
from cnnkit.inference import Classifier, Prediction, expand_inputs, load
from cnnkit.training.loop import TrainResult
from numerics import PROB_ATOL

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def classifier(fast_trained_run: tuple[Path, TrainResult]) -> Classifier:
    run, _ = fast_trained_run
    return load(run, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def new_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shapes the model has never seen (another seed)."""
    return generate_shapes(tmp_path_factory.mktemp("new"), count=10, size=32, seed=99)


def test_classifier_knows_its_model(classifier: Classifier) -> None:
    assert classifier.classes == SHAPE_CLASSES
    assert classifier.meta.preprocessing.size == 32 and classifier.meta.preprocessing.channels == 3
    assert classifier.precision == "fp32" and classifier.device.type == "cpu"
    assert not classifier.model.training


def test_predictions_on_new_images_are_right(classifier: Classifier, new_shapes: Path) -> None:
    files = expand_inputs([new_shapes])
    predictions = classifier.predict(files)
    truth = [p.parent.name for p in files]
    correct = sum(p.label == t for p, t in zip(predictions, truth, strict=True))
    assert correct / len(files) >= 0.85
    for pred, path in zip(predictions, files, strict=True):
        assert pred.source == str(path)
        assert set(pred.probabilities) == set(SHAPE_CLASSES)
        assert sum(pred.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert pred.confidence == max(pred.probabilities.values())
        assert pred.label == max(pred.probabilities, key=pred.probabilities.get)


def test_probabilities_sum_to_one(classifier: Classifier, new_shapes: Path) -> None:
    probs = classifier.predict_proba(expand_inputs([new_shapes / "circle"]))
    assert probs.shape == (10, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs >= 0).all()
    assert classifier.predict_proba([]).shape == (0, 3)
    assert classifier.predict([]) == []


def test_every_kind_of_input_gives_the_same_answer(
    classifier: Classifier, new_shapes: Path
) -> None:
    path = new_shapes / "triangle" / "triangle_00003.png"
    pil = Image.open(path)
    array = np.asarray(pil)  # (32, 32, 3) uint8
    rgba = np.dstack([array, np.full(array.shape[:2], 255, np.uint8)])
    inputs = [
        path,
        str(path),
        path.read_bytes(),
        io.BytesIO(path.read_bytes()),
        pil,
        array,
        rgba,
        array.astype(np.float32),
    ]
    # Every kind of input becomes the same uint8 pixels (exact: integers)...
    pixels = [classifier.preprocess(im) for im in inputs]
    for other in pixels[1:]:
        np.testing.assert_array_equal(other, pixels[0])
    # ...and the same probabilities, to float32's rounding: rows of one batch may be computed
    # by different kernel code (tests/numerics.py), so not bit for bit.
    probs = classifier.predict_proba(inputs)
    for row in probs[1:]:
        np.testing.assert_allclose(row, probs[0], rtol=0, atol=PROB_ATOL["fp32"])
    assert len({int(np.argmax(row)) for row in probs}) == 1
    sources = [p.source for p in classifier.predict(inputs[:1] + inputs[2:3] + inputs[4:6])]
    assert sources == [str(path), "<bytes>", "<PngImageFile>", "<ndarray>"]


def test_a_single_input_needs_no_list(classifier: Classifier, new_shapes: Path) -> None:
    path = new_shapes / "square" / "square_00000.png"
    for one in (path, str(path), path.read_bytes(), Image.open(path), np.asarray(Image.open(path))):
        (pred,) = classifier.predict(one)
        assert isinstance(pred, Prediction)


def test_greyscale_arrays_are_accepted(classifier: Classifier, new_shapes: Path) -> None:
    grey = np.asarray(Image.open(new_shapes / "circle" / "circle_00001.png").convert("L"))
    np.testing.assert_array_equal(
        classifier.preprocess(grey), classifier.preprocess(grey[..., None])
    )
    a, b = classifier.predict_proba([grey, grey[:, :, None]])  # two rows: see tests/numerics.py
    np.testing.assert_allclose(a, b, rtol=0, atol=PROB_ATOL["fp32"])
    assert classifier.preprocess(grey).shape == (32, 32, 3)  # the model wants colour


def test_preprocess_equals_the_cached_training_array(
    classifier: Classifier, fast_trained_run: tuple[Path, TrainResult]
) -> None:
    run, _ = fast_trained_run
    cfg = RunConfig.from_dict(load_yaml(run / "config.yaml"))
    data = prepare_data(cfg.data, classifier.meta.preprocessing.size)
    for split in (data.train, data.val):
        for i in (0, 7, len(split) - 1):
            np.testing.assert_array_equal(classifier.preprocess(split.paths[i]), split.images[i])


def test_preprocess_follows_the_model_settings(
    fast_trained_run: tuple[Path, TrainResult], tmp_path: Path
) -> None:
    run, _ = fast_trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    meta = json.loads((copy / "model.json").read_text())
    meta["preprocessing"]["resize"] = "pad"
    (copy / "model.json").write_text(json.dumps(meta))
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 60, 3), np.uint8))
    padded = load(copy, device="cpu", precision="fp32").preprocess(wide)
    np.testing.assert_array_equal(padded, load_image(wide, 32, 3, "pad"))
    assert (padded[:8] == 0).all()  # black bars: it was padded, not cropped


def test_logits_match_the_model(classifier: Classifier, new_shapes: Path) -> None:
    import torch

    from cnnkit.data.images import to_model_input

    batch = np.stack([classifier.preprocess(p) for p in expand_inputs([new_shapes / "square"])])
    with torch.no_grad():
        x = to_model_input(
            torch.from_numpy(batch),
            classifier.meta.preprocessing.mean,
            classifier.meta.preprocessing.std,
        )
        expected = classifier.model(x)
    torch.testing.assert_close(classifier.logits(batch), expected)


def test_bf16_or_auto_precision_agrees_closely(
    fast_trained_run: tuple[Path, TrainResult], classifier: Classifier, new_shapes: Path
) -> None:
    run, _ = fast_trained_run
    files = expand_inputs([new_shapes])
    exact = classifier.predict_proba(files)
    auto = load(run, device="cpu").predict_proba(files)
    assert np.abs(exact - auto).max() < 0.05
    assert (exact.argmax(1) == auto.argmax(1)).mean() >= 0.95


def test_prediction_top_and_dict() -> None:
    pred = Prediction("x.png", "b", 0.6, {"a": 0.1, "b": 0.6, "c": 0.3})
    assert pred.top(2) == [("b", 0.6), ("c", 0.3)]
    assert pred.to_dict(1) == {
        "source": "x.png",
        "label": "b",
        "confidence": 0.6,
        "probabilities": {"b": 0.6},
    }
    assert pred.to_dict()["probabilities"] == {"a": 0.1, "b": 0.6, "c": 0.3}


# --------------------------------------------------------------------------- errors


def test_bad_inputs_raise_image_error(classifier: Classifier, tmp_path: Path) -> None:
    with pytest.raises(ImageError) as info:
        classifier.predict(np.zeros((4, 4, 2), np.uint8))
    assert str(info.value) == (
        "array of shape (4, 4, 2): expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
    )
    with pytest.raises(ImageError, match="array of shape \\(2, 4, 4, 3\\)"):
        classifier.predict(np.zeros((2, 4, 4, 3), np.uint8))
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    with pytest.raises(ImageError, match=f"^{bad}: not an image"):
        classifier.predict([bad])
    with pytest.raises(ImageError, match=f"^{tmp_path / 'gone.png'}: file not found$"):
        classifier.predict(tmp_path / "gone.png")
    with pytest.raises(ImageError, match=r"^<image bytes>: "):
        classifier.predict(b"\x89PNG\r\n\x1a\n broken")


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match="not a run directory"):
        load(tmp_path)


def test_expand_inputs(tmp_path: Path) -> None:
    for name in ("b.png", "a.jpg", ".hidden.png", "notes.txt"):
        (tmp_path / "folder" / "sub").mkdir(parents=True, exist_ok=True)
        (tmp_path / "folder" / name).write_bytes(b"x")
    (tmp_path / "folder" / "sub" / "c.webp").write_bytes(b"x")
    single = tmp_path / "single.bmp"
    single.write_bytes(b"x")
    assert expand_inputs([single, tmp_path / "folder"]) == [
        single,
        tmp_path / "folder" / "a.jpg",
        tmp_path / "folder" / "b.png",
        tmp_path / "folder" / "sub" / "c.webp",
    ]
    assert expand_inputs([str(tmp_path / "missing.png")]) == [tmp_path / "missing.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"^{tmp_path / 'empty'}: no images found \\(looked for "):
        expand_inputs([tmp_path / "empty"])


def test_float_arrays_in_unit_range_are_scaled_like_pixels(
    trained_run: tuple[Path, TrainResult], shapes_dir: Path
) -> None:
    model = load(trained_run[0], precision="fp32")
    path = next((shapes_dir / "circle").iterdir())
    pixels = np.asarray(Image.open(path).convert("RGB"))
    as_unit = pixels.astype(np.float32) / 255.0
    assert np.array_equal(model.preprocess(as_unit), model.preprocess(pixels))
