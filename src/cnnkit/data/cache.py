"""Decode every image once into a memory-mapped uint8 array on disk, and reuse it.

The cache is keyed by the file list, each file's size and mtime, the input size, channels and
resize mode, so a second run decodes nothing and any change to a file decodes afresh. Arrays
are ``(N, S, S, C)`` uint8 ``.npy`` files opened with ``mmap_mode="r"``: a data set larger than
RAM still trains, the operating system pages it in.

Layout: ``CACHE_ROOT/<key>/images.npy`` and ``meta.json``, built in a temporary folder and
renamed into place, so a killed run never leaves a half-written cache under the final name.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnkit.data.folder import ImageList
from cnnkit.data.images import GREY_MODES, decode_image
from cnnkit.errors import DataError, ImageError
from cnnkit.files import OwnerLock
from cnnkit.threads import allowed_cpus

__all__ = ["DecodedImages", "decode_cached", "default_cache_root", "file_stamp"]

log = logging.getLogger("cnnkit")
CACHE_VERSION = 1
PARALLEL_FROM = 4096  # images: below this, starting worker processes costs more than it saves
CHUNK = 1024  # images per task handed to a worker
MAX_WORKERS = 8
PR_SET_PDEATHSIG = 1  # linux/prctl.h
BUILD_LOCK = "owner.lock"  # held by the process building a cache folder
BUILD_NAME = re.compile(r"\.[0-9a-f]{32}\..+")  # a cache folder being built: .<key>.<random>
LOCKLESS_BUILD_SECONDS = 3600


def default_cache_root() -> Path:
    """``$CNNKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/cnnkit``, else ``~/.cache/cnnkit``."""
    if env := os.environ.get("CNNKIT_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cnnkit"


@dataclass(frozen=True)
class DecodedImages:
    """The usable images of an ``ImageList``, decoded: ``images[i]`` has label ``labels[i]``."""

    images: np.ndarray  # (N, S, S, C) uint8, memory-mapped
    labels: np.ndarray  # (N,) int64
    paths: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]  # (path, reason) of each unusable file
    channels: int
    from_cache: bool

    def __len__(self) -> int:
        return len(self.labels)


def _stat_stamp(name: str) -> str:
    try:
        st = os.stat(name)
        return f"{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        return "missing"


def file_stamp(path: str) -> str:
    """``absolute path|size|mtime`` of an image file (``missing`` for the last two when it
    cannot be read): what identifies its contents in cnnkit's caches without reading it."""
    name = os.path.abspath(path)
    return f"{name}|{_stat_stamp(name)}"


def _file_stamps(files: ImageList) -> bytes:
    """Every file's absolute path, label, size and mtime, one line each: what a cache holds."""
    lines = []
    for path, label in zip(files.paths, files.labels, strict=True):
        name = os.path.abspath(path)  # string arithmetic only: no per-file resolve()
        lines.append(f"{name}|{label}|{_stat_stamp(name)}\n")
    return "".join(lines).encode("utf-8", "surrogateescape")  # names need not be UTF-8


def _cache_key(stamps: bytes, size: int, channels: int | None, resize: str) -> str:
    """A digest of the settings and of the files' stamps (``_file_stamps``)."""
    digest = hashlib.sha256()
    wanted = "auto" if channels is None else channels  # (the key caches have always had)
    digest.update(f"v{CACHE_VERSION}|{size}|{wanted}|{resize}\n".encode())
    digest.update(stamps)
    return digest.hexdigest()[:32]


def _report(skipped: list[tuple[str, str]], used: int, strict: bool) -> None:
    for _path, reason in skipped:
        log.warning("skipped %s", reason)
    if skipped:
        log.warning("%d images used, %d skipped", used, len(skipped))
        if strict:
            raise DataError(
                "{value} unreadable image(s) with {setting}, first: {first}",
                setting="data.strict",
                value=len(skipped),
                first=skipped[0][1],
            )


def _open(folder: Path) -> DecodedImages:
    meta = json.loads((folder / "meta.json").read_text())
    images = np.load(folder / "images.npy", mmap_mode="r")
    labels = np.asarray(meta["labels"], dtype=np.int64)
    if images.shape[0] != len(labels):
        raise ValueError("cache rows and labels disagree")
    return DecodedImages(
        images=images,
        labels=labels,
        paths=tuple(meta["paths"]),
        skipped=tuple((p, r) for p, r in meta["skipped"]),
        channels=int(meta["channels"]),
        from_cache=True,
    )


def _decode_rows(
    npy: str, start: int, paths: Sequence[str], size: int, channels: int, resize: str
) -> list[tuple[str | None, bool]]:
    """Decode ``paths`` into rows ``start, start + 1, ...`` of the ``.npy`` file ``npy``.

    Returns (why it failed or None, stored greyscale) for each path, in order.
    """
    images = np.load(npy, mmap_mode="r+")
    results: list[tuple[str | None, bool]] = []
    for row, path in enumerate(paths, start=start):
        try:
            images[row], mode = decode_image(path, size, channels, resize)
        except ImageError as exc:
            results.append((str(exc), False))
        else:
            results.append((None, mode in GREY_MODES))
    images.flush()
    return results


def _die_with_parent(parent: int) -> None:
    """Worker initializer: end this worker when the process that forked it ends.

    A parent killed during a parallel decode (SIGKILL, or SIGTERM, which Python does not
    catch) would otherwise leave its workers waiting on their task queue forever. On Linux
    the kernel sends SIGKILL (``PR_SET_PDEATHSIG``); elsewhere a thread watches the parent.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        armed = False
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    if not armed:

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()


def _decode_all(
    npy: str, paths: Sequence[str], size: int, channels: int, resize: str
) -> list[tuple[str | None, bool]]:
    """Every image of ``paths`` into the ``.npy`` file, on every core for a large set.

    Worker processes, not threads: Pillow's per-file Python work holds the GIL, and a thread
    pool was twice as slow as one thread (28x28 and 128x128 PNGs, 2000x1500 JPEGs alike).
    Processes are forked (as torch's DataLoader does on Linux): nothing is imported again.
    """
    n, workers = len(paths), min(len(allowed_cpus()), MAX_WORKERS)
    if n < PARALLEL_FROM or workers < 2 or "fork" not in mp.get_all_start_methods():
        return _decode_rows(npy, 0, paths, size, channels, resize)
    with ProcessPoolExecutor(
        workers,
        mp_context=mp.get_context("fork"),
        initializer=_die_with_parent,
        initargs=(os.getpid(),),
    ) as pool:
        parts = [
            pool.submit(_decode_rows, npy, s, paths[s : s + CHUNK], size, channels, resize)
            for s in range(0, n, CHUNK)
        ]
        return [r for part in parts for r in part.result()]


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _allocate(path: Path, shape: tuple[int, ...], root: Path) -> np.memmap:
    """A zeroed ``.npy`` map of ``shape`` whose disk blocks are reserved before any write.

    Writing into a sparse map on a disk that fills up kills the process with SIGBUS, no
    message; checking the free space first and reserving the blocks (``posix_fallocate``)
    turns a full disk into an ``OSError`` here instead.
    """
    needed = int(np.prod(shape)) + (1 << 20)  # the pixels, the header and a little room
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = None
    if free is not None and needed > free:
        raise DataError(
            f"the decode cache needs {_size(needed)} in {root} but only {_size(free)} is "
            "free; free some space there, or set CNNKIT_CACHE_DIR (or data.cache_dir) to a "
            "folder on a larger disk"
        )
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    if hasattr(os, "posix_fallocate"):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise  # ENOSPC, EDQUOT, EIO; a filesystem without fallocate just goes on
        finally:
            os.close(fd)
    return images


def _remove_dead_builds(root: Path) -> None:
    """Delete temporary folders of decodes whose process died (killed mid-decode).

    A build holds ``BUILD_LOCK`` in its folder until it is renamed into place (forked workers
    share the lock, and die with their parent); a folder whose lock is free is dead. One
    without a lock file (made by an older cnnkit) counts as dead after an hour untouched.
    """
    try:
        entries = [e for e in os.scandir(root) if BUILD_NAME.fullmatch(e.name)]
    except OSError:
        return
    for entry in entries:
        folder = Path(entry.path)
        lock = OwnerLock(folder / BUILD_LOCK)
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            if (folder / BUILD_LOCK).is_file():
                dead = lock.acquire()
            else:
                dead = time.time() - entry.stat().st_mtime > LOCKLESS_BUILD_SECONDS
        except OSError:
            continue
        if dead:
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed %s, left by a decode that was killed", folder)
        lock.release()


def _build(
    files: ImageList, size: int, channels: int | None, resize: str, root: Path, key: str
) -> int:
    """Decode ``files`` into ``root/key`` (built in a temporary folder, renamed into place)
    and return the channel count stored."""
    # One pass: every file is opened once, decoded, and its stored mode noted. For "auto",
    # images are decoded with three channels and the set is cut to one at the end when every
    # image was stored greyscale (for those, R = G = B = the grey decode, exactly).
    decode_channels = channels or 3
    n = len(files)
    folder = root / key
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    lock = OwnerLock(tmp / BUILD_LOCK)
    try:
        try:
            lock.acquire()
        except OSError:  # a filesystem without locks: the folder is then judged by its age
            (tmp / BUILD_LOCK).unlink(missing_ok=True)
        images = _allocate(tmp / "images.npy", (n, size, size, decode_channels), root)
        images.flush()  # the header is on disk: worker processes open the file by name
        results = _decode_all(str(tmp / "images.npy"), files.paths, size, decode_channels, resize)
        good_rows = [i for i, (why, _) in enumerate(results) if why is None]
        skipped = [(str(files.paths[i]), why) for i, (why, _) in enumerate(results) if why]
        n_ch = channels or (1 if good_rows and all(results[i][1] for i in good_rows) else 3)
        if len(good_rows) != n or n_ch != decode_channels:  # drop failures / extra channels
            compact = _allocate(tmp / "compact.npy", (len(good_rows), size, size, n_ch), root)
            for start in range(0, len(good_rows), 1024):
                chunk = good_rows[start : start + 1024]
                compact[start : start + len(chunk)] = images[chunk][..., :n_ch]
            compact.flush()
            del compact
            os.replace(tmp / "compact.npy", tmp / "images.npy")
        images.flush()
        del images
        kept = good_rows
        meta = {
            "version": CACHE_VERSION,
            "size": size,
            "channels": n_ch,
            "resize": resize,
            "paths": [str(files.paths[i]) for i in kept],
            "labels": [int(files.labels[i]) for i in kept],
            "skipped": sorted(skipped),
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        # Not files.replace_folder: syncing gigabytes of pixels would buy nothing, as a cache
        # a crash loses is decoded again; and a folder of the same name is handled here.
        try:
            os.replace(tmp, folder)
        except OSError:
            if (folder / "meta.json").is_file():  # another process finished it first
                shutil.rmtree(tmp, ignore_errors=True)
            else:  # a damaged leftover (only complete caches are renamed into place)
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(tmp, folder)
        (folder / BUILD_LOCK).unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        lock.release()
    return n_ch


def decode_cached(
    files: ImageList,
    size: int,
    channels: int | None = None,
    resize: str = "crop",
    cache_root: Path | None = None,
    strict: bool = False,
) -> DecodedImages:
    """Decode ``files`` at ``size`` into the cache (or open the cached copy) and return them.

    Unreadable files are skipped with one warning line each and a count; with ``strict`` they
    are an error. ``channels=None`` (auto) keeps one channel when every usable image is greyscale.
    """
    root = Path(cache_root) if cache_root else default_cache_root()
    stamps = _file_stamps(files)  # stat each file once, whichever keys are looked up
    key = _cache_key(stamps, size, channels, resize)
    folder = root / key
    # A cache decoded with channels "auto" serves an explicit request for the channel count
    # it resolved to (a resumed run, evaluation and reports ask for it by number).
    candidates = [folder]
    if channels is not None:
        candidates.append(root / _cache_key(stamps, size, None, resize))
    for found in candidates:
        if not (found / "meta.json").is_file():
            continue
        try:
            decoded = _open(found)
        except (OSError, ValueError, KeyError, TypeError):
            shutil.rmtree(found, ignore_errors=True)  # damaged: rebuild below
            continue
        if channels is not None and decoded.channels != channels:
            continue
        _report(list(decoded.skipped), len(decoded), strict)
        return decoded

    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_dead_builds(root)
        n_ch = _build(files, size, channels, resize, root, key)
    except OSError as exc:
        why = exc.strerror or str(exc)
        hint = "free some space there, or " if exc.errno == errno.ENOSPC else ""
        raise DataError(
            f"cannot write the decode cache in {root}: {why}; {hint}set CNNKIT_CACHE_DIR "
            "(or data.cache_dir) to another folder"
        ) from None
    except BrokenProcessPool:
        raise DataError(
            f"a decoding worker process died (out of memory, or killed) while filling the "
            f"decode cache in {root}; nothing was kept, run again"
        ) from None
    decoded = _open(folder)
    decoded = DecodedImages(
        decoded.images, decoded.labels, decoded.paths, decoded.skipped, n_ch, from_cache=False
    )
    _report(list(decoded.skipped), len(decoded), strict)
    return decoded
