"""One description of preprocessing: the ``Preprocessing`` a run saves is the very one its
``model.json``, its ONNX and pt2 exports and the server's ``GET /model`` give back, and run
directories and exports written before it (size, channels, mean, std as top-level keys) load."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnkit.data.preprocessing import Preprocessing
from cnnkit.errors import ConfigError
from cnnkit.export.graph import META_KEY, meta_from_metadata
from cnnkit.inference import load
from cnnkit.model_io import ModelMeta, load_model, save_model
from cnnkit.models import build_network, load_model_spec
from cnnkit.models.weights import plan_weights

# No field at its default and no two alike, so a field lost or swapped on the way shows.
UNUSUAL = Preprocessing(size=24, channels=1, mean=(0.3,), std=(0.7,), resize="pad")


def test_the_json_object_holds_every_field_and_reads_back_equal() -> None:
    names = {field.name for field in dataclasses.fields(Preprocessing)}
    assert set(UNUSUAL.to_dict()) == names
    assert Preprocessing.from_dict(json.loads(json.dumps(UNUSUAL.to_dict()))) == UNUSUAL
    assert UNUSUAL.shape == (24, 24, 1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"size": 2}, "size: expected 4 to 1024 pixels, got 2"),
        ({"channels": 2}, "channels: expected 1 or 3, got 2"),
        ({"resize": "zoom"}, "resize: expected one of crop, squash, pad, got 'zoom'"),
        ({"mean": (0.3, 0.3)}, "normalisation mean has 2 values for 1 channels"),
        ({"std": (0.0,)}, "normalisation std[0] is 0.0: every input would be divided"),
    ],
)
def test_a_description_cnnkit_never_writes_is_refused(change: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(UNUSUAL, **change)
    assert str(info.value).startswith(message)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained ``fast`` network on 24x24 greyscale images, saved with ``UNUSUAL``."""
    torch.manual_seed(0)
    net = build_network(load_model_spec("fast").layers, 3, UNUSUAL.channels, UNUSUAL.size)
    meta = ModelMeta(("a", "b", "c"), UNUSUAL, tuple(net.architecture()), model_name="fast")
    folder = tmp_path_factory.mktemp("preprocessing") / "run"
    save_model(folder, net.eval(), meta)
    return folder


def test_one_preprocessing_travels_to_model_json_the_exports_and_the_server(
    run: Path, tmp_path: Path
) -> None:
    onnx = pytest.importorskip("onnx")
    with warnings.catch_warnings():  # starlette's note about httpx, not about cnnkit
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    from cnnkit.export import export_onnx, export_pt2, load_predictor
    from cnnkit.serve import create_app

    stored = json.loads((run / "model.json").read_text())["preprocessing"]
    assert stored == UNUSUAL.to_dict()
    assert load_model(run)[1].preprocessing == UNUSUAL
    onnx_file = export_onnx(run, tmp_path / "m.onnx", check_images=4, batch_sizes=(1,)).path
    pt2_file = export_pt2(run, tmp_path / "m.pt2", check_images=4, batch_sizes=(1,)).path
    props = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    assert json.loads(props["preprocessing"]) == stored  # the readable copy, for other languages
    for source in (run, onnx_file, pt2_file):
        assert load_predictor(source).meta.preprocessing == UNUSUAL, source
        with TestClient(create_app(source)) as client:
            assert client.get("/model").json()["preprocessing"] == stored, source


# What cnnkit wrote before ``Preprocessing``: the values as top-level keys, and a
# "preprocessing" object that only repeated them for readers (with ``input_size``).
OLD_FORM = {
    "classes": ["a", "b", "c"],
    "channels": 1,
    "image_size": 24,
    "resize": "pad",
    "mean": [0.3],
    "std": [0.7],
    "model_name": "fast",
    "tta": False,
    "cnnkit_version": "0.1.0",
    "weights": None,
    "preprocessing": {
        "input_size": 24,
        "channels": 1,
        "resize": "pad",
        "scale": "pixel / 255",
        "mean": [0.3],
        "std": [0.7],
        "layout": "NCHW float32, x = (pixel / 255 - mean) / std",
    },
}


def test_an_old_model_json_is_read_and_saved_again_in_the_new_form(
    run: Path, tmp_path: Path
) -> None:
    old = tmp_path / "old"
    shutil.copytree(run, old)
    architecture = json.loads((run / "model.json").read_text())["architecture"]
    old_text = json.dumps({**OLD_FORM, "architecture": architecture}, indent=2)
    (old / "model.json").write_text(old_text)
    model, meta = load_model(old)
    assert meta.preprocessing == UNUSUAL and meta == load_model(run)[1]
    image = np.random.default_rng(0).integers(0, 256, (30, 18), dtype=np.uint8)
    np.testing.assert_array_equal(
        load(old).predict_proba([image]), load(run).predict_proba([image])
    )
    assert plan_weights(str(old), load_model_spec("fast")).preprocessing == UNUSUAL  # --weights
    save_model(old, model, meta)
    written = json.loads((old / "model.json").read_text())
    assert written["preprocessing"] == UNUSUAL.to_dict()
    assert not {"image_size", "channels", "resize", "mean", "std"} & set(written)


def test_old_export_metadata_is_read() -> None:
    """ONNX and pt2 files carry model.json's text under one key, beside readable copies of
    the values (in the old form, one key each): both exports read it with one function."""
    architecture = [{"type": "flatten"}, {"type": "dense", "units": 3}]
    props = {
        META_KEY: json.dumps({**OLD_FORM, "architecture": architecture}),
        "input_size": "24",
        "channels": "1",
        "resize": "pad",
        "mean": "[0.3]",
        "std": "[0.7]",
    }
    assert meta_from_metadata(props, "old.onnx").preprocessing == UNUSUAL


def test_a_model_json_without_preprocessing_names_what_is_missing(
    run: Path, tmp_path: Path
) -> None:
    from cnnkit.errors import RunDirError

    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    meta = json.loads((broken / "model.json").read_text())
    del meta["preprocessing"]
    (broken / "model.json").write_text(json.dumps(meta))
    with pytest.raises(RunDirError) as info:
        load_model(broken)
    assert str(info.value) == (
        f'{broken / "model.json"}: damaged (no "preprocessing" object (size, channels, '
        "resize, mean, std))"
    )
