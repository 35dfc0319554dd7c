"""The run report: every section, only embedded images, and it survives a missing data folder."""

from __future__ import annotations

import base64
import io
import logging
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

import cnnkit
import cnnkit.data.dataset as dataset_mod
import cnnkit.reporting.build as report_mod
from cnnkit.cli import app
from cnnkit.config import RunConfig, load_yaml
from cnnkit.data.dataset import prepare_data
from cnnkit.data.shapes import generate_shapes
from cnnkit.errors import RunDirError
from cnnkit.inference import Classifier
from cnnkit.model_io import load_model
from cnnkit.plots import kernel_figure
from cnnkit.reporting import DATA_SECTIONS, SECTIONS, build_report, try_write_report, write_report

IMG_SRC = re.compile(r"<img[^>]*\ssrc=['\"]([^'\"]*)['\"]")


@pytest.fixture(scope="module")
def report_run(trained_run, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    """A copy of the trained run with its report written, and the seconds that took."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(trained_run[0], run_dir)
    started = time.perf_counter()
    path = write_report(run_dir)
    return run_dir, path, time.perf_counter() - started


def test_report_from_training_data_in_memory_matches_one_from_disk(
    trained_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After training, the report uses the decoded data the run holds: nothing is scanned or
    decoded again, and the page is the one a later ``cnnkit report`` builds from disk."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run[0], run_dir)
    from_disk = build_report(run_dir)
    prepared = prepare_data(RunConfig.from_dict(load_yaml(run_dir / "config.yaml")).data, 32)

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the folder was scanned again")

    monkeypatch.setattr(report_mod, "prepare_data", refuse)
    monkeypatch.setattr(dataset_mod, "scan_folder", refuse)
    in_memory = build_report(run_dir, prepared=prepared)
    assert in_memory == from_disk
    # With training's validation logits of the saved weights, nothing runs the model again.
    # (A bf16 run keeps none: they are not what fp32 prediction computes; the report's are.)
    logits = trained_run[1].val_logits
    if trained_run[1].precision != "fp32":
        assert logits is None
        logits = cnnkit.load(run_dir).logits(prepared.val.images)
    assert logits is not None and logits.shape == (len(prepared.val), len(prepared.classes))
    monkeypatch.setattr(Classifier, "logits", refuse)
    assert build_report(run_dir, prepared=prepared, val_logits=logits) == from_disk


def _images(html: str) -> list[np.ndarray]:
    out = []
    for src in IMG_SRC.findall(html):
        assert src.startswith("data:image/png;base64,"), src[:60]
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        out.append(np.asarray(Image.open(io.BytesIO(raw))))
    return out


def test_report_has_every_section_and_embedded_images(report_run) -> None:
    run_dir, path, seconds = report_run
    assert path == run_dir / "report.html"
    html = path.read_text()
    for key, title in SECTIONS:
        assert f"<section id='{key}'><h2>{title}</h2>" in html
    assert "Unavailable" not in html
    images = _images(html)
    # 16 augmented, curves, up to 8 mistakes, kernels, input + 15 feature-map layers
    assert len(images) >= 16 + 1 + 1 + 1 + 15
    assert all(im.size > 0 for im in images)
    print(f"report written in {seconds:.2f}s, {path.stat().st_size / 1e3:.0f} kB")


def test_report_is_self_contained(report_run) -> None:
    html = report_run[1].read_text()
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html)  # images are inside
    assert "<script" not in text.lower()
    assert "//" not in text and "http" not in text.lower()
    assert "url(" not in text
    for href in re.findall(r"href=['\"]([^'\"]*)['\"]", html):
        assert href.startswith("#")


def test_report_numbers_match_the_run(report_run) -> None:
    run_dir, path, _ = report_run
    html = path.read_text()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert f"path: {config['data']['path']}" in html
    for layer in ("conv1", "batchnorm1", "maxpool3", "gmp1", "dense1"):
        assert f"<td>{layer}</td>" in html
    evaluation = cnnkit.evaluate(run_dir, config["data"]["path"], split="val")
    assert (
        f"{evaluation.count} validation images, accuracy {100 * evaluation.accuracy:.1f}%" in html
    )
    for row in evaluation.per_class:
        assert f"<td>{row['class']}</td><td>{row['precision']:.3f}</td>" in html


def test_report_without_the_data_folder(trained_run, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run[0], run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["data"]["path"] = str(tmp_path / "deleted")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    html = build_report(run_dir)
    reason = f"the data folder {tmp_path / 'deleted'} no longer exists"
    for key, title in SECTIONS:
        section = html.split(f"<section id='{key}'>", 1)[1].split("</section>", 1)[0]
        assert f"<h2>{title}</h2>" in section
        assert (f"Unavailable: {reason}." in section) == (key in DATA_SECTIONS), key
    assert "Unavailable without the training images" in html
    assert len(_images(html)) == 2  # curves and first-layer kernels still render


def test_report_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(RunDirError):
        write_report(tmp_path)
    with caplog.at_level(logging.WARNING, logger="cnnkit"):
        assert try_write_report(tmp_path) is None
    assert "report not written" in caplog.text
    assert not (tmp_path / "report.html").exists()


def test_training_writes_the_report(tmp_path: Path) -> None:
    data = generate_shapes(tmp_path / "data", count=12, size=16, seed=3)
    args = ["train", str(data), "--out", str(tmp_path / "cli"), "--epochs", "1", "--quiet"]
    result = CliRunner().invoke(app, [*args, "--image-size", "16", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "report.html").is_file()
    assert f"report: {tmp_path / 'cli' / 'report.html'}" in result.stdout
    cnnkit.train(data, tmp_path / "api", epochs=1, image_size=16, batch_size=8)
    assert "<h2>Confusion matrix</h2>" in (tmp_path / "api" / "report.html").read_text()


def test_a_failing_report_keeps_the_model(tmp_path: Path, monkeypatch, caplog) -> None:
    import cnnkit.reporting.build

    def broken(*_args, **_kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(cnnkit.reporting.build, "build_report", broken)
    data = generate_shapes(tmp_path / "data", count=12, size=16, seed=4)
    with caplog.at_level(logging.WARNING, logger="cnnkit"):
        cnnkit.train(data, tmp_path / "run", epochs=1, image_size=16, batch_size=8)
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "report.html").exists()
    assert "report not written: disk full" in caplog.text


@pytest.mark.browser
def test_report_in_headless_chromium(report_run) -> None:
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("/usr/bin/chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    _, path, _ = report_run
    args = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
        try:
            page = browser.new_page()
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(path.as_uri())
            headings = page.eval_on_selector_all("h2", "els => els.map(e => e.textContent)")
            widths = page.eval_on_selector_all(
                "img", "els => els.map(e => e.complete ? e.naturalWidth : 0)"
            )
        finally:
            browser.close()
    assert headings == [title for _, title in SECTIONS]
    assert widths and all(w > 0 for w in widths)
    assert all(u.startswith(("file:", "data:")) for u in requests), requests


def _section(html: str, key: str) -> str:
    return html.split(f"<section id='{key}'>", 1)[1].split("</section>", 1)[0]


def test_kernels_are_drawn_readably_and_class_scores_are_labelled(report_run) -> None:
    run_dir, path, _ = report_run
    html = path.read_text()
    model, meta = load_model(run_dir)
    kernels = _section(html, "kernels")
    (image,) = _images(kernels)
    weight = model.layers["conv1"].weight.detach().numpy()  # (16, 3, 3, 3)
    figure = kernel_figure(weight, rgb=True)
    np.testing.assert_array_equal(image, figure.image)  # tiles of >= 24 px: see test_plots
    assert min(right - left for left, _, right, _ in figure.tiles.values()) >= 24
    assert "centred on zero: blue negative, white zero, red positive" in kernels
    assert f"from {-figure.limit:.3g} to +{figure.limit:.3g}" in kernels
    assert "then its red, green and blue weights" in kernels
    maps = _section(html, "feature-maps")
    assert "<h3>dense1 (dense): one score per class, softmax gives the probabilities</h3>" in maps
    scores = maps.split("<h3>dense1", 1)[1]
    for name in meta.classes:
        assert f"<td>{name}</td>" in scores
