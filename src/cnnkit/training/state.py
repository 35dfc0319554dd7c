"""Training checkpoints: written atomically, verified on load, resumed exactly.

``RUN_DIR/checkpoints/ckpt-<seq>/`` holds ``model.safetensors`` (weights), ``state.pt``
(optimizer, scheduler, RNG states, counters: only tensors and plain values, loadable with
``torch.load(weights_only=True)``) and ``manifest.json`` (sizes and SHA-256 of both, written
last). A checkpoint is built in a temporary folder, fsynced and renamed into place; the
previous one is deleted only after the new one is complete. Loading checks the manifest and
falls back to the previous checkpoint when the newest is damaged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import signal
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cnnkit.errors import CheckpointError

__all__ = [
    "Progress",
    "find_checkpoint",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

log = logging.getLogger("cnnkit")
FOLDER = "checkpoints"
KEEP = 2  # the newest and the one before it


@dataclass
class Progress:
    """Where training stands; everything needed to continue bit for bit."""

    epoch: int = 0  # completed epochs
    step: int = 0  # completed steps of the current epoch
    loss_sum: float = 0.0  # running sums of the current epoch
    correct: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_acc: float = -1.0
    best_loss: float = float("inf")
    best_epoch: int = 0
    stale: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0
    elapsed: float = 0.0  # wall seconds of earlier sessions of this run
    seconds_to_target: float | None = None
    finished: bool = False  # stopped early (target accuracy or patience)
    stopped: str = "epochs"  # why training ended: epochs, target_accuracy or patience


def rng_state() -> dict[str, Any]:
    """The torch, numpy and Python random states, as tensors and plain values."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [list(v) if isinstance(v, tuple) else v for v in random.getstate()],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fault(point: str) -> None:
    """Test hook: ``CNNKIT_FAULT=<point>:<n>`` kills this process the n-th time it passes."""
    spec = os.environ.get("CNNKIT_FAULT", "")
    name, _, count = spec.partition(":")
    if name != point:
        return
    left = int(count or "1") - 1
    os.environ["CNNKIT_FAULT"] = f"{name}:{left}"
    if left <= 0:
        os.kill(os.getpid(), signal.SIGKILL)


def _sequence(path: Path) -> int:
    try:
        return int(path.name.split("-")[1])
    except (IndexError, ValueError):
        return -1


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete-looking checkpoint folders, newest first."""
    folder = run_dir / FOLDER
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("ckpt-")]
    return sorted(found, key=_sequence, reverse=True)


def save_checkpoint(run_dir: Path, model: torch.nn.Module, state: dict[str, Any]) -> Path:
    """Write a new checkpoint and prune all but the newest ``KEEP``; returns its folder."""
    folder = run_dir / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    existing = list_checkpoints(run_dir)
    seq = (_sequence(existing[0]) + 1) if existing else 1
    final = folder / f"ckpt-{seq:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder))
    try:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        _fault("checkpoint-write")
        torch.save(state, tmp / "state.pt")
        manifest = {
            name: {"bytes": (tmp / name).stat().st_size, "sha256": _digest(tmp / name)}
            for name in ("model.safetensors", "state.pt")
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        for name in ("model.safetensors", "state.pt", "manifest.json"):
            _fsync(tmp / name)
        os.replace(tmp, final)
        _fsync(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _verify(folder: Path) -> None:
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder}: incomplete (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        raise CheckpointError(f"{manifest_path}: damaged (not valid JSON)") from None
    for name in ("model.safetensors", "state.pt"):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        size = path.stat().st_size
        if size == 0:
            raise CheckpointError(f"{path}: empty (0 bytes)")
        want = manifest.get(name, {})
        if size != want.get("bytes"):
            raise CheckpointError(f"{path}: truncated ({size} bytes, expected {want.get('bytes')})")
        if _digest(path) != want.get("sha256"):
            raise CheckpointError(f"{path}: corrupted (checksum mismatch)")


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, state) of one checkpoint folder; raises ``CheckpointError`` if damaged."""
    _verify(folder)
    try:
        weights = load_file(str(folder / "model.safetensors"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / 'model.safetensors'}: unreadable ({exc})") from None
    try:
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{folder / 'state.pt'}: refused or unreadable ({first[:200]})"
        ) from None
    return weights, state


def find_checkpoint(run_dir: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
    """The newest good checkpoint, skipping damaged ones with a warning naming each."""
    for leftover in (run_dir / FOLDER).glob(".tmp-*"):  # a write that was cut short
        shutil.rmtree(leftover, ignore_errors=True)
    candidates = list_checkpoints(run_dir)
    if not candidates:
        raise CheckpointError(
            f"{run_dir}: no checkpoint to resume from (looked in {run_dir / FOLDER})"
        )
    reasons = []
    for folder in candidates:
        try:
            weights, state = load_checkpoint(folder)
        except CheckpointError as exc:
            log.warning("%s; trying the previous checkpoint", exc)
            reasons.append(str(exc))
            continue
        return folder, weights, state
    raise CheckpointError(f"{run_dir}: no usable checkpoint ({'; '.join(reasons)})")


def progress_to_state(progress: Progress) -> dict[str, Any]:
    data = asdict(progress)
    data["history"] = [dict(row) for row in progress.history]
    return data


def progress_from_state(data: dict[str, Any]) -> Progress:
    return Progress(**data)
