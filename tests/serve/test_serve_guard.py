"""The server against slow, greedy and unauthorised clients: decode-work and pixel limits, the
shared memory budget, header and body timeouts, waiting connections, the bearer token and
the warning for addresses other machines can reach. Real sockets where the protocol matters
(uvicorn, h11), the in-process client elsewhere; every wait is bounded.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.errors import ConfigError, RunDirError
from cnnkit.model_io import save_model
from cnnkit.models.registry import build_network, load_model_spec
from cnnkit.serve import ServedModel, background_server, create_app
from cnnkit.serve.runner import check_address
from cnnkit.serve.worker import ModelWorker
from conftest import model_meta
from hostile_files import many_scans_jpeg
from serving import GatedModel, wait_until

with warnings.catch_warnings():  # starlette's note about httpx, not about cnnkit
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

TOKEN = "s3cret-token-for-tests-0123456789"


def png(size: int = 32, mode: str = "RGB", noise: bool = False) -> bytes:
    if noise:
        bands = len(mode)
        pixels = np.random.default_rng(0).integers(0, 256, (size, size, bands), np.uint8)
        image = Image.fromarray(pixels.squeeze(), mode)
    else:
        image = Image.new(mode, (size, size))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained run directory (16x16 RGB input): enough to serve."""
    torch.manual_seed(0)
    model = build_network(load_model_spec("fast").layers, 3, 3, 16)
    run = tmp_path_factory.mktemp("guard") / "run"
    save_model(run, model, model_meta(model, classes=("circle", "square", "triangle")))
    return run


@pytest.fixture()
def client(run_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(run_dir)) as test_client:
        yield test_client


# ----------------------------------------------------------------- decode work and memory


def test_a_jpeg_with_thousands_of_scans_is_413_without_decoding(client) -> None:
    response = client.post(
        "/predict", content=many_scans_jpeg(256, 3000), headers={"content-type": "image/jpeg"}
    )
    assert response.status_code == 413
    assert response.json()["error"].startswith("image: refused, a JPEG with more than 100 scans")
    assert client.get("/healthz").status_code == 200


def test_pixels_per_request_are_bounded(client) -> None:
    """The issue's request was 16 blank 4096x4096 RGBA PNGs in 1 MB: 1.7 GB to decode."""
    big = png(4096, "RGBA")
    files = [("file", (f"{i}.png", big, "image/png")) for i in range(3)]
    response = client.post("/predict", files=files)
    assert response.status_code == 413
    assert response.json()["error"] == (
        "3 image(s) of 50,331,648 pixels in all (as decoded) is more than this server's limit "
        "of 33,554,432 pixels per request"
    )
    assert client.app.state.budget.held == 0
    assert client.post("/predict", files=files[:1]).status_code == 200  # one is fine


def test_the_memory_budget_is_shared_503_while_busy_and_given_back(run_dir: Path) -> None:
    served = GatedModel.load(run_dir)
    image = png(256, noise=True)  # 197 KB, 256 KB decoded: one request holds about 660 KB
    app = create_app(served, max_inflight_bytes=1024 * 1024)
    with TestClient(app) as client:
        wait_until(lambda: client.get("/readyz").status_code == 200)
        served.gate = threading.Event()
        first: dict = {}
        sender = threading.Thread(
            target=lambda: first.update(r=client.post("/predict", files={"f": ("a.png", image)}))
        )
        sender.start()
        wait_until(lambda: app.state.worker.busy == 1)
        held = app.state.budget.held
        assert 600_000 < held < 1024 * 1024
        busy = client.post("/predict", files={"f": ("b.png", image)})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"].startswith(
            f"server busy: requests hold {held / 2**20:.0f} MB of the 1 MB memory budget"
        )
        served.gate.set()
        sender.join(10)
        served.gate = None
        assert first["r"].status_code == 200
        wait_until(lambda: app.state.budget.held == 0)
        assert client.post("/predict", files={"f": ("c.png", image)}).status_code == 200


def test_images_are_closed_as_soon_as_they_are_decoded(run_dir: Path) -> None:
    worker = ModelWorker(ServedModel.load(run_dir), max_queue=2)
    images = [Image.open(io.BytesIO(png(64, noise=True))) for _ in range(3)]
    try:
        result = worker.predict(images).result(30)
    finally:
        worker.close()
    assert result.probabilities.shape == (3, 3)
    for image in images:  # their decoded pixels are freed, not kept until the request ends
        with pytest.raises(ValueError, match="closed image"):
            image.load()


def test_a_model_with_std_zero_is_refused_when_the_app_is_made(tmp_path: Path) -> None:
    model = build_network(load_model_spec("fast").layers, 3, 3, 16)
    save_model(tmp_path / "run", model, model_meta(model))
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    meta["preprocessing"]["std"] = [0.0, 0.0, 0.0]
    (tmp_path / "run" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(RunDirError, match=r"normalisation std\[0\] is 0\.0"):
        create_app(tmp_path / "run")


# ---------------------------------------------------------------------- timeouts (sockets)


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _read_until_closed(sock: socket.socket, seconds: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (a timeout fails). A
    connection closed with bytes unread is reset rather than closed: closed all the same."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _ready(url: str) -> None:
    with httpx.Client(base_url=url, timeout=10) as http:
        wait_until(lambda: http.get("/readyz").status_code == 200, 30)


def test_stalled_headers_are_closed_and_healthz_keeps_answering(run_dir: Path) -> None:
    """Before: 100 sockets that never finished their headers filled uvicorn's connection
    limit (68 with max_queue=1) and /healthz answered 503; they were never closed."""
    app = create_app(run_dir, max_queue=1, header_timeout_s=1.0, max_waiting=8)
    with background_server(app) as url:
        _ready(url)
        stalled = []
        try:
            for _ in range(100):
                sock = socket.create_connection(_address(url), timeout=10)
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no blank line: never ends
                stalled.append(sock)
            with httpx.Client(base_url=url, timeout=10) as http:
                assert http.get("/healthz").status_code == 200
            silent = socket.create_connection(_address(url), timeout=10)
            stalled.append(silent)
            answers = [_read_until_closed(sock) for sock in stalled]
        finally:
            for sock in stalled:
                sock.close()
    assert answers[-1] == b""  # sent nothing, answered nothing: closed
    for answer in answers[:-1]:  # closed, with a 408 when part of a request had come
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert any(answer.startswith(b"HTTP/1.1 408") for answer in answers)


def test_a_body_that_stops_half_way_is_answered_408(run_dir: Path) -> None:
    app = create_app(run_dir, body_timeout_s=0.5)
    with background_server(app) as url:
        _ready(url)
        with socket.create_connection(_address(url), timeout=10) as sock:
            sock.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\ncontent-type: image/png\r\n"
                b"content-length: 1000\r\n\r\n\x89PNG"
            )
            answer = _read_until_closed(sock)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ")
        assert b"connection: close" in head.lower()
        assert json.loads(body) == {"error": "request body not complete after 0.5s: send it faster"}
        assert app.state.budget.held == 0
        with httpx.Client(base_url=url, timeout=10) as http:
            assert http.get("/healthz").status_code == 200


def test_a_body_nobody_reads_is_cut_off_after_the_answer(run_dir: Path) -> None:
    app = create_app(run_dir, body_timeout_s=0.2, token=TOKEN)
    with background_server(app) as url:
        _ready(url)
        with socket.create_connection(_address(url), timeout=10) as sock:
            sock.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\ncontent-type: image/png\r\n"
                b"content-length: 100000\r\n\r\n\x89PNG"
            )
            answer = _read_until_closed(sock)  # 401 at once; closed once the body is late
    assert answer.startswith(b"HTTP/1.1 401 ")


def test_headers_over_16_kb_are_refused_even_when_they_arrive_whole(run_dir: Path) -> None:
    with background_server(create_app(run_dir)) as url:
        _ready(url)
        with socket.create_connection(_address(url), timeout=10) as sock:
            big = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
            sock.sendall(big)
            answer = _read_until_closed(sock)
    # 431 when they arrive in one read (h11 alone took them: 200), h11's 400 when in parts
    assert answer.startswith((b"HTTP/1.1 431 ", b"HTTP/1.1 400 ")), answer[:80]


# ------------------------------------------------------------------------------ the token


def test_the_token_guards_everything_but_the_page_and_probes(run_dir: Path) -> None:
    with TestClient(create_app(run_dir, token=TOKEN)) as client:
        for path in ("/", "/static/app.js", "/healthz"):
            assert client.get(path).status_code == 200, path
        wait_until(lambda: client.get("/readyz").status_code == 200)
        missing = client.get("/model")
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == 'Bearer realm="cnnkit"'
        assert missing.json()["error"].startswith("missing bearer token")
        assert missing.headers["x-content-type-options"] == "nosniff"
        for wrong in ("Bearer nope", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer"):
            response = client.get("/model", headers={"authorization": wrong})
            assert response.status_code == 401, wrong
            assert response.headers["www-authenticate"].endswith('error="invalid_token"')
        good = {"authorization": f"Bearer {TOKEN}"}
        assert client.get("/model", headers=good).status_code == 200
        image = {"file": ("a.png", png(), "image/png")}
        assert client.post("/predict", files=image).status_code == 401
        assert client.post("/predict", files=image, headers=good).status_code == 200


@pytest.mark.parametrize("token", ["", "short", "has spaces in the middle of it"])
def test_weak_tokens_are_refused(run_dir: Path, token: str) -> None:
    with pytest.raises(ConfigError, match="token: expected at least 16 printable characters"):
        create_app(run_dir, token=token)


# ---------------------------------------------------------------------------- binding


@pytest.mark.parametrize("host", ["0", "::0", "0.0.0.0", "::", ""])
def test_every_address_other_machines_can_reach_is_warned_about(
    host: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="cnnkit"):
        check_address(host, 8000)
    (record,) = caplog.records
    assert "reachable from other machines" in record.getMessage()
    assert "there is no authentication (set --token or CNNKIT_TOKEN)" in record.getMessage()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_addresses_are_not_warned_about(
    host: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="cnnkit"):
        check_address(host, 8000)
    assert caplog.records == []


def test_an_unknown_host_is_one_error() -> None:
    with pytest.raises(ConfigError, match=r"^host: cannot resolve 'no-such-host\.invalid'"):
        check_address("no-such-host.invalid", 8000)
