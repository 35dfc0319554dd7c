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
from cnnkit.data.folder import FolderLayout, ImageList, scan_folder, stratified_split
from cnnkit.errors import DataError

__all__ = [
    "ImageArray",
    "PreparedData",
    "channel_stats",
    "held_out_split",
    "load_split",
    "prepare_data",
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
    """A data set split for training, with what preprocessing needs to know about it."""

    classes: tuple[str, ...]
    train: ImageArray
    val: ImageArray
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    skipped: int


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
    x = np.asarray(images[idx], dtype=np.float64) / 255.0  # (n, S, S, C)
    mean = x.mean(axis=(0, 1, 2))
    std = np.maximum(x.std(axis=(0, 1, 2)), 1e-3)
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


def _check_classes(classes: tuple[str, ...], labels: np.ndarray, where: str) -> None:
    counts = np.bincount(labels, minlength=len(classes))
    for name, count in zip(classes, counts, strict=True):
        if count == 0:
            raise DataError(f"{where}: class {name!r} has no usable images")


def _decode(files: ImageList, cfg: DataConfig, size: int, channels: str) -> DecodedImages:
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
    """Scan, decode (once, cached) and split the folder at ``cfg.path``."""
    layout = scan_folder(cfg.path)
    channels = str(cfg.channels)
    if layout.has_split:
        train = _decode(layout.splits["train"], cfg, image_size, channels)
        channels = str(train.channels)
        held = held_out_split(layout)
        val = _decode(layout.splits[held], cfg, image_size, channels)
        if len(val) == 0:
            raise DataError(f"{layout.root / held}: no usable images to validate on")
        _check_classes(layout.classes, train.labels, str(layout.root / "train"))
        train_arr, val_arr = _take(train), _take(val)
        skipped = len(train.skipped) + len(val.skipped)
    else:
        everything = _decode(layout.splits["all"], cfg, image_size, channels)
        _check_classes(layout.classes, everything.labels, str(layout.root))
        train_rows, val_rows = stratified_split(everything.labels, cfg.val_split, cfg.seed)
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
        channels=train.channels,
        image_size=image_size,
        mean=tuple(mean),
        std=tuple(std),
        skipped=skipped,
    )


def load_split(
    path: str | Path,
    split: str,
    classes: tuple[str, ...],
    cfg: DataConfig,
    image_size: int,
    channels: int,
) -> ImageArray:
    """Images of ``path`` for evaluation, labelled by a trained model's ``classes``.

    ``split``: ``auto`` takes ``test/`` when the folder has one, else ``val/``, else the whole
    folder; ``all``, ``train``, ``val`` and ``test`` name one explicitly. ``val`` is always
    what training validated on: ``test/`` in a train/test folder, and for a folder without
    its own split, ``train``/``val`` re-draw the training run's split from ``cfg``.
    """
    layout = scan_folder(path)
    unknown = sorted(set(layout.classes) - set(classes))
    if unknown:
        raise DataError(
            f"{layout.root}: class {unknown[0]!r} is not one the model knows ({', '.join(classes)})"
        )
    remap = np.array([classes.index(c) for c in layout.classes], dtype=np.int64)
    if layout.has_split:
        if split == "auto":
            split = "test" if "test" in layout.splits else "val"
        elif split == "val":  # what training validated on: val/, else test/
            split = held_out_split(layout)
        if split == "all":
            parts = [layout.splits[k] for k in ("train", "val", "test") if k in layout.splits]
            files = ImageList(
                tuple(p for part in parts for p in part.paths),
                tuple(lb for part in parts for lb in part.labels),
            )
        elif split in layout.splits:
            files = layout.splits[split]
        else:
            raise DataError(f"{layout.root}: has no {split!r} split")
        arr = _take(_decode(files, cfg, image_size, str(channels)))
    else:
        decoded = _decode(layout.splits["all"], cfg, image_size, str(channels))
        if split in ("auto", "all", "test"):
            arr = _take(decoded)
        elif split in ("train", "val"):
            tr, va = stratified_split(decoded.labels, cfg.val_split, cfg.seed)
            arr = _take(decoded, tr if split == "train" else va)
        else:
            raise DataError(f"unknown split {split!r}, expected auto, all, train, val or test")
    return ImageArray(arr.images, remap[arr.labels], arr.paths)
