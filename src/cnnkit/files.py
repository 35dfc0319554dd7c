"""Writing files without losing anyone's: atomic replacement (``atomic_write`` for a file,
``replace_folder`` for a folder), owner locks, and a record of what cnnkit wrote.

Every folder cnnkit writes into keeps ``.cnnkit-manifest``: one JSON string per line, each
the relative path of a file (or, ending in ``/``, a folder) cnnkit wrote there. It is how
cnnkit tells its own outputs from a user's files: it replaces the first and refuses to touch
the second. Lines are only appended, each batch with one ``O_APPEND`` write, so processes
writing into one folder keep each other's records. Every way a manifest can go wrong (lost,
damaged, never written) makes files look foreign, which refuses; it never deletes more.

An ``OwnerLock`` is a lock file held with ``flock`` for the life of its owner and naming it
(pid and host). The kernel drops the lock when the owner dies, so a ``kill -9`` never blocks
a later run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import glob
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from cnnkit.errors import OutputError, RunDirError

__all__ = [
    "LOCK",
    "MANIFEST",
    "FolderContents",
    "OwnerLock",
    "atomic_write",
    "check_output",
    "fsync",
    "list_names",
    "record",
    "recorded",
    "remove_owned",
    "replace_folder",
    "survey",
    "temporary_names",
    "write_file",
    "write_folder",
]

log = logging.getLogger("cnnkit")
MANIFEST = ".cnnkit-manifest"
LOCK = ".cnnkit-lock"
BOOKKEEPING = (MANIFEST, LOCK)


def temporary_names(name: str) -> str:
    """The pattern of the temporary files ``atomic_write`` writes ``name`` through."""
    return f".{glob.escape(name)}.*.tmp"


def fsync(path: Path) -> None:
    """Flush a file's bytes, or a folder's list of names, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` for a temporary file beside ``path``, fsync it, rename it to ``path``.

    A full disk or an unwritable folder raises ``RunDirError``; ``path`` keeps its old contents.
    This is cnnkit's one way to replace a file; ``replace_folder`` is its one way to put a
    whole folder in place.
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    except BaseException as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise RunDirError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


def replace_folder(tmp: Path, final: Path) -> None:
    """Rename the filled folder ``tmp`` to ``final`` once everything in it is on the disk.

    Files and folders are synced bottom-up before the rename and ``final``'s parent after it,
    so a crash leaves either no ``final`` (or the one it replaced) or the complete new one.
    ``OSError`` (e.g. ``final`` exists and is not empty) is the caller's to handle.
    """
    for folder, _, files in os.walk(tmp, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):  # a link's target is not ours
                fsync(Path(folder, name))
        fsync(Path(folder))
    os.replace(tmp, final)
    fsync(final.parent)


def list_names(names: list[str], limit: int = 5) -> str:
    """``a, b, c and 4 more``: the first few of a list of names, for one-line messages."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ------------------------------------------------------------------------------- owner locks


class OwnerLock:
    """An exclusive lock on the file ``path`` that names its holder (``pid host``).

    ``acquire`` never waits: it says whether the lock was free. ``release`` deletes the file
    (a finished owner leaves nothing behind); a file left by a killed owner is free to take.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock if nobody holds it; raises ``OSError`` if the file cannot be made."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError:
                os.close(fd)
                raise
            # The previous holder may have deleted the file between our open and our flock:
            # then we hold a lock on a name nobody else sees; open the current file again.
            try:
                current = os.stat(self.path)
                mine = os.fstat(fd)
                same = (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd
        return True

    def owner(self) -> str:
        """Who holds (or last held) the lock, e.g. ``pid 4242 on gpu-3``."""
        try:
            pid, _, host = self.path.read_text(errors="replace").strip().partition(" ")
        except OSError:
            return "an unknown process"
        if not pid.isdigit():
            return "an unknown process"
        return f"pid {pid} on {host}" if host else f"pid {pid}"

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # before unlocking: nobody can take a doomed file
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OwnerLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# --------------------------------------------------------------------------------- manifests


def _safe_name(name: str) -> bool:
    """A relative path that stays inside its folder (a damaged manifest cannot point out)."""
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts


def _read(folder: Path) -> tuple[set[str], set[str]]:
    """(names, families) of ``folder``'s manifest; both empty when there is none."""
    try:
        text = (folder / MANIFEST).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set(), set()
    names, families = set(), set()
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash: its file then looks foreign (refused)
        if isinstance(entry, str) and _safe_name(entry):
            names.add(entry)
        elif isinstance(entry, dict) and _safe_name(family := str(entry.get("family", ""))):
            families.add(family)
    return names, families


def recorded(folder: Path) -> set[str]:
    """The names ``folder``'s manifest records (empty when there is none)."""
    return _read(folder)[0]


def _lines(entries: Iterable[str | dict[str, str]]) -> bytes:
    return "".join(json.dumps(e) + "\n" for e in entries).encode()


def record(folder: Path, names: Iterable[str], families: Iterable[str] = ()) -> None:
    """Add ``names`` (relative to ``folder``; a folder ends in ``/``) to its manifest.

    ``families`` are glob patterns for names cnnkit picks as it goes (``ckpt-*/`` for
    checkpoints, ``.name.*.tmp`` for a file being written): each entry one matches at its
    depth is cnnkit's, a folder (pattern ending in ``/``) with all it holds.
    """
    known, known_families = _read(folder)
    new: list[str | dict[str, str]] = [n for n in dict.fromkeys(names) if n not in known]
    new += [{"family": f} for f in dict.fromkeys(families) if f not in known_families]
    if not new:
        return
    fd = os.open(folder / MANIFEST, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, _lines(new))
    finally:
        os.close(fd)


@dataclass
class FolderContents:
    """What a folder holds, sorted into what cnnkit wrote and what it did not."""

    owned: list[Path] = field(default_factory=list)  # files and whole folders cnnkit wrote
    foreign: list[str] = field(default_factory=list)  # relative names; folders end in "/"
    folders: list[Path] = field(default_factory=list)  # folders holding owned entries
    has_manifest: bool = False


def survey(folder: Path) -> FolderContents:
    """Walk ``folder`` (never following links) and sort each entry by the manifest.

    A file is cnnkit's when recorded by name; a folder recorded with a trailing ``/`` (or
    matching a recorded family) is cnnkit's with everything in it; any other folder is
    cnnkit's only as the parent of recorded entries (an empty or unrelated one is foreign).
    """
    names, families = _read(folder)
    files = {n for n in names if not n.endswith("/")}
    whole = {n.rstrip("/") for n in names if n.endswith("/")}
    file_families = [f for f in families if not f.endswith("/")]
    folder_families = [f.rstrip("/") for f in families if f.endswith("/")]
    parents = {
        str(p) for n in [*names, *families] for p in PurePosixPath(n.rstrip("/")).parents
    } - {"."}
    contents = FolderContents(has_manifest=(folder / MANIFEST).is_file())

    def in_family(entry: str, patterns: list[str]) -> bool:
        depth = entry.count("/")
        return any(p.count("/") == depth and fnmatch.fnmatchcase(entry, p) for p in patterns)

    def fail(exc: OSError) -> None:
        raise exc

    for dirpath, dirnames, filenames in os.walk(folder, onerror=fail):
        rel = PurePosixPath(Path(dirpath).relative_to(folder))
        descend = []
        for name in dirnames:
            entry = str(rel / name) if str(rel) != "." else name
            path = Path(dirpath, name)
            if path.is_symlink():  # a link to a folder is a file here: never followed
                filenames.append(name)
            elif entry in whole or in_family(entry, folder_families):
                contents.owned.append(path)
            elif entry in parents:
                contents.folders.append(path)
                descend.append(name)
            else:
                contents.foreign.append(entry + "/")
        dirnames[:] = descend
        for name in filenames:
            entry = str(rel / name) if str(rel) != "." else name
            if entry in BOOKKEEPING:
                continue
            if entry in files or in_family(entry, file_families):
                contents.owned.append(Path(dirpath, name))
            else:
                contents.foreign.append(entry)
    contents.foreign.sort()
    return contents


def remove_owned(contents: FolderContents) -> None:
    """Delete what ``survey`` found cnnkit wrote, then the folders it emptied."""
    for path in contents.owned:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for path in sorted(contents.folders, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty: holds what is not cnnkit's to delete
            path.rmdir()


# --------------------------------------------------------------------------------- outputs


def check_output(path: str | Path, *, overwrite: bool) -> Path:
    """``path`` if cnnkit may write the file there: it does not exist, cnnkit wrote it
    (its folder's manifest says so), or ``overwrite``. Else ``OutputError``."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise OutputError(f"{path} is a folder; expected a file name")
    exists = path.exists() or path.is_symlink()
    if exists and not overwrite and path.name not in recorded(path.parent):
        raise OutputError(
            "{path} exists and cnnkit did not write it; choose another name, or pass "
            "{overwrite=True} to replace it",
            setting="overwrite",
            path=path,
        )
    return path


def write_file(path: str | Path, write: Callable[[Path], None], *, overwrite: bool) -> Path:
    """Write the file ``path`` with ``write(tmp)``, atomically, and record it as cnnkit's.

    An existing ``path`` that cnnkit did not write (no record of it in its folder's manifest)
    is refused unless ``overwrite``. A write that fails leaves the old file as it was.
    """
    path = check_output(path, overwrite=overwrite)
    manifest = path.parent / MANIFEST
    had_manifest = manifest.is_file()
    with contextlib.suppress(OSError):  # if the folder is unwritable, atomic_write says so
        path.parent.mkdir(parents=True, exist_ok=True)
        record(path.parent, [], [temporary_names(path.name)])  # what a kill may leave
    try:
        atomic_write(path, write)
    except BaseException:
        if not had_manifest:  # a failed write leaves nothing behind, not even a record
            manifest.unlink(missing_ok=True)
        raise
    try:
        record(path.parent, [path.name])
    except OSError as exc:  # the file is written; only the record of it is missing
        log.warning("could not record %s in %s: %s", path.name, path.parent / MANIFEST, exc)
    return path


def _files_below(folder: Path) -> list[str]:
    return sorted(
        str(PurePosixPath(p.relative_to(folder)))
        for p in folder.rglob("*")
        if not p.is_dir() or p.is_symlink()
    )


def write_folder(path: str | Path, fill: Callable[[Path], None], *, overwrite: bool) -> Path:
    """Write a folder of outputs: ``fill(tmp)`` writes them into a fresh temporary folder.

    A new ``path`` is that folder renamed into place. Over cnnkit's own earlier output each
    file is replaced by a rename and the files it no longer has are removed, so no file is
    ever half-written. A folder holding anything cnnkit did not write is refused, naming
    it, unless ``overwrite``; then only the files written are replaced, nothing is removed.
    """
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        raise OutputError(f"{path} exists and is not a folder")
    try:
        before = survey(path) if path.is_dir() else FolderContents()
    except OSError as exc:
        raise OutputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if before.foreign and not overwrite:
        raise OutputError(
            "{path} holds files cnnkit did not write ({names}); choose another folder, or "
            "pass {overwrite=True} to write into it (only the files cnnkit writes are replaced)",
            setting="overwrite",
            path=path,
            names=list_names(before.foreign),
        )
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        fill(tmp)
        written = _files_below(tmp)
        if not path.exists():
            record(tmp, written)
            try:
                replace_folder(tmp, path)
                return path
            except OSError:  # someone made the folder meanwhile: replace file by file
                if not tmp.is_dir():
                    raise  # it was renamed; only the sync after the rename failed
                (tmp / MANIFEST).unlink()
        record(path, written)  # first: a crash half-way leaves each new file recorded
        for name in written:
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / name, path / name)
        keep = set(written)
        stale = FolderContents(
            owned=[p for p in before.owned if str(PurePosixPath(p.relative_to(path))) not in keep],
            folders=before.folders,
        )
        remove_owned(stale)  # earlier outputs that were not written again
        atomic_write(path / MANIFEST, lambda p: p.write_bytes(_lines(written)))
        return path
    except OSError as exc:
        why = exc.strerror or str(exc)
        if exc.errno == errno.ENOSPC:
            why += " (free some space)"
        raise OutputError(f"cannot write {path}: {why}") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
