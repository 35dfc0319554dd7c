"""The explorer's JSON endpoints and ``cnnkit explore``, over HTTP in-process (the page itself
runs in a real browser in ``test_explore_browser.py``)."""

from __future__ import annotations

import base64
import io
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cnnkit.cli import app as cli_app
from cnnkit.inspection.pixel import explain_pixel
from cnnkit.inspection.pixel_rules import PIXEL_RULES
from cnnkit.model_io import load_model, save_model
from cnnkit.models.layers import parse_layers, with_head
from cnnkit.models.network import Network
from cnnkit.models.registry import build_network, list_presets, load_model_spec
from cnnkit.serve import ServedModel, create_app
from cnnkit.serve.app import web_dir
from conftest import model_meta

with warnings.catch_warnings():  # starlette's note about httpx, not about cnnkit
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def decode(data_url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained conv-batchnorm-relu-pool net on 16x16 RGB (no data folder recorded)."""
    torch.manual_seed(5)
    layers = with_head(
        parse_layers([{"conv": {"filters": 4, "kernel": 3}}, "batchnorm", "relu", "maxpool"]), 3
    )
    net = Network(layers, (3, 16, 16))
    path = tmp_path_factory.mktemp("explore") / "run"
    save_model(path, net, model_meta(net))
    return path


@pytest.fixture(scope="module")
def image() -> bytes:
    """A 20x24 photo-like image: the model crops and scales it to 16x16 itself."""
    return png(np.random.default_rng(1).integers(0, 256, (20, 24, 3), dtype=np.uint8))


def client_for(source) -> TestClient:
    client = TestClient(create_app(source))
    client.__enter__()
    deadline = time.monotonic() + 30
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return client


@pytest.fixture(scope="module")
def client(run):
    c = client_for(run)
    yield c
    c.__exit__(None, None, None)


def assert_same(a, b, where: str = "") -> None:
    """Equal JSON, floats within float32 rounding (two forward passes, possibly on threads
    with different oneDNN schedules)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9), where
    else:
        assert a == b, where


def post(client: TestClient, url: str, data: bytes):
    return client.post(url, content=data, headers={"content-type": "image/png"})


def test_the_page_is_served_and_self_contained(client) -> None:
    page = client.get("/explore")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    files = sorted(p.name for p in web_dir().glob("explore*"))
    assert "explore.html" in files and "explore.css" in files and len(files) == 6
    for name in files:
        text = (web_dir() / name).read_text()
        assert "http://" not in text and "https://" not in text and "@import" not in text
        assert client.get(f"/static/{name}").status_code == 200
    for name in files:
        if name.endswith(".js"):
            assert f'<script src="/static/{name}" defer></script>' in page.text
    assert "<script>" not in page.text and "style=" not in page.text


def test_maps_show_every_layer_and_the_model_sized_image(client, run, image) -> None:
    body = post(client, "/explore/maps", image).json()
    model, _ = load_model(run)
    assert [layer["name"] for layer in body["layers"]] == [i.name for i in model.infos]
    pixels = decode(body["input"])
    assert pixels.shape == (16, 16, 3)
    # the model-sized picture is the model's input: sending it again changes nothing
    again = post(client, "/explore/maps", png(pixels)).json()
    assert again["probabilities"] == body["probabilities"]
    conv = body["layers"][0]
    assert len(conv["maps"]) == 4 and decode(conv["maps"][0]["image"]).shape == (16, 16)
    head = body["layers"][-1]
    assert len(head["values"]) == 3 and body["classes"] == ["a", "b", "c"]
    probs = torch.softmax(torch.tensor(head["values"], dtype=torch.float64), 0)
    np.testing.assert_allclose(body["probabilities"], probs.numpy(), rtol=1e-12)
    assert body["class"] == body["classes"][int(np.argmax(body["probabilities"]))]


def test_a_maps_inputs_and_kernels(client, run, image) -> None:
    model, _ = load_model(run)
    conv = post(client, "/explore/map?layer=conv1&map=2", image).json()
    assert conv["input_layer"] == "the image" and conv["input_channels"] == 3
    kernels = np.array([k["values"] for k in conv["kernels"]])
    np.testing.assert_array_equal(
        kernels, model.layers["conv1"].weight[2].detach().double().numpy()
    )
    relu = post(client, "/explore/map?layer=relu1&map=3", image).json()
    assert relu["kernels"] is None and [i["channel"] for i in relu["inputs"]] == [3]
    before = post(client, "/explore/map?layer=batchnorm1&map=3", image).json()
    assert relu["inputs"][0]["values"] == before["values"]  # relu1's input is batchnorm1's map
    pool = post(client, "/explore/map?layer=maxpool1&map=0", image).json()
    assert np.array(pool["values"]).shape == (8, 8)


def test_the_pixel_endpoint_is_explain_pixel(client, run, image) -> None:
    """One library function: the endpoint's JSON is ``explain_pixel``'s, number for number."""
    pixels = decode(post(client, "/explore/maps", image).json()["input"])
    url = "/explore/pixel?layer=conv1&map=1&y=0&x=15"
    body = post(client, url, png(pixels)).json()
    expected = explain_pixel(run, Image.open(io.BytesIO(image)), "conv1", 1, (0, 15)).to_dict()
    assert_same(body, expected)
    assert body["matches"] and body["activation"] == "relu1"
    head = post(client, "/explore/pixel?layer=dense1&map=2", image).json()
    assert head["label"] == "c" and head["activation"] == "softmax"


@pytest.mark.parametrize(
    ("url", "status", "message"),
    [
        ("/explore/pixel?layer=conv1&map=1&y=3", 400, "give both y and x"),
        (
            "/explore/pixel?layer=conv1&map=one&y=3&x=3",
            400,
            "map: expected a whole number, got 'one'",
        ),
        ("/explore/pixel?layer=conv1&y=3&x=3", 400, "missing query parameter 'map'"),
        (
            "/explore/pixel?layer=conv1&map=0&y=16&x=3",
            400,
            "at: (16, 3) is outside conv1's 16x16 maps",
        ),
        ("/explore/pixel?layer=conv9&map=0&y=1&x=1", 400, "layer: unknown layer 'conv9'"),
        ("/explore/map?layer=dense1&map=0", 400, "layer: dense1 outputs a vector, not maps"),
        ("/explore/map?layer=conv1&map=4", 400, "map: conv1 has 4 maps, got 4"),
    ],
)
def test_bad_requests_get_clean_errors(client, image, url, status, message) -> None:
    response = post(client, url, image)
    assert response.status_code == status
    assert response.json()["error"].startswith(message)
    assert post(client, "/explore/pixel?layer=conv1&map=0&y=1&x=1", image).status_code == 200


def test_bad_images_get_the_servers_errors(client) -> None:
    response = post(client, "/explore/maps", b"not an image")
    assert response.status_code == 400 and "not an image" in response.json()["error"]
    two = client.post(
        "/explore/maps", files=[("a", ("a.png", png(np.zeros((4, 4, 3), np.uint8)))),
                                ("b", ("b.png", png(np.zeros((4, 4, 3), np.uint8))))],
    )  # fmt: skip
    assert two.status_code == 400 and two.json()["error"] == "the explorer takes one image, got 2"


def test_a_layer_type_without_a_rule_is_501(client, image, monkeypatch) -> None:
    monkeypatch.delitem(PIXEL_RULES, "relu")
    response = post(client, "/explore/pixel?layer=relu1&map=0&y=1&x=1", image)
    assert response.status_code == 501
    assert response.json()["error"] == "layer relu1: no pixel explanation for layer type 'relu' yet"


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_can_be_explored(preset: str, tmp_path: Path) -> None:
    """Any network cnnkit builds: every layer in the overview, every layer's first value
    explained and equal to the forward pass (whitening, dropout, flatten, tempered logits)."""
    spec = load_model_spec(preset)
    channels = 1 if preset == "mnist" else 3
    net = build_network(spec.layers, 3, channels, spec.input_size)
    save_model(tmp_path / "run", net, model_meta(net, channels=channels, size=spec.input_size))
    pixels = np.random.default_rng(2).integers(0, 256, (spec.input_size,) * 2, dtype=np.uint8)
    image = png(pixels if channels == 1 else np.stack([pixels] * 3, axis=2))
    c = client_for(tmp_path / "run")
    try:
        body = post(c, "/explore/maps", image).json()
        assert [layer["name"] for layer in body["layers"]] == [i.name for i in net.infos]
        for info in net.infos:
            at = "&y=0&x=0" if len(info.out_shape) == 3 else ""
            answer = post(c, f"/explore/pixel?layer={info.name}&map=0{at}", image).json()
            assert answer["matches"], (info.name, answer)
    finally:
        c.__exit__(None, None, None)


def test_validation_samples_carry_true_labels(fast_trained_run) -> None:
    run, _ = fast_trained_run
    c = client_for(run)
    try:
        body = c.get("/explore/samples").json()
    finally:
        c.__exit__(None, None, None)
    labels = [s["label"] for s in body["samples"]]
    assert set(labels) == {"circle", "square", "triangle"} and body["split"] == "val"
    assert body["total"] == 120  # 20% of 600
    assert all(decode(s["image"]).shape == (32, 32, 3) for s in body["samples"])


def test_validation_samples_without_the_data_folder(fast_trained_run, tmp_path, client) -> None:
    assert (
        client.get("/explore/samples")
        .json()["error"]
        .startswith("the run does not record its data folder")
    )
    run = tmp_path / "moved"
    shutil.copytree(fast_trained_run[0], run)
    config = (run / "config.yaml").read_text()
    data = next(line.split(":", 1)[1].strip() for line in config.splitlines() if "path:" in line)
    (run / "config.yaml").write_text(config.replace(data, str(tmp_path / "gone")))
    c = client_for(run)
    try:
        response = c.get("/explore/samples")
    finally:
        c.__exit__(None, None, None)
    assert response.status_code == 404
    assert response.json()["error"] == f"the run's data folder {tmp_path / 'gone'} no longer exists"


def test_an_onnx_server_has_no_explorer(run, image, monkeypatch) -> None:
    monkeypatch.setattr(ServedModel, "can_explain", property(lambda self: False))
    c = client_for(run)
    try:
        response = post(c, "/explore/maps", image)
    finally:
        c.__exit__(None, None, None)
    assert response.status_code == 501 and "needs a run directory" in response.json()["error"]


runner = CliRunner()


def test_cnnkit_explore_serves_the_run(run, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr("cnnkit.serve.serve", lambda *args, **kw: calls.append((args, kw)))
    result = runner.invoke(cli_app, ["explore", str(run), "--port", "8123"])
    assert result.exit_code == 0, result.output
    assert "explorer: http://127.0.0.1:8123/explore" in result.stdout
    assert calls[0][0] == (run, "127.0.0.1", 8123)
    missing = runner.invoke(cli_app, ["explore", str(run.parent / "nope")])
    assert missing.exit_code == 1 and missing.output.startswith("error: not a run directory")
    assert runner.invoke(cli_app, ["explore", "--help"]).exit_code == 0
