"""``cnnkit export``, ``cnnkit serve`` and ``cnnkit predict MODEL.onnx``, in-process."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

from cnnkit.cli import app

runner = CliRunner()


def _run(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture()
def captured_uvicorn(monkeypatch: pytest.MonkeyPatch) -> list:
    """Replace uvicorn's serving loop: record the config instead of listening (and bind no
    real port: 8000 may be taken on a shared machine)."""
    import socket

    import uvicorn

    import cnnkit.serve.runner as runner_mod

    configs: list = []
    monkeypatch.setattr(
        uvicorn.Server, "run", lambda self, sockets=None: configs.append(self.config)
    )
    monkeypatch.setattr(runner_mod, "bind_port", lambda host, port: socket.socket())
    return configs


def test_help_of_export_and_serve() -> None:
    export = _run("export", "--help")
    assert export.exit_code == 0 and "--format" in export.stdout and "--opset" in export.stdout
    serve = _run("serve", "--help")
    assert serve.exit_code == 0 and "--host" in serve.stdout and "--port" in serve.stdout


def test_export_onnx_then_predict_with_it_gives_the_same_answers(
    trained_run, shapes_dir, tmp_path
) -> None:
    run, _ = trained_run
    out = tmp_path / "shapes.onnx"
    result = _run("export", run, "--format", "onnx", "--out", out, "--opset", "18")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"exported {out} (onnx, opset 18, ")
    assert lines[1].startswith("verified on ") and "validation images" in lines[1]
    assert lines[1].endswith("batch sizes 1, 7, 32")
    assert lines[2].startswith("max abs difference ") and "top-1 agreement 100.00%" in lines[2]
    proto = onnx.load(str(out))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [18]

    images = (
        sorted((shapes_dir / "circle").iterdir())[:4]
        + sorted((shapes_dir / "triangle").iterdir())[:4]
    )
    from_run = _run("predict", run, *images, "--json")
    from_onnx = _run("predict", out, *images, "--json")
    assert from_run.exit_code == from_onnx.exit_code == 0, from_onnx.output
    a = [json.loads(line) for line in from_run.stdout.splitlines()]
    b = [json.loads(line) for line in from_onnx.stdout.splitlines()]
    assert [(p["source"], p["label"]) for p in a] == [(p["source"], p["label"]) for p in b]
    assert [list(p["probabilities"]) for p in a] == [list(p["probabilities"]) for p in b]
    plain = _run("predict", out, images[0])
    assert plain.stdout.startswith(f"{images[0]}: ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "tflite"], "error: --format: expected one of onnx, pt2, got 'tflite'"),
        (["--format", "pt2", "--opset", "17"], "error: --opset applies to --format onnx only"),
        (["--check-images", "0"], "error: --check-images: expected a positive integer, got 0"),
        (["--tolerance", "0"], "error: --tolerance: expected a positive number, got 0.0"),
        (["--out", "model.bin"], "error: --out model.bin: expected a file name ending in .onnx"),
    ],
)
def test_export_refuses_bad_options_in_one_line(trained_run, args, message) -> None:
    run, _ = trained_run
    result = _run("export", run, *args)
    assert result.exit_code == 1
    assert result.stderr.strip() == message


def test_export_and_predict_name_what_is_missing(tmp_path) -> None:
    result = _run("export", tmp_path / "nope")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: not a run directory: {tmp_path / 'nope'}")
    missing = _run("predict", tmp_path / "gone.onnx", tmp_path)
    assert missing.exit_code == 1
    assert missing.stderr.strip() == f"error: {tmp_path / 'gone.onnx'}: no such ONNX file"


def test_serve_listens_on_loopback_by_default(trained_run, captured_uvicorn) -> None:
    run, _ = trained_run
    result = _run("serve", run)
    assert result.exit_code == 0, result.output
    (config,) = captured_uvicorn
    assert (config.host, config.port) == ("127.0.0.1", 8000)
    assert "reachable from other machines" not in result.stderr
    assert f"serving {run} on http://127.0.0.1:8000/" in result.stderr
    state = config.app.state
    assert state.settings.max_queue == 32 and state.settings.max_body_bytes == 10 * 1024 * 1024


def test_serve_warns_for_every_interface_and_passes_limits(trained_run, captured_uvicorn) -> None:
    run, _ = trained_run
    result = _run(
        "serve", run, "--host", "0.0.0.0", "--port", "8123", "--max-queue", "4",
        "--max-body-mb", "1", "--timeout", "2.5",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (
        "warning: listening on 0.0.0.0 port 8123, reachable from other machines: anyone who can "
        "reach it can use the model: there is no authentication (set --token or CNNKIT_TOKEN)"
    ) in result.stderr
    (config,) = captured_uvicorn
    settings = config.app.state.settings
    assert (config.host, config.port) == ("0.0.0.0", 8123)
    assert (settings.max_queue, settings.max_body_bytes, settings.timeout_s) == (4, 1 << 20, 2.5)


@pytest.mark.parametrize(("host", "bound"), [("0", "0.0.0.0"), ("::0", "::")])
def test_serve_warns_for_every_spelling_of_every_interface(
    trained_run, captured_uvicorn, host, bound
) -> None:
    run, _ = trained_run
    result = _run("serve", run, "--host", host, "--header-timeout", "3", "--body-timeout", "7")
    assert result.exit_code == 0, result.output
    assert f"warning: listening on {bound} port 8000, reachable from other machines" in (
        result.stderr
    )
    (config,) = captured_uvicorn
    settings = config.app.state.settings
    assert (settings.header_timeout_s, settings.body_timeout_s) == (3.0, 7.0)
    assert config.http.header_timeout == 3.0  # cnnkit's protocol, with the timeouts


def test_serve_takes_the_token_from_the_environment(trained_run, captured_uvicorn) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    run, _ = trained_run
    token = "environment-token-0123456789"
    result = runner.invoke(app, ["serve", str(run), "--host", "::"], env={"CNNKIT_TOKEN": token})
    assert result.exit_code == 0, result.output
    assert "requests need the bearer token, which travels as plain HTTP" in result.stderr
    assert token not in result.output  # never printed
    (config,) = captured_uvicorn
    with TestClient(config.app) as client:
        assert client.get("/model").status_code == 401
        assert client.get("/model", headers={"authorization": f"Bearer {token}"}).status_code == 200
    short = runner.invoke(app, ["serve", str(run), "--token", "abc"])
    assert short.exit_code == 1
    assert short.stderr.startswith("error: token: expected at least 16 printable characters")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "0"], "error: --port: expected 1 to 65535, got 0"),
        (["--port", "70000"], "error: --port: expected 1 to 65535, got 70000"),
        (["--max-queue", "0"], "error: serve: max_queue must be a positive integer, got 0"),
        (["--max-body-mb", "0"], "error: --max-body-mb: expected a positive number, got 0.0"),
    ],
)
def test_serve_refuses_bad_options(trained_run, captured_uvicorn, args, message) -> None:
    run, _ = trained_run
    result = _run("serve", run, *args)
    assert result.exit_code == 1
    assert result.stderr.strip() == message
    assert captured_uvicorn == []


def test_serve_refuses_a_missing_model_before_listening(tmp_path, captured_uvicorn) -> None:
    result = _run("serve", tmp_path / "nothing")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: not a run directory: {tmp_path / 'nothing'}")
    assert captured_uvicorn == []
