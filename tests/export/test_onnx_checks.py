"""Hostile ONNX files: refused before onnxruntime loads them, with one clear error each.

The files are built here with ``onnx.helper``: a small graph shaped like a cnnkit export
(uint8 NHWC in, normalisation, conv, pooling, dense, logits and probabilities out), then
changed the way an attacker would: an operator that expands a tensor to gigabytes at run
time, allowed operators that grow a tensor with the square of the batch or pad it to 40,000
pixels, weights stored in another file, metadata with a size of 30,000 pixels or a NaN mean.
Real exports pass the same checks in ``test_export.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from cnnkit.cli import app  # noqa: E402
from cnnkit.data.preprocessing import Preprocessing  # noqa: E402
from cnnkit.errors import CheckpointError  # noqa: E402
from cnnkit.export import onnx_check, runtime  # noqa: E402
from cnnkit.export.graph import metadata_for  # noqa: E402
from cnnkit.export.runtime import OnnxClassifier  # noqa: E402
from cnnkit.model_io import ModelMeta  # noqa: E402

META = ModelMeta(
    classes=("circle", "square", "triangle"),
    preprocessing=Preprocessing(
        size=16,
        channels=3,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        resize="crop",
    ),
    architecture=(),
)
OPSET = 17


def export_like(
    meta: ModelMeta = META,
    middle: Callable[[list, list], str] | None = None,
    outputs: int | None = None,
    image_side: int | None = None,
) -> onnx.ModelProto:
    """A graph like a cnnkit export of conv(4) -> relu -> global max pooling -> dense.

    ``middle(nodes, weights)`` may add nodes after the ReLU (output ``"r"``, shape
    (batch, 4, S, S)) and returns the name to pool instead.
    """
    side, channels = image_side or meta.preprocessing.size, meta.preprocessing.channels
    classes = outputs or len(meta.classes)
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.normal(size=(4, channels, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(size=(classes, 4)).astype(np.float32), "wd"),
        numpy_helper.from_array(np.array(255.0, dtype=np.float32), "scale"),
    ]
    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["f", "scale"], ["fs"]),
        helper.make_node("Transpose", ["fs"], ["x"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"]),
    ]
    pooled = middle(nodes, weights) if middle else "r"
    nodes += [
        helper.make_node("GlobalMaxPool", [pooled], ["g"]),
        helper.make_node("Flatten", ["g"], ["v"]),
        helper.make_node("Gemm", ["v", "wd"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnnkit",
        [
            helper.make_tensor_value_info(
                "image", TensorProto.UINT8, ["batch", side, side, channels]
            )
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes]),
        ],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    helper.set_model_props(model, metadata_for(meta))
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def test_the_export_like_graph_loads_and_predicts(tmp_path: Path) -> None:
    """The baseline that every hostile file below changes: accepted, and it runs."""
    classifier = OnnxClassifier(save(export_like(), tmp_path / "ok.onnx"))
    assert classifier.classes == META.classes
    images = np.random.default_rng(1).integers(0, 256, size=(5, 16, 16, 3), dtype=np.uint8)
    assert classifier.logits(images).shape == (5, 3)


# ------------------------------------------------------------------------------- graphs


def expanded(op: str) -> Callable[[list, list], str]:
    """``r`` made (batch, 4, 40000, 40000) by an expanding operator: 25 GB per image."""

    def middle(nodes: list, weights: list) -> str:
        if op == "Expand":
            shape = np.array([1, 4, 40_000, 40_000], dtype=np.int64)
            weights.append(numpy_helper.from_array(shape, "shape"))
            nodes.append(helper.make_node("Expand", ["r", "shape"], ["big"]))
        elif op == "Tile":
            repeats = np.array([1, 1, 2_500, 2_500], dtype=np.int64)
            weights.append(numpy_helper.from_array(repeats, "repeats"))
            nodes.append(helper.make_node("Tile", ["r", "repeats"], ["big"]))
        else:  # ConstantOfShape, added to r by broadcasting
            shape = np.array([1, 4, 40_000, 40_000], dtype=np.int64)
            weights.append(numpy_helper.from_array(shape, "shape"))
            nodes.append(helper.make_node("ConstantOfShape", ["shape"], ["zeros"]))
            nodes.append(helper.make_node("Add", ["zeros", "r"], ["big"]))
        return "big"

    return middle


@pytest.mark.parametrize("op", ["Expand", "Tile", "ConstantOfShape"])
def test_an_expanding_operator_is_refused(tmp_path: Path, op: str) -> None:
    path = save(export_like(middle=expanded(op)), tmp_path / "bomb.onnx")
    assert path.stat().st_size < 2500  # mostly metadata
    with pytest.raises(CheckpointError, match=rf"not a cnnkit export \(operator '{op}' of node"):
        OnnxClassifier(path)


def padded(nodes: list, weights: list) -> str:
    """Allowed operators only: r padded to (batch, 4, 40016, 40016), 6.4 G values an image."""
    pads = np.array([0, 0, 20_000, 20_000, 0, 0, 20_000, 20_000], dtype=np.int64)
    weights.append(numpy_helper.from_array(pads, "pads"))
    nodes.append(helper.make_node("Pad", ["r", "pads"], ["big"]))
    return "big"


def squared(nodes: list, weights: list) -> str:
    """Allowed operators only: r broadcast against itself to (batch, batch, 1024)."""
    for name, shape in (("rows", [-1, 1, 1024]), ("cols", [1, -1, 1024])):
        weights.append(numpy_helper.from_array(np.array(shape, dtype=np.int64), f"{name}_shape"))
        nodes.append(helper.make_node("Reshape", ["r", f"{name}_shape"], [name]))
    nodes.append(helper.make_node("Add", ["rows", "cols"], ["square"]))  # (B, B, 1024)
    nodes.append(helper.make_node("ReduceMax", ["square"], ["m"], axes=[1], keepdims=0))
    weights.append(numpy_helper.from_array(np.array([-1, 4, 16, 16], dtype=np.int64), "back"))
    nodes.append(helper.make_node("Reshape", ["m", "back"], ["big"]))
    return "big"


def test_a_tensor_padded_to_gigabytes_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"\(Pad output 'big' holds 6,405,121,024 values"):
        OnnxClassifier(save(export_like(middle=padded), tmp_path / "pad.onnx"))


def test_a_tensor_growing_with_the_square_of_the_batch_is_refused(tmp_path: Path) -> None:
    model = export_like(middle=squared)
    with pytest.raises(CheckpointError, match=r"Add output 'square' grows faster than the batch"):
        OnnxClassifier(save(model, tmp_path / "square.onnx"))
    # the same graph is harmless for one image: the bound is what makes it refused
    onnx_check.check_onnx(model.SerializeToString(), "x", max_batch=1)


def with_initializer(tensor: TensorProto) -> onnx.ModelProto:
    model = export_like()
    model.graph.initializer.append(tensor)
    return model


def external_weights() -> onnx.ModelProto:
    tensor = TensorProto(name="stolen", data_type=TensorProto.FLOAT, dims=[4])
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="/etc/passwd")
    return with_initializer(tensor)


def custom_domain() -> onnx.ModelProto:
    model = export_like()
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    return model


def with_subgraph() -> onnx.ModelProto:
    model = export_like()
    model.graph.node[4].attribute.append(
        helper.make_attribute("body", helper.make_graph([], "g", [], []))
    )
    return model


def renamed_input() -> onnx.ModelProto:
    model = export_like()
    model.graph.input[0].name = "pixels"
    model.graph.node[0].input[0] = "pixels"
    return model


GRAPHS = {
    "200 M weight values": (
        lambda: with_initializer(
            TensorProto(name="w2", data_type=TensorProto.FLOAT, dims=[200_000_000])
        ),
        "200,000,121 weight values, more than 100,000,000",
    ),
    "weights in /etc/passwd": (external_weights, "weight 'stolen' refers to an external file"),
    "a custom operator domain": (custom_domain, "uses operators of domain 'com.example'"),
    "a subgraph": (with_subgraph, "node '' holds a subgraph"),
    "five scores for three classes": (
        lambda: export_like(outputs=5),
        "'logits' does not give one score per class",
    ),
    "32 px images for a 16 px model": (
        lambda: export_like(image_side=32),
        "input 'image' is not uint8 (batch, 16, 16, 3)",
    ),
    "another input name": (renamed_input, "expected input 'image' and outputs"),
}


@pytest.mark.parametrize("case", sorted(GRAPHS))
def test_a_graph_that_is_not_a_cnnkit_export_is_refused(tmp_path: Path, case: str) -> None:
    make, reason = GRAPHS[case]
    path = save(make(), tmp_path / "x.onnx")
    with pytest.raises(CheckpointError) as info:
        OnnxClassifier(path)
    assert str(info.value).startswith(f"{path}: not a cnnkit export ({reason}"), str(info.value)


# ----------------------------------------------------------------------------- metadata


def meta_json(change: Callable[[dict], None]) -> str:
    data = json.loads(META.to_json())
    change(data)
    return json.dumps(data)


METADATA = {
    "image size 30000": (
        lambda d: d["preprocessing"].update(size=30_000),
        "size: expected 4 to 1024 pixels, got 30000",
    ),
    "a NaN mean": (
        lambda d: d["preprocessing"].update(mean=[float("nan")] * 3),
        "normalisation mean[0] is nan",
    ),
    "a std of 0": (
        lambda d: d["preprocessing"].update(std=[0.25, 0.0, 0.25]),
        "normalisation std[1] is 0.0",
    ),
    "four channels of mean": (
        lambda d: d["preprocessing"].update(mean=[0.5] * 4),
        "normalisation mean has 4 values",
    ),
    "2 channels": (
        lambda d: d["preprocessing"].update(channels=2),
        "channels: expected 1 or 3, got 2",
    ),
    "no classes": (lambda d: d.update(classes=[]), "classes: expected 2 to 100,000 names"),
}


@pytest.mark.parametrize("case", sorted(METADATA))
def test_metadata_out_of_range_is_refused(tmp_path: Path, case: str) -> None:
    change, reason = METADATA[case]
    model = export_like()
    props = {p.key: p.value for p in model.metadata_props}
    props["cnnkit"] = meta_json(change)
    del model.metadata_props[:]
    helper.set_model_props(model, props)
    path = save(model, tmp_path / "x.onnx")
    with pytest.raises(CheckpointError) as info:
        OnnxClassifier(path)
    assert str(info.value).startswith(f"{path}: cnnkit metadata is damaged ({reason}")


def test_deeply_nested_metadata_is_damaged_not_a_crash(tmp_path: Path) -> None:
    model = export_like()
    for prop in model.metadata_props:
        if prop.key == "cnnkit":
            prop.value = '{"classes": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(CheckpointError, match=r"metadata is damaged \(nested too deeply\)$"):
        OnnxClassifier(save(model, tmp_path / "x.onnx"))


def test_a_file_over_the_size_bound_is_refused_unparsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save(export_like(), tmp_path / "x.onnx")
    monkeypatch.setattr(runtime, "MAX_ONNX_BYTES", 1000)
    monkeypatch.setattr(onnx_check, "MAX_ONNX_BYTES", 1000)
    with pytest.raises(CheckpointError, match=r"over 1,000 bytes, too large for a model"):
        OnnxClassifier(path)


def test_predict_with_a_hostile_onnx_file_is_one_error_line(
    tmp_path: Path, tiny_shapes: Path
) -> None:
    path = save(export_like(middle=expanded("Expand")), tmp_path / "bomb.onnx")
    image = next((tiny_shapes / "circle").iterdir())
    result = CliRunner().invoke(app, ["predict", str(path), str(image)])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: {path}: not a cnnkit export (operator 'Expand' of node '')"]
