"""Everything works on a fine-tuned pretrained backbone, not only on cnnkit's small presets.

The run: EfficientNet-Lite0 from its ImageNet weights (the ``cnnkit[pretrained]`` package:
offline), on the tiny shapes at 64 px, one head epoch from cached features and one epoch of
the whole network, through ``cnnkit.train`` (so the report is written too). Then report,
inspect and Grad-CAM, evaluate, predict, ONNX and pt2 export with their verification,
serve, the pixel explanations and the explorer, a bit-identical resume and two processes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

import cnnkit
from cnnkit.cli import app
from cnnkit.data.images import to_model_input
from cnnkit.errors import ConfigError
from cnnkit.inspection import grad_cam
from cnnkit.inspection.gradcam import default_cam_layer
from cnnkit.inspection.pixel import explain_pixel
from cnnkit.model_io import load_model
from interrupt import interrupt_at

SIZE = 64
OPTIONS = {"model": "efficientnet_lite0", "weights": "imagenet", "image_size": SIZE,
           "epochs": 2, "freeze_epochs": 1, "batch_size": 4, "precision": "fp32"}  # fmt: skip
runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_shapes: Path) -> Path:
    out = tmp_path_factory.mktemp("backbone") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cnnkit.train(tiny_shapes, out, **OPTIONS)  # type: ignore[arg-type]
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def image(tiny_shapes: Path) -> Path:
    return sorted((tiny_shapes / "square").iterdir())[0]


def test_the_run_records_the_phases_and_the_weights(run: Path) -> None:
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["freeze_epochs"] == 1 and config["train"]["weights"] == "imagenet"
    assert config["train"]["backbone_lr_factor"] == 0.1 and config["train"]["freeze_bn"] is True
    meta = json.loads((run / "model.json").read_text())
    assert (
        meta["weights"]["sha256"].startswith("57934424") and meta["preprocessing"]["size"] == SIZE
    )
    assert len((run / "metrics.csv").read_text().splitlines()) == 3


def test_the_report_shows_the_pretrained_first_layer_kernels(run: Path) -> None:
    html = (run / "report.html").read_text()
    assert "The 32 kernels of features.0.0 (3x3)" in html
    assert "They started as the imagenet weights' kernels." in html


def test_inspect_and_grad_cam_on_the_last_convolutional_block(
    run: Path, image: Path, tmp_path: Path
) -> None:
    model, meta = load_model(run)
    assert default_cam_layer(model) == "features.17.2"  # conv 1x1, batchnorm, ReLU6: 2x2 maps
    x = to_model_input(
        torch.from_numpy(np.array(Image.open(image).convert("RGB").resize((SIZE, SIZE)))[None]),
        meta.preprocessing.mean, meta.preprocessing.std,
    )  # fmt: skip
    heat, chosen = grad_cam(model, x)
    assert heat.shape == (SIZE, SIZE) and np.isfinite(heat).all() and 0 <= chosen < 3
    result = runner.invoke(app, ["inspect", str(run), str(image), "--out", str(tmp_path / "i")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "i" / "index.html").is_file()


def test_evaluate_and_predict(run: Path, image: Path, tiny_shapes: Path) -> None:
    result = runner.invoke(app, ["evaluate", str(run), str(tiny_shapes), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["count"] > 0
    result = runner.invoke(app, ["predict", str(run), str(image), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["label"] in ("circle", "square", "triangle")


def test_bf16_prediction_runs_the_folded_copy(run: Path, tiny_shapes: Path) -> None:
    from cnnkit.inference import expand_inputs
    from cnnkit.models.fold import FastNetwork

    files = expand_inputs([tiny_shapes])
    fast = cnnkit.load(run, precision="bf16")
    p16, p32 = fast.predict_proba(files), cnnkit.load(run).predict_proba(files)
    assert isinstance(fast._fast, FastNetwork)
    assert np.abs(p16 - p32).max() < 0.1  # bf16: 8 significant bits over 20 layers
    assert (p16.argmax(1) == p32.argmax(1)).mean() >= 0.9


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_exports_verify_and_predict_as_the_run(
    run: Path, image: Path, tmp_path: Path, fmt: str
) -> None:
    path = tmp_path / f"model.{fmt}"
    result = runner.invoke(
        app, ["export", str(run), "--format", fmt, "--out", str(path), "--check-images", "8"]
    )
    assert result.exit_code == 0, result.output
    assert "top-1 agreement 100.00%" in result.stdout
    ours = cnnkit.load(run).predict([str(image)])[0]
    from cnnkit.export import load_predictor

    theirs = load_predictor(path).predict([str(image)])[0]
    assert theirs.label == ours.label
    assert theirs.confidence == pytest.approx(ours.confidence, abs=1e-4)


def test_serve_answers(run: Path, image: Path) -> None:
    from fastapi.testclient import TestClient

    from cnnkit.serve import create_app

    with TestClient(create_app(run)) as client:
        while client.get("/readyz").status_code != 200:
            pass
        response = client.post("/predict", files={"file": ("a.png", image.read_bytes())})
        assert response.status_code == 200, response.text
        (pred,) = response.json()["predictions"]
        assert pred["class"] == cnnkit.load(run).predict([str(image)])[0].label


@pytest.mark.parametrize(
    ("layer", "at", "type_"),
    [
        ("features.0.0", (SIZE // 2 - 1, SIZE // 2 - 1), "conv"),  # TF SAME: the odd pad after
        ("features.0.2", (3, 4), "relu6"),
        ("features.3", (5, 2), "inverted_residual"),  # 24 -> 24 maps: identity shortcut
        ("features.2", (0, 0), "inverted_residual"),  # stride 2: no shortcut
        ("features.17.0", (1, 1), "conv"),
        ("avgpool", None, "gap"),
    ],
)
def test_pixel_explanations_inside_the_backbone(
    run: Path, image: Path, layer: str, at: tuple[int, int] | None, type_: str
) -> None:
    ex = explain_pixel(run, Image.open(image), layer, 1, at)
    assert ex.type == type_
    assert ex.matches, (ex.value, ex.model_value, ex.tolerance)


def test_depthwise_convolutions_are_explained(run: Path, image: Path) -> None:
    model, _ = load_model(run)
    from cnnkit.inspection.pixel import explain_value
    from cnnkit.models.layers import parse_layers, with_head
    from cnnkit.models.network import Network

    # a depthwise convolution at the top level: each map filtered on its own
    layers = [{"conv": {"filters": 6, "groups": "depthwise"}}, "relu6", "gap", "dense"]
    net = Network(with_head(parse_layers(layers), 3), (6, 8, 8))
    x = torch.randn(1, 6, 8, 8)
    ex = explain_value(net, x, "conv1", 4, (0, 7))
    assert ex.matches and ex.parts["input_channels"] == [4] and ex.activation == "relu61"
    assert model.layers["features.3.conv.1.0"].groups == 144  # the backbone's own, too


@pytest.mark.parametrize(
    ("layer", "type_", "activation"),
    [
        ("features.3.conv.0.0", "conv", "features.3.conv.0.2"),  # expand 1x1, then bn, ReLU6
        ("features.3.conv.1.0", "conv", "features.3.conv.1.2"),  # depthwise 3x3
        ("features.3.conv.1.2", "relu6", "features.3.conv.1.2"),
        ("features.3.conv.3", "batchnorm", None),  # the block's last: the addition follows
    ],
)
def test_values_inside_a_block_are_explained(
    run: Path, image: Path, layer: str, type_: str, activation: str | None
) -> None:
    ex = explain_pixel(run, Image.open(image), layer, 2, (4, 5))
    assert (ex.type, ex.activation, ex.parts["block"]) == (type_, activation, "features.3")
    assert ex.matches, (ex.value, ex.model_value, ex.tolerance)
    for step in ex.after:  # batchnorm and ReLU6 after the convolution, each as computed
        assert step["value"] == pytest.approx(step["model_value"], rel=1e-4, abs=1e-5)


def test_a_projection_shortcut_is_explained_inside_and_at_the_block() -> None:
    from cnnkit.inspection.pixel import explain_value
    from cnnkit.models import build_network, load_model_spec

    torch.manual_seed(0)
    net = build_network(load_model_spec("resnet18").layers, 3, 3, 32).eval()
    x = torch.randn(1, 3, 32, 32)
    for layer in ("layer2.0.downsample.0", "layer2.0.downsample.1", "layer2.0.conv1", "layer2.0"):
        ex = explain_value(net, x, layer, 5, (1, 2))
        assert ex.matches, (layer, ex.value, ex.model_value)
    assert ex.parts["shortcut"] == "projection" and ex.type == "basic_block"
    with pytest.raises(ConfigError, match="or a layer inside a block"):
        explain_value(net, x, "layer2.0.conv9", 0, (0, 0))


def test_the_explorer_shows_a_backbone(run: Path, image: Path) -> None:
    from fastapi.testclient import TestClient

    from cnnkit.serve import create_app

    buffer = io.BytesIO()
    Image.open(image).convert("RGB").save(buffer, format="PNG")
    headers = {"content-type": "image/png"}
    with TestClient(create_app(run)) as client:
        while client.get("/readyz").status_code != 200:
            pass
        body = client.post("/explore/maps", content=buffer.getvalue(), headers=headers).json()
        names = [layer["name"] for layer in body["layers"]]
        assert names[0] == "features.0.0" and "features.16" in names
        url = "/explore/pixel?layer=features.16&map=0&y=0&x=0"
        answer = client.post(url, content=buffer.getvalue(), headers=headers).json()
        assert answer["matches"] and answer["type"] == "inverted_residual"


def test_an_interrupted_fine_tune_resumes_bit_identical(
    run: Path, tmp_path: Path, single_thread: None
) -> None:
    from cnnkit.config import RunConfig, load_yaml
    from cnnkit.errors import TrainingInterrupted
    from cnnkit.training.loop import train

    saved = load_yaml(run / "config.yaml")
    saved["train"].update(deterministic=True, checkpoint_every=2, weights_sha256=None)
    config = RunConfig.from_dict(saved)
    train(config, tmp_path / "whole", progress=False)
    cut = tmp_path / "cut"
    with pytest.MonkeyPatch.context() as patch:  # 4 steps an epoch: in the full epoch
        interrupt_at(patch, {5})
        with pytest.raises(TrainingInterrupted):
            train(config, cut, progress=False)
    train(None, cut, resume=True, progress=False)
    assert (cut / "model.safetensors").read_bytes() == (
        tmp_path / "whole" / "model.safetensors"
    ).read_bytes()


def test_two_processes_fine_tune_a_backbone(tiny_shapes: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CNNKIT_CACHE_DIR": str(tmp_path / "cache"),
           "CNNKIT_DIST_TIMEOUT": "120", "MPLBACKEND": "Agg"}  # fmt: skip
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in OPTIONS.items()]
    cmd = [sys.executable, "-m", "cnnkit", "train", str(tiny_shapes), "--out",
           str(tmp_path / "run"), "--nproc", "2", *flags, "--quiet"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["world_size"], summary["epochs_run"]) == (2, 2)
    shutil.rmtree(tmp_path / "cache")
