"""Property and fuzz tests of the one preprocessing path (hypothesis).

Properties: an image of any size from 1 to 4096 pixels a side, in any mode, becomes a finite
float tensor of the model's input shape; the probabilities of any batch sum to 1.
Fuzz: random bytes and mutations of valid PNG, JPEG, GIF, BMP and WEBP files (byte flips,
inserts, deletes, truncation, interesting integers, PNG chunks with their CRCs fixed) are
either decoded to the requested shape or refused with cnnkit's ``ImageError``; nothing else
escapes and no input takes 2 s. ``CNNKIT_FUZZ_EXAMPLES`` raises the budget for a long run.
"""

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
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnkit.data.images import load_image, to_model_input
from cnnkit.errors import ImageError
from cnnkit.inference import Classifier, load
from cnnkit.model_io import save_model
from cnnkit.models.registry import build_network, load_model_spec
from conftest import model_meta

FUZZ_EXAMPLES = int(os.environ.get("CNNKIT_FUZZ_EXAMPLES", "500"))
MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "I;16", "I", "F")
MODEL_INPUT = load_model_spec("fast").input_size  # the default model's side


# ------------------------------------------------------------------------ any image


def make_image(mode: str, width: int, height: int, pattern: np.ndarray) -> Image.Image:
    """A ``mode`` image of ``width`` x ``height`` from a small random ``pattern`` (blocks)."""
    rgb = Image.fromarray(pattern[:, :, :3]).resize((width, height), Image.Resampling.NEAREST)
    grey = np.asarray(rgb.convert("L"))
    if mode == "1":
        return Image.fromarray(grey > 127)
    if mode == "P":
        return rgb.quantize(8)
    if mode == "PA":
        return rgb.quantize(8).convert("PA")
    if mode in ("LA", "La", "RGBA", "RGBa"):
        alpha = Image.fromarray(pattern[:, :, 3]).resize((width, height))
        base = rgb.convert("LA" if mode.startswith("L") else "RGBA")
        base.putalpha(alpha)
        return base.convert(mode)
    if mode == "I;16":
        return Image.fromarray(grey.astype(np.uint16) * 257)
    if mode == "I":  # anything a 32-bit integer holds, negative and huge included
        return Image.fromarray((grey.astype(np.int64) * 16_843_009 - 2**31).astype(np.int32))
    if mode == "F":  # NaN, infinities and huge values included
        values = grey.astype(np.float32) * 1e36
        values[grey % 7 == 0] = np.nan
        values[grey % 11 == 0] = np.inf
        values[grey % 13 == 0] = -np.inf
        return Image.fromarray(values)
    return rgb.convert(mode)


@settings(max_examples=25, deadline=None)
@example(mode="RGBA", width=4096, height=4096, channels=3, resize="pad", seed=1)
@example(mode="F", width=4096, height=3, channels=1, resize="crop", seed=5)
@example(mode="I;16", width=1, height=4096, channels=1, resize="crop", seed=2)
@example(mode="P", width=4096, height=1, channels=3, resize="squash", seed=3)
@example(mode="1", width=1, height=1, channels=3, resize="crop", seed=4)
@given(
    mode=st.sampled_from(MODES),
    width=st.integers(1, 4096),
    height=st.integers(1, 4096),
    channels=st.sampled_from([1, 3]),
    resize=st.sampled_from(["crop", "squash", "pad"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_size_and_mode_becomes_a_finite_model_input(
    mode: str, width: int, height: int, channels: int, resize: str, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    pattern = rng.integers(0, 256, (rng.integers(1, 9), rng.integers(1, 9), 4), dtype=np.uint8)
    image = make_image(mode, width, height, pattern)
    assert image.mode == mode and image.size == (width, height)
    pixels = load_image(image, MODEL_INPUT, channels, resize)
    assert pixels.shape == (MODEL_INPUT, MODEL_INPUT, channels) and pixels.dtype == np.uint8
    mean, std = [0.5] * channels, [0.25] * channels
    x = to_model_input(torch.from_numpy(pixels.copy())[None], mean, std)
    assert x.shape == (1, channels, MODEL_INPUT, MODEL_INPUT) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    reference = (pixels.astype(np.float64) / 255 - 0.5) / 0.25  # numpy, HWC
    assert np.allclose(x[0].permute(1, 2, 0).numpy(), reference, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(width=st.integers(1, 64), height=st.integers(1, 64), fmt=st.sampled_from(["PNG", "GIF"]))
def test_encoded_images_of_any_size_decode_to_the_input_shape(
    width: int, height: int, fmt: str
) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, fmt)
    assert load_image(buffer.getvalue(), MODEL_INPUT, 3).shape == (MODEL_INPUT, MODEL_INPUT, 3)


# ------------------------------------------------------------------- probabilities


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Classifier:
    """An untrained classifier with large weights: logits far apart, softmax at its limits."""
    torch.manual_seed(0)
    model = build_network(load_model_spec("fast").layers, 4, 3, 32)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)
    meta = model_meta(model, ("a", "b", "c", "d"), size=32, resize="crop", model_name="")
    run = tmp_path_factory.mktemp("props") / "run"
    save_model(run, model, meta)
    return load(run, device="cpu")


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 80), st.integers(1, 80)), min_size=0, max_size=9),
    seed=st.integers(0, 2**32 - 1),
)
def test_probabilities_of_any_batch_sum_to_one(
    classifier: Classifier, shapes: list[tuple[int, int]], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    probs = classifier.predict_proba(images)
    assert probs.shape == (len(images), 4)
    assert np.isfinite(probs).all() and (probs >= 0).all()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    if images:  # against the reference: softmax of the logits in float64
        logits = classifier.logits(np.stack([classifier.preprocess(im) for im in images]))
        reference = torch.softmax(logits.double(), dim=1).numpy()
        assert np.allclose(probs, reference, atol=1e-6)


# ---------------------------------------------------------------------------- fuzz


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    frames = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(2)]
    grey16 = Image.fromarray(rng.integers(0, 65536, (6, 6), dtype=np.uint16))
    return {
        "png": _encode(rgb, "PNG"),
        "png palette": _encode(rgb.quantize(4), "PNG", transparency=0),
        "png 16-bit": _encode(grey16, "PNG"),
        "png rgba": _encode(rgb.convert("RGBA"), "PNG"),
        "jpeg": _encode(rgb, "JPEG", quality=80),
        "jpeg progressive": _encode(rgb, "JPEG", progressive=True),
        "jpeg cmyk": _encode(rgb.convert("CMYK"), "JPEG"),
        "gif animated": _encode(
            frames[0].quantize(4), "GIF", save_all=True, append_images=[frames[1]], duration=10
        ),
        "bmp": _encode(rgb, "BMP"),
        "bmp palette": _encode(rgb.quantize(4), "BMP"),
        "webp": _encode(rgb, "WEBP", quality=50),
        "webp lossless": _encode(rgb.convert("RGBA"), "WEBP", lossless=True),
        "webp animated": _encode(
            frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=10
        ),
    }


SEEDS = _seeds()
INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF)


def fix_png_crcs(data: bytes) -> bytes:
    """Recompute every PNG chunk's CRC, so that mutations reach the decoders behind them."""
    out, at = bytearray(data[:8]), 8
    while at + 12 <= len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        end = at + 8 + length
        if end + 4 > len(data):
            break
        kind, body = data[at + 4 : at + 8], data[at + 8 : end]
        out += data[at:end] + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        at = end + 4
    return bytes(out + data[at:])


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "byte", "insert", "delete", "truncate", "integer"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif kind == "truncate":
            del data[at:]
        elif kind == "integer":
            size = draw(st.sampled_from([1, 2, 4]))
            value = draw(st.sampled_from(INTERESTING)) & ((1 << 8 * size) - 1)
            data[at : at + size] = value.to_bytes(size, draw(st.sampled_from(["big", "little"])))
    if name.startswith("png") and draw(st.booleans()):
        return fix_png_crcs(bytes(data))
    return bytes(data)


def decode_or_refuse(data: bytes, size: int, channels: int, resize: str) -> None:
    """The fuzz property: the requested shape or an ``ImageError``, within 2 s."""
    start = time.perf_counter()
    try:
        pixels = load_image(data, size, channels, resize)
    except ImageError as exc:
        assert str(exc).startswith("<image bytes>: ")
    else:
        assert pixels.shape == (size, size, channels) and pixels.dtype == np.uint8
    assert time.perf_counter() - start < 2.0, f"{len(data)} bytes took over 2 s"


def test_every_seed_decodes() -> None:
    """The fuzz seeds are valid files of each allowed format (else mutations test little)."""
    for name, data in SEEDS.items():
        assert load_image(data, 16, 3).shape == (16, 16, 3), name


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(
    data=mutated_images(),
    size=st.sampled_from([1, 16, 33]),
    channels=st.sampled_from([1, 3]),
    resize=st.sampled_from(["crop", "squash", "pad"]),
)
def test_fuzz_mutated_images(data: bytes, size: int, channels: int, resize: str) -> None:
    decode_or_refuse(data, size, channels, resize)


@settings(max_examples=FUZZ_EXAMPLES // 3, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=512),
        st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"RIFF"]).flatmap(
            lambda magic: st.binary(max_size=256).map(lambda rest: magic + rest)
        ),
    )
)
def test_fuzz_random_bytes(data: bytes) -> None:
    decode_or_refuse(data, 16, 3, "crop")


def test_fuzz_files_on_disk_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(SEEDS["png"][:40])
    with pytest.raises(ImageError, match=rf"^{path}: (unreadable|not an image)"):
        load_image(path, 16, 3)
