"""What a training session needs around the loop: its run directory, its progress bar (an
HTML one in a Jupyter notebook), its stop signals (SIGINT/SIGTERM end it at the next step,
with a checkpoint) and the type of its end-of-epoch hook."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from cnnkit.console import console, in_notebook
from cnnkit.data.dataset import PreparedData
from cnnkit.errors import RunDirError

__all__ = ["EpochHook", "prepare_run_dir", "progress_bar", "stop_on_signals"]

# Called at the end of each epoch with the metrics row, the evaluated model and the data; it
# runs on the training thread, so it must hand the work over and return quickly.
EpochHook = Callable[[dict[str, Any], nn.Module, PreparedData], None]


def prepare_run_dir(out: Path, overwrite: bool, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} exists and is not a folder")
    if resume:
        if not (out / "config.yaml").is_file():
            raise RunDirError(f"cannot resume: {out} is not a run directory (no config.yaml)")
        return
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RunDirError(
            f"--out {out} already holds files; choose a new folder, pass "
            "--overwrite, or --resume it"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".cnnkit-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(f"cannot write to run directory {out}: {exc.strerror}") from None


def progress_bar(enabled: bool) -> Any:
    """rich's bar in a terminal; in a Jupyter notebook an HTML one that needs no widgets."""
    if enabled and in_notebook():
        from cnnkit.training.notebook import NotebookProgress

        return NotebookProgress()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}  {task.fields[speed]}"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not enabled,
    )


@contextmanager
def stop_on_signals() -> Iterator[list[int]]:
    """SIGINT/SIGTERM set a flag the loop checks after each step (then saves and stops)."""
    caught: list[int] = []
    previous = {}

    def handler(signum: int, _frame: object) -> None:
        caught.append(signum)

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: signals stay with the caller
        previous = {}
    try:
        yield caught
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
