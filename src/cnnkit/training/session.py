"""What a training session needs around the loop: its run directory (locked, with a record of
what it writes), its progress bar (an HTML one in a Jupyter notebook), its clock and running
figures, its stop signals (SIGINT/SIGTERM end it at the next step, with a checkpoint) and the
type of its end-of-epoch hook."""

from __future__ import annotations

import errno
import logging
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit.console import console, in_notebook
from cnnkit.data.dataset import PreparedData
from cnnkit.errors import RunDirError
from cnnkit.files import (
    LOCK,
    MANIFEST,
    OwnerLock,
    list_names,
    record,
    remove_owned,
    survey,
    temporary_names,
)
from cnnkit.training.progress import Position, Progress

__all__ = [
    "RUN_OUTPUTS",
    "Clock",
    "EpochBar",
    "EpochHook",
    "Meter",
    "claim_run_dir",
    "progress_bar",
    "stop_on_signals",
]

log = logging.getLogger("cnnkit")

# Called at the end of each epoch with the metrics row, the evaluated model and the data; it
# runs on the training thread, so it must hand the work over and return quickly.
EpochHook = Callable[[dict[str, Any], nn.Module, PreparedData], None]


# What a training run writes into its run directory, recorded before it writes them (so a
# run killed at any moment leaves only recorded files): its files, the checkpoint folders
# that training/checkpoints.py names as it goes (complete, moved aside, half-written) and the
# temporary files of atomic writes.
RUN_OUTPUTS = (
    "config.yaml",
    "model.safetensors",
    "model.json",
    "metrics.csv",
    "summary.json",
    "curves.png",
    "split.csv",
)
RUN_FAMILIES = (
    "checkpoints/ckpt-*/",
    "checkpoints/damaged-ckpt-*/",
    "checkpoints/.tmp-*/",
    "evaluations/",  # cnnkit evaluate's results, one folder per data set and split
    *(temporary_names(name) for name in RUN_OUTPUTS),  # left by a kill during a write
)


@contextmanager
def claim_run_dir(out: Path, overwrite: bool, resume: bool) -> Iterator[None]:
    """Hold the run directory ``out`` for one training run, from its checks to its end.

    The run locks ``RUN_DIR/.cnnkit-lock`` (a second run into the same folder is refused,
    naming the owner; the lock dies with its process, so a killed run never blocks a resume)
    and records what it writes in ``RUN_DIR/.cnnkit-manifest``. ``overwrite`` removes exactly
    what an earlier run recorded, checkpoints included, and refuses a folder holding anything
    else. A run that fails before writing anything leaves no folder it created behind.
    """
    if out.exists() and not out.is_dir():
        raise RunDirError("{setting} {path} exists and is not a folder", setting="out", path=out)
    if resume and not (out / "config.yaml").is_file():
        raise RunDirError(f"cannot resume: {out} is not a run directory (no config.yaml)")
    created = not out.exists()
    lock = OwnerLock(out / LOCK)
    try:
        out.mkdir(parents=True, exist_ok=True)
        locked = lock.acquire()
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise RunDirError(f"cannot write to run directory {out}: {exc.strerror}") from None
        log.warning("cannot lock %s (%s): a second run into it would not be stopped", out, exc)
        locked = True
    if not locked:
        raise RunDirError(
            "{path} is in use by another training run ({owner}); wait for it to finish or "
            "choose another {setting}",
            setting="out",
            path=out,
            owner=lock.owner(),
        )
    try:
        if not resume:
            _clear(out, overwrite)
        try:
            record(out, RUN_OUTPUTS, RUN_FAMILIES)
        except OSError as exc:
            raise RunDirError(f"cannot write to run directory {out}: {exc.strerror}") from None
        yield
    except BaseException:
        if created:
            _remove_if_unused(out, lock)
        raise
    finally:
        lock.release()


def _remove_if_unused(out: Path, lock: OwnerLock) -> None:
    """Remove the run directory a failed run created, if it wrote nothing into it."""
    try:
        contents = survey(out)
        if not contents.owned and not contents.foreign:
            (out / MANIFEST).unlink(missing_ok=True)
            lock.release()
            out.rmdir()
    except OSError:  # something is there after all: leave it
        return


def _clear(out: Path, overwrite: bool) -> None:
    """Empty ``out`` for a new run: only of what cnnkit recorded writing, only with
    ``overwrite``."""
    try:
        contents = survey(out)
    except OSError as exc:
        raise RunDirError(f"cannot read run directory {out}: {exc.strerror}") from None
    if not contents.owned and not contents.foreign:
        return
    if not overwrite:
        raise RunDirError(
            "{setting} {path} already holds files; choose a new folder, pass "
            "{overwrite=True}, or {resume=True} to continue it",
            setting="out",
            path=out,
        )
    if contents.foreign:
        why = "" if contents.has_manifest else f" (no {MANIFEST}: cnnkit wrote nothing there)"
        raise RunDirError(
            "{setting} {path} holds files cnnkit did not write: {names}{why}; move them "
            "away or choose another {setting}",
            setting="out",
            path=out,
            names=list_names(contents.foreign),
            why=why,
        )
    try:
        remove_owned(contents)
        (out / MANIFEST).unlink(missing_ok=True)
    except OSError as exc:
        raise RunDirError(
            "{setting}: cannot empty {path}: {why}", setting="overwrite", path=out, why=exc.strerror
        ) from None


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


class Clock:
    """Where a run's time goes (``Progress.timing``), accounted at one point: ``settle``.

    ``timing.elapsed`` is the wall time of the whole run over all its sessions (setup,
    steps, validation, checkpoints); ``train_seconds`` and ``images_seen`` the time in
    training steps and the images they took (the run's img/s). Between settles the clock
    only notes when the steps run (``start_epoch`` to ``end_steps``: validation is not
    training time). ``settle`` moves what passed since the last one into ``timing``; the
    checkpoint save calls it, and nothing else, so a checkpoint holds the time up to itself.
    Every epoch ends with a checkpoint, so after the epochs only the wall time since the
    last one is unsettled: ``total`` adds it."""

    def __init__(self, p: Progress, started: float, global_batch: int) -> None:
        self.p, self.batch = p, global_batch
        self.wall = started  # the wall time before this is in timing.elapsed
        self.steps_from: float | None = None  # steps running since then, not yet noted
        self.first_step = self.epoch_first = 0
        self.step_seconds, self.step_images = 0.0, 0  # steps noted, not yet settled
        self.epoch_started = time.perf_counter()

    def start_epoch(self, step: int) -> None:
        self.epoch_started = self.steps_from = time.perf_counter()
        self.first_step = self.epoch_first = step

    def _note_steps(self, now: float) -> None:
        if self.steps_from is not None:
            step = self.p.position.step
            self.step_seconds += now - self.steps_from
            self.step_images += (step - self.first_step) * self.batch
            self.steps_from, self.first_step = now, step

    def end_steps(self) -> None:
        """The epoch's steps are done (or cut short by a signal)."""
        self._note_steps(time.perf_counter())
        self.steps_from = None

    def settle(self) -> None:
        now = time.perf_counter()
        self._note_steps(now)
        timing = self.p.timing
        timing.train_seconds += self.step_seconds
        timing.images_seen += self.step_images
        timing.elapsed += now - self.wall
        self.step_seconds, self.step_images, self.wall = 0.0, 0, now

    def total(self) -> float:
        """Wall seconds of the run so far, all sessions."""
        return self.p.timing.elapsed + time.perf_counter() - self.wall

    def epoch_seconds(self) -> float:
        return time.perf_counter() - self.epoch_started

    def rate(self) -> float:
        """Images a second of this epoch's steps in this session."""
        seconds = time.perf_counter() - self.epoch_started
        step = self.p.position.step
        return (step - self.epoch_first) * self.batch / seconds if seconds > 0 else 0.0


class Meter:
    """The epoch's running loss and accuracy sums, kept on the device and read only when
    shown or saved (reading them waits for the device)."""

    def __init__(self, position: Position, device: torch.device) -> None:
        self.loss_sum = torch.tensor(position.loss_sum, dtype=torch.float64, device=device)
        self.correct = torch.tensor(position.correct, dtype=torch.int64, device=device)
        self.batch = 1  # this rank's batch

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += loss.detach().double() * len(labels)
        self.correct += (logits.argmax(1) == labels).sum()
        self.batch = len(labels)

    def keep(self, position: Position) -> None:
        """Into ``position``, for a checkpoint in the middle of the epoch."""
        position.loss_sum, position.correct = self.loss_sum.item(), int(self.correct.item())

    def sums(self) -> torch.Tensor:
        return torch.stack([self.loss_sum, self.correct.double()]).cpu()


class EpochBar:
    """The progress bar of an epoch's steps (loss, accuracy, img/s), redrawn at most four
    times a second; ``enabled`` false: nothing is shown and nothing is read."""

    def __init__(self, enabled: bool, steps: int) -> None:
        self.enabled, self.steps, self.shown = enabled, steps, 0.0
        self.bar = progress_bar(enabled)

    def __enter__(self) -> EpochBar:
        self.bar.__enter__()
        self.task = self.bar.add_task(
            "train", total=self.steps, epoch="", loss="-", acc="-", speed=""
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def start(self, epoch: int, epochs: int, step: int, phase: str) -> None:
        label = f"{epoch}/{epochs}" + (f" {phase}" if phase else "")
        self.bar.reset(
            self.task, total=self.steps, completed=step, epoch=label, loss="-", acc="-", speed=""
        )
        self.shown = time.perf_counter()

    def show(self, step: int, meter: Meter, clock: Clock) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.shown <= 0.25 and step != self.steps):
            return
        seen = step * meter.batch
        self.bar.update(
            self.task,
            completed=step,
            loss=f"{meter.loss_sum.item() / seen:.4f}",
            acc=f"{meter.correct.item() / seen:.1%}",
            speed=f"{clock.rate():,.0f} img/s",
        )
        self.shown = now
