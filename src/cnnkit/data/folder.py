"""Find the images of a folder data set and their classes; split them deterministically.

Two layouts are understood:

- ``DIR/<class>/*``: one folder per class; a validation split is drawn from it.
- ``DIR/train/<class>/*`` with ``DIR/val/<class>/*`` and/or ``DIR/test/<class>/*``: the split
  is given (validation uses ``val/`` when present, else ``test/``).

Hidden files and folders (``.DS_Store``, ``.ipynb_checkpoints``, ``._x.jpg``) and files that
are not images by their suffix are ignored.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnkit.data.images import IMAGE_SUFFIXES
from cnnkit.errors import DataError, display_path

__all__ = [
    "SPLIT_FILE",
    "FolderLayout",
    "ImageList",
    "absolute",
    "class_name",
    "folder_problem",
    "read_split_file",
    "same_folder",
    "scan_folder",
    "stratified_split",
]

SPLIT_NAMES = ("train", "val", "test")
SPLIT_FILE = "split.csv"  # RUN_DIR/split.csv: path,label,split of every image a run used
SPLIT_COLUMNS = ("path", "label", "split")


@dataclass(frozen=True)
class ImageList:
    """Image files with integer labels into a shared class list.

    Paths are plain strings: a 70,000-file data set would spend a third of a second just
    building ``Path`` objects, on every run.
    """

    paths: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class FolderLayout:
    """What ``scan_folder`` found: the classes and the image list of each split."""

    root: Path
    classes: tuple[str, ...]
    splits: dict[str, ImageList]  # "all" for a flat folder; else "train" and "val"/"test"

    @property
    def has_split(self) -> bool:
        return "train" in self.splits


def _visible(name: str) -> bool:
    return not name.startswith(".") and name != "__MACOSX"


def class_name(folder: Path) -> str:
    """A class folder's name as its class name: printable, whatever bytes it holds (a name
    that is not UTF-8 would crash every report, plot and JSON file that shows it)."""
    return display_path(folder.name)


def _class_dirs(root: Path) -> list[Path]:
    return sorted(
        (p for p in root.iterdir() if p.is_dir() and _visible(p.name)), key=lambda p: p.name
    )


def _images_in(folder: Path) -> list[str]:
    """Image files below ``folder`` (recursively), hidden ones skipped, in a stable order.

    A folder named like an image (``x.png/``) is listed too, not walked into: decoding it
    then fails with "not a file", so it is reported and skipped instead of vanishing.
    Symbolic links to folders are not followed. One ``scandir`` per folder and plain strings
    keep a 70,000-file data set's scan to a fraction of a second.
    """
    found: list[str] = []

    def walk(directory: str) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:  # unreadable or vanished while listing: as os.walk, skip it
            return
        below: list[str] = []
        for entry in entries:
            name = entry.name
            if not _visible(name):
                continue
            named_like_image = os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir and not named_like_image:
                if not entry.is_symlink():
                    below.append(entry.path)
            elif named_like_image:
                found.append(entry.path)
        for sub in below:
            walk(sub)

    walk(str(folder))
    return found


def _collect(root: Path, classes: list[str] | None, where: str) -> tuple[list[str], ImageList]:
    dirs = _class_dirs(root)
    names = [class_name(d) for d in dirs]
    if classes is None:
        classes = names
    else:
        extra = sorted(set(names) - set(classes))
        if extra:
            raise DataError(
                f"{display_path(root)}: class {extra[0]!r} is not among the training classes"
            )
    index = {name: i for i, name in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    for d, name in zip(dirs, names, strict=True):
        images = _images_in(d)
        if not images and where == "train":
            raise DataError(f"{display_path(d)}: class {name!r} has no images")
        paths += images
        labels += [index[name]] * len(images)
    return classes, ImageList(tuple(paths), tuple(labels))


def absolute(path: str | Path) -> Path:
    """``path`` made absolute against the working directory, ``~`` expanded, ``..`` folded;
    symbolic links are kept as written (a run directory records the path the user gave)."""
    return Path(os.path.abspath(Path(path).expanduser()))


def same_folder(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same existing folder (symbolic links followed)."""
    try:
        return os.path.samefile(absolute(a), absolute(b))
    except OSError:
        return False


def folder_problem(path: str | Path | None) -> str | None:
    """Why a run's recorded data folder cannot be used from here, in words, or None.

    Runs record their folder as an absolute path; older ones kept it as typed, and a
    relative path only means something from the folder training ran in.
    """
    if not path:
        return "the run does not record its data folder"
    if Path(path).expanduser().is_dir():
        return None
    if not Path(path).expanduser().is_absolute():
        return (
            f"the run records its data folder as the relative path {path}, which is not a "
            f"folder from {os.getcwd()} (give the data folder explicitly)"
        )
    return f"the data folder {path} no longer exists"


def scan_folder(path: str | Path) -> FolderLayout:
    """List a data set's classes and images; raises ``DataError`` for an unusable folder.

    Every path found is absolute, so what a run records (split.csv, evaluations, the
    checkpoint's fingerprint) means the same from any working directory.
    """
    root = absolute(path)
    if not root.exists():
        raise DataError(f"data folder not found: {display_path(root)}")
    if not root.is_dir():
        raise DataError(f"not a folder: {display_path(root)} (expected one sub-folder per class)")
    subdirs = {d.name for d in _class_dirs(root)}
    splits: dict[str, ImageList] = {}
    if "train" in subdirs and subdirs & {"val", "test"}:
        classes, splits["train"] = _collect(root / "train", None, "train")
        for name in ("val", "test"):
            if name in subdirs:
                _, splits[name] = _collect(root / name, classes, name)
    else:
        classes, splits["all"] = _collect(root, None, "train")
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise DataError(
            f"{display_path(root)}: need at least two classes (one sub-folder of images each), "
            f"found {found}"
        )
    return FolderLayout(root=root, classes=tuple(classes), splits=splits)


def stratified_split(
    labels: np.ndarray,
    val_fraction: float,
    seed: int,
    groups: Sequence[Sequence[int]] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): ``val_fraction`` of every class, the same for the same seed.

    ``groups`` lists images that must stay together (exact duplicates): each group goes
    whole to one side, counted in the class of its first image, so a copy of a validation
    image is never trained on. Without groups the split is the plain per-class draw. Each
    class with at least two images (or groups) gives at least one to validation when the
    fraction is positive, so every class is measured.
    """
    rng = np.random.default_rng(seed)
    leader = np.arange(len(labels))  # each image's group, named by its first image
    for group in groups:
        leader[np.asarray(group)] = min(group)
    size = np.bincount(leader, minlength=len(labels))
    units = np.flatnonzero(leader == np.arange(len(labels)))  # one per group or lone image
    chosen: list[np.ndarray] = []
    for cls in np.unique(labels[units]):
        idx = units[labels[units] == cls]
        idx = idx[rng.permutation(len(idx))]
        rows = int(size[idx].sum())
        n_val = round(rows * val_fraction)
        if val_fraction > 0 and len(idx) >= 2:
            n_val = min(max(n_val, 1), rows - 1)
        chosen.append(_fill(idx, size, n_val))
    val_units = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    in_val = np.isin(leader, val_units)
    return np.flatnonzero(~in_val), np.flatnonzero(in_val)


def _fill(units: np.ndarray, size: np.ndarray, n_val: int) -> np.ndarray:
    """The units, in their drawn order, that fill ``n_val`` validation images without
    going over (at least one when ``n_val`` asks for any and another is left to train)."""
    if n_val <= 0:
        return units[:0]
    if (size[units] == 1).all():
        return units[:n_val]
    taken, total = [], 0
    for unit in units:
        if total + size[unit] <= n_val:
            taken.append(unit)
            total += int(size[unit])
            if total == n_val:
                break
    if not taken and len(units) >= 2:  # every group is larger than the share: the smallest
        taken.append(units[int(np.argmin(size[units]))])
    return np.asarray(taken, dtype=np.int64)


def read_split_file(path: str | Path) -> dict[str, frozenset[str]]:
    """The paths of each split (``train``, ``val``, ``test``) a run's ``split.csv`` lists;
    empty when the run has none (runs from before cnnkit wrote it)."""
    parts: dict[str, set[str]] = {}
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            for row in csv.DictReader(f):
                if row.get("path") and row.get("split"):
                    parts.setdefault(row["split"], set()).add(row["path"])
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from None
    return {name: frozenset(paths) for name, paths in parts.items()}
