"""Training checkpoints: written atomically, verified on load, resumed exactly.

``RUN_DIR/checkpoints/ckpt-<seq>/`` holds ``model.safetensors`` (weights), ``state.pt``
(optimizer, scheduler, RNG states, counters: only tensors and plain values, loadable with
``torch.load(weights_only=True)``) and ``manifest.json`` (sizes and SHA-256 of both, written
last). A checkpoint is built in a temporary folder, fsynced and renamed into place; the
previous one is deleted only after the new one is complete. Loading checks the manifest and
falls back to the previous checkpoint when the newest is damaged; the damaged one is then moved
aside to ``damaged-ckpt-<seq>`` (kept for inspection, never counted among the newest two).

There is no gradient scaler to save: cnnkit's mixed precision is bf16 autocast, and bf16 has
fp32's exponent range, so gradients cannot underflow the way fp16 ones do and no loss scaling
(``torch.amp.GradScaler``) is needed. Nothing here loads code: weights are safetensors and the
state is read with ``weights_only=True``, which refuses any pickle that names a callable.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from cnnkit.errors import CheckpointError, RunDirError, first_line
from cnnkit.files import replace_folder
from cnnkit.training.checkpoint_checks import state_problem

__all__ = [
    "find_checkpoint",
    "load_checkpoint",
    "load_weights",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

log = logging.getLogger("cnnkit")
FOLDER = "checkpoints"
KEEP = 2  # the newest and the one before it
FILES = ("model.safetensors", "state.pt")
STATE_KEYS = ("progress", "optimizer", "scheduler", "total_steps", "rng", "fingerprint")
OPTIONAL_KEYS = ("ema",)
MAX_MANIFEST_BYTES = 64 << 10  # two entries of a size and a checksum: about 200 bytes


def rng_state() -> dict[str, Any]:
    """The torch (CPU and, once used, CUDA), numpy and Python random states.

    Tensors and plain values only, so ``weights_only=True`` loads them. Dropout and
    augmentation on a GPU draw from the CUDA generators, hence those are kept too.
    """
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [list(v) if isinstance(v, tuple) else v for v in random.getstate()],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    elif cuda:
        log.warning(
            "the checkpoint holds the random state of %d GPU(s), this machine has %d: "
            "GPU randomness (dropout, augmentation) continues from a different stream",
            len(cuda),
            torch.cuda.device_count() if torch.cuda.is_available() else 0,
        )


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _write_file(path: Path, data: bytes) -> None:
    """One file of a checkpoint being built (``replace_folder`` syncs them all). A crash
    between two of them leaves a folder without a manifest, which loading never trusts."""
    path.write_bytes(data)


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
    """Write a new checkpoint and prune all but the newest ``KEEP``; returns its folder.

    Both files are serialised in memory and written with plain file writes, so a full disk or
    an unwritable folder surfaces as one ``RunDirError`` (not a serialiser's internal error);
    the temporary folder is removed and the previous checkpoints stay as they were.
    """
    folder = run_dir / FOLDER
    try:
        folder.mkdir(parents=True, exist_ok=True)
        existing = list_checkpoints(run_dir)
        seq = (_sequence(existing[0]) + 1) if existing else 1
        final = folder / f"ckpt-{seq:06d}"
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder))
    except OSError as exc:
        raise RunDirError(f"cannot write a checkpoint in {folder}: {_why(exc)}") from None
    try:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        blobs = {"model.safetensors": safetensors_bytes(weights), "state.pt": buffer.getvalue()}
        manifest = {
            name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in blobs.items()
        }
        blobs["manifest.json"] = json.dumps(manifest).encode()
        for name, data in blobs.items():  # in this order: the manifest last
            _write_file(tmp / name, data)
        replace_folder(tmp, final)  # the three files on disk before the folder gets its name
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunDirError(
            f"cannot write checkpoint {final}: {_why(exc)} (earlier checkpoints are kept)"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in folder.glob(".tmp-*"):  # writes cut short by a kill of an earlier session
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def _verify(folder: Path) -> None:
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder}: incomplete (no manifest.json)")
    try:
        if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
            raise CheckpointError(f"{manifest_path}: damaged (over {MAX_MANIFEST_BYTES:,} bytes)")
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: nested too deeply
        raise CheckpointError(f"{manifest_path}: damaged (not valid JSON)") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{manifest_path}: damaged (not a JSON object)")
    for name in FILES:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        size = path.stat().st_size
        if size == 0:
            raise CheckpointError(f"{path}: empty (0 bytes)")
        want = manifest.get(name)
        if not isinstance(want, dict):
            raise CheckpointError(f"{manifest_path}: damaged (no entry for {name})")
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
        raise CheckpointError(
            f"{folder / 'state.pt'}: refused or unreadable ({first_line(exc, 200)})"
        ) from None
    why = state_problem(state, STATE_KEYS, OPTIONAL_KEYS)
    if why:
        raise CheckpointError(f"{folder / 'state.pt'}: not a training state ({why})")
    return weights, state


def find_checkpoint(run_dir: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
    """The newest good checkpoint, skipping damaged ones with a warning naming each.

    Damaged checkpoints newer than the good one are moved aside (``damaged-ckpt-<seq>``) so
    that the next saves never prune a good checkpoint while keeping a damaged one. When none
    is usable, nothing is moved and the error lists every checkpoint with its reason.
    """
    for leftover in (run_dir / FOLDER).glob(".tmp-*"):  # a write that was cut short
        shutil.rmtree(leftover, ignore_errors=True)
    candidates = list_checkpoints(run_dir)
    if not candidates:
        raise CheckpointError(
            f"{run_dir}: no checkpoint to resume from (looked in {run_dir / FOLDER})"
        )
    reasons, damaged = [], []
    for folder in candidates:
        try:
            weights, state = load_checkpoint(folder)
        except CheckpointError as exc:
            log.warning("%s; trying the previous checkpoint", exc)
            reasons.append(str(exc))
            damaged.append(folder)
            continue
        for bad in damaged:
            aside = _move_aside(bad)
            if aside is not None:
                log.info("moved the damaged checkpoint %s to %s", bad.name, aside.name)
        return folder, weights, state
    raise CheckpointError(f"{run_dir}: no usable checkpoint ({'; '.join(reasons)})")


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], folder: Path) -> None:
    """Put a checkpoint's weights into ``model``; a model that changed shape is a clear error.

    Only reachable with ``--force``: the fingerprint check refuses changed settings before.
    """
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        why = lines[1] if len(lines) > 1 else lines[0]
        raise CheckpointError(
            f"{folder}: the checkpoint's weights do not fit the model of this config ({why}); "
            "resume with the settings the run was started with"
        ) from None


def _move_aside(folder: Path) -> Path | None:
    """Rename a damaged checkpoint so that pruning never keeps it in place of a good one."""
    for n in range(100):
        aside = folder.with_name(f"damaged-{folder.name}" + (f"-{n}" if n else ""))
        if not aside.exists():
            try:
                folder.rename(aside)
            except OSError:
                return None
            return aside
    return None
