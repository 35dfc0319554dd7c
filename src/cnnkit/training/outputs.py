"""What a training run writes besides the model: metrics, summary, curves, fingerprint."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import itertools
import json
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnkit.config import RunConfig, channel_count
from cnnkit.data.dataset import PreparedData
from cnnkit.data.folder import SPLIT_COLUMNS, SPLIT_FILE
from cnnkit.errors import ConfigError
from cnnkit.files import atomic_write, list_names
from cnnkit.model_io import ModelMeta
from cnnkit.plots import plot_curves

__all__ = [
    "METRIC_FIELDS",
    "TrainResult",
    "describe_changes",
    "fingerprint",
    "stop_message",
    "write_outputs",
    "write_split_csv",
]

METRIC_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")
# Settings that may change between a run and its resume without changing what it computes.
RESUMABLE = {
    "train.epochs",
    "train.patience",
    "train.target_accuracy",
    "train.threads",
    "data.cache_dir",
}


@dataclass
class TrainResult:
    """What a finished run achieved; also written to ``RUN_DIR/summary.json``."""

    run_dir: Path
    best_val_acc: float
    final_val_acc: float
    best_epoch: int
    epochs_run: int
    wall_seconds: float
    images_per_second: float
    seconds_to_target: float | None
    stopped_because: str
    precision: str
    device: str
    world_size: int = 1
    threads: int = 1  # torch's CPU threads (intra-op) during training
    history: list[dict[str, float]] = field(default_factory=list)
    # The decoded data the run used, kept for the evaluation and report that follow it in
    # the same process (not written anywhere).
    data: PreparedData | None = field(default=None, repr=False, compare=False)
    # Validation logits (N, classes) of the saved weights, when this session computed them.
    val_logits: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # The saved (best) weights' network and metadata, still in memory when the network that
    # trained holds them (a single process whose last epoch was its best); else None and
    # the run directory has them.
    model: torch.nn.Module | None = field(default=None, repr=False, compare=False)
    meta: ModelMeta | None = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        return (
            f"TrainResult({self.run_dir}: best validation accuracy {100 * self.best_val_acc:.2f}% "
            f"at epoch {self.best_epoch} of {self.epochs_run}, {self.wall_seconds:.1f}s, "
            f"{self.images_per_second:,.0f} img/s, {self.precision} on {self.device})"
        )

    def _repr_html_(self) -> str:
        from cnnkit.inspection.html import fragment, picture, table

        facts = [(k, v) for k, v in self.summary().items() if v is not None]
        curves = Path(self.run_dir) / "curves.png"
        drawn = picture(curves.read_bytes(), "curves", 560) if curves.is_file() else ""
        return fragment(
            f"Training run {self.run_dir}", f"<div class='row'>{table(None, facts)}{drawn}</div>"
        )

    def summary(self) -> dict[str, object]:
        return {
            "best_val_acc": self.best_val_acc,
            "final_val_acc": self.final_val_acc,
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "wall_seconds": round(self.wall_seconds, 3),
            "images_per_second": round(self.images_per_second, 1),
            "seconds_to_target": None
            if self.seconds_to_target is None
            else round(self.seconds_to_target, 3),
            "stopped_because": self.stopped_because,
            "precision": self.precision,
            "device": self.device,
            "world_size": self.world_size,
            "threads": self.threads,
        }


def stop_message(stopped: str, best_acc: float, patience: int | None) -> str:
    """Why a run ended before its last epoch, in words ('' when it ran them all)."""
    if stopped == "target_accuracy":
        return "stopped early: reached the target accuracy"
    if stopped != "patience":
        return ""
    if best_acc == 1.0:
        why = f"validation accuracy was 100% and stayed there for {patience} more epochs"
    else:
        why = f"no better validation accuracy (or loss at the same accuracy) for {patience} epochs"
    return f"stopped early: {why} (patience {patience}; --patience 0 runs every epoch)"


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = value


def _stamps(paths: Sequence[str]) -> torch.Tensor:
    """A 32-bit checksum of each file's size and modification time, the stamps the decode
    cache is keyed on: (N,) int32, 4 bytes a file, so a checkpoint can name changed files."""
    sums = np.empty(len(paths), dtype=np.uint32)
    for i, path in enumerate(paths):
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}|{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        sums[i] = zlib.crc32(stamp.encode())
    return torch.from_numpy(sums.view(np.int32))


def fingerprint(config: RunConfig, data: PreparedData) -> dict[str, Any]:
    """What a resume must find unchanged: the settings, the exact images and labels, and
    each image file's size and modification time."""
    digest = hashlib.sha256()
    for part in (data.train, data.val):
        for path, label in zip(part.paths, part.labels.tolist(), strict=True):
            digest.update(f"{path}|{label}\n".encode("utf-8", "surrogateescape"))
    settings: dict[str, Any] = {}
    _flat("", config.to_dict(), settings)
    return {
        "data": digest.hexdigest(),
        "classes": list(data.classes),
        "images": [len(data.train), len(data.val)],
        "settings": settings,
        # by path, not by split: a replaced file can change a duplicate-aware split, and it
        # is the file, not the split, that a resume must name
        "stamps": _stamps(sorted([*data.train.paths, *data.val.paths])),
    }


def _changed_files(old: Any, new: Any) -> list[int] | None:
    """Positions whose stamps differ (None when there are none, or nothing to compare)."""
    if not (isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor)):
        return None
    if old.shape != new.shape:
        return None
    changed = (old != new).nonzero().flatten().tolist()
    return changed or None


def describe_changes(
    old: dict[str, Any], new: dict[str, Any], paths: Sequence[str] = ()
) -> list[str]:
    """Human-readable differences between two fingerprints that forbid an exact resume.

    ``paths`` are the images of ``new`` sorted by path (as ``fingerprint`` stamps them), to
    name the files whose contents changed; changed files are named before a changed split,
    which they may have caused. A fingerprint from before cnnkit kept file stamps (no
    ``stamps``) is compared on paths and labels only.
    """
    changes = []
    if old.get("classes") != new.get("classes"):
        changes.append(f"classes changed from {old.get('classes')} to {new.get('classes')}")
    if (changed := _changed_files(old.get("stamps"), new.get("stamps"))) is not None:
        names = [str(paths[i]) for i in changed if i < len(paths)]
        changes.append(
            f"{len(changed)} image file(s) changed since the run started (size or "
            f"modification time): {list_names(names, 3)}"
        )
    elif old.get("data") != new.get("data"):
        before, after = old.get("images", ["?", "?"]), new.get("images", ["?", "?"])
        changes.append(
            f"data changed (training/validation images {before[0]}/{before[1]} "
            f"-> {after[0]}/{after[1]}, or files were replaced)"
        )
    a, b = old.get("settings", {}), new.get("settings", {})
    defaults: dict[str, Any] = {}  # a setting added since the run started had its default
    _flat("", RunConfig().to_dict(), defaults)
    for key in sorted(set(a) | set(b)):
        before, after = _canonical(key, a.get(key, defaults.get(key))), _canonical(key, b.get(key))
        if key not in RESUMABLE and before != after:
            changes.append(f"{key} changed from {_shown(key, before)!r} to {_shown(key, after)!r}")
    return changes


def _canonical(key: str, value: Any) -> Any:
    """A setting as this version of cnnkit writes it (runs started before channels were
    numbers recorded ``"3"``)."""
    if key == "data.channels":
        with contextlib.suppress(ConfigError):
            return channel_count(value)
    return value


def _shown(key: str, value: Any) -> Any:
    return ("auto" if value is None else str(value)) if key == "data.channels" else value


def check_resumable(
    old: dict[str, Any], new: dict[str, Any], force: bool, data: PreparedData | None = None
) -> None:
    """Refuse to resume a run whose data or settings changed, unless ``force``."""
    paths = sorted([*data.train.paths, *data.val.paths]) if data is not None else []
    changes = describe_changes(old, new, paths)
    if changes and not force:
        raise ConfigError(
            "cannot resume: {changes} (pass {force=True} to resume anyway)",
            setting="resume",
            changes="; ".join(changes),
        )


def write_outputs(out: Path, result: TrainResult) -> None:
    """metrics.csv, summary.json and curves.png, each written atomically."""

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            writer.writeheader()
            for row in result.history:
                writer.writerow(
                    {
                        k: (round(v, 6) if isinstance(v, float) else v)
                        for k, v in row.items()
                        if k in METRIC_FIELDS
                    }
                )

    atomic_write(out / "metrics.csv", write_csv)
    atomic_write(
        out / "summary.json", lambda p: p.write_text(json.dumps(result.summary(), indent=2))
    )
    if result.history:
        atomic_write(out / "curves.png", lambda p: plot_curves(result.history, p))


def write_split_csv(out: Path, data: PreparedData) -> Path:
    """``RUN_DIR/split.csv``: ``path,label,split`` of every image the run trained on
    (``train``), validated on (``val``) and, for a given test/ it did not validate on, held
    back (``test``); absolute paths, so anyone can check that no image is on two sides. A
    file name that is not UTF-8 is written as its own bytes, so the path still finds it."""
    parts = [
        ("train", data.train.paths, data.train.labels),
        ("val", data.val.paths, data.val.labels),
    ]
    if data.held_back is not None:
        parts.append(("test", data.held_back.paths, data.held_back.labels))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            writer = csv.writer(f)
            writer.writerow(SPLIT_COLUMNS)
            for split, paths, labels in parts:  # one C-level call per part: 80,000 rows ~0.1 s
                names = [data.classes[i] for i in np.asarray(labels).tolist()]
                writer.writerows(zip(paths, names, itertools.repeat(split), strict=False))

    atomic_write(out / SPLIT_FILE, write)
    return out / SPLIT_FILE
