"""Export: ONNX and pt2 files reproduce the PyTorch model, carry their metadata, fail loudly."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from cnnkit.data.preprocessing import Preprocessing
from cnnkit.errors import CheckpointError, ExportError, RunDirError
from cnnkit.export import (
    ExportReport,
    OnnxClassifier,
    check_parity,
    export_onnx,
    export_pt2,
    load_predictor,
    load_pt2,
    sample_images,
)
from cnnkit.inference import Classifier, Predictor, expand_inputs
from cnnkit.model_io import load_model
from numerics import PROB_ATOL


@pytest.fixture(scope="module")
def onnx_export(trained_run, tmp_path_factory) -> ExportReport:
    run, _ = trained_run
    return export_onnx(run, tmp_path_factory.mktemp("onnx") / "model.onnx")


@pytest.fixture(scope="module")
def pt2_export(trained_run, tmp_path_factory) -> ExportReport:
    """A pt2 export to the default path, in a copy of the run directory."""
    run, _ = trained_run
    copy = tmp_path_factory.mktemp("pt2") / "run"
    shutil.copytree(run, copy)
    return export_pt2(copy)


@pytest.fixture(scope="module")
def val_images(trained_run) -> np.ndarray:
    """40 of the run's validation images, uint8 (N, S, S, C)."""
    run, _ = trained_run
    _, meta = load_model(run)
    images, source = sample_images(run, meta, count=40)
    assert "validation images" in source
    return images


def torch_logits(run: Path, images: np.ndarray) -> np.ndarray:
    """The trusted reference: the run's network in fp32 on explicitly normalised floats."""
    model, meta = load_model(run)
    x = torch.from_numpy(images).float().permute(0, 3, 1, 2) / 255.0  # (B, C, S, S)
    mean = torch.tensor(meta.preprocessing.mean).view(1, -1, 1, 1)
    std = torch.tensor(meta.preprocessing.std).view(1, -1, 1, 1)
    with torch.no_grad():
        return model.eval()((x - mean) / std).numpy()


# ------------------------------------------------------------------------------------ onnx


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_onnx_matches_pytorch_at_batch_size(onnx_export, trained_run, val_images, batch) -> None:
    run, _ = trained_run
    exported = OnnxClassifier(onnx_export.path)
    images = val_images[:batch]
    got = exported.logits(images).numpy()  # (batch, classes)
    expected = torch_logits(run, images)
    assert got.shape == (batch, 3)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert (got.argmax(1) == expected.argmax(1)).all()
    # the probabilities output is the softmax of the logits
    (probs,) = exported.session.run(["probabilities"], {"image": images})
    np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(expected), 1), atol=1e-5)


def test_onnx_file_has_dynamic_batch_uint8_input_and_metadata(onnx_export, trained_run) -> None:
    run, _ = trained_run
    _, meta = load_model(run)
    proto = onnx.load(str(onnx_export.path))
    onnx.checker.check_model(proto)
    (inp,) = proto.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == "image"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims[0].dim_param and not dims[0].dim_value  # symbolic: any batch size
    assert tuple(d.dim_value for d in dims[1:]) == meta.preprocessing.shape
    assert [o.name for o in proto.graph.output] == ["logits", "probabilities"]
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["classes"]) == list(meta.classes) == ["circle", "square", "triangle"]
    assert Preprocessing.from_dict(json.loads(props["preprocessing"])) == meta.preprocessing
    assert not {"input_size", "channels", "mean", "std", "resize"} & set(props)  # said once
    assert props["input_layout"] == "NHWC" and props["input_dtype"] == "uint8"
    assert "inside the graph" in props["normalization"]
    # no training-mode operators survive: batchnorm is folded or in inference form
    ops = {node.op_type for node in proto.graph.node}
    assert "Dropout" not in ops and "BatchNormalizationTraining" not in ops


def test_onnx_report_says_how_close_it_is(onnx_export) -> None:
    parity = onnx_export.parity
    assert onnx_export.format == "onnx" and onnx_export.opset and onnx_export.opset >= 13
    assert parity.batch_sizes == (1, 7, 32)
    assert "validation images" in parity.source
    assert 0 <= parity.max_abs_diff < 1e-4
    assert parity.top1_agreement == 1.0
    lines = onnx_export.summary().splitlines()  # what ``cnnkit export`` prints
    assert lines[0].startswith(f"exported {onnx_export.path} (onnx, opset {onnx_export.opset}, ")
    assert lines[1] == f"verified on {parity.source}, batch sizes 1, 7, 32"
    assert lines[2].startswith("max abs difference ") and "(tolerance 0.001)" in lines[2]
    assert lines[2].endswith("top-1 agreement 100.00%") and len(lines) == 3
    assert onnx_export.size_bytes == onnx_export.path.stat().st_size > 0


def test_a_run_directory_and_both_exports_are_predictors_with_one_interface(
    onnx_export, pt2_export, trained_run
) -> None:
    """One ``Predictor`` interface; only the run directory's has a network to look inside,
    and an exported file's is no ``Classifier`` with half of it switched off."""
    run, _ = trained_run
    loaded = [load_predictor(source) for source in (run, onnx_export.path, pt2_export.path)]
    assert all(isinstance(p, Predictor) for p in loaded)
    assert [isinstance(p, Classifier) for p in loaded] == [True, False, False]
    assert [hasattr(p, "model") for p in loaded] == [True, False, False]
    for p in loaded:
        assert p.classes == ("circle", "square", "triangle") and p.precision == "fp32"
        assert p.predict_proba([]).shape == (0, 3)
        assert p is loaded[0] or p.device.type == "cpu"  # exports run on the CPU
    with pytest.raises(TypeError, match="abstract"):
        Predictor()  # logits and _size are each kind's own


def test_onnx_and_pytorch_predict_the_same_classes(onnx_export, trained_run, shapes_dir) -> None:
    run, _ = trained_run
    files = expand_inputs([shapes_dir])[::10]  # 60 images, every class
    torch_model = load_predictor(run)
    torch_preds = torch_model.predict(files)
    onnx_preds = load_predictor(onnx_export.path).predict(files)
    assert isinstance(load_predictor(onnx_export.path), OnnxClassifier)
    # The same class, except for an image whose top two classes are within the rounding of
    # PyTorch's precision (bf16 on CPUs with native bf16: tests/numerics.py), which another
    # kernel may order either way (seen with oneDNN limited to AVX2: 47.2% against 46.1%).
    tie = 2 * PROB_ATOL[torch_model.precision]
    for a, b in zip(onnx_preds, torch_preds, strict=True):
        first, second = sorted(b.probabilities.values())[-2:][::-1]
        assert a.label == b.label or first - second < tie, (a.source, a.label, b.probabilities)
        assert a.source == b.source
        assert a.probabilities.keys() == b.probabilities.keys()
        for name in a.probabilities:  # PyTorch may run in bf16 on this CPU: loose check
            assert a.probabilities[name] == pytest.approx(b.probabilities[name], abs=0.02)


def test_failed_verification_raises_and_leaves_no_file(trained_run, tmp_path, monkeypatch) -> None:
    import cnnkit.export.base as export_base  # where every exporter's reference comes from

    run, _ = trained_run
    real = export_base.reference_logits

    def off_by_a_bit(model, meta):
        reference = real(model, meta)
        return lambda images: reference(images) + 0.01

    monkeypatch.setattr(export_base, "reference_logits", off_by_a_bit)
    out = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match=r"differs from the PyTorch model by up to 0\.01"):
        export_onnx(run, out, check_images=8)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file either


def test_export_refuses_bad_arguments(trained_run, tmp_path) -> None:
    run, _ = trained_run
    with pytest.raises(ExportError, match=r"expected a file name ending in \.onnx"):
        export_onnx(run, tmp_path / "model.pt2")
    with pytest.raises(ExportError, match=r"expected a file name ending in \.pt2"):
        export_pt2(run, tmp_path / "model.onnx")
    with pytest.raises(ExportError, match=r"^opset: expected 13 or newer, got 9$"):
        export_onnx(run, tmp_path / "m.onnx", opset=9)
    with pytest.raises(RunDirError, match="not a run directory"):
        export_onnx(tmp_path / "missing", tmp_path / "m.onnx")


# ------------------------------------------------------------------------------------- pt2


def test_pt2_matches_pytorch_at_batch_sizes(pt2_export, trained_run, val_images) -> None:
    run, _ = trained_run
    logits, meta = load_pt2(pt2_export.path)
    assert meta.classes == ("circle", "square", "triangle")
    for batch in (1, 7, 32):
        images = val_images[:batch]
        np.testing.assert_allclose(logits(images), torch_logits(run, images), atol=1e-4, rtol=0)
    assert pt2_export.path.name == "model.pt2" and pt2_export.path.parent.name == "run"
    assert pt2_export.format == "pt2" and pt2_export.opset is None
    assert pt2_export.parity.top1_agreement == 1.0
    assert pt2_export.parity.max_abs_diff < 1e-4


# ------------------------------------------------------------------------------ the checks


def test_check_parity_passes_equal_and_fails_different_models() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 4, 4, 3), dtype=np.uint8)
    weights = rng.normal(size=(4 * 4 * 3, 5))

    def reference(batch: np.ndarray) -> np.ndarray:
        return batch.reshape(len(batch), -1).astype(np.float64) @ weights / 255.0

    parity = check_parity(reference, reference, images, source="20 test images")
    assert parity.max_abs_diff < 1e-12 and parity.top1_agreement == 1.0
    assert parity.images == 20 and parity.batch_sizes == (1, 7, 32)
    with pytest.raises(ExportError, match=r"differs .* by up to 0\.005 at batch size 1"):
        check_parity(reference, lambda b: reference(b) + 0.005, images)

    with pytest.raises(ExportError, match=r"output shape \(20, 4\) at batch size 1"):
        check_parity(reference, lambda b: reference(b)[:, :4], images)
    with pytest.raises(ExportError, match="non-finite"):
        check_parity(reference, lambda b: reference(b) * np.nan, images)


def test_check_parity_catches_a_batch_dependent_export() -> None:
    """An export that behaves differently per batch size (train-mode batchnorm) fails."""
    images = np.random.default_rng(1).integers(0, 256, (32, 2, 2, 1), dtype=np.uint8)

    def reference(batch: np.ndarray) -> np.ndarray:
        x = batch.reshape(len(batch), -1).astype(np.float64)
        return np.stack([x.mean(1), -x.mean(1)], axis=1)

    def batch_statistics(batch: np.ndarray) -> np.ndarray:
        out = reference(batch)
        return out - out.mean(0) if len(batch) > 1 else out

    with pytest.raises(ExportError, match="at batch size 7"):
        check_parity(reference, batch_statistics, images)


def test_sample_images_fall_back_to_random_ones(trained_run, tmp_path) -> None:
    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = (copy / "config.yaml").read_text()
    _, meta = load_model(run)
    data_path = json.dumps(str(tmp_path / "gone"))
    lines = [
        f"  path: {data_path}" if line.strip().startswith("path:") else line
        for line in config.splitlines()
    ]
    (copy / "config.yaml").write_text("\n".join(lines) + "\n")
    images, source = sample_images(copy, meta, count=5)
    assert (
        source == f"5 random images, because the data folder {tmp_path / 'gone'} no longer exists"
    )
    assert images.shape == (
        5,
        meta.preprocessing.size,
        meta.preprocessing.size,
        meta.preprocessing.channels,
    )
    assert images.dtype == np.uint8
    again, _ = sample_images(copy, meta, count=5)
    np.testing.assert_array_equal(images, again)  # seeded


def test_onnx_classifier_refuses_what_is_not_a_cnnkit_export(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no such ONNX file"):
        OnnxClassifier(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf")
    with pytest.raises(CheckpointError, match="not a valid ONNX model"):
        OnnxClassifier(junk)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    plain = tmp_path / "plain.onnx"
    onnx.save(onnx.helper.make_model(graph), str(plain))
    with pytest.raises(CheckpointError, match="has no cnnkit metadata"):
        OnnxClassifier(plain)


class _RunsCommand:
    """A pickle whose loading runs ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _rewrite(src: Path, dst: Path, replace: dict[str, bytes], add: dict[str, bytes]) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, replace.get(item.filename, zin.read(item.filename)))
        for name, data in add.items():
            zout.writestr(name, data)


def test_load_pt2_runs_nothing_from_a_crafted_archive(pt2_export, tmp_path) -> None:
    marker = tmp_path / "pwned"
    payload = tmp_path / "payload.pt"
    torch.save(_RunsCommand(f"touch {marker}"), payload)
    root = "archive/"
    config_name = f"{root}data/weights/model_weights_config.json"
    with zipfile.ZipFile(pt2_export.path) as archive:
        config = json.loads(archive.read(config_name))
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True  # torch.export.load then torch.load()s it, weights_only=False
    pickled_weight = tmp_path / "pickled_weight.pt2"
    _rewrite(
        pt2_export.path,
        pickled_weight,
        {
            config_name: json.dumps(config).encode(),
            f"{root}data/weights/{first['path_name']}": payload.read_bytes(),
        },
        {},
    )
    with pytest.raises(CheckpointError, match=r"refused, it holds pickled Python objects"):
        load_pt2(pickled_weight)
    opaque = tmp_path / "opaque.pt2"
    _rewrite(
        pt2_export.path, opaque, {}, {f"{root}data/constants/opaque_obj_0": payload.read_bytes()}
    )
    with pytest.raises(CheckpointError, match=r"refused, it holds an entry"):
        load_pt2(opaque)
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match=r"not a torch\.export archive"):
        load_pt2(junk)
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored


def _constant_payload_attack(src: Path, dst: Path, entry: str, path_name: str, payload: bytes):
    """``src`` with one more constant: the constants table names ``path_name`` (which torch
    looks up case-insensitively) and the archive stores the pickle as ``entry``."""
    root = "archive/"
    config_name = f"{root}data/constants/model_constants_config.json"
    with zipfile.ZipFile(src) as archive:
        config = json.loads(archive.read(config_name))
    config["config"]["evil"] = {
        "path_name": path_name,
        "is_param": False,
        "use_pickle": True,
        "tensor_meta": None,
    }
    _rewrite(
        src,
        dst,
        {config_name: json.dumps(config).encode()},
        {f"{root}data/constants/{entry}": payload},
    )


@pytest.mark.parametrize(
    ("entry", "path_name"),
    [
        ("OPAQUE_OBJ_0", "opaque_obj_0"),  # miniz finds the upper-case name for torch
        ("Opaque_Obj_0", "opaque_obj_0"),
        ("CUSTOM_OBJ_0", "custom_obj_0"),
        ("opaque_obj_0", "opaque_obj_0"),
        ("TENSOR_0", "tensor_0"),  # a pickled tensor constant: torch.load(weights_only=False)
    ],
)
def test_load_pt2_refuses_pickled_constants_of_any_case(
    pt2_export, tmp_path, entry: str, path_name: str
) -> None:
    import pickle

    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.pt2"
    _constant_payload_attack(
        pt2_export.path,
        crafted,
        entry,
        path_name,
        pickle.dumps(_RunsCommand(f"touch {marker}")),
    )
    with pytest.raises(CheckpointError) as refused:
        load_pt2(crafted)
    assert not marker.exists(), "loading the .pt2 ran the command inside it"
    assert "refused" in str(refused.value)


def _graph_attack(src: Path, dst: Path, change) -> None:
    name = "archive/models/model.json"
    with zipfile.ZipFile(src) as archive:
        graph = json.loads(archive.read(name))
    change(graph)
    _rewrite(src, dst, {name: json.dumps(graph).encode()}, {})


def _first(tree, key: str) -> dict:
    """The first mapping in ``tree`` that has ``key``."""
    stack = [tree]
    while stack:
        node = stack.pop(0)
        if isinstance(node, dict):
            if key in node:
                return node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    raise AssertionError(f"no {key!r} in the graph")


@pytest.mark.parametrize("attack", ["size expression", "guard code", "call target"])
def test_load_pt2_refuses_a_graph_that_would_run_python(pt2_export, tmp_path, attack) -> None:
    marker = tmp_path / "pwned"
    code = f"__import__('os').system('touch {marker}')"

    def change(graph: dict) -> None:
        if attack == "size expression":  # sympy.sympify evaluates the string
            _first(graph, "expr_str")["expr_str"] = code
        elif attack == "guard code":  # torch compiles guards into a Python function
            _first(graph, "guards_code")["guards_code"] = [f"{code} or True"]
        else:
            _first(graph, "target")["target"] = "torch.serialization.load"

    crafted = tmp_path / "crafted.pt2"
    _graph_attack(pt2_export.path, crafted, change)
    with pytest.raises(CheckpointError) as refused:
        load_pt2(crafted)
    assert not marker.exists(), "loading the .pt2 ran the command inside it"
    assert "refused, its graph" in str(refused.value)
