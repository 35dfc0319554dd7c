"""Turn an HTTP request into opened images, refusing anything unsafe before it costs much.

Order of checks, cheapest first: the content type (415), the declared ``Content-Length``
(413, nothing read), the body while it streams in (413 as soon as it passes the limit), the
multipart structure (400), then each image's header through cnnkit's ``open_image``: allowed
formats only (400 otherwise) and the pixel count from the header (413 for a decompression
bomb, before a single pixel is decoded). Pixels are decoded later, in the inference worker.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.types import Message

from cnnkit.data.images import open_image
from cnnkit.errors import ImageError

__all__ = ["RAW_TYPES", "ApiError", "Upload", "UploadLimits", "error_status", "read_images"]

MULTIPART = "multipart/form-data"
RAW_TYPES = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/gif",
        "image/bmp",
        "image/webp",
        "application/octet-stream",
    }
)
MAX_NAME = 200  # characters of a client's file name echoed back


class ApiError(Exception):
    """An HTTP error answered as ``{"error": message}`` with ``status`` (and headers)."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class UploadLimits:
    """How much one request may send."""

    max_body_bytes: int
    max_images: int
    max_pixels: int


@dataclass(frozen=True)
class Upload:
    """One image of a request, opened (header read) but not decoded."""

    name: str
    image: Image.Image


def error_status(error: ImageError) -> int:
    """413 for images refused for their size (decompression bombs), 400 for anything else."""
    return 413 if "decompression bomb" in str(error) else 400


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, f"invalid Content-Length header {declared[:40]!r}") from None
        if size > limit:
            raise ApiError(413, f"request body of {size:,} bytes is over the limit of {limit:,}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"request body is over the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _multipart_files(request: Request, body: bytes, limits: UploadLimits) -> list[Upload]:
    sent = False

    async def replay() -> Message:  # the already-read (bounded) body, once
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(
            max_files=limits.max_images, max_fields=limits.max_images
        )
    except (MultiPartException, HTTPException) as exc:
        why = getattr(exc, "message", None) or getattr(exc, "detail", "")
        raise ApiError(400, f"malformed multipart body: {why}") from None
    try:
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        return [
            _open(await f.read(), (f.filename or f"image {i + 1}")[:MAX_NAME], limits)
            for i, f in enumerate(files)
        ]
    finally:
        await form.close()


def _open(data: bytes, name: str, limits: UploadLimits) -> Upload:
    try:
        image = open_image(data)  # header only: format allowed, size within MAX_PIXELS
    except ImageError as exc:
        reason = str(exc).removeprefix("<image bytes>: ")
        raise ApiError(error_status(exc), f"{name}: {reason}") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ApiError(
            413,
            f"{name}: {width}x{height} is more than this server's limit of "
            f"{limits.max_pixels:,} pixels",
        )
    return Upload(name, image)


async def read_images(request: Request, limits: UploadLimits) -> list[Upload]:
    """The images of a multipart form (any file fields) or of a raw image body."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != MULTIPART and media not in RAW_TYPES:
        accepted = ", ".join([MULTIPART, *sorted(RAW_TYPES)])
        raise ApiError(415, f"unsupported content type {media or '(none)'!r}; send {accepted}")
    body = await _read_body(request, limits.max_body_bytes)
    if media == MULTIPART:
        uploads = await _multipart_files(request, body, limits)
    elif not body:
        raise ApiError(400, "empty request body: send an image")
    else:
        uploads = [_open(body, "image", limits)]
    if not uploads:
        raise ApiError(400, "no image in the request: send one or more file fields")
    return uploads
