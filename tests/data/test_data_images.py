"""Safe decoding and the one preprocessing path: every mode, format, hostile file and resize."""

from __future__ import annotations

import io
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cnnkit.data.images as images_mod
from cnnkit.data.images import load_image, open_image, to_model_input
from cnnkit.errors import DataError, ImageError


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims ``width`` x ``height`` RGB pixels (no real pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


# ------------------------------------------------------------------------------ modes


def test_16_bit_greyscale_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 32768], [65535, 16384]], dtype=np.uint16)
    data = encode(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    grey = load_image(data, channels=1)[:, :, 0]
    assert grey.tolist() == [[0, 128], [255, 64]]  # Pillow's own convert("L") gives 255s
    rgb = load_image(data, channels=3)
    assert rgb.shape == (2, 2, 3) and (rgb[0, 1] == 128).all()


def test_32_bit_integer_and_float_greyscale() -> None:
    wide = Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.int32))
    assert wide.mode == "I"
    assert load_image(wide, channels=1)[0, :, 0].tolist() == [0, 4, 255]  # 16-bit range
    narrow = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32))
    assert load_image(narrow, channels=1)[0, :, 0].tolist() == [0, 100, 255]  # 8-bit range
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32))
    assert unit.mode == "F"
    assert load_image(unit, channels=1)[0, :, 0].tolist() == [0, 128, 255, 0]


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("L", (3, 2), 77), [77, 77, 77]),
        (Image.new("RGB", (3, 2), (200, 10, 30)), [200, 10, 30]),
        (Image.new("LA", (3, 2), (0, 0)), [255, 255, 255]),  # transparent -> white
        (Image.new("LA", (3, 2), (0, 255)), [0, 0, 0]),
        (Image.new("RGBA", (3, 2), (255, 0, 0, 0)), [255, 255, 255]),
        (Image.new("RGBA", (3, 2), (255, 0, 0, 128)), [255, 127, 127]),  # half over white
        (Image.new("RGBA", (3, 2), (0, 0, 255, 255)), [0, 0, 255]),
        (Image.new("1", (3, 2), 1), [255, 255, 255]),
        (Image.new("1", (3, 2), 0), [0, 0, 0]),
    ],
    ids=["L", "RGB", "LA-clear", "LA-opaque", "RGBA-clear", "RGBA-half", "RGBA-opaque", "1", "0"],
)
def test_modes_through_png(image: Image.Image, expected: list[int]) -> None:
    out = load_image(encode(image))
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    assert (out.reshape(-1, 3) == expected).all()


def _palette_image(transparent: bool) -> bytes:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((0, 0), 1)
    return encode(image, transparency=0) if transparent else encode(image)


def test_palette_with_and_without_transparency() -> None:
    opaque = load_image(_palette_image(False))
    assert opaque[1, 1].tolist() == [255, 0, 0] and opaque[0, 0].tolist() == [0, 255, 0]
    clear = load_image(_palette_image(True))
    assert clear[1, 1].tolist() == [255, 255, 255]  # index 0 is transparent -> white
    assert clear[0, 0].tolist() == [0, 255, 0]


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = load_image(data)
    assert out.shape == (8, 8, 3)
    assert np.abs(out.astype(int) - [255, 0, 0]).max() <= 3


def test_rgb_to_one_channel_uses_luma() -> None:
    out = load_image(Image.new("RGB", (2, 2), (200, 100, 50)), channels=1)
    assert out.shape == (2, 2, 1)
    assert abs(int(out[0, 0, 0]) - round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)) <= 1


def test_exif_orientation_is_applied() -> None:
    array = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high
    array[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encode(Image.fromarray(array), "JPEG", exif=exif.tobytes(), quality=95)
    out = load_image(data)
    assert out.shape == (40, 20, 3)  # portrait now
    assert out[:15].mean() > 240 and out[-15:].mean() < 15  # the left half is now on top
    plain = load_image(encode(Image.fromarray(array), "JPEG", quality=95))
    assert plain.shape == (20, 40, 3)


# ---------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "WEBP"])
def test_allowed_formats_are_read(fmt: str, tmp_path: Path) -> None:
    image = Image.new("RGB", (6, 4), (200, 40, 40))
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(encode(image, fmt, **({"quality": 100} if fmt == "WEBP" else {})))
    for source in (path, str(path), path.read_bytes(), io.BytesIO(path.read_bytes())):
        out = load_image(source)
        assert out.shape == (4, 6, 3)
        assert np.abs(out.astype(int) - [200, 40, 40]).max() <= 12


def test_gif_first_frame_is_used() -> None:
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert load_image(data)[4, 4].tolist() == [255, 0, 0]


@pytest.mark.parametrize("fmt", ["TIFF", "ICO", "PPM", "TGA"])
def test_formats_pillow_knows_but_cnnkit_refuses(fmt: str, tmp_path: Path) -> None:
    data = encode(Image.new("RGB", (16, 16), (1, 2, 3)), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself would decode it
    path = tmp_path / "disguised.png"
    path.write_bytes(data)
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert str(info.value) == (
        f"{path}: not an image in a supported format (JPEG, PNG, BMP, GIF, WEBP)"
    )


def test_content_decides_not_the_suffix(tmp_path: Path) -> None:
    path = tmp_path / "really_a_jpeg.png"
    path.write_bytes(encode(Image.new("RGB", (4, 4), (0, 200, 0)), "JPEG", quality=95))
    assert load_image(path)[0, 0, 1] > 190


# ------------------------------------------------------------------------- bad files


def test_bad_files_raise_image_error_naming_file_and_reason(tmp_path: Path) -> None:
    png = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)))
    jpg = encode(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG")
    cases = {
        "missing.png": (None, "file not found"),
        "empty.png": (b"", "empty file (0 bytes)"),
        "notes.png": (b"these are my notes, not pixels\n", "not an image in a supported format"),
        "cut.png": (png[: len(png) // 2], "unreadable (image file is truncated"),
        "cut.jpg": (jpg[: len(jpg) - 20], "unreadable ("),
        "header.png": (png[:30], "not an image in a supported format"),
    }
    for name, (data, reason) in cases.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(ImageError) as info:
            load_image(path, 16)
        assert str(info.value).startswith(f"{path}: {reason}"), str(info.value)
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(ImageError, match=r"folder\.png: not a file$"):
        load_image(tmp_path / "folder.png")
    with pytest.raises(ImageError, match=r"^<image bytes>: empty \(0 bytes\)$"):
        load_image(b"")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "locked.png"
    path.write_bytes(encode(Image.new("RGB", (4, 4))))
    path.chmod(0)
    try:
        with pytest.raises(ImageError, match=f"^{path}: permission denied$"):
            load_image(path)
    finally:
        path.chmod(0o644)


def test_image_error_is_a_data_error() -> None:
    with pytest.raises(DataError):
        load_image(b"nope")


def test_decompression_bomb_header_is_refused_fast() -> None:
    data = png_header_only(50_000, 50_000)
    assert len(data) < 100
    started = time.perf_counter()
    with pytest.raises(ImageError, match=r"^<image bytes>: refused, .*decompression bomb"):
        load_image(data, 32)
    with pytest.raises(ImageError, match="decompression bomb"):
        open_image(png_header_only(8_000, 6_000))  # 48 MP: between the limit and twice it
    assert time.perf_counter() - started < 0.5


def test_max_pixels_is_the_limit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(encode(Image.new("RGB", (20, 10))))
    assert load_image(path).shape == (10, 20, 3)
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 199)
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert str(info.value) == (
        f"{path}: refused, 20x10 is more than 199 pixels (decompression bomb)"
    )
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 200)
    assert load_image(path).shape == (10, 20, 3)


def test_open_image_reads_the_header_only() -> None:
    data = png_header_only(300, 200)  # no pixel data at all
    image = open_image(data)
    assert image.size == (300, 200) and image.format == "PNG"
    with pytest.raises(ImageError, match="unreadable"):
        load_image(data)


# ---------------------------------------------------------------------------- resizing


def _stripes() -> Image.Image:
    """64 wide, 32 high: a red, a green and a blue vertical band (16, 32, 16 columns)."""
    array = np.zeros((32, 64, 3), np.uint8)
    array[:, :16] = (255, 0, 0)
    array[:, 16:48] = (0, 255, 0)
    array[:, 48:] = (0, 0, 255)
    return Image.fromarray(array)


def test_crop_keeps_the_aspect_ratio_and_cuts_the_centre() -> None:
    out = load_image(_stripes(), 16, resize="crop").astype(int)
    assert out.shape == (16, 16, 3)
    assert (np.abs(out[:, 1:-1] - [0, 255, 0]) <= 1).all()  # only the green centre remains
    assert out[:, [0, -1]][..., [0, 2]].max() <= 40  # at most a trace of red and blue


def test_squash_keeps_everything_and_stretches() -> None:
    out = load_image(_stripes(), 16, resize="squash").astype(int)
    assert out.shape == (16, 16, 3)
    assert (out[:, :3] == [255, 0, 0]).all()  # red: the first quarter of the width
    assert (out[:, 5:11] == [0, 255, 0]).all()
    assert (out[:, 13:] == [0, 0, 255]).all()


def test_pad_keeps_everything_and_the_aspect_ratio() -> None:
    out = load_image(_stripes(), 16, resize="pad").astype(int)
    assert out.shape == (16, 16, 3)
    assert (out[:4] == 0).all() and (out[12:] == 0).all()  # black bars above and below
    band = out[5:11]  # the image, scaled to 16x8, in the middle rows
    assert (band[:, :3] == [255, 0, 0]).all()
    assert (band[:, 5:11] == [0, 255, 0]).all()
    assert (band[:, 13:] == [0, 0, 255]).all()


@pytest.mark.parametrize("resize", ["crop", "squash", "pad"])
def test_square_images_are_only_scaled(resize: str) -> None:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), np.uint8))
    out = load_image(image, 16, resize=resize)
    expected = np.asarray(image.resize((16, 16), Image.Resampling.BILINEAR, reducing_gap=3.0))
    assert np.abs(out.astype(int) - expected).max() <= 1
    assert np.array_equal(load_image(image, 32, resize=resize), np.asarray(image))


def test_size_none_keeps_the_image_size_and_channels_are_as_asked() -> None:
    image = Image.new("RGB", (7, 5), (1, 2, 3))
    assert load_image(image).shape == (5, 7, 3)
    assert load_image(image, channels=1).shape == (5, 7, 1)
    assert load_image(Image.new("L", (7, 5)), 4, channels=3).shape == (4, 4, 3)


# ------------------------------------------------------------------------ model input


def test_to_model_input_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)  # (B, H, W, C)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    x = to_model_input(torch.from_numpy(batch), mean, std)
    assert x.shape == (2, 3, 5, 4) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    expected = (batch / 255.0 - np.array(mean)) / np.array(std)  # (B, H, W, C)
    np.testing.assert_allclose(x.permute(0, 2, 3, 1).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_to_model_input_rejects_wrong_batches() -> None:
    with pytest.raises(ValueError, match="expected a uint8 \\(B, H, W, C\\) batch"):
        to_model_input(torch.zeros((1, 4, 4, 3)), [0.5] * 3, [0.2] * 3)
    with pytest.raises(ValueError, match="expected a uint8"):
        to_model_input(torch.zeros((4, 4, 3), dtype=torch.uint8), [0.5] * 3, [0.2] * 3)
