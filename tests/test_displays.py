"""What cnnkit's objects show in Jupyter (``_repr_html_``, ``_repr_png_``) and in a plain
``repr`` (what the object is, on one line, not a wall of numbers); and the public functions
``cnnkit.inspect``, ``explain_conv``, ``explain_pixel`` and ``report``."""

from __future__ import annotations

import base64
import dataclasses
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cnnkit
from cnnkit.data.shapes import draw_shape
from cnnkit.inspection import explain_pool
from cnnkit.inspection.html import esc
from cnnkit.inspection.maps import layer_outputs
from cnnkit.inspection.pixel import render_pixel
from cnnkit.inspection.render import map_grid, vector_strip

pytestmark = pytest.mark.usefixtures("single_thread")


def short(text: str, most: int = 300) -> None:
    """One line that names the object, without a dump of arrays."""
    assert "\n" not in text and len(text) <= most, text
    assert "array(" not in text and "tensor(" not in text, text


def cells(html: str) -> list[str]:
    return re.findall(r"<td[^>]*>(.*?)</td>", html)


@pytest.fixture(scope="module")
def classifier(fast_trained_run):
    run, _ = fast_trained_run
    return cnnkit.load(run, device="cpu", precision="fp32")


@pytest.fixture
def triangle(tmp_path: Path) -> Path:
    path = tmp_path / "triangle.png"
    draw_shape("triangle", 32, np.random.default_rng(5)).save(path)
    return path


def test_classifier_says_model_classes_and_input_and_shows_its_layers(classifier) -> None:
    text = repr(classifier)
    short(text)
    assert text.startswith("Classifier(fast, 3 classes: circle, square, triangle; input 32x32x3")
    html = classifier._repr_html_()
    for info in classifier.model.infos:  # the model table, one row per layer
        assert f"<td>{info.name}</td><td>{info.spec.type}</td>" in html
    total = sum(p.numel() for p in classifier.model.parameters())
    assert f"{total:,}" in cells(html)
    assert "3: circle, square, triangle" in cells(html)


def test_an_exported_classifier_says_so(classifier) -> None:
    from cnnkit.export.runtime import OnnxClassifier

    onnx = OnnxClassifier.__new__(OnnxClassifier)  # without onnxruntime: only what repr reads
    onnx.path, onnx.meta = Path("shapes.onnx"), classifier.meta
    onnx.device, onnx.precision = torch.device("cpu"), "fp32"
    short(repr(onnx))
    assert repr(onnx).startswith("OnnxClassifier(shapes.onnx, 3 classes: circle, square, ")
    assert "no PyTorch network" in repr(onnx)
    assert "cnnkit classifier: shapes.onnx" in onnx._repr_html_()


def test_a_prediction_shows_its_image_and_bars(classifier, triangle: Path) -> None:
    (pred,) = classifier.predict(triangle)
    text = repr(pred)
    short(text)
    assert text.startswith(f"Prediction({str(triangle)!r}: {pred.label}; {pred.label} ")
    html = pred._repr_html_()
    (image,) = re.findall(r"src='data:image/png;base64,([^']+)'", html)
    assert Image.open(io.BytesIO(base64.b64decode(image))).size == (128, 128)
    for name, p in pred.probabilities.items():
        assert f"<td>{name}</td>" in html and f"{100 * p:.1f}%" in html
    (from_array,) = classifier.predict(np.asarray(Image.open(triangle)))
    assert "data:image/png;base64," in from_array._repr_html_()
    assert from_array.label == pred.label
    assert dataclasses.replace(pred, image=None) == pred  # the picture is not the answer
    triangle.unlink()  # a file gone since: the bars stay, the picture says why it is missing
    assert "cannot be read any more" in pred._repr_html_()


def test_an_evaluation_shows_scores_and_the_confusion_matrix(fast_trained_run) -> None:
    run, _ = fast_trained_run
    result = cnnkit.evaluate(run, result_data(run), split="val")
    text = repr(result)
    short(text)
    assert f"{result.count} images, accuracy {100 * result.accuracy:.2f}%" in text
    html = result._repr_html_()
    for row in result.per_class:
        assert f"<td>{row['class']}</td><td>{row['precision']:.3f}</td>" in html
    counts = re.findall(r"<td style='background: [^']+'>(\d+)</td>", html)
    assert [int(c) for c in counts] == result.confusion.ravel().tolist()


def result_data(run: Path) -> str:
    from cnnkit.config import RunConfig, load_yaml

    return RunConfig.from_dict(load_yaml(run / "config.yaml")).data.path


def test_a_training_result_says_how_it_went_and_shows_the_curves(fast_trained_run) -> None:
    _, result = fast_trained_run
    text = repr(result)
    short(text)
    assert f"best validation accuracy {100 * result.best_val_acc:.2f}%" in text
    html = result._repr_html_()
    assert "data:image/png;base64," in html and "<td>best_epoch</td>" in html


def test_layer_outputs_say_what_they_are_and_draw_their_maps(classifier) -> None:
    x = torch.zeros(1, 3, 32, 32)
    outputs = layer_outputs(classifier.model, x)
    conv, vector = outputs[0], outputs[-1]
    short(repr(conv))
    assert repr(conv).startswith(f"LayerOutput(conv1 (conv): {conv.values.shape[0]} maps of 32x32")
    picture = np.asarray(Image.open(io.BytesIO(conv._repr_png_())))
    np.testing.assert_array_equal(picture, map_grid(conv.values, cols=8))
    strip = np.asarray(Image.open(io.BytesIO(vector._repr_png_())))
    np.testing.assert_array_equal(strip, vector_strip(vector.values))


def test_the_pixel_explanation_shows_its_arithmetic(classifier, triangle: Path) -> None:
    ex = cnnkit.explain_pixel(classifier, triangle, "conv1", 2, (5, 7))
    text = repr(ex)
    short(text)
    assert text.startswith("PixelExplanation(conv1 (conv), map 2, row 5, column 7: ")
    html = ex._repr_html_()
    assert "The arithmetic equals the model's own forward pass" in html
    assert f"<pre>{esc(render_pixel(ex))}</pre>" in html


def test_conv_and_pool_explanations_show_the_worked_example() -> None:
    conv = cnnkit.explain_conv()
    short(repr(conv))
    assert "16 sums, the first 155" in repr(conv)
    html = conv._repr_html_()
    assert "= 155" in html and "data:image/png;base64," in html
    pool = explain_pool()
    short(repr(pool))
    assert "9 windows -> 3x3" in repr(pool) and "<pre>" in pool._repr_html_()


def test_inspect_is_public_and_its_result_shows_the_pictures(fast_trained_run, triangle, tmp_path):
    run, _ = fast_trained_run
    result = cnnkit.inspect(run, triangle, tmp_path / "inspect")
    assert result.index.is_file()
    text = repr(result)
    short(text)
    assert text.startswith(f"InspectResult({result.predicted} (")
    html = result._repr_html_()
    assert html.count("data:image/png;base64,") == 2 + len(result.layers)  # input, Grad-CAM
    assert f"<b>{result.predicted}</b>" in html


def test_explain_conv_and_pixel_are_the_library_functions(classifier, triangle) -> None:
    assert cnnkit.explain_conv().steps[0].sum == 155
    zero = cnnkit.explain_conv([[1, 2], [3, 4]], [[1, 0], [0, 1]], padding="zero")
    assert zero.result.tolist() == [[5, 2], [3, 4]]
    ex = cnnkit.explain_pixel(classifier, triangle, classifier.model.infos[-1].name, 0)
    assert ex.matches and ex.label == "circle" and ex.activation == "softmax"


def test_report_is_public_and_callable_after_every_module_was_imported(
    fast_trained_run, tmp_path: Path
) -> None:
    run, _ = fast_trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    import cnnkit.reporting.build

    assert callable(cnnkit.report) and not isinstance(cnnkit.report, type(cnnkit))
    path = cnnkit.report(copy, out=tmp_path / "r.html")
    assert path == tmp_path / "r.html" and "<h1>Training report: run</h1>" in path.read_text()
    assert cnnkit.report(copy) == copy / "report.html"


def test_the_public_functions_are_documented() -> None:
    for name in ("train", "load", "evaluate", "inspect", "explain_conv", "explain_pixel"):
        assert name in cnnkit.__all__ and getattr(cnnkit, name).__doc__
    assert "report" in cnnkit.__all__ and cnnkit.report.__doc__


def test_the_notebook_bar_keeps_the_loops_calls_in_its_html(monkeypatch) -> None:
    drawn: list[str] = []

    class Handle:
        def update(self, obj) -> None:
            drawn.append(obj.data)

    import IPython.display

    from cnnkit.training.notebook import NotebookProgress

    monkeypatch.setattr(IPython.display, "display", lambda obj, display_id: Handle())
    with NotebookProgress() as bar:
        task = bar.add_task("train", total=4, epoch="", loss="-", acc="-", speed="")
        bar.reset(task, total=4, completed=0, epoch="1/2", loss="-", acc="-", speed="")
        bar.update(task, completed=3, loss="0.5000", acc="75.0%", speed="<b>9</b> img/s")
    assert "epoch 1/2" in drawn[-1] and "<progress value='3' max='4'>" in drawn[-1]
    assert "loss 0.5000" in drawn[-1] and "&lt;b&gt;9&lt;/b&gt; img/s" in drawn[-1]
