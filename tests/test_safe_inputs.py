"""Files that hang, never end, take minutes to decode or cannot be printed; models that would
answer "nan%". Each is refused (or, for odd names, handled) with one clear message, the same
way in training, ``data check``, ``predict`` and the server (``test_serve`` covers the server).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import cnnkit.data.images as images_mod
from cnnkit.cli import app
from cnnkit.config import DataConfig
from cnnkit.data.check import check_folder
from cnnkit.data.dataset import prepare_data
from cnnkit.data.folder import read_split_file
from cnnkit.data.images import MAX_JPEG_SCANS, load_image, open_image, read_image_file
from cnnkit.data.jpeg import count_scans
from cnnkit.errors import CheckpointError, ImageTooLarge, RunDirError, display_path
from cnnkit.export.graph import META_KEY, meta_from_metadata
from cnnkit.model_io import load_model, save_model
from cnnkit.models.registry import build_network, load_model_spec
from cnnkit.reporting import write_report
from cnnkit.training.loop import train
from conftest import model_meta, tiny_config
from hostile_files import many_scans_jpeg


def jpeg(mode: str = "RGB", size: int = 64, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (size, size), 90).save(buffer, "JPEG", **options)
    return buffer.getvalue()


# ------------------------------------------------------------------- decode work of a JPEG


def test_count_scans_finds_every_scan_and_nothing_else() -> None:
    assert count_scans(jpeg(), 1000) == 1  # baseline: one interleaved scan
    assert count_scans(jpeg(progressive=True), 1000) == 10  # libjpeg's colour script
    assert count_scans(jpeg("L", progressive=True), 1000) == 6
    exif = Image.Exif()
    exif[0x010E] = "\xff\xda" * 20  # bytes that look like scans, inside an APP1 segment
    assert count_scans(jpeg(exif=exif.tobytes()), 1000) == 1
    hostile = many_scans_jpeg(64, 500)
    assert count_scans(hostile, 10_000) == 510
    assert count_scans(hostile, 100) == 101  # stops once it knows there are too many


def test_a_jpeg_with_thousands_of_scans_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "scans.jpg"
    path.write_bytes(many_scans_jpeg(256, 3000))  # 36 KB
    expected = f"{path}: refused, a JPEG with more than {MAX_JPEG_SCANS} scans"
    with pytest.raises(ImageTooLarge, match="^" + expected):
        load_image(path, 32)
    with pytest.raises(ImageTooLarge, match=r"^<image bytes>: refused, a JPEG with more than"):
        open_image(path.read_bytes())
    with pytest.raises(ImageTooLarge), path.open("rb") as f:  # an open file, too
        open_image(f)
    normal = load_image(jpeg(progressive=True, size=256), 32)
    assert normal.shape == (32, 32, 3)


def test_decode_work_is_pixels_times_scans(monkeypatch: pytest.MonkeyPatch) -> None:
    data = many_scans_jpeg(256, 2)  # 12 scans: allowed by count
    assert load_image(data, 16).shape == (16, 16, 3)
    monkeypatch.setattr(images_mod, "MAX_SCAN_WORK", 256 * 256 * 11)
    with pytest.raises(ImageTooLarge) as info:
        load_image(data, 16)
    assert str(info.value) == (
        "<image bytes>: refused, 256x256 pixels in 12 JPEG scans is more decode work than "
        "720,896 pixel-scans"
    )


def test_training_data_check_and_predict_refuse_it_alike(tmp_path: Path, tiny_shapes) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_shapes, data)
    (data / "circle" / "scans.jpg").write_bytes(many_scans_jpeg(128, 2000))
    why = "refused, a JPEG with more than 100 scans"
    report = check_folder(data)
    assert [(p, r.split(": ", 1)[1][: len(why)]) for p, r in report.bad] == [
        (str(data / "circle" / "scans.jpg"), why)
    ]
    prepared = prepare_data(DataConfig(path=str(data), image_size=16), 16)
    assert len(prepared.train) + len(prepared.val) == 24  # the other images all kept
    run = tmp_path / "run"
    model = build_network(load_model_spec("fast").layers, 3, 3, 16)
    save_model(run, model, model_meta(model))
    result = CliRunner().invoke(app, ["predict", str(run), str(data / "circle" / "scans.jpg")])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {data / 'circle' / 'scans.jpg'}: {why} " + (
        "(a normal one has under 20): decoding it would take too long"
    )


# ---------------------------------------------------------------- regular files, bounded size


def test_data_check_reports_a_fifo_named_like_an_image_instead_of_waiting(
    tmp_path: Path, tiny_shapes
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_shapes, data)
    fifo = data / "circle" / "x.png"
    os.mkfifo(fifo)
    found: dict = {}
    worker = threading.Thread(target=lambda: found.update(report=check_folder(data)))
    worker.start()
    worker.join(20)
    if worker.is_alive():  # it opened the FIFO and waits for a writer: be one, then fail
        with fifo.open("wb"):
            pass
        worker.join(20)
        pytest.fail("data check waited on a FIFO")
    assert found["report"].bad == [(str(fifo), f"{fifo}: not a file (a named pipe)")]


def test_links_to_devices_are_refused_before_opening(tmp_path: Path, tiny_shapes) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_shapes, data)
    zero = data / "square" / "zero.png"
    zero.symlink_to("/dev/zero")
    with pytest.raises(images_mod.ImageError, match=r"zero\.png: not a file \(a character device"):
        read_image_file(zero)
    assert check_folder(data).bad == [(str(zero), f"{zero}: not a file (a character device)")]
    prepared = prepare_data(DataConfig(path=str(data), image_size=16), 16)
    assert len(prepared.train) + len(prepared.val) == 24


def test_files_over_the_size_limit_are_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(bytes(5000))
    monkeypatch.setattr(images_mod, "MAX_FILE_BYTES", 4096)
    with pytest.raises(ImageTooLarge) as info:
        load_image(path)
    assert str(info.value) == f"{path}: refused, 5,000 bytes is more than 4,096 for one image"


# ------------------------------------------------------------------- names that are not UTF-8


def test_display_path_escapes_bytes_and_control_characters() -> None:
    assert display_path("runs/naïve/ü.png") == "runs/naïve/ü.png"
    assert display_path(os.fsdecode(b"caf\xe9.png")) == "caf\\xe9.png"
    assert display_path(b"a\xffb") == "a\\xffb"
    assert display_path(Path("two\nlines\x1b[31m.png")) == "two\\nlines\\x1b[31m.png"


def test_names_that_are_not_utf8_train_check_and_report(
    tmp_path: Path, tiny_shapes, single_thread
) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_shapes, data)
    raw = os.fsencode(data)
    first = sorted(os.listdir(raw + b"/circle"))[0]
    os.rename(raw + b"/circle/" + first, raw + b"/circle/caf\xe9.png")
    (Path(os.fsdecode(raw + b"/circle/bad\xff.png"))).write_bytes(b"not an image")
    os.rename(raw + b"/square", raw + b"/sq\xe9")

    result = train(tiny_config(data), tmp_path / "run", progress=False)  # UnicodeEncodeError
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["classes"] == ["circle", "sq\\xe9", "triangle"]
    listed = read_split_file(tmp_path / "run" / "split.csv")  # the names' own bytes
    assert os.fsdecode(raw + b"/circle/caf\xe9.png") in listed["train"] | listed["val"]
    report = write_report(tmp_path / "run", prepared=result.data, val_logits=result.val_logits)
    assert "circle/caf\\xe9.png" in report.read_text() or "sq\\xe9" in report.read_text()

    cli = CliRunner().invoke(app, ["data", "check", str(data)])
    assert cli.exit_code == 0, cli.output
    assert f"bad file: {data}/circle/bad\\xff.png: not an image" in cli.stdout
    predicted = CliRunner().invoke(app, ["predict", str(tmp_path / "run"), f"{data}/circle"])
    assert f"{data}/circle/caf\\xe9.png: " in predicted.stdout
    assert f"error: {data}/circle/bad\\xff.png: not an image" in predicted.stderr


# ------------------------------------------------------------------ normalisation of a model


@pytest.mark.parametrize(
    ("field", "values", "why"),
    [
        ("std", [0.0, 0.2, 0.2], "normalisation std[0] is 0.0: every input would be divided"),
        ("std", [0.2, float("nan"), 0.2], "normalisation std[1] is nan: not a finite number"),
        ("mean", [0.5, 0.5, float("inf")], "normalisation mean[2] is inf: not a finite number"),
        ("std", [0.2], "normalisation std has 1 values for 3 channels"),
    ],
)
def test_a_model_whose_normalisation_is_not_finite_is_refused_at_load(
    tmp_path: Path, field: str, values: list[float], why: str
) -> None:
    model = build_network(load_model_spec("fast").layers, 3, 3, 16)
    save_model(tmp_path / "run", model, model_meta(model))
    meta_file = tmp_path / "run" / "model.json"
    meta = json.loads(meta_file.read_text())
    meta["preprocessing"][field] = values
    meta_file.write_text(json.dumps(meta))  # json writes NaN and Infinity as Python reads them
    with pytest.raises(RunDirError) as info:
        load_model(tmp_path / "run")
    assert str(info.value).startswith(f"{meta_file}: damaged ({why}")
    with pytest.raises(CheckpointError) as onnx_info:
        meta_from_metadata({META_KEY: json.dumps(meta)}, "x.onnx")
    assert str(onnx_info.value).startswith(f"x.onnx: cnnkit metadata is damaged ({why}")
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "run"), str(meta_file)])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [f"error: {info.value}"]
    torch.manual_seed(0)
