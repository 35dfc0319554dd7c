"""Where a training run stands: what a checkpoint holds to continue it bit for bit, and the
rules that judge each epoch (is it the best so far, should the run stop).

``Progress`` groups the facts by who changes them: the step loop moves the ``Position``, the
epoch's end replaces ``Best`` and sets ``stopped``, only ``Clock.settle`` (``session``) adds
to ``Timing``, and ``history`` gains one row per epoch. A checkpoint stores it as nested
plain values (``progress_to_state``); checkpoints written before the groups hold one flat
dict of fifteen fields (``FlatProgress``), which ``progress_from_state`` still reads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from cnnkit.config import TrainConfig

__all__ = [
    "Best",
    "FlatProgress",
    "Position",
    "Progress",
    "Timing",
    "progress_from_state",
    "progress_to_state",
    "stop_reason",
]


@dataclass
class Position:
    """Completed epochs, completed steps of the next one and its running sums (all zero
    after an epoch's end: a checkpoint in the middle of an epoch holds them)."""

    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0  # this rank's summed training loss over the steps so far
    correct: int = 0  # and its correct predictions


@dataclass(frozen=True)
class Best:
    """The best epoch so far (its weights are the run's model) and the epochs since that
    spent patience without beating it."""

    epoch: int = 0
    acc: float = -1.0
    loss: float = math.inf
    stale: int = 0

    def judge(self, epoch: int, val_acc: float, val_loss: float, *, head_only: bool) -> Best:
        """The record after ``epoch``: that epoch when it is the best so far (a higher
        validation accuracy, or the same with a lower loss; with no validation images, the
        latest), else one more stale epoch. At 100% a lower loss still keeps the better
        weights but is no reason to go on training, so patience keeps counting. A head epoch
        (``phases``) spends no patience: patience judges the epochs that train the whole
        network."""
        perfect = val_acc == 1.0 and self.acc == 1.0
        better = (
            math.isnan(val_acc)
            or val_acc > self.acc
            or (val_acc == self.acc and val_loss < self.loss)
        )
        stale = 0 if head_only else (self.stale + 1 if perfect or not better else 0)
        if better:
            return Best(epoch, val_acc, val_loss, stale)
        return replace(self, stale=stale)


def stop_reason(cfg: TrainConfig, val_acc: float, best: Best) -> str:
    """Why the run stops after an epoch of ``val_acc``: ``target_accuracy`` once reached,
    ``patience`` when the best has gone ``cfg.patience`` epochs unbeaten, else ``epochs``
    (it goes on, to the last of them)."""
    if cfg.target_accuracy is not None and val_acc >= cfg.target_accuracy:
        return "target_accuracy"
    if cfg.patience and best.stale >= cfg.patience:
        return "patience"
    return "epochs"


@dataclass
class Timing:
    """Where the run's time went, over all its sessions (``Clock`` adds to it)."""

    elapsed: float = 0.0  # wall seconds: setup, steps, validation, checkpoints
    train_seconds: float = 0.0  # in training steps
    images_seen: int = 0  # by those steps

    @property
    def images_per_second(self) -> float:
        """Of the training steps (0 before the first)."""
        return self.images_seen / self.train_seconds if self.train_seconds else 0.0


@dataclass
class Progress:
    """Where training stands: everything a checkpoint needs to continue bit for bit."""

    position: Position = field(default_factory=Position)
    best: Best = field(default_factory=Best)
    timing: Timing = field(default_factory=Timing)
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch
    stopped: str = "epochs"  # why training ends: "epochs" (all of them) or stop_reason's
    seconds_to_target: float | None = None  # run time when the target accuracy was reached

    @property
    def finished(self) -> bool:
        """Stopped before its last epoch (target accuracy or patience)."""
        return self.stopped != "epochs"


@dataclass(frozen=True)
class FlatProgress:
    """The progress of checkpoints written before ``Progress`` had groups: read, never
    written."""

    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_acc: float = -1.0
    best_loss: float = math.inf
    best_epoch: int = 0
    stale: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0
    elapsed: float = 0.0
    seconds_to_target: float | None = None
    finished: bool = False
    stopped: str = "epochs"

    def grouped(self) -> Progress:
        return Progress(
            Position(self.epoch, self.step, self.loss_sum, self.correct),
            Best(self.best_epoch, self.best_acc, self.best_loss, self.stale),
            Timing(self.elapsed, self.train_seconds, self.images_seen),
            [dict(row) for row in self.history],
            self.stopped if self.finished else "epochs",
            self.seconds_to_target,
        )


GROUPS = {"position": Position, "best": Best, "timing": Timing}  # Progress's groups


def is_flat(data: dict[str, Any]) -> bool:
    """A progress dict as checkpoints held it before the groups."""
    return not any(name in data for name in GROUPS)


def progress_to_state(progress: Progress) -> dict[str, Any]:
    """Plain nested values (``torch.load(weights_only=True)`` reads them back)."""
    return asdict(progress)


def progress_from_state(data: dict[str, Any]) -> Progress:
    """The ``Progress`` a checkpoint holds, grouped or flat (checked by ``state_checks``)."""
    if is_flat(data):
        return FlatProgress(**data).grouped()
    values = {k: GROUPS[k](**v) if k in GROUPS else v for k, v in data.items()}
    values["history"] = [dict(row) for row in values.get("history", [])]
    return Progress(**values)
