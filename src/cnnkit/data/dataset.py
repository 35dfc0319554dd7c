"""From a ``DataConfig`` to decoded training and validation arrays, ready for batching."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnkit.config import DataConfig
from cnnkit.data.cache import DecodedImages, decode_cached
from cnnkit.data.check import identical_rows
from cnnkit.data.folder import (
    FolderLayout,
    ImageList,
    read_split_file,
    same_folder,
    scan_folder,
    stratified_split,
)
from cnnkit.data.preprocessing import Preprocessing
from cnnkit.errors import DataError

__all__ = [
    "ImageArray",
    "PreparedData",
    "Selection",
    "channel_stats",
    "held_out_split",
    "load_split",
    "prepare_data",
    "select_images",
]

log = logging.getLogger("cnnkit")
RAM_FRACTION = 0.25  # arrays smaller than this share of RAM are copied in; larger stay mapped


@dataclass(frozen=True)
class ImageArray:
    """Decoded images of one split: ``images[i]`` (S, S, C) uint8 has label ``labels[i]``."""

    images: np.ndarray  # (N, S, S, C) uint8, in RAM or memory-mapped
    labels: np.ndarray  # (N,) int64
    paths: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather a batch as tensors: uint8 (B, S, S, C) images and int64 (B,) labels."""
        idx = np.asarray(index)
        return torch.from_numpy(np.ascontiguousarray(self.images[idx])), torch.from_numpy(
            self.labels[idx]
        )


@dataclass(frozen=True)
class PreparedData:
    """A data set split for training, with how a model trained on it is fed."""

    classes: tuple[str, ...]
    train: ImageArray
    val: ImageArray
    preprocessing: Preprocessing  # the training images' size, channels, mean and std
    skipped: int
    root: str = ""  # the data folder, absolute
    held_back: ImageList | None = None  # test/ when validating on val/: never trained on
    # Groups of identical images (absolute paths) found in more than one of a given
    # split's train/, val/ and test/: their scores are not on unseen images.
    duplicates: tuple[tuple[str, ...], ...] = ()


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _take(decoded: DecodedImages, rows: np.ndarray | None = None) -> ImageArray:
    """The rows of a decoded set; copied into RAM when small enough (faster random batches),
    else kept memory-mapped and gathered batch by batch (data larger than RAM)."""
    if rows is None:
        rows = np.arange(len(decoded), dtype=np.int64)
    paths = tuple(decoded.paths[i] for i in rows)
    if decoded.images.nbytes < RAM_FRACTION * _ram_bytes():
        return ImageArray(np.asarray(decoded.images[rows]), decoded.labels[rows], paths)
    return ImageArray(_LazyRows(decoded.images, rows), decoded.labels[rows], paths)  # type: ignore[arg-type]


class _LazyRows:
    """A row subset of a memory-mapped array that gathers only the rows a batch asks for."""

    def __init__(self, images: np.ndarray, rows: np.ndarray) -> None:
        self._images, self._rows = images, rows
        self.shape = (len(rows), *images.shape[1:])
        self.dtype = images.dtype
        self.nbytes = int(np.prod(self.shape))

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: np.ndarray | slice | int) -> np.ndarray:
        rows = self._rows[index]
        if np.ndim(rows) == 0:
            return np.asarray(self._images[int(rows)])
        order = np.argsort(rows)  # sequential reads from disk, then back to the asked order
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        out[order] = self._images[rows[order]]
        return out


def channel_stats(images: np.ndarray, sample: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1], from a fixed sample."""
    n = len(images)
    if n == 0:
        raise DataError("no images to compute normalisation statistics from")
    idx = np.linspace(0, n - 1, num=min(n, sample)).astype(np.int64)
    x = np.asarray(images[idx])  # (n, S, S, C)
    if x.dtype == np.uint8:  # from each value's count: 10x faster than in floats, and exact
        values = np.arange(256, dtype=np.float64) / 255.0
        counts = [np.bincount(x[..., c].ravel(), minlength=256) for c in range(x.shape[-1])]
        mean = np.array([h @ values / h.sum() for h in counts])
        var = [h @ (values - m) ** 2 / h.sum() for h, m in zip(counts, mean, strict=True)]
        std = np.maximum(np.sqrt(var), 1e-3)
    else:
        x = x.astype(np.float64) / 255.0
        mean = x.mean(axis=(0, 1, 2))
        std = np.maximum(x.std(axis=(0, 1, 2)), 1e-3)
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


def _check_classes(classes: tuple[str, ...], labels: np.ndarray, where: str) -> None:
    counts = np.bincount(labels, minlength=len(classes))
    for name, count in zip(classes, counts, strict=True):
        if count == 0:
            raise DataError(f"{where}: class {name!r} has no usable images")


def _decode(files: ImageList, cfg: DataConfig, size: int, channels: int | None) -> DecodedImages:
    return decode_cached(
        files,
        size,
        channels,
        cfg.resize,
        Path(cfg.cache_dir) if cfg.cache_dir else None,
        cfg.strict,
    )


def held_out_split(layout: FolderLayout) -> str:
    """The split a train/val|test folder validates on: ``val`` when it has images, else
    ``test`` (without any, no epoch could be kept as the best)."""
    given = [n for n in ("val", "test") if n in layout.splits]
    return next((n for n in given if len(layout.splits[n])), given[0])


def prepare_data(cfg: DataConfig, image_size: int) -> PreparedData:
    """Scan, decode (once, cached) and split the folder at ``cfg.path``.

    Exact duplicates (the same decoded pixels at ``image_size``, so byte-identical files
    too) never straddle a drawn split. In a given split they are counted and named, and
    ``cfg.strict`` refuses them.
    """
    layout = scan_folder(cfg.path)
    channels = cfg.channels
    held_back = None
    duplicates: tuple[tuple[str, ...], ...] = ()
    if layout.has_split:
        train = _decode(layout.splits["train"], cfg, image_size, channels)
        channels = train.channels
        held = held_out_split(layout)
        val = _decode(layout.splits[held], cfg, image_size, channels)
        if len(val) == 0:
            raise DataError(f"{layout.root / held}: no usable images to validate on")
        _check_classes(layout.classes, train.labels, str(layout.root / "train"))
        parts = [train, val]
        if held != "test" and "test" in layout.splits:  # decoded to look for copies only
            test = _decode(layout.splits["test"], cfg, image_size, channels)
            held_back = ImageList(test.paths, tuple(test.labels.tolist()))
            parts.append(test)
        duplicates = _shared_images(parts)
        _report_shared(duplicates, layout.root, cfg.strict)
        train_arr, val_arr = _take(train), _take(val)
        skipped = sum(len(part.skipped) for part in parts)
    else:
        everything = _decode(layout.splits["all"], cfg, image_size, channels)
        _check_classes(layout.classes, everything.labels, str(layout.root))
        groups = [[row for _, row in group] for group in identical_rows([everything.images])]
        train_rows, val_rows = stratified_split(everything.labels, cfg.val_split, cfg.seed, groups)
        if groups:
            log.info(
                "%d groups of identical images (%d images) each kept on one side of the split",
                len(groups),
                sum(len(g) for g in groups),
            )
        train_arr, val_arr = _take(everything, train_rows), _take(everything, val_rows)
        train = everything
        skipped = len(everything.skipped)
    mean, std = channel_stats(train_arr.images)
    log.info(
        "%d classes, %d training and %d validation images (%dx%d, %d channel%s)",
        len(layout.classes),
        len(train_arr),
        len(val_arr),
        image_size,
        image_size,
        train.channels,
        "" if train.channels == 1 else "s",
    )
    return PreparedData(
        classes=layout.classes,
        train=train_arr,
        val=val_arr,
        preprocessing=Preprocessing(
            image_size, train.channels, tuple(mean), tuple(std), cfg.resize
        ),
        skipped=skipped,
        root=str(layout.root),
        held_back=held_back,
        duplicates=duplicates,
    )


def _shared_images(parts: list[DecodedImages]) -> tuple[tuple[str, ...], ...]:
    """Groups of identical images that lie in more than one of ``parts`` (paths)."""
    groups = identical_rows([part.images for part in parts])
    return tuple(
        tuple(parts[k].paths[row] for k, row in group)
        for group in groups
        if len({k for k, _ in group}) > 1
    )


def _report_shared(groups: tuple[tuple[str, ...], ...], root: Path, strict: bool) -> None:
    """Name identical images across train/, val/ and test/: one warning, or with ``strict``
    an error (a score on them is not a score on unseen images)."""
    if not groups:
        return
    names = [" = ".join(os.path.relpath(p, root) for p in group) for group in groups]
    listed = "; ".join(names[:5]) + (f"; and {len(names) - 5} more" if len(names) > 5 else "")
    what = (
        f"{root}: {len(groups)} group(s) of identical images lie in more than one split ({listed})"
    )
    if strict:
        raise DataError(
            "{what}; {setting} refuses splits that share images", setting="data.strict", what=what
        )
    log.warning("%s: scores on them are not scores on unseen images", what)


SPLIT_CHOICES = ("auto", "all", "train", "val", "test")
PART_NAMES = {"train": "training part", "val": "validation part", "test": "test part"}


@dataclass(frozen=True)
class Selection:
    """Images chosen for an evaluation, and what they are: which folder, which part of it,
    and whether it is the folder the run trained on."""

    images: ImageArray
    root: Path  # absolute
    split: str  # all, train, val or test
    own: bool  # the run's own data folder

    def describe(self) -> str:
        """E.g. ``validation part of /data/shapes`` or ``all of /data/other``."""
        if self.split == "all":
            return f"all of {self.root}" + (" (training images included)" if self.own else "")
        return f"{PART_NAMES[self.split]} of {self.root}"


def select_images(
    path: str | Path,
    split: str,
    classes: tuple[str, ...],
    cfg: DataConfig,
    image_size: int,
    channels: int,
    *,
    split_file: str | Path | None = None,
) -> Selection:
    """Images of ``path`` for evaluation, labelled by a trained model's ``classes``.

    ``cfg`` is the run's data config: ``cfg.path`` names the folder it trained on. There,
    ``auto`` is the validation part and ``train``/``val`` are the parts the run used: as
    ``split_file`` (the run's ``split.csv``) lists them, else drawn again from ``cfg``. For
    any other folder ``auto`` is all of it. ``test`` needs a ``test/`` folder; ``val`` of a
    train/test folder is ``test/``, what training validates on.
    """
    if split not in SPLIT_CHOICES:
        raise DataError(f"unknown split {split!r}, expected {', '.join(SPLIT_CHOICES)}")
    own = bool(cfg.path) and same_folder(path, cfg.path)
    # The run's folder is read under the name the run recorded, so its paths are the very
    # strings of split.csv and its decode cache is the one training filled.
    layout = scan_folder(cfg.path if own else path)
    unknown = sorted(set(layout.classes) - set(classes))
    if unknown:
        raise DataError(
            f"{layout.root}: class {unknown[0]!r} is not one the model knows ({', '.join(classes)})"
        )
    if split == "auto":
        split = "val" if own else "all"
    remap = np.array([classes.index(c) for c in layout.classes], dtype=np.int64)
    if layout.has_split:
        if split == "all":
            parts = [layout.splits[k] for k in ("train", "val", "test") if k in layout.splits]
            files = ImageList(
                tuple(p for part in parts for p in part.paths),
                tuple(lb for part in parts for lb in part.labels),
            )
        else:
            name = held_out_split(layout) if split == "val" else split
            if name not in layout.splits:
                raise DataError(f"{layout.root}: has no {split!r} split (no {split}/ folder)")
            files = layout.splits[name]
        arr = _take(_decode(files, cfg, image_size, channels))
    else:
        if split == "test":
            raise DataError(
                f"{layout.root}: has no 'test' split (it holds one folder per class, "
                "without train/ and test/ folders)"
            )
        decoded = _decode(layout.splits["all"], cfg, image_size, channels)
        if split == "all":
            arr = _take(decoded)
        else:
            listed = read_split_file(split_file).get(split) if own and split_file else None
            if listed is not None:  # the run's own record of its parts
                rows = np.array([i for i, p in enumerate(decoded.paths) if p in listed])
            else:
                groups = [[row for _, row in g] for g in identical_rows([decoded.images])]
                drawn = stratified_split(decoded.labels, cfg.val_split, cfg.seed, groups)
                rows = drawn[0] if split == "train" else drawn[1]
            arr = _take(decoded, rows.astype(np.int64))
    images = ImageArray(arr.images, remap[arr.labels], arr.paths)
    return Selection(images, layout.root, split, own)


def load_split(
    path: str | Path,
    split: str,
    classes: tuple[str, ...],
    cfg: DataConfig,
    image_size: int,
    channels: int,
) -> ImageArray:
    """The images of ``select_images`` (without a split file)."""
    return select_images(path, split, classes, cfg, image_size, channels).images
