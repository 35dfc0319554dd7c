"""Hostile and broken surroundings: decompression bombs everywhere images enter, full disks.

Bombs are tiny files whose headers claim billions of pixels (a 50000x50000 PNG; GIFs with a
huge logical screen, a huge frame, or a frame placed far outside the screen). Each must be
refused from its header, fast and without allocating the pixels, by ``load_image``, by a
training data folder, by ``cnnkit predict`` and by the server. A full disk or an unwritable
run directory gives one clear error and never a half-written file under a final name.
"""

from __future__ import annotations

import errno
import io
import os
import resource
import struct
import time
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cnnkit.cli import app
from cnnkit.config import DataConfig
from cnnkit.data.dataset import prepare_data
from cnnkit.data.images import MAX_PIXELS, MAX_SIDE, load_image
from cnnkit.data.preprocessing import Preprocessing
from cnnkit.data.shapes import generate_shapes
from cnnkit.errors import DataError, ImageError, RunDirError
from cnnkit.files import atomic_write
from cnnkit.model_io import ModelMeta, save_model
from cnnkit.models.registry import build_network, load_model_spec
from cnnkit.training import checkpoints as ckpt
from conftest import model_meta, training_state

# ------------------------------------------------------------------------------ bombs


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid-looking PNG (correct CRCs) claiming ``width`` x ``height`` RGB pixels.

    Its IDAT holds the start of the real pixel stream: zero rows compress ~1000:1, so the
    whole 7.5 GB image would fit in a few MB; this file carries the first 1 MB of it.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(bytes(1 << 20), 9)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def gif_bomb(
    screen: tuple[int, int], frame: tuple[int, int], at: tuple[int, int] = (0, 0)
) -> bytes:
    """A GIF89a with a logical screen, one frame of ``frame`` pixels at ``at``, and LZW data."""
    header = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + bytes(6)  # 2-colour table
    descriptor = b"\x2c" + struct.pack("<HHHHB", *at, *frame, 0)
    pixels = b"\x02" + b"\x02\x4c\x01" + b"\xff" + bytes(255) + b"\x00"  # code size 2, data
    return header + descriptor + pixels + b"\x3b"


def webp_wide_canvas(width: int = 4_000_000, height: int = 8) -> bytes:
    """An animated WEBP of two 8x8 frames on a ``width`` x ``height`` canvas (512 bytes).

    Within the pixel limit, but rows this wide made Pillow's row loop quadratic: 7 s to
    decode before cnnkit refused sides over ``MAX_SIDE``.
    """
    frames = [Image.new("RGB", (8, 8), (i * 90, 40, 200)) for i in range(2)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], duration=10)
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"VP8X"  # canvas width-1 and height-1: 24-bit little-endian
    data[24:27] = (width - 1).to_bytes(3, "little")
    data[27:30] = (height - 1).to_bytes(3, "little")
    return bytes(data)


BOMBS = {
    "png 50000x50000": png_bomb(),
    "webp 4000000x8 animation canvas": webp_wide_canvas(),
    "gif 65535x65535 screen": gif_bomb((65535, 65535), (1, 1)),
    "gif 65535x65535 frame on a 1x1 screen": gif_bomb((1, 1), (65535, 65535)),
    "gif frame placed at 65000,65000": gif_bomb((1, 1), (16, 16), (65000, 65000)),
}


def test_the_bombs_are_well_formed_headers() -> None:
    """Sanity check of the files themselves: Pillow reads each header and sees the huge size."""
    for name, data in BOMBS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None  # Pillow's own guard off: just read the header
            try:
                width, height = Image.open(io.BytesIO(data)).size
            finally:
                Image.MAX_IMAGE_PIXELS = saved
        assert width * height > 25 * MAX_PIXELS or max(width, height) > 60 * MAX_SIDE, name


def _peak_rss_reset() -> bool:
    """Reset this process's peak RSS (Linux); False where the platform cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_load_image_refuses_a_bomb_fast_with_bounded_memory(name: str, tmp_path: Path) -> None:
    path = tmp_path / "bomb.img"
    path.write_bytes(BOMBS[name])
    measured = _peak_rss_reset()
    before = _rss_kb("VmRSS") if measured else 0
    start = time.perf_counter()
    for source in (path, BOMBS[name]):
        with pytest.raises(ImageError, match=r"refused, .*\(decompression bomb\)$"):
            load_image(source, 64, 3)
    assert time.perf_counter() - start < 1.0
    if measured:  # the peak while refusing: no pixel buffer was ever allocated
        assert _rss_kb("VmHWM") - before < 64 * 1024, "more than 64 MB for a refused file"


@pytest.fixture
def data_with_bombs(tmp_path: Path) -> Path:
    data = generate_shapes(tmp_path / "data", count=10, size=16, seed=2)
    (data / "circle" / "bomb.png").write_bytes(BOMBS["png 50000x50000"])
    (data / "square" / "bomb.gif").write_bytes(BOMBS["gif 65535x65535 frame on a 1x1 screen"])
    return data


def test_training_data_skips_bombs_with_a_warning(
    data_with_bombs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    start = time.perf_counter()
    with caplog.at_level("WARNING", logger="cnnkit"):
        data = prepare_data(DataConfig(path=str(data_with_bombs), image_size=16), 16)
    assert time.perf_counter() - start < 10
    assert len(data.train) + len(data.val) == 30
    for bomb in ("circle/bomb.png", "square/bomb.gif"):
        assert any(
            bomb in r.getMessage() and "decompression bomb" in r.getMessage()
            for r in caplog.records
        ), bomb


def test_training_data_with_strict_refuses_bombs(data_with_bombs: Path) -> None:
    with pytest.raises(DataError, match=r"2 unreadable image\(s\) with data.strict, first: .*bomb"):
        prepare_data(DataConfig(path=str(data_with_bombs), image_size=16, strict=True), 16)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """An untrained run directory: enough for predict and serve to load it."""
    spec = load_model_spec("fast")
    torch.manual_seed(0)
    model = build_network(spec.layers, 3, 3, 16)
    meta = model_meta(model, classes=("circle", "square", "triangle"), resize="crop")
    save_model(tmp_path / "run", model, meta)
    return tmp_path / "run"


def test_predict_refuses_bombs_with_one_error_line_each(run_dir: Path, tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.new("RGB", (20, 20), (200, 30, 30)).save(good)
    png, gif = tmp_path / "bomb.png", tmp_path / "bomb.gif"
    png.write_bytes(BOMBS["png 50000x50000"])
    gif.write_bytes(BOMBS["gif 65535x65535 screen"])
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["predict", str(run_dir), str(png), str(good), str(gif)])
    assert time.perf_counter() - start < 10
    assert result.exit_code == 1
    assert result.stdout.startswith(f"{good}: ")  # the good image is still classified
    errors = result.stderr.strip().splitlines()
    assert [e.split(": refused, ")[0] for e in errors] == [f"error: {png}", f"error: {gif}"]
    assert all(e.endswith(f"more than {MAX_PIXELS:,} pixels (decompression bomb)") for e in errors)


@pytest.fixture
def client(run_dir: Path) -> Iterator[object]:
    serve = pytest.importorskip("cnnkit.serve")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    with TestClient(serve.create_app(run_dir)) as test_client:
        yield test_client


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_server_refuses_bombs_with_413(client, name: str) -> None:
    start = time.perf_counter()
    response = client.post("/predict", files={"file": ("x.img", BOMBS[name], "image/png")})
    assert time.perf_counter() - start < 1.0
    assert response.status_code == 413, response.text
    assert "decompression bomb" in response.json()["error"]
    good = np.full((16, 16, 3), 90, np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(good).save(buffer, format="PNG")
    after = client.post("/predict", files={"file": ("ok.png", buffer.getvalue(), "image/png")})
    assert after.status_code == 200  # and it keeps serving


# ------------------------------------------------------------------- full disk, no access


class FileSizeLimit:
    """A real write failure from the kernel: RLIMIT_FSIZE makes larger writes fail (EFBIG).

    Python ignores SIGXFSZ, so the write returns an error instead of killing the process.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def __enter__(self) -> None:
        self.saved = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.saved[1]))

    def __exit__(self, *exc: object) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, self.saved)


def disk_full_at_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC where a full disk often reports it: when delayed writes are flushed."""

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_checkpoint_on_a_full_disk_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = torch.nn.Linear(64, 64)  # 16 kB of weights
    state = training_state()
    ckpt.save_checkpoint(tmp_path, model, state)
    before = files_under(tmp_path)
    with FileSizeLimit(8192), pytest.raises(RunDirError) as info:
        ckpt.save_checkpoint(tmp_path, torch.nn.Linear(64, 64), state)
    assert str(info.value) == (
        f"cannot write checkpoint {tmp_path / 'checkpoints' / 'ckpt-000002'}: File too large "
        "(earlier checkpoints are kept)"
    )
    assert files_under(tmp_path) == before  # no temporary folder, nothing new, nothing changed
    disk_full_at_fsync(monkeypatch)
    with pytest.raises(RunDirError, match=r"ckpt-000002: No space left on device"):
        ckpt.save_checkpoint(tmp_path, model, state)
    assert files_under(tmp_path) == before
    monkeypatch.undo()
    ckpt.find_checkpoint(tmp_path)  # still loads


def test_checkpoint_into_an_unwritable_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> str:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(ckpt.tempfile, "mkdtemp", refuse)
    with pytest.raises(RunDirError) as info:
        ckpt.save_checkpoint(tmp_path, torch.nn.Linear(2, 2), {})
    assert str(info.value) == (
        f"cannot write a checkpoint in {tmp_path / 'checkpoints'}: Permission denied"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_checkpoint_into_a_read_only_folder(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints").chmod(0o500)
    try:
        with pytest.raises(RunDirError, match=r"cannot write a checkpoint in .*Permission denied"):
            ckpt.save_checkpoint(tmp_path, torch.nn.Linear(2, 2), {})
    finally:
        (tmp_path / "checkpoints").chmod(0o700)


def test_atomic_write_on_a_full_disk_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("old contents\n")
    with FileSizeLimit(1000), pytest.raises(RunDirError) as info:
        atomic_write(path, lambda p: p.write_bytes(bytes(5000)))
    assert str(info.value) == f"cannot write {path}: File too large"
    assert files_under(tmp_path) == {"metrics.csv": b"old contents\n"}
    disk_full_at_fsync(monkeypatch)
    with pytest.raises(RunDirError, match=r"metrics\.csv: No space left on device$"):
        atomic_write(path, lambda p: p.write_text("new"))
    assert files_under(tmp_path) == {"metrics.csv": b"old contents\n"}


def test_save_model_on_a_full_disk_keeps_the_old_model(run_dir: Path) -> None:
    before = files_under(run_dir)
    model = build_network(load_model_spec("fast").layers, 3, 3, 16)
    meta = ModelMeta(("a", "b", "c"), Preprocessing(16, 3, (0.5,) * 3, (0.2,) * 3, "crop"), ())
    with FileSizeLimit(4096), pytest.raises(RunDirError, match=r"model\.safetensors: File too"):
        save_model(run_dir, model, meta)
    assert files_under(run_dir) == before


def test_training_on_a_full_disk_is_one_clear_error(tmp_path: Path) -> None:
    data = generate_shapes(tmp_path / "data", count=10, size=16, seed=4)
    out = tmp_path / "run"
    args = ["train", str(data), "--out", str(out), "--image-size", "16", "--epochs", "1"]
    args += ["--batch-size", "8", "--checkpoint-every", "1", "--device", "cpu", "--quiet"]
    with FileSizeLimit(64 * 1024):  # the data cache fits; the first checkpoint does not
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.exception
    (line,) = result.stderr.strip().splitlines()
    assert line == (
        f"error: cannot write checkpoint {out / 'checkpoints' / 'ckpt-000001'}: File too large "
        "(earlier checkpoints are kept)"
    )
    assert not list((out / "checkpoints").iterdir())  # nothing half-written is left


def test_training_into_an_unwritable_place_is_one_clear_error(tmp_path: Path) -> None:
    data = generate_shapes(tmp_path / "data", count=4, size=16, seed=4)
    (tmp_path / "file").write_text("not a folder")
    out = str(tmp_path / "file" / "run")  # (a named model: auto would log its choice first)
    result = CliRunner().invoke(app, ["train", str(data), "--out", out, "--model", "fast"])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert (
        line == f"error: cannot write to run directory {tmp_path / 'file' / 'run'}: Not a directory"
    )
