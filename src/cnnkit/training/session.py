"""What a training session needs around the loop: its run directory, its progress bar and
its stop signals (SIGINT/SIGTERM end it at the next step, with a checkpoint)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cnnkit.console import console
from cnnkit.errors import RunDirError

__all__ = ["prepare_run_dir", "progress_bar", "stop_on_signals"]


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
