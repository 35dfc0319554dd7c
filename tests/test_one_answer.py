"""One answer everywhere: a run directory, its ONNX and pt2 exports and the server give every
validation image the same top-1, with probabilities that differ only by fp32 rounding.

All of them compute in fp32 (a run directory's classifier too, unless bf16 is asked for). Two
fp32 implementations of the same network (oneDNN, onnxruntime, the ``torch.export`` program)
sum in different orders; on logits of size ~10 that moves them by ~1e-6, so 1e-4 on the
probabilities is a wide margin that bf16 (8 bits of mantissa: ~1e-2) does not fit in.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cnnkit.cli import app
from cnnkit.config import RunConfig, load_yaml
from cnnkit.data.dataset import load_split
from cnnkit.export import export_onnx, export_pt2, load_predictor
from cnnkit.inference import load
from cnnkit.serve import create_app

with warnings.catch_warnings():  # starlette's note about httpx, not about cnnkit
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

FP32_TOLERANCE = 1e-4  # on probabilities; see the module docstring
runner = CliRunner()


def val_paths(run: Path) -> list[Path]:
    """The files the run validated on (its own split, re-drawn from config.yaml)."""
    config = RunConfig.from_dict(load_yaml(run / "config.yaml"))
    meta = load(run).meta
    val = load_split(
        config.data.path,
        "val",
        meta.classes,
        config.data,
        meta.preprocessing.size,
        meta.preprocessing.channels,
    )
    assert len(val) >= 60
    return [Path(p) for p in val.paths]


def cli_probabilities(model: Path, files: list[Path]) -> tuple[list[str], np.ndarray]:
    """``cnnkit predict MODEL FILES --csv``: labels and probabilities ``(N, classes)``."""
    result = runner.invoke(app, ["predict", str(model), *map(str, files), "--csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert [Path(r[0]) for r in rows[1:]] == files
    return [r[1] for r in rows[1:]], np.array([[float(v) for v in r[3:]] for r in rows[1:]])


def served_probabilities(model: Path, files: list[Path]) -> tuple[list[str], np.ndarray]:
    """``POST /predict`` of the files, several to a request (the server batches them)."""
    labels, probs = [], []
    with TestClient(create_app(model, max_images=16)) as client:
        classes = client.get("/model").json()["classes"]
        for start in range(0, len(files), 16):
            part = files[start : start + 16]
            upload = [("file", (p.name, p.read_bytes(), "image/png")) for p in part]
            response = client.post("/predict", files=upload)
            assert response.status_code == 200, response.text
            for pred in response.json()["predictions"]:
                labels.append(pred["class"])
                probs.append([pred["probabilities"][c] for c in classes])
    return labels, np.array(probs)


def assert_one_answer(sources: dict[str, Path], files: list[Path]) -> None:
    answers = {name: cli_probabilities(path, files) for name, path in sources.items()}
    answers["serve"] = served_probabilities(sources["run directory"], files)
    answers["serve onnx"] = served_probabilities(sources["onnx"], files)
    answers["serve pt2"] = served_probabilities(sources["pt2"], files)
    ref_labels, ref_probs = answers.pop("run directory")
    for name, (labels, probs) in answers.items():
        differ = [str(f) for f, a, b in zip(files, labels, ref_labels, strict=True) if a != b]
        assert differ == [], f"{name} disagrees with the run directory on {differ}"
        # CSV and JSON round probabilities to 6 decimals: 1e-6 more
        assert np.abs(probs - ref_probs).max() < FP32_TOLERANCE, name


@pytest.fixture(scope="module")
def exported(fast_trained_run, tmp_path_factory) -> dict[str, Path]:
    run, _ = fast_trained_run
    folder = tmp_path_factory.mktemp("exports")
    return {
        "run directory": run,
        "onnx": export_onnx(run, folder / "m.onnx", check_images=8).path,
        "pt2": export_pt2(run, folder / "m.pt2", check_images=8).path,
    }


def test_every_validation_image_gets_one_answer_everywhere(exported) -> None:
    assert_one_answer(exported, val_paths(exported["run directory"]))


def test_a_model_trained_with_tta_averages_the_mirror_image_in_its_exports_too(
    fast_trained_run, tmp_path
) -> None:
    """``--tta`` travels in model.json; the exports' predictors must average as the run does."""
    run = tmp_path / "run"
    shutil.copytree(fast_trained_run[0], run)
    meta = json.loads((run / "model.json").read_text())
    meta["tta"] = True
    (run / "model.json").write_text(json.dumps(meta))
    sources = {
        "run directory": run,
        "onnx": export_onnx(run, tmp_path / "m.onnx", check_images=8).path,
        "pt2": export_pt2(run, tmp_path / "m.pt2", check_images=8).path,
    }
    files = val_paths(run)[::4]
    with_tta = load(run).predict_proba(files)
    without = load(fast_trained_run[0]).predict_proba(files)
    assert np.abs(with_tta - without).max() > 10 * FP32_TOLERANCE  # the mirror counts
    assert_one_answer(sources, files)


def test_prediction_defaults_to_fp32_and_bf16_is_only_on_request(fast_trained_run) -> None:
    run, result = fast_trained_run
    assert load(run).precision == "fp32"
    assert load_predictor(run).precision == "fp32"
    assert load(run, precision="bf16").precision == "bf16"
    # training keeps its validation logits for the report only when predict would compute
    # the same ones (fp32); bf16 training leaves them to be computed again
    if result.precision == "fp32":
        assert result.val_logits is not None
        files = val_paths(run)
        exact = torch.softmax(result.val_logits, 1).numpy()
        assert np.abs(exact - load(run).predict_proba(files)).max() < FP32_TOLERANCE
    else:
        assert result.val_logits is None


def test_cnnkit_serve_takes_a_pt2_file(exported, monkeypatch) -> None:
    import socket

    import uvicorn

    import cnnkit.serve.runner as runner_mod

    apps: list = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: apps.append(self.config))
    monkeypatch.setattr(runner_mod, "bind_port", lambda host, port: socket.socket())
    result = runner.invoke(app, ["serve", str(exported["pt2"]), "--port", "8765"])
    assert result.exit_code == 0, result.output
    (config,) = apps
    assert config.app.state.served.info()["format"] == "pt2"
