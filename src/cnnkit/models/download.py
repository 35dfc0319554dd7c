"""Download a weights file once into the cache, resumably, checking the hash its name carries.

torchvision names its files ``NAME-HASH.pth``, ``HASH`` being the first hex digits of the
file's sha256 (``resnet18-f37072fd.pth``). ``fetch`` keeps the file in
``CACHE/weights/NAME-HASH.pth``; an interrupted download leaves ``*.partial`` behind and the
next call asks the server only for the rest (HTTP Range). Without a network it fails at once
with the URL to fetch elsewhere and how to pass the file instead.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from cnnkit.data.cache import default_cache_root
from cnnkit.errors import WeightsError

__all__ = ["cache_folder", "expected_prefix", "fetch", "sha256_of"]

CHUNK = 1 << 20
TIMEOUT = 15.0  # seconds without a byte before a download gives up
HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,64})\.[A-Za-z0-9]+$")


def cache_folder() -> Path:
    """``$CNNKIT_CACHE_DIR/weights``, else ``~/.cache/cnnkit/weights``."""
    return default_cache_root() / "weights"


def expected_prefix(name: str) -> str | None:
    """The sha256 prefix a torchvision-style file name carries (``f37072fd``), if any."""
    match = HASH_IN_NAME.search(name)
    return match.group(1) if match else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _check(path: Path, url: str, prefix: str | None) -> str:
    digest = sha256_of(path)
    if prefix and not digest.startswith(prefix):
        path.unlink(missing_ok=True)
        raise WeightsError(
            f"{url}: the file's sha256 is {digest[:16]}..., its name says {prefix}...; it is "
            "damaged or not the published file, so it was deleted"
        )
    return digest


def fetch(url: str, *, progress: bool = True, folder: Path | None = None) -> tuple[Path, str]:
    """The local copy of ``url`` and its sha256, downloading what the cache lacks."""
    name = url.rstrip("/").rsplit("/", 1)[-1] or "weights"
    folder = folder or cache_folder()
    path = folder / name
    prefix = expected_prefix(name)
    if path.is_file():
        return path, _check(path, url, prefix)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(f"cannot create the weights cache {folder}: {exc.strerror}") from None
    partial = path.with_name(path.name + ".partial")
    have = partial.stat().st_size if partial.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "cnnkit"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to send: the partial file is complete
            os.replace(partial, path)
            return path, _check(path, url, prefix)
        raise WeightsError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise WeightsError(
            "cannot download {url} ({why}); fetch that file elsewhere and pass it: "
            "{setting} /path/to/{name} (or put it in {path}/)",
            setting="train.weights",
            path=folder,
            url=url,
            why=reason,
            name=name,
        ) from None
    with response:
        if have and response.status != 206:  # the server ignored the range: start again
            have = 0
        total = response.headers.get("Content-Length")
        total = int(total) + have if total and total.isdigit() else None
        _stream(response, partial, have, total, url, progress)
    os.replace(partial, path)
    return path, _check(path, url, prefix)


def _stream(response, partial: Path, have: int, total: int | None, url: str, show: bool) -> None:
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    columns = ("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with (
        Progress(*columns, transient=True, disable=not show) as bar,
        open(partial, "ab" if have else "wb") as f,
    ):
        task = bar.add_task(url.rsplit("/", 1)[-1], total=total, completed=have)
        try:
            while block := response.read(CHUNK):
                f.write(block)
                bar.advance(task, len(block))
            error = None
        except (OSError, http.client.HTTPException) as exc:
            error = exc
        if error is not None or (total is not None and f.tell() < total):
            # A dropped connection: what arrived stays, and the next call asks for the rest.
            raise WeightsError(
                f"download of {url} broke off after {f.tell():,} bytes"
                + (f" ({error})" if error else "")
                + "; run the same command again to fetch the rest"
            )
