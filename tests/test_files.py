"""cnnkit.files: owner locks, the manifest of what cnnkit wrote, and outputs that replace
cnnkit's own files atomically and refuse everyone else's."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cnnkit.files as files_mod
from cnnkit.errors import OutputError
from cnnkit.files import (
    MANIFEST,
    OwnerLock,
    record,
    recorded,
    remove_owned,
    replace_folder,
    survey,
    write_file,
    write_folder,
)

# ------------------------------------------------------------------------------ owner locks


def test_a_held_lock_refuses_a_second_owner_and_names_the_first(tmp_path: Path) -> None:
    first, second = OwnerLock(tmp_path / "lock"), OwnerLock(tmp_path / "lock")
    assert first.acquire()
    assert not second.acquire()
    assert second.owner() == f"pid {os.getpid()} on {socket.gethostname()}"
    first.release()
    assert not (tmp_path / "lock").exists()  # a finished owner leaves nothing behind
    assert second.acquire()
    second.release()


def test_the_lock_of_a_killed_owner_is_free(tmp_path: Path) -> None:
    """``kill -9`` leaves the lock file behind, but never the lock."""
    lock_file = tmp_path / "lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from cnnkit.files import OwnerLock; "
            "assert OwnerLock(Path(sys.argv[1])).acquire(); print('held', flush=True); "
            "time.sleep(600)",
            str(lock_file),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        lock = OwnerLock(lock_file)
        assert not lock.acquire()
        assert lock.owner().startswith(f"pid {holder.pid} on ")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_file.exists()
    assert lock.acquire()
    lock.release()


# -------------------------------------------------------------------------------- manifests


def test_survey_sorts_entries_by_the_manifest(tmp_path: Path) -> None:
    (tmp_path / "maps").mkdir()
    (tmp_path / "checkpoints" / "ckpt-000001").mkdir(parents=True)
    (tmp_path / "checkpoints" / "mine").mkdir()
    for name in ("a.png", "maps/b.png", "checkpoints/ckpt-000001/state.pt", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "empty").mkdir()
    record(tmp_path, ["a.png", "maps/b.png", "gone.png"], ["checkpoints/ckpt-*/"])
    contents = survey(tmp_path)
    owned = sorted(str(p.relative_to(tmp_path)) for p in contents.owned)
    assert owned == ["a.png", "checkpoints/ckpt-000001", "maps/b.png"]
    assert contents.foreign == ["checkpoints/mine/", "empty/", "notes.txt"]
    remove_owned(contents)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == [MANIFEST, "checkpoints", "checkpoints/mine", "empty", "notes.txt"]


def test_a_manifest_cannot_point_outside_its_folder(tmp_path: Path) -> None:
    folder, outside = tmp_path / "out", tmp_path / "precious.txt"
    folder.mkdir()
    outside.write_text("keep")
    (folder / "link").symlink_to(tmp_path)
    lines = ['"../precious.txt"', f'"{outside}"', '"link/precious.txt"', '{"family": "../*"}']
    (folder / MANIFEST).write_text("\n".join(lines) + "\n")
    assert recorded(folder) == {"link/precious.txt"}
    contents = survey(folder)
    assert contents.owned == [] and contents.foreign == ["link"]  # the link is never followed
    remove_owned(contents)
    assert outside.read_text() == "keep"


def test_a_damaged_manifest_line_makes_its_file_foreign(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_text("x")
    (tmp_path / "b.png").write_text("x")
    (tmp_path / MANIFEST).write_text('"a.png"\n"b.pn')  # cut short by a crash
    assert survey(tmp_path).foreign == ["b.png"]


# ---------------------------------------------------------------------------------- outputs


def test_write_file_refuses_a_users_file_and_replaces_its_own(tmp_path: Path) -> None:
    mine = tmp_path / "report.html"
    mine.write_text("my notes")
    with pytest.raises(OutputError) as info:
        write_file(mine, lambda p: p.write_text("report"), overwrite=False)
    assert str(info.value) == (
        f"{mine} exists and cnnkit did not write it; choose another name, or pass "
        "overwrite=True to replace it"
    )
    assert mine.read_text() == "my notes"
    write_file(mine, lambda p: p.write_text("report 1"), overwrite=True)
    assert recorded(tmp_path) == {"report.html"}
    write_file(mine, lambda p: p.write_text("report 2"), overwrite=False)  # cnnkit's own now
    assert mine.read_text() == "report 2"
    (tmp_path / ".report.html.k1ll3d.tmp").write_text("half")  # what a kill mid-write leaves
    (tmp_path / ".report.htmlx.k1ll3d.tmp").write_text("someone else's")
    assert survey(tmp_path).foreign == [".report.htmlx.k1ll3d.tmp"]


def test_a_failed_write_keeps_cnnkits_old_file(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"

    def fail(p: Path) -> None:
        p.write_text("half")
        raise RuntimeError("verification failed")

    with pytest.raises(RuntimeError):
        write_file(path, fail, overwrite=False)
    assert list(tmp_path.iterdir()) == []  # nothing at all, not even a manifest
    write_file(path, lambda p: p.write_text("old"), overwrite=False)
    with pytest.raises(RuntimeError):
        write_file(path, fail, overwrite=False)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST, "model.onnx"]


def _fill(names: list[str], text: str = "new"):
    def fill(folder: Path) -> None:
        for name in names:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)

    return fill


def test_write_folder_replaces_its_own_output_and_removes_what_it_no_longer_writes(
    tmp_path: Path,
) -> None:
    out = tmp_path / "inspect"
    write_folder(out, _fill(["index.html", "maps/conv1.png", "maps/conv2.png"]), overwrite=False)
    assert recorded(out) == {"index.html", "maps/conv1.png", "maps/conv2.png"}
    write_folder(out, _fill(["index.html", "maps/conv1.png"], "second"), overwrite=False)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [MANIFEST, "index.html", "maps/conv1.png"]
    assert (out / "index.html").read_text() == "second"
    assert recorded(out) == {"index.html", "maps/conv1.png"}
    assert [p.name for p in tmp_path.iterdir()] == ["inspect"]  # no temporary folder left


def test_write_folder_refuses_a_users_folder_and_overwrite_deletes_nothing(
    tmp_path: Path,
) -> None:
    out = tmp_path / "data"
    (out / "circle").mkdir(parents=True)
    (out / "circle" / "photo.jpg").write_text("mine")
    (out / "index.html").write_text("mine too")
    with pytest.raises(OutputError) as info:
        write_folder(out, _fill(["index.html"]), overwrite=False)
    assert str(info.value) == (
        f"{out} holds files cnnkit did not write (circle/, index.html); choose another "
        "folder, or pass overwrite=True to write into it (only the files cnnkit writes are "
        "replaced)"
    )
    assert (out / "index.html").read_text() == "mine too"
    write_folder(out, _fill(["index.html", "circle/circle_00000.png"]), overwrite=True)
    assert (out / "index.html").read_text() == "new"
    assert (out / "circle" / "photo.jpg").read_text() == "mine"
    assert survey(out).foreign == ["circle/photo.jpg"]


def test_a_failed_fill_leaves_the_old_folder_and_no_temporary_one(tmp_path: Path) -> None:
    out = tmp_path / "inspect"
    write_folder(out, _fill(["index.html"], "old"), overwrite=False)

    def fail(folder: Path) -> None:
        (folder / "index.html").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match=r"cannot write .*: No space left on device"):
        write_folder(out, fail, overwrite=False)
    assert (out / "index.html").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["inspect"]


def test_a_file_where_a_folder_goes_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("mine")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        write_folder(tmp_path / "out", _fill(["a"]), overwrite=True)
    with pytest.raises(OutputError, match="is a folder; expected a file name"):
        write_file(tmp_path, lambda p: None, overwrite=True)


def test_replace_folder_syncs_all_it_holds_before_the_rename_and_the_parent_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp, final = tmp_path / ".new.tmp", tmp_path / "new"
    (tmp / "sub").mkdir(parents=True)
    (tmp / "a.bin").write_bytes(b"a")
    (tmp / "sub" / "b.bin").write_bytes(b"b")
    events: list[tuple[str, Path]] = []
    sync, rename = files_mod.fsync, os.replace

    def recording_sync(path: Path) -> None:
        events.append(("sync", Path(path)))
        sync(path)

    def recording_rename(src, dst) -> None:
        events.append(("rename", Path(dst)))
        rename(src, dst)

    monkeypatch.setattr(files_mod, "fsync", recording_sync)
    monkeypatch.setattr(files_mod.os, "replace", recording_rename)
    replace_folder(tmp, final)
    at = events.index(("rename", final))
    before = {path for _, path in events[:at]}
    assert before == {tmp / "a.bin", tmp / "sub" / "b.bin", tmp / "sub", tmp}
    assert events[at + 1 :] == [("sync", tmp_path)]
    assert (final / "sub" / "b.bin").read_bytes() == b"b" and not tmp.exists()


def test_replace_folder_leaves_both_folders_when_the_name_is_taken(tmp_path: Path) -> None:
    tmp, final = tmp_path / ".new.tmp", tmp_path / "new"
    tmp.mkdir()
    (tmp / "a.bin").write_bytes(b"new")
    final.mkdir()
    (final / "a.bin").write_bytes(b"old")
    with pytest.raises(OSError):
        replace_folder(tmp, final)
    assert (final / "a.bin").read_bytes() == b"old" and (tmp / "a.bin").read_bytes() == b"new"


def test_records_from_two_writers_are_both_kept(tmp_path: Path) -> None:
    """Appends, not rewrites: two processes recording into one folder keep both records."""
    code = (
        "import sys; from pathlib import Path; from cnnkit.files import record\n"
        "for i in range(200): record(Path(sys.argv[1]), [f'{sys.argv[2]}{i}'])"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path), prefix]) for prefix in "ab"
    ]
    deadline = time.monotonic() + 120
    for proc in procs:
        assert proc.wait(timeout=max(1.0, deadline - time.monotonic())) == 0
    assert recorded(tmp_path) == {f"{p}{i}" for p in "ab" for i in range(200)}
