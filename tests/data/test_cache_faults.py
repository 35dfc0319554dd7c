"""The decode cache when things go wrong: a full disk, a write that fails, a decode killed
half-way. Each ends in one clear error or a clean next run, never a crash or a leftover."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import cnnkit.data.cache as cache_mod
from cnnkit.cli import app
from cnnkit.data.cache import decode_cached
from cnnkit.data.folder import scan_folder
from cnnkit.data.shapes import generate_shapes
from cnnkit.errors import DataError
from cnnkit.files import OwnerLock

SIZE = 16


@pytest.fixture
def small_set(tmp_path: Path) -> Path:
    """Six 16x16 shapes per class."""
    return generate_shapes(tmp_path / "data", count=6, size=SIZE, seed=3)


def _leftovers(root: Path) -> list[str]:
    """Temporary build folders (``.<key>.<random>``) under the cache root."""
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.exists() else []


def _enospc(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_too_little_free_space_is_one_clear_error_before_writing(
    small_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "cache"
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(cache_mod.shutil, "disk_usage", lambda path: usage._replace(free=150_000))
    files = scan_folder(small_set).splits["all"]
    with pytest.raises(DataError) as info:
        decode_cached(files, SIZE, cache_root=root)
    needed = 18 * SIZE * SIZE * 3 + (1 << 20)  # 18 images, 3 channels, header and room
    assert str(info.value) == (
        f"the decode cache needs {needed / 1e6:.1f} MB in {root} but only 150.0 KB is free; "
        "free some space there, or set CNNKIT_CACHE_DIR (or data.cache_dir) to a folder on "
        "a larger disk"
    )
    assert _leftovers(root) == [] and list(root.iterdir()) == []


@pytest.mark.parametrize("where", ["open_memmap", "posix_fallocate"])
def test_a_full_disk_while_writing_is_one_clear_error_and_leaves_nothing(
    small_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """ENOSPC from creating the map or from reserving its blocks (where a full disk shows
    itself instead of as SIGBUS on a write into the map)."""
    root = tmp_path / "cache"
    target = np.lib.format if where == "open_memmap" else os
    monkeypatch.setattr(target, where, _enospc)
    files = scan_folder(small_set).splits["all"]
    with pytest.raises(DataError) as info:
        decode_cached(files, SIZE, cache_root=root)
    assert str(info.value) == (
        f"cannot write the decode cache in {root}: No space left on device; free some space "
        "there, or set CNNKIT_CACHE_DIR (or data.cache_dir) to another folder"
    )
    assert list(root.iterdir()) == []
    monkeypatch.undo()
    decoded = decode_cached(files, SIZE, cache_root=root)  # the next run just works
    assert len(decoded) == 18 and not decoded.from_cache


def test_the_cli_says_the_cache_disk_is_full_in_one_line(
    small_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "posix_fallocate", _enospc)
    root = tmp_path / "cache"
    monkeypatch.setenv("CNNKIT_CACHE_DIR", str(root))
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(small_set), "--out", str(run), "--quiet"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: cannot write the decode cache in {root}: No space left on device; free some "
        "space there, or set CNNKIT_CACHE_DIR (or data.cache_dir) to another folder"
    ]
    assert not run.exists() and _leftovers(root) == []


def test_builds_whose_owner_died_are_removed_and_live_ones_kept(
    small_set: Path, tmp_path: Path
) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    key = "0123456789abcdef" * 2
    dead, live, old, fresh = (root / f".{key}.{name}" for name in ("dead", "live", "old", "new"))
    for folder in (dead, live, old, fresh):
        folder.mkdir()
        (folder / "images.npy").write_bytes(b"\0" * 64)
    (dead / cache_mod.BUILD_LOCK).write_text("999999 elsewhere\n")  # a killed owner's file
    holder = OwnerLock(live / cache_mod.BUILD_LOCK)
    assert holder.acquire()
    an_hour_ago = time.time() - cache_mod.LOCKLESS_BUILD_SECONDS - 60
    os.utime(old, (an_hour_ago, an_hour_ago))  # lockless (an older cnnkit's) and stale
    try:
        decode_cached(scan_folder(small_set).splits["all"], SIZE, cache_root=root)
        assert _leftovers(root) == [live.name, fresh.name]
    finally:
        holder.release()


def test_a_worker_that_dies_is_one_clear_error_and_leaves_nothing(
    small_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed by the kernel (the out-of-memory killer, say) breaks the pool."""
    monkeypatch.setattr(cache_mod, "PARALLEL_FROM", 4)
    monkeypatch.setattr(cache_mod, "allowed_cpus", lambda: {0, 1})
    monkeypatch.setattr(
        cache_mod, "decode_image", lambda *args: os.kill(os.getpid(), signal.SIGKILL)
    )  # runs in the forked workers only
    root = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        decode_cached(scan_folder(small_set).splits["all"], SIZE, cache_root=root)
    assert str(info.value) == (
        "a decoding worker process died (out of memory, or killed) while filling the decode "
        f"cache in {root}; nothing was kept, run again"
    )
    assert list(root.iterdir()) == []


# ------------------------------------------------------------------- a decode killed midway

_SLOW_PARALLEL_DECODE = """
import os, sys, time
from pathlib import Path
import cnnkit.data.cache as cache
from cnnkit.data.folder import scan_folder

data, root, log = sys.argv[1:4]
cache.PARALLEL_FROM, cache.CHUNK, cache.allowed_cpus = 4, 2, lambda: {0, 1}  # two workers, 9 tasks
real = cache.decode_image

def slow(*args):
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(0.5)
    return real(*args)

cache.decode_image = slow  # the forked workers inherit it
cache.decode_cached(scan_folder(data).splits["all"], 16, cache_root=Path(root))
"""


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie nobody has reaped yet counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_workers_die_with_a_killed_parent_and_the_next_run_cleans_up(
    small_set: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    root, log = tmp_path / "cache", tmp_path / "pids"
    parent = subprocess.Popen(
        [sys.executable, "-c", _SLOW_PARALLEL_DECODE, str(small_set), str(root), str(log)]
    )
    deadline = time.monotonic() + 120
    workers: set[int] = set()
    try:
        while len(workers) < 2 and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.05)
            workers = {int(p) for p in log.read_text().split()} if log.exists() else set()
        assert len(workers) == 2, "the workers never started"
        parent.send_signal(sig)
        parent.wait(timeout=60)
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in workers if _alive(pid)], "workers outlived their parent"
    finally:  # whatever happened, leave no process of this test behind
        parent.kill()
        parent.wait()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert len(_leftovers(root)) == 1  # the killed decode's temporary folder

    decoded = decode_cached(scan_folder(small_set).splits["all"], SIZE, cache_root=root)
    assert len(decoded) == 18
    assert _leftovers(root) == []
