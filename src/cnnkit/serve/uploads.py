"""Turn an HTTP request into opened images, refusing anything unsafe before it costs much.

Order of checks, cheapest first: the content type (415), the declared ``Content-Length``
(413, nothing read), the body while it streams in (413 as soon as it passes the limit), the
multipart structure (400), then each image's header through cnnkit's ``open_image``: allowed
formats only (400 otherwise), the pixel count from the header and a JPEG's decode work (413
for a decompression bomb, before a single pixel is decoded), and the pixels of all the
request's images at the scale they will be decoded at (413 over ``max_request_pixels``).
What the request holds in memory (its body, then its decoded images) is taken from the
server's shared ``MemoryBudget`` first: 503 with ``Retry-After`` while others hold it.
Pixels are decoded later, in the inference worker.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request
from starlette.types import Message

from cnnkit.data.images import decoded_size, open_image
from cnnkit.errors import ImageError, ImageTooLarge
from cnnkit.serve.budget import MB, Hold

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
    max_pixels: int  # per image, from its header
    max_request_pixels: int  # all of a request's images, as decoded
    input_size: int  # the model's: JPEGs are decoded at a reduced scale for it
    retry_after_s: int = 1


@dataclass(frozen=True)
class Upload:
    """One image of a request, opened (header read) but not decoded."""

    name: str
    image: Image.Image


def error_status(error: ImageError) -> int:
    """413 for images refused for their size or decode work, 400 for anything else."""
    return 413 if isinstance(error, ImageTooLarge) else 400


def _take(hold: Hold, n: int, limits: UploadLimits) -> None:
    """Take ``n`` bytes of the shared budget for this request, or answer 503."""
    if not hold.take(n):
        budget = hold.budget
        raise ApiError(
            503,
            f"server busy: requests hold {budget.held / MB:.0f} MB of the "
            f"{budget.limit / MB:.0f} MB memory budget and this one needs "
            f"{(hold.bytes + n) / MB:.1f} MB; retry",
            {"retry-after": str(limits.retry_after_s)},
        )


async def _read_body(request: Request, limits: UploadLimits, hold: Hold) -> bytes:
    limit = limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, f"invalid Content-Length header {declared[:40]!r}") from None
        if size > limit:
            raise ApiError(413, f"request body of {size:,} bytes is over the limit of {limit:,}")
        _take(hold, size, limits)  # before reading a byte of it
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise ApiError(413, f"request body is over the limit of {limit:,} bytes")
            if declared is None:
                _take(hold, len(chunk), limits)
            chunks.append(chunk)
    except ClientDisconnect:  # nobody is left to read the answer
        raise ApiError(400, "the connection closed before the body was complete") from None
    return b"".join(chunks)


async def _multipart_files(
    request: Request, body: bytes, limits: UploadLimits, hold: Hold
) -> list[Upload]:
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
        uploads = []
        for i, file in enumerate(files):
            _take(hold, file.size or 0, limits)  # its bytes, read out of the parsed form
            uploads.append(
                _open(await file.read(), (file.filename or f"image {i + 1}")[:MAX_NAME], limits)
            )
        return uploads
    finally:
        await form.close()


def _open(data: bytes, name: str, limits: UploadLimits) -> Upload:
    try:
        image = open_image(data)  # header only: format allowed, size within MAX_PIXELS
    except ImageError as exc:  # named as the client named the upload
        raise ApiError(error_status(exc), f"{name}: {exc.reason}") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ApiError(
            413,
            f"{name}: {width}x{height} is more than this server's limit of "
            f"{limits.max_pixels:,} pixels",
        )
    return Upload(name, image)


def _take_decoded(uploads: list[Upload], limits: UploadLimits, hold: Hold) -> None:
    """413 when the request's images are too many pixels in all, else take their bytes."""
    sizes = [decoded_size(u.image, limits.input_size) for u in uploads]
    pixels = sum(w * h for w, h in sizes)
    if pixels > limits.max_request_pixels:
        raise ApiError(
            413,
            f"{len(uploads)} image(s) of {pixels:,} pixels in all (as decoded) is more than "
            f"this server's limit of {limits.max_request_pixels:,} pixels per request",
        )
    _take(hold, 4 * pixels, limits)  # decoded as RGBA at most: 4 bytes a pixel


async def read_images(request: Request, limits: UploadLimits, hold: Hold) -> list[Upload]:
    """The images of a multipart form (any file fields) or of a raw image body, their
    memory taken from the shared budget through ``hold``."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != MULTIPART and media not in RAW_TYPES:
        accepted = ", ".join([MULTIPART, *sorted(RAW_TYPES)])
        raise ApiError(415, f"unsupported content type {media or '(none)'!r}; send {accepted}")
    body = await _read_body(request, limits, hold)
    if media == MULTIPART:
        uploads = await _multipart_files(request, body, limits, hold)
    elif not body:
        raise ApiError(400, "empty request body: send an image")
    else:
        uploads = [_open(body, "image", limits)]
    if not uploads:
        raise ApiError(400, "no image in the request: send one or more file fields")
    _take_decoded(uploads, limits, hold)
    return uploads
