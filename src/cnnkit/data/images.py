"""Decode one image safely and turn it into the model's input: the only preprocessing there is.

Training, evaluation, prediction, export checks and the server all call ``load_image`` (a
file or bytes to an RGB or greyscale uint8 array at the input size) and ``to_model_input``
(a uint8 batch to normalised floats), so what the model sees never differs between them.

Safety: only regular files are opened (never a FIFO or a device, which would hang or never
end), at most ``MAX_FILE_BYTES`` of them; only the JPEG, PNG, BMP, GIF and WEBP decoders are
allowed; the pixel count is checked from the header and a JPEG's scans are counted before any
pixel is decoded (decompression bombs and decode-work bombs are refused as ``ImageTooLarge``);
a JPEG is decoded at a reduced scale when it is far larger than the input size; and every
failure becomes an ``ImageError`` naming the file (printably, see ``display_path``) and why.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from cnnkit.data.jpeg import count_scans
from cnnkit.errors import ImageError, ImageTooLarge, display_path, first_line

__all__ = [
    "ALLOWED_FORMATS",
    "GREY_MODES",
    "IMAGE_SUFFIXES",
    "MAX_FILE_BYTES",
    "MAX_JPEG_SCANS",
    "MAX_PIXELS",
    "MAX_SCAN_WORK",
    "decode_image",
    "decoded_size",
    "load_image",
    "open_image",
    "read_image_file",
    "to_model_input",
]

ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP")
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".gif", ".webp"}
)
MAX_PIXELS = 40_000_000  # 40 MP: larger than any camera photo, far below a bomb
# JPEG's and GIF's largest side. Wider rows make Pillow's row loop quadratic: a 512-byte
# animated WEBP with a 4,000,000 x 8 canvas took 7 s to decode.
MAX_SIDE = 65_535
MAX_FILE_BYTES = 256 * 1024 * 1024  # a file larger than this is not read into memory
# A JPEG decode passes over every pixel once per scan: a normal progressive file has 6 to 18
# scans; a hostile one with 2,000 repeated 12-byte scans took 2.3 s for 1 MP (about 1 ns a
# pixel-scan), 286 KB of them 23 s. Both bounds hold a decode to about a second at worst.
MAX_JPEG_SCANS = 100
MAX_SCAN_WORK = 20 * MAX_PIXELS  # pixels x scans: a 40 MP file may have 20 scans
DRAFT_GAP = 3  # a JPEG is decoded at 1/2, 1/4 or 1/8 scale while still this many times the
# input size: the same margin as ``resize(reducing_gap=3)`` keeps before it reduces
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
BACKGROUND = (255, 255, 255)  # what transparent pixels are composited onto

ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

Source = str | Path | bytes | BinaryIO


def _name(source: Source) -> str:
    if isinstance(source, str | Path):
        return display_path(source)
    return "<image bytes>"


NOT_REGULAR = {
    stat.S_IFIFO: "a named pipe",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _regular_file(path: str | Path, name: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = NOT_REGULAR.get(stat.S_IFMT(st.st_mode))
        raise ImageError(name, "not a file" + (f" ({kind})" if kind else ""), path=path)
    if st.st_size == 0:
        raise ImageError(name, "empty file (0 bytes)", path=path)
    if st.st_size > MAX_FILE_BYTES:
        raise ImageTooLarge(
            name,
            f"refused, {st.st_size:,} bytes is more than {MAX_FILE_BYTES:,} for one image",
            path=path,
            value=st.st_size,
            limit=MAX_FILE_BYTES,
        )


def read_image_file(path: str | Path) -> bytes:
    """The bytes of a regular file of at most ``MAX_FILE_BYTES``; ``ImageError`` otherwise.

    Links are followed, then the target is checked with ``stat`` before it is opened: a FIFO
    named ``x.png`` would block forever, ``/dev/zero`` would never end, and opening some
    devices has effects of its own. The open file is checked again (it may have been swapped
    in between) and read no further than the limit (it may be growing).
    """
    name = display_path(path)
    try:
        try:  # one stat call before opening: this runs once per image of a data set
            _regular_file(path, name, os.stat(path))
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise ImageError(name, "file not found", path=path) from None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise ImageError(name, "file not found", path=path) from None
        with os.fdopen(fd, "rb") as f:
            _regular_file(path, name, os.fstat(f.fileno()))
            data = f.read(MAX_FILE_BYTES + 1)
    except ImageError:
        raise
    except PermissionError:
        raise ImageError(name, "permission denied", path=path) from None
    except OSError as exc:
        reason = f"unreadable ({exc.strerror or _reason(exc)})"
        raise ImageError(name, reason, path=path) from None
    if len(data) > MAX_FILE_BYTES:
        raise ImageTooLarge(
            name,
            f"refused, more than {MAX_FILE_BYTES:,} bytes for one image",
            path=path,
            limit=MAX_FILE_BYTES,
        )
    if not data:
        raise ImageError(name, "empty file (0 bytes)", path=path)
    return data


def _check_decode_work(name: str, image: Image.Image, data: bytes, path: str | Path | None) -> None:
    """Refuse a JPEG whose scans would take too long to decode (see ``MAX_SCAN_WORK``)."""
    if image.format != "JPEG":
        return
    scans = count_scans(data, MAX_JPEG_SCANS)
    pixels = image.size[0] * image.size[1]
    if scans > MAX_JPEG_SCANS:
        raise ImageTooLarge(
            name,
            f"refused, a JPEG with more than {MAX_JPEG_SCANS} scans (a normal one has under "
            "20): decoding it would take too long",
            path=path,
            value=scans,
            limit=MAX_JPEG_SCANS,
        )
    if pixels * scans > MAX_SCAN_WORK:
        raise ImageTooLarge(
            name,
            f"refused, {image.size[0]}x{image.size[1]} pixels in {scans} JPEG scans is more "
            f"decode work than {MAX_SCAN_WORK:,} pixel-scans",
            path=path,
            value=pixels * scans,
            limit=MAX_SCAN_WORK,
        )


def open_image(source: Source, name: str | None = None) -> Image.Image:
    """Open a file or bytes with the allowed decoders and check its size and decode work;
    pixels not yet read. A path is read into memory first (``read_image_file``). Errors
    name the file as ``name`` when given (bytes read from a file elsewhere)."""
    name = name or _name(source)
    path = source if isinstance(source, str | Path) else None
    try:
        if path is not None:
            source = read_image_file(path)
        if isinstance(source, bytes):
            if not source:
                raise ImageError(name, "empty (0 bytes)")
            fp: BinaryIO = io.BytesIO(source)
        else:
            fp = source
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(fp, formats=ALLOWED_FORMATS)
    except ImageError:
        raise
    except UnidentifiedImageError:
        formats = ", ".join(ALLOWED_FORMATS)
        reason = f"not an image in a supported format ({formats})"
        raise ImageError(name, reason, path=path) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        reason = f"refused, more than {MAX_PIXELS:,} pixels (decompression bomb)"
        raise ImageTooLarge(name, reason, path=path, limit=MAX_PIXELS) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(name, f"unreadable ({_reason(exc)})", path=path) from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(name, f"has no pixels ({width}x{height})", path=path)
    if width * height > MAX_PIXELS:
        raise ImageTooLarge(
            name,
            f"refused, {width}x{height} is more than {MAX_PIXELS:,} pixels (decompression bomb)",
            path=path,
            value=width * height,
            limit=MAX_PIXELS,
        )
    if max(width, height) > MAX_SIDE:
        raise ImageTooLarge(
            name,
            f"refused, {width}x{height} has a side over {MAX_SIDE:,} pixels (decompression bomb)",
            path=path,
            value=max(width, height),
            limit=MAX_SIDE,
        )
    if isinstance(source, bytes):
        _check_decode_work(name, image, source, path)
    elif image.format == "JPEG":  # an open file: the whole of it is needed to count scans
        position = fp.tell()
        fp.seek(0)
        data = fp.read(MAX_FILE_BYTES + 1)
        fp.seek(position)
        _check_decode_work(name, image, data, path)
    return image


def _reason(exc: BaseException) -> str:
    return first_line(exc, 160)


def _to_rgb_or_grey(image: Image.Image) -> Image.Image:
    """Any mode to 8-bit ``RGB`` or ``L``, transparency composited onto white, 16-bit scaled."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and 32-bit greyscale: scale the full range down to 8 bits. Pillow's own
        # convert("L") clips everything above 255 to white, which is the bug we avoid here.
        arr = np.asarray(image)
        if arr.dtype.kind == "f":
            finite = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
            top = 1.0 if finite.max(initial=0.0) <= 1.0 else 65535.0
            out = np.clip(finite / top * 255.0, 0, 255)
        else:
            values = arr.astype(np.int64)
            top = 65535 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255
            out = np.clip(values, 0, top) * 255.0 / top
        return Image.fromarray(np.rint(out).astype(np.uint8), mode="L")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    elif mode == "PA":
        image = image.convert("RGBA")
        mode = "RGBA"
    elif mode == "La":  # premultiplied alpha: Pillow converts it to LA and nothing else
        image = image.convert("LA")
    if mode in ("RGBA", "RGBa", "LA", "La"):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")  # no 4-byte copy
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        flat = Image.alpha_composite(background, rgba)
        return flat.convert("L" if mode in ("LA", "La") else "RGB")
    if mode == "1":
        return image.convert("L")
    if mode in ("L", "RGB"):
        return image
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX


def _fit(image: Image.Image, size: int, resize: str) -> Image.Image:
    """Bring an image to size x size (see ``DataConfig.resize``)."""
    width, height = image.size
    if (width, height) == (size, size):
        return image
    if resize == "squash":
        return image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    if resize == "crop":
        return ImageOps.fit(image, (size, size), Image.Resampling.BILINEAR)
    scale = size / max(width, height)  # pad
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    inner = image.resize(new, Image.Resampling.BILINEAR, reducing_gap=3.0)
    canvas = Image.new(image.mode, (size, size))
    canvas.paste(inner, ((size - new[0]) // 2, (size - new[1]) // 2))
    return canvas


def load_image(
    source: Source | Image.Image,
    size: int | None = None,
    channels: int = 3,
    resize: str = "crop",
) -> np.ndarray:
    """Decode ``source`` into a ``(size, size, channels)`` uint8 array (HWC).

    EXIF orientation is applied, every mode becomes RGB or greyscale correctly, and with
    ``size=None`` the image keeps its own size. Raises ``ImageError`` for anything unreadable.
    """
    return decode_image(source, size, channels, resize)[0]


def _draft_scale(image: Image.Image, size: int | None) -> int:
    """The scale (1, 2, 4 or 8) a JPEG is decoded at for ``size`` (Pillow's ``draft``)."""
    if size is None or image.format != "JPEG":
        return 1
    width, height = image.size
    fits = min(width // (DRAFT_GAP * size), height // (DRAFT_GAP * size))
    return next((s for s in (8, 4, 2) if fits >= s), 1)


def decoded_size(image: Image.Image, size: int | None) -> tuple[int, int]:
    """Width and height ``decode_image(image, size)`` decodes an opened image at: its own,
    or a JPEG's reduced one. What a decode costs in memory, known before it happens."""
    scale = _draft_scale(image, size)
    width, height = image.size
    return -(-width // scale), -(-height // scale)


def decode_image(
    source: Source | Image.Image,
    size: int | None = None,
    channels: int = 3,
    resize: str = "crop",
) -> tuple[np.ndarray, str]:
    """``load_image``'s array and the mode the image was stored in (``"L"``, ``"RGB"``, ...),
    from one opening of the file: the decode cache tells greyscale data sets by it."""
    name = _name(source) if not isinstance(source, Image.Image) else "<PIL image>"
    path = source if isinstance(source, str | Path) else None
    image = source if isinstance(source, Image.Image) else open_image(source)
    stored = image.mode
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if _draft_scale(image, size) > 1:  # a no-op for an image already loaded
                image.draft(None, (DRAFT_GAP * size, DRAFT_GAP * size))  # type: ignore[operator]
            image.load()
            image = ImageOps.exif_transpose(image) or image
            image = _to_rgb_or_grey(image)
            if channels == 3 and image.mode != "RGB":
                image = image.convert("RGB")
            elif channels == 1 and image.mode != "L":
                image = image.convert("L")
            if size is not None:
                image = _fit(image, size, resize)
            arr = np.asarray(image, dtype=np.uint8)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        reason = "refused, too many pixels (decompression bomb)"
        raise ImageTooLarge(name, reason, path=path, limit=MAX_PIXELS) from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise ImageError(name, f"unreadable ({_reason(exc)})", path=path) from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr), stored


def to_model_input(
    batch: torch.Tensor, mean: torch.Tensor | list[float], std: torch.Tensor | list[float]
) -> torch.Tensor:
    """uint8 images ``(B, H, W, C)`` to normalised float ``(B, C, H, W)`` in channels_last.

    ``x = (pixel / 255 - mean) / std`` per channel; mean and std travel with the model.
    """
    if batch.dtype != torch.uint8 or batch.ndim != 4:
        raise ValueError(f"expected a uint8 (B, H, W, C) batch, got {batch.dtype} {batch.shape}")
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    x = batch.permute(0, 3, 1, 2).float()  # (B, C, H, W), memory stays NHWC = channels_last
    return (x.div_(255.0) - mean_t).div_(std_t)
