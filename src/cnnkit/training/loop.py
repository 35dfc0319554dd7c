"""The training loop: one plain function, in sections, for CPU, one GPU and torchrun alike.

Setup -> Data -> Network -> Optimiser -> Resume -> Epochs -> Save; ``_train`` calls one
function per section, in that order.

The hot path works on whole batches: uint8 images gathered by index from the decode cache,
normalised and augmented as one tensor, channels_last, bf16 autocast where the hardware runs it
natively; or, in the head epochs of a fine-tune (``training.phases``), the frozen backbone's
cached features. Losses and accuracies are summed on the device and read once per progress
update, not once per step. Under torchrun every rank trains on its shard of each global
batch; only rank 0 prints and writes files. Each epoch is ``train_one_epoch``, then
``_end_epoch`` validates and judges it (``progress``: the best-keeper and the stopping rule),
then ``_checkpoint`` saves it, the one point where time is accounted (``Clock.settle``). A
stop signal cuts the steps short; ``_epochs`` saves and raises ``TrainingInterrupted``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnkit.config import RunConfig, TrainConfig, load_yaml
from cnnkit.data.dataset import PreparedData
from cnnkit.errors import RunDirError, TrainingInterrupted
from cnnkit.files import atomic_write
from cnnkit.model_io import save_model
from cnnkit.runtime import autocast
from cnnkit.threads import fit_threads
from cnnkit.training import checkpoints as ckpt
from cnnkit.training import distributed as ddp
from cnnkit.training.optim import Optimizer, Schedule
from cnnkit.training.outputs import (
    TrainResult,
    check_resumable,
    fingerprint,
    write_outputs,
    write_split_csv,
)
from cnnkit.training.phases import Phases, make_optimizer, make_schedule, set_mode
from cnnkit.training.plan import RunPlan, settle
from cnnkit.training.progress import (
    Position,
    Progress,
    progress_from_state,
    progress_to_state,
    stop_reason,
)
from cnnkit.training.session import Clock, EpochBar, EpochHook, Meter, stop_on_signals
from cnnkit.training.setup import Model, Session, build_model, load_data, setup
from cnnkit.training.stages import Stage, build_stage

__all__ = ["TrainResult", "train"]

log = logging.getLogger("cnnkit")


def train(
    config: RunPlan | RunConfig | None,
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
    force: bool = False,
    on_epoch: EpochHook | None = None,
) -> TrainResult:
    """Train ``config`` into the run directory ``out`` (or continue it with ``resume``).

    ``config`` is a plan (``training.plan.plan_run``) or a config, settled here the same way;
    None with ``resume``: the run's own ``config.yaml``.

    ``on_epoch(row, model, data)`` is called on rank 0 after each epoch's validation, with
    the metrics row, the evaluated model and the data (``cnnkit train --live`` watches it)."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        with contextlib.ExitStack() as run_dir:  # locked until the run ends, however it ends
            return _train(config, Path(out), overwrite, progress, resume, force, run_dir, on_epoch)
    finally:  # --deterministic applies to this run only, not to the rest of the process
        if torch.are_deterministic_algorithms_enabled() != deterministic:
            # (only when changed: the call imports torch._inductor, over a second)
            torch.use_deterministic_algorithms(deterministic)


@dataclass
class Run:
    """Everything the epochs work with, settled by the sections before them."""

    s: Session
    data: PreparedData
    m: Model
    phases: Phases
    opt: Optimizer
    sched: Schedule
    criterion: nn.Module
    steps: int  # per epoch
    global_batch: int
    fingerprint: dict
    on_epoch: EpochHook | None = None  # rank 0, after each epoch's validation

    @property
    def cfg(self) -> TrainConfig:
        return self.s.cfg


def _train(
    config: RunPlan | RunConfig | None,
    out: Path,
    overwrite: bool,
    progress: bool,
    resume: bool,
    force: bool,
    run_dir: contextlib.ExitStack,
    on_epoch: EpochHook | None = None,
) -> TrainResult:
    # Setup: settings settled, device and processes, the run directory locked, seeds.
    s = setup(_plan(config, out, resume), out, overwrite=overwrite, resume=resume, run_dir=run_dir)
    # Data: decoded once into the cache, split into training and validation images.
    data = load_data(s)
    # Network: built for the classes, from the starting weights when given.
    m = build_model(s, data, resume, progress)
    # Optimiser: which epochs train what, the optimizer and its schedule.
    r = _optimiser(s, data, m, on_epoch)
    # Resume: weights, optimizer, schedule, random state and progress from the checkpoint.
    p = _resume(r, force) if resume else Progress()
    clock = Clock(p, s.started, r.global_batch)
    _announce(r)
    # Epochs: until the last, the target accuracy or patience; a checkpoint after each.
    best_logits = _epochs(r, p, clock, progress)
    # Save: the best epoch's model is saved already; metrics, summary and curves.
    return _save(r, p, clock, best_logits)


def _plan(config: RunPlan | RunConfig | None, out: Path, resume: bool) -> RunPlan:
    if isinstance(config, RunPlan):
        return config
    if config is not None:
        return settle(config)
    if not resume:
        raise RunDirError("train: a config is required unless resuming")
    return settle(RunConfig.from_dict(load_yaml(out / "config.yaml")))


def _optimiser(s: Session, data: PreparedData, m: Model, on_epoch: EpochHook | None = None) -> Run:
    cfg, info = s.cfg, s.info
    global_batch = min(cfg.batch_size, len(data.train))
    global_batch -= global_batch % info.world_size
    steps = ddp.shard_batches(
        torch.arange(len(data.train)), max(global_batch, 1), info.rank, info.world_size
    ).shape[0]
    phases = Phases.plan(cfg, m.model)
    opt = make_optimizer(m.model, cfg, phases)  # over every parameter, before any is frozen
    sched = make_schedule(opt, cfg, steps, phases)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    run_fingerprint = fingerprint(s.config, data)
    return Run(
        s, data, m, phases, opt, sched, criterion, steps, global_batch, run_fingerprint, on_epoch
    )


def _resume(r: Run, force: bool) -> Progress:
    out, steps = r.s.out, r.steps
    if not ckpt.list_checkpoints(out):  # killed before its first checkpoint
        log.warning("%s has no checkpoint yet; starting the run from the beginning", out)
        return Progress()
    folder, weights, saved = ckpt.find_checkpoint(out)
    check_resumable(saved["fingerprint"], r.fingerprint, force, r.data)
    ckpt.load_weights(r.m.model, weights, folder)
    p = progress_from_state(saved["progress"])
    r.opt.load_state_dict(saved["optimizer"])
    if saved["total_steps"] == r.cfg.epochs * steps:
        r.sched.load_state_dict(saved["scheduler"])
    else:  # more or fewer epochs than planned: same position on the new schedule
        r.sched.seek(p.position.epoch * steps + p.position.step)
    if r.m.ema is not None and "ema" in saved:
        r.m.ema.load_state_dict(saved["ema"])
    if r.s.info.is_main:
        ckpt.set_rng_state(saved["rng"])
    at = p.position
    log.info("resumed from %s: epoch %d, step %d of %d", folder, at.epoch + 1, at.step, steps)
    return p


def _announce(r: Run) -> None:
    """Fit the threads, record the settings now in force (a resume may extend the epochs)
    and say what trains where."""
    s, cfg = r.s, r.cfg
    if cfg.threads or not s.info.enabled:  # under torchrun: its OMP_NUM_THREADS, unless asked
        fit_threads(cfg.threads, adapt=not cfg.deterministic, since=s.cpu_before)
    if s.info.is_main:
        atomic_write(s.out / "config.yaml", lambda path: s.config.save(path))
        write_split_csv(s.out, r.data)
    log.info(
        "training %s (%s parameters) on %s%s, %s, batch %d, %d steps per epoch",
        s.spec.name,
        f"{sum(t.numel() for t in r.m.model.parameters()):,}",
        s.device.type,
        f" x{s.info.world_size}" if s.info.enabled else "",
        s.precision,
        r.global_batch,
        r.steps,
    )


# ------------------------------------------------------------------------------ Epochs


@dataclass(frozen=True)
class EpochStats:
    """What an epoch's steps achieved, all ranks together."""

    train_loss: float  # mean over the epoch's images
    train_acc: float
    lr: float  # at the epoch's end


def _epochs(r: Run, p: Progress, clock: Clock, progress: bool) -> torch.Tensor | None:
    """Train epoch after epoch until the last, the target accuracy or patience, with a
    checkpoint after each; the best epoch's validation logits when this session computed
    them in fp32 (the report reuses them).

    SIGINT or SIGTERM ends the epoch after its current step (or, during validation, after
    the epoch): the checkpoint that follows holds where it stopped, and the run ends here,
    the one place that raises ``TrainingInterrupted``."""
    best_logits, stage = None, None
    with stop_on_signals() as signals, EpochBar(progress and r.s.info.is_main, r.steps) as bar:
        for epoch in range(p.position.epoch + 1, r.cfg.epochs + 1):
            if p.finished:
                break
            if stage is None or stage.head_only != r.phases.head_only(epoch):
                stage = None  # a phase starts: its predecessor's DDP hooks go first
                stage = build_stage(r.s, r.data, r.m.model, r.phases, epoch)
            stats = train_one_epoch(r, stage, epoch, p, bar, clock, signals)
            if stats is not None:  # all its steps ran
                logits = _end_epoch(r, stage, epoch, p, clock, stats)
                if p.best.epoch == epoch:
                    best_logits = logits
            _checkpoint(r, p, clock)
            if signals:  # (one that arrives after the last checkpoint lets the run finish)
                raise TrainingInterrupted(signal.Signals(signals[0]).name, r.s.out)
    return best_logits


def train_one_epoch(
    r: Run,
    stage: Stage,
    epoch: int,
    p: Progress,
    bar: EpochBar,
    clock: Clock,
    signals: list[int],
) -> EpochStats | None:
    """The epoch's steps from ``p.position`` on (a checkpoint every ``checkpoint_every``);
    None when a stop signal cut them short (``p.position`` then holds where they stopped)."""
    s, cfg, opt, ema, at = r.s, r.cfg, r.opt, r.m.ema, p.position
    set_mode(r.m.model, r.phases, epoch)
    order = torch.randperm(
        len(r.data.train), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    )
    batches = ddp.shard_batches(order, r.global_batch, s.info.rank, s.info.world_size)
    meter = Meter(at, s.device)
    clock.start_epoch(at.step)
    bar.start(epoch, cfg.epochs, at.step, "head" if stage.head_only else "")
    for step in range(at.step, r.steps):
        x, y = stage.feed(batches[step])  # (B, C, S, S) augmented images, or (B, D) features
        with autocast(s.device, s.precision):
            logits = stage.forward(x)
            loss = r.criterion(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        r.sched.step()
        if ema is not None:
            ema.update_parameters(r.m.model)
        meter.add(loss, logits, y)
        at.step = step + 1
        bar.show(at.step, meter, clock)
        if signals:
            break
        if cfg.checkpoint_every and at.step % cfg.checkpoint_every == 0 and at.step < r.steps:
            meter.keep(at)  # (the epoch's own checkpoint follows its end)
            _checkpoint(r, p, clock)
    clock.end_steps()
    if signals:
        meter.keep(at)
        return None
    sums = ddp.all_sum(s.info, meter.sums())
    seen = r.steps * r.global_batch
    return EpochStats(float(sums[0]) / seen, float(sums[1]) / seen, opt.param_groups[0]["lr"])


def validate(
    score: Callable[[np.ndarray], torch.Tensor],
    labels: np.ndarray,
    info: ddp.DistInfo,
    device: torch.device,
) -> tuple[float, float, torch.Tensor | None]:
    """(mean cross-entropy, accuracy) over the whole validation split, all ranks together,
    and in a single process the logits ``(N, classes)`` (the report reuses the best epoch's).
    ``score(idx)`` gives the logits of validation rows ``idx``."""
    idx = np.arange(info.rank, len(labels), info.world_size)
    sums = torch.zeros(3, dtype=torch.float64)
    logits = None
    if len(idx):
        logits = score(idx)
        y = torch.from_numpy(np.asarray(labels[idx]))
        loss = nn.functional.cross_entropy(logits, y, reduction="sum")
        sums += torch.tensor(
            [loss.item(), (logits.argmax(1) == y).sum().item(), len(idx)], dtype=torch.float64
        )
    sums = ddp.all_sum(info, sums.to(device)).cpu()
    if sums[2] == 0:
        return float("nan"), float("nan"), None
    return float(sums[0] / sums[2]), float(sums[1] / sums[2]), None if info.enabled else logits


def _end_epoch(
    r: Run, stage: Stage, epoch: int, p: Progress, clock: Clock, stats: EpochStats
) -> torch.Tensor | None:
    """Validate, record the epoch, keep its weights if they are the best so far and decide
    whether to stop; its validation logits when fp32 (bf16 ones are not what predict says).

    This is the end-of-epoch point: the epoch's row is complete here."""
    s = r.s
    evaluated = r.m.evaluated
    ddp.broadcast_buffers(s.info, evaluated)  # validate what rank 0 saves
    val_loss, val_acc, logits = validate(
        lambda idx: stage.score(evaluated, idx), r.data.val.labels, s.info, s.device
    )
    row = {
        "epoch": epoch,
        "train_loss": stats.train_loss,
        "train_acc": stats.train_acc,
        "val_loss": val_loss,
        "val_acc": val_acc,
        "lr": stats.lr,
        "seconds": clock.epoch_seconds(),
    }
    _record(r, p, row, evaluated, stage.head_only)
    p.best = p.best.judge(epoch, val_acc, val_loss, head_only=r.phases.head_only(epoch))
    if p.best.epoch == epoch and s.info.is_main:
        save_model(s.out, evaluated, r.m.meta)
    p.position = Position(epoch)
    p.stopped = stop_reason(r.cfg, val_acc, p.best)
    if p.stopped == "target_accuracy":
        p.seconds_to_target = clock.total()
    return logits if s.precision == "fp32" else None


def _record(r: Run, p: Progress, row: dict, evaluated: nn.Module, head_only: bool) -> None:
    """The epoch's row into the history, the end-of-epoch hook and the log."""
    p.history.append(row)
    if r.on_epoch is not None and r.s.info.is_main:
        r.on_epoch(dict(row), evaluated, r.data)
    log.info(
        "epoch %d/%d%s  train_loss %.4f  train_acc %.2f%%  val_loss %.4f  val_acc %.2f%%  "
        "lr %.2e  %.1fs",
        row["epoch"], r.cfg.epochs, " (head)" if head_only else "", row["train_loss"],
        100 * row["train_acc"], row["val_loss"], 100 * row["val_acc"], row["lr"], row["seconds"],
    )  # fmt: skip


def _checkpoint(r: Run, p: Progress, clock: Clock) -> None:
    """Save where the run stands (rank 0), with its time settled up to now."""
    clock.settle()
    if r.s.info.is_main:
        state = {
            "progress": progress_to_state(p),
            "optimizer": r.opt.state_dict(),
            "scheduler": r.sched.state_dict(),
            "total_steps": r.cfg.epochs * r.steps,
            "rng": ckpt.rng_state(),
            "fingerprint": r.fingerprint,
        }
        if r.m.ema is not None:
            state["ema"] = r.m.ema.state_dict()
        ckpt.save_checkpoint(r.s.out, r.m.model, state)


def _save(r: Run, p: Progress, clock: Clock, best_logits: torch.Tensor | None) -> TrainResult:
    s = r.s
    if p.history and p.best.epoch != p.history[-1]["epoch"]:
        log.info(
            "kept the weights of epoch %d (best validation accuracy %.2f%%)",
            p.best.epoch,
            100 * p.best.acc,
        )
    result = TrainResult(
        run_dir=s.out,
        best_val_acc=p.best.acc,
        final_val_acc=p.history[-1]["val_acc"] if p.history else math.nan,
        best_epoch=p.best.epoch,
        epochs_run=len(p.history),
        wall_seconds=clock.total(),
        images_per_second=p.timing.images_per_second,
        seconds_to_target=p.seconds_to_target,
        stopped_because=p.stopped,
        precision=s.precision,
        device=str(s.device),
        world_size=s.info.world_size,
        threads=torch.get_num_threads(),
        history=p.history,
        data=r.data,
        val_logits=best_logits,
    )
    # The network in memory holds the saved weights when the last epoch was the best.
    last_is_best = bool(p.history) and p.best.epoch == p.history[-1]["epoch"]
    if s.info.is_main and not s.info.enabled and last_is_best:
        result.model, result.meta = r.m.evaluated.eval(), r.m.meta
    if s.info.is_main:
        write_outputs(s.out, result)
    ddp.barrier(s.info)
    return result
