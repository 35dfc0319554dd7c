"""The HTTP service: every endpoint, every refusal, and that it keeps serving after each."""

from __future__ import annotations

import base64
import io
import threading
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.data.shapes import draw_shape
from cnnkit.errors import ConfigError, RunDirError
from cnnkit.inspection import grad_cam, layer_outputs, normalize_map
from cnnkit.inspection.render import overlay
from cnnkit.inspection.walkthrough import inspect_image
from cnnkit.model_io import load_model
from cnnkit.serve import SECURITY_HEADERS, create_app
from serving import GatedModel, wait_until

with warnings.catch_warnings():  # starlette's note about httpx, not about cnnkit
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


def png_bytes(pixels: np.ndarray | Image.Image) -> bytes:
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def shape_png(kind: str = "circle", size: int = 32, seed: int = 0) -> bytes:
    return png_bytes(draw_shape(kind, size, np.random.default_rng(seed)))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height``: a decompression bomb's header."""
    data = bytearray(png_bytes(np.zeros((1, 1), np.uint8)))
    data[16:20] = width.to_bytes(4, "big")  # IHDR chunk: length, type, then width and height
    data[20:24] = height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 30
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the model never became ready"
        time.sleep(0.02)


def post_image(client: TestClient, data: bytes, path: str = "/predict", name: str = "a.png"):
    return client.post(path, files={"file": (name, data, "image/png")})


def assert_still_serving(client: TestClient) -> None:
    """A good request right after a bad one gets a correct answer."""
    response = post_image(client, shape_png("square"))
    assert response.status_code == 200, response.text
    (pred,) = response.json()["predictions"]
    assert pred["class"] == max(pred["probabilities"], key=pred["probabilities"].get)
    assert sum(pred["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def wait_busy(app, count: int) -> None:
    wait_until(lambda: app.state.worker.busy >= count, what="requests never reached the worker")


@pytest.fixture(scope="module")
def client(trained_run):
    run, _ = trained_run
    with TestClient(create_app(run, max_body_bytes=200_000, max_images=4)) as c:
        wait_ready(c)
        yield c


# -------------------------------------------------------------------------------- endpoints


def test_health_ready_and_model(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"ready": True}
    info = client.get("/model").json()
    assert info["classes"] == ["circle", "square", "triangle"]
    assert info["preprocessing"]["size"] == 32 and info["preprocessing"]["channels"] in (1, 3)
    assert info["format"] == "run directory" and info["explain"] is True
    assert [layer["type"] for layer in info["architecture"]][:3] == ["conv", "batchnorm", "relu"]


def test_predict_multipart_and_raw_body_agree_with_the_classifier(client, trained_run) -> None:
    from cnnkit.inference import load

    run, _ = trained_run
    image = shape_png("triangle", seed=3)
    multipart = post_image(client, image, name="tri.png")
    raw = client.post("/predict", content=image, headers={"content-type": "image/png"})
    assert multipart.status_code == raw.status_code == 200
    body = multipart.json()
    (pred,) = body["predictions"]
    assert pred["name"] == "tri.png" and raw.json()["predictions"][0]["name"] == "image"
    expected = load(run).predict([image])[0]
    assert pred["class"] == expected.label
    assert sum(pred["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    for name, p in pred["probabilities"].items():
        assert p == pytest.approx(expected.probabilities[name], abs=0.02)
    assert raw.json()["predictions"][0]["probabilities"] == pred["probabilities"]
    latency = body["latency_ms"]
    assert 0 < latency["inference"] <= latency["total"] and latency["decode"] >= 0


def test_several_images_in_one_request_are_one_batch(client, trained_run) -> None:
    from cnnkit.inference import load

    run, _ = trained_run
    kinds = ["circle", "square", "triangle"]
    images = [shape_png(k, seed=5) for k in kinds]
    files = [("file", (f"{k}.png", im, "image/png")) for k, im in zip(kinds, images, strict=True)]
    response = client.post("/predict", files=files)
    assert response.status_code == 200
    body = response.json()
    assert body["batch_size"] == 3
    expected = [p.label for p in load(run).predict(images)]
    assert [p["class"] for p in body["predictions"]] == expected
    assert sum(a == b for a, b in zip(expected, kinds, strict=True)) >= 2  # a trained model
    assert [p["name"] for p in body["predictions"]] == [f"{k}.png" for k in kinds]


def test_explain_returns_the_maps_and_grad_cam_the_library_computes(client, trained_run) -> None:
    run, _ = trained_run
    image = shape_png("circle", size=32, seed=7)
    response = post_image(client, image, "/explain")
    assert response.status_code == 200, response.text
    body = response.json()
    model, meta = load_model(run)
    pixels = meta.preprocessing.load_image(image)  # (S, S, C)
    x = meta.preprocessing.to_model_input(torch.tensor(pixels[None]))
    outputs = [o for o in layer_outputs(model, x) if o.is_map]
    assert [layer["name"] for layer in body["layers"]] == [o.name for o in outputs]
    first, served = outputs[0], body["layers"][0]
    assert served["shape"] == list(first.values.shape)
    assert len(served["maps"]) == min(8, first.values.shape[0])
    assert served["min"] == pytest.approx(first.min, abs=1e-4)
    shown = decode_data_url(served["maps"][0])
    np.testing.assert_allclose(shown, normalize_map(first.values[0]), atol=1)
    heat, index = grad_cam(model, x)
    assert body["class"] == meta.classes[index]
    drawn = decode_data_url(body["gradcam"])
    np.testing.assert_allclose(drawn, overlay(pixels, heat), atol=2)
    np.testing.assert_array_equal(decode_data_url(body["input"]).reshape(pixels.shape), pixels)


def test_explain_draws_grad_cam_with_the_inspect_reports_colours(
    client, trained_run, monkeypatch, tmp_path: Path
) -> None:
    """The web page and ``cnnkit inspect`` show the same heat map in the same pixels."""
    run, _ = trained_run
    ramp = np.linspace(0.0, 1.0, 32 * 32).reshape(32, 32)  # every colour from 0 to 1
    heat = np.where(np.arange(32)[:, None] % 5 == 0, ramp.T, ramp)  # (32, 32), not symmetric

    def fixed(*args, **kwargs) -> tuple[np.ndarray, int]:  # one heat map for both
        return heat, 0

    monkeypatch.setattr("cnnkit.serve.explain.grad_cam", fixed)
    monkeypatch.setattr("cnnkit.inspection.walkthrough.grad_cam", fixed)
    image = tmp_path / "circle.png"
    image.write_bytes(shape_png("circle", size=32, seed=5))
    response = post_image(client, image.read_bytes(), "/explain")
    assert response.status_code == 200, response.text
    served = decode_data_url(response.json()["gradcam"])  # (32, 32, 3)
    inspect_image(run, image, tmp_path / "inspect")
    report = np.asarray(Image.open(tmp_path / "inspect" / "gradcam.png")).astype(np.int64)
    scale = report.shape[0] // served.shape[0]  # the report draws it zoomed, nearest-neighbour
    np.testing.assert_array_equal(served, report[::scale, ::scale])


def decode_data_url(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    data = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data))).astype(np.int64)


def test_page_and_static_files_have_security_headers(client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js" defer></script>' in page.text
    assert "<script>" not in page.text and "style=" not in page.text  # nothing inline
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "innerHTML" not in script.text and "eval(" not in script.text
    assert client.get("/static/style.css").status_code == 200
    for response in (page, script, client.get("/healthz"), client.get("/missing")):
        for key, value in SECURITY_HEADERS.items():
            assert response.headers[key] == value
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp


def test_unknown_routes_and_methods_answer_json(client) -> None:
    assert client.get("/nothing").json() == {"error": "Not Found"}
    response = client.get("/predict")
    assert response.status_code == 405 and "error" in response.json()
    assert client.get("/docs").status_code == 404  # no CDN-loaded docs page


# ------------------------------------------------------------------------------ refusals


def test_body_over_the_limit_is_413_from_the_header_or_the_stream(client) -> None:
    big = b"\x89PNG" + bytes(300_000)
    start = time.perf_counter()
    declared = client.post("/predict", content=big, headers={"content-type": "image/png"})
    assert declared.status_code == 413
    assert declared.json()["error"] == "request body of 300,004 bytes is over the limit of 200,000"

    def chunks():  # no Content-Length: chunked transfer, counted while it streams
        for _ in range(10):
            yield bytes(50_000)

    streamed = client.post("/predict", content=chunks(), headers={"content-type": "image/png"})
    assert streamed.status_code == 413
    assert streamed.json()["error"] == "request body is over the limit of 200,000 bytes"
    assert time.perf_counter() - start < 1.0
    assert_still_serving(client)


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", ""])
def test_wrong_content_type_is_415(client, content_type) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/predict", content=b'{"model": "/etc/passwd"}', headers=headers)
    assert response.status_code == 415
    assert response.json()["error"].startswith("unsupported content type")
    assert_still_serving(client)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not an image at all", "a.png: not an image in a supported format"),
        (b"", "a.png: empty (0 bytes)"),
        (b"http://example.com/cat.png", "a.png: not an image in a supported format"),
    ],
)
def test_not_an_image_is_400(client, data, message) -> None:
    response = post_image(client, data)
    assert response.status_code == 400
    assert response.json()["error"].startswith(message)
    assert_still_serving(client)


def test_corrupt_image_is_400_after_its_header_passed(client) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    truncated = png_bytes(noise)[:3000]  # a valid header, then the data stops
    response = client.post("/predict", content=truncated, headers={"content-type": "image/png"})
    assert response.status_code == 400
    assert "unreadable" in response.json()["error"]
    assert_still_serving(client)


@pytest.mark.parametrize(
    ("width", "height", "message"),
    [
        (60_000, 60_000, "decompression bomb"),  # over cnnkit's MAX_PIXELS
        (5_000, 5_000, "more than this server's limit of 16,777,216 pixels"),  # over the server's
    ],
)
def test_decompression_bomb_is_refused_from_its_header(client, width, height, message) -> None:
    start = time.perf_counter()
    response = post_image(client, png_claiming(width, height))
    elapsed = time.perf_counter() - start
    assert response.status_code == 413
    assert message in response.json()["error"]
    assert elapsed < 1.0  # nothing was decoded
    assert_still_serving(client)


def test_malformed_multipart_and_missing_or_too_many_files_are_400(client) -> None:
    no_boundary = client.post(
        "/predict", content=b"--x\r\n\r\n", headers={"content-type": "multipart/form-data"}
    )
    assert no_boundary.status_code == 400
    assert no_boundary.json()["error"].startswith("malformed multipart body")
    only_a_field = b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n--b--\r\n'
    no_file = client.post(
        "/predict",
        content=only_a_field,
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert no_file.status_code == 400
    assert no_file.json()["error"] == "no image in the request: send one or more file fields"
    many = [("file", (f"{i}.png", shape_png(seed=i), "image/png")) for i in range(5)]
    too_many = client.post("/predict", files=many)
    assert too_many.status_code == 400 and "Too many files" in too_many.json()["error"]
    two = client.post("/explain", files=many[:2])
    assert two.status_code == 400 and two.json()["error"] == "explain takes one image, got 2"
    assert_still_serving(client)


# -------------------------------------------------------------------- overload and timeout


def test_overload_is_503_with_retry_after_and_then_recovers(trained_run) -> None:
    run, _ = trained_run
    served = GatedModel.load(run)
    app = create_app(served, max_queue=1)
    with TestClient(app) as client:
        wait_ready(client)
        served.gate = threading.Event()
        first: dict = {}
        worker = threading.Thread(
            target=lambda: first.update(r=post_image(client, shape_png("circle")))
        )
        worker.start()
        wait_busy(app, 1)
        busy = post_image(client, shape_png("circle"))
        assert busy.status_code == 503
        assert busy.headers["retry-after"] == "1"
        assert busy.json()["error"] == "server busy: 1 requests queued; retry"
        served.gate.set()
        worker.join(10)
        assert first["r"].status_code == 200
        served.gate = None
        assert_still_serving(client)


def test_waiting_requests_run_as_one_batch_and_keep_their_own_errors(trained_run) -> None:
    run, _ = trained_run
    served = GatedModel.load(run)
    app = create_app(served)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    corrupt = png_bytes(noise)[:3000]  # its header passes; decoding it fails in the worker
    images = {"first": shape_png("circle"), "square": shape_png("square", seed=4)}
    images |= {"triangle": shape_png("triangle", seed=4), "corrupt": corrupt}
    with TestClient(app) as client:
        wait_ready(client)
        served.gate = threading.Event()
        answers: dict = {}

        def send(name: str) -> None:
            answers[name] = post_image(client, images[name], name=f"{name}.png")

        first = threading.Thread(target=send, args=("first",))
        first.start()
        wait_busy(app, 1)  # the first request is in the forward pass, held by the gate
        others = [threading.Thread(target=send, args=(n,)) for n in ("square", "triangle")]
        others.append(threading.Thread(target=send, args=("corrupt",)))
        for thread in others:
            thread.start()
        wait_busy(app, 4)
        served.gate.set()
        for thread in [first, *others]:
            thread.join(10)
        served.gate = None
    assert answers["first"].json()["model_batch_size"] == 1
    expected = served.predict([Image.open(io.BytesIO(images[n])) for n in ("square", "triangle")])
    for i, name in enumerate(("square", "triangle")):
        body = answers[name].json()
        assert answers[name].status_code == 200
        assert body["model_batch_size"] == 2  # run together, without the corrupt one
        probs = body["predictions"][0]["probabilities"]
        np.testing.assert_allclose(list(probs.values()), expected.probabilities[i], atol=2e-3)
    assert answers["corrupt"].status_code == 400
    assert "unreadable" in answers["corrupt"].json()["error"]


def test_inference_timeout_is_504_and_the_slot_comes_back(trained_run) -> None:
    run, _ = trained_run
    served = GatedModel.load(run)
    app = create_app(served, timeout_s=0.3, max_queue=1)
    with TestClient(app) as client:
        wait_ready(client)
        served.gate = threading.Event()
        start = time.perf_counter()
        slow = post_image(client, shape_png())
        assert time.perf_counter() - start < 2.0
        assert slow.status_code == 504
        assert slow.json()["error"] == "inference timed out after 0.3s"
        assert slow.headers["retry-after"] == "1"
        assert app.state.worker.busy == 1  # the work is still running: its place is held
        served.gate.set()
        served.gate = None
        deadline = time.monotonic() + 10
        while app.state.worker.busy:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert_still_serving(client)


def test_readyz_is_503_until_warmed_up(trained_run) -> None:
    run, _ = trained_run
    served = GatedModel.load(run)
    served.gate = threading.Event()  # the warm-up waits too
    with TestClient(create_app(served)) as client:
        not_yet = client.get("/readyz")
        assert not_yet.status_code == 503
        assert not_yet.json() == {"error": "model is warming up"}
        assert client.get("/healthz").status_code == 200
        served.gate.set()
        served.gate = None
        wait_ready(client)


# ------------------------------------------------------------------------- construction


def test_onnx_model_serves_predictions_but_not_explanations(trained_run, tmp_path) -> None:
    from cnnkit.export import export_onnx

    run, _ = trained_run
    onnx_file = export_onnx(run, tmp_path / "model.onnx", check_images=8).path
    with TestClient(create_app(onnx_file)) as client:
        wait_ready(client)
        info = client.get("/model").json()
        assert info["format"] == "onnx" and info["explain"] is False
        assert info["classes"] == ["circle", "square", "triangle"]
        assert_still_serving(client)
        response = post_image(client, shape_png(), "/explain")
        assert response.status_code == 501
        assert "need a run directory" in response.json()["error"]


def test_create_app_refuses_bad_sources_and_settings(tmp_path: Path, trained_run) -> None:
    run, _ = trained_run
    with pytest.raises(RunDirError, match="not a run directory"):
        create_app(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="max_queue must be a positive integer, got 0"):
        create_app(run, max_queue=0)
    with pytest.raises(ConfigError, match="timeout_s must be positive"):
        create_app(run, timeout_s=0)


def test_a_real_server_refuses_big_bodies_fast_and_keeps_serving(trained_run) -> None:
    """Over real sockets (uvicorn, h11), not only through the in-process test client."""
    import httpx

    from cnnkit.serve import background_server

    run, _ = trained_run
    with background_server(create_app(run, max_body_bytes=1_000_000)) as url:
        assert url.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=url, timeout=10) as http:
            deadline = time.monotonic() + 30
            while http.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            start = time.perf_counter()
            declared = http.post(
                "/predict", content=bytes(20_000_000), headers={"content-type": "image/png"}
            )
            streamed = http.post(
                "/predict",
                content=(bytes(100_000) for _ in range(200)),  # 20 MB, chunked
                headers={"content-type": "image/png"},
            )
            assert time.perf_counter() - start < 2.0
            assert declared.status_code == streamed.status_code == 413
            good = http.post("/predict", content=shape_png(), headers={"content-type": "image/png"})
            assert good.status_code == 200
            assert good.headers["x-content-type-options"] == "nosniff"
