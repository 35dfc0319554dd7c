"""The training loop: one plain function, in sections, for CPU, one GPU and torchrun alike.

Setup -> Run directory -> Data -> Network -> Optimiser -> Resume -> Epochs -> Save.

The hot path works on whole batches: uint8 images gathered by index from the decode cache,
normalised and augmented as one tensor, channels_last, bf16 autocast where the hardware runs it
natively. Losses and accuracies are summed on the device and read once per progress update,
not once per step. Under torchrun every rank trains on its shard of each global batch; only
rank 0 prints and writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnkit.checkpoint import ModelMeta, atomic_write, save_model
from cnnkit.config import RunConfig, TrainConfig, load_yaml
from cnnkit.data.dataset import PreparedData, prepare_data
from cnnkit.data.images import to_model_input
from cnnkit.engine import autocast, batched_logits, resolve_device, resolve_precision
from cnnkit.errors import CnnkitError, ConfigError, RunDirError
from cnnkit.models.network import Whiten
from cnnkit.models.registry import build_network, load_model_spec, resolve_model
from cnnkit.models.weights import fit_config, load_pretrained, plan_weights, weights_record
from cnnkit.threads import fit_threads, sample_cpus
from cnnkit.training import distributed as dist
from cnnkit.training import state as ckpt
from cnnkit.training.augment import build_augmentation
from cnnkit.training.optim import Optimizer, Schedule, constant, cosine, linear, one_cycle
from cnnkit.training.outputs import (
    TrainResult,
    check_resumable,
    fingerprint,
    write_outputs,
    write_split_csv,
)
from cnnkit.training.session import EpochHook, claim_run_dir, progress_bar, stop_on_signals

__all__ = ["TrainingInterrupted", "train"]

log = logging.getLogger("cnnkit")


class TrainingInterrupted(CnnkitError):
    """SIGINT or SIGTERM arrived; a checkpoint was saved and the run can be resumed."""


def _optimizer(model: nn.Module, cfg: TrainConfig) -> Optimizer:
    # No weight decay on biases and batchnorm parameters (1-D tensors), as is standard.
    # Muon steps the convolution filters (4-D) at its own rate, the rest as AdamW.
    params = list(model.parameters())
    muon = cfg.optimizer == "muon"
    filters = [p for p in params if muon and p.ndim == 4 and p.requires_grad]
    taken = {id(p) for p in filters}
    decay = [p for p in params if p.ndim > 1 and id(p) not in taken]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay}]
    if filters:
        groups.append({"params": filters, "lr": cfg.muon_lr, "muon": True})
    return Optimizer(groups, cfg.optimizer, cfg.lr, betas=(0.9, 0.99), momentum=cfg.momentum)


def _schedule(opt: Optimizer, cfg: TrainConfig, total_steps: int) -> Schedule:
    factor = {"onecycle": one_cycle, "cosine": cosine, "linear": linear}.get(cfg.schedule)
    return Schedule(opt, factor(total_steps) if factor else constant)


def _validate(
    model: nn.Module,
    data: PreparedData,
    device: torch.device,
    precision: str,
    info: dist.DistInfo,
    tta: bool,
) -> tuple[float, float, torch.Tensor | None]:
    """(mean cross-entropy, accuracy) over the whole validation split, all ranks together,
    and in a single process the logits ``(N, classes)`` (the report reuses the best epoch's)."""
    idx = np.arange(info.rank, len(data.val), info.world_size)
    sums = torch.zeros(3, dtype=torch.float64)
    logits = None
    if len(idx):
        images = data.val.images[idx] if info.enabled else data.val.images
        logits = batched_logits(model, images, data.mean, data.std, device, precision, tta=tta)
        labels = torch.from_numpy(np.asarray(data.val.labels[idx]))
        loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
        sums += torch.tensor(
            [loss.item(), (logits.argmax(1) == labels).sum().item(), len(idx)], dtype=torch.float64
        )
    sums = dist.all_sum(info, sums.to(device)).cpu()
    if sums[2] == 0:
        return float("nan"), float("nan"), None
    return float(sums[0] / sums[2]), float(sums[1] / sums[2]), None if info.enabled else logits


def _fit_whitening(model: nn.Module, data: PreparedData, sample: int = 5000) -> None:
    """Set each frozen whitening layer from the training images that reach it."""
    whitens = [name for name, m in model.layers.items() if isinstance(m, Whiten)]
    if not whitens:
        return
    idx = np.linspace(0, len(data.train) - 1, num=min(sample, len(data.train))).astype(np.int64)
    x = to_model_input(data.train.batch(idx)[0], data.mean, data.std)  # (N, C, S, S)
    with torch.no_grad():
        for name, module in model.layers.items():
            if isinstance(module, Whiten):
                module.fit(x)
            x = module(x)
            if name == whitens[-1]:
                break


def train(
    config: RunConfig | None,
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
    force: bool = False,
    on_epoch: EpochHook | None = None,
) -> TrainResult:
    """Train ``config`` into the run directory ``out`` (or continue it with ``resume``).

    ``on_epoch(row, model, data)`` is called on rank 0 after each epoch's validation, with
    the metrics row, the evaluated model and the data (``cnnkit train --live`` watches it)."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        with contextlib.ExitStack() as run_dir:  # locked until the run ends, however it ends
            return _train(
                config,
                out,
                overwrite=overwrite,
                progress=progress,
                resume=resume,
                force=force,
                run_dir=run_dir,
                on_epoch=on_epoch,
            )
    finally:  # --deterministic applies to this run only, not to the rest of the process
        if torch.are_deterministic_algorithms_enabled() != deterministic:
            # (only when changed: the call imports torch._inductor, over a second)
            torch.use_deterministic_algorithms(deterministic)


def _train(
    config: RunConfig | None,
    out: str | Path,
    *,
    overwrite: bool,
    progress: bool,
    resume: bool,
    force: bool,
    run_dir: contextlib.ExitStack,
    on_epoch: EpochHook | None = None,
) -> TrainResult:
    # ---------------------------------------------------------------- Setup
    session_start = time.perf_counter()
    out = Path(out)
    if config is None:
        if not resume:
            raise RunDirError("train: a config is required unless resuming")
        config = RunConfig.from_dict(load_yaml(out / "config.yaml"))
    config = resolve_model(config)  # model "auto": chosen from the data
    cfg = config.train
    spec = load_model_spec(config.model)
    pretrained = plan_weights(cfg.weights, spec) if cfg.weights else None
    config = fit_config(config, pretrained)  # the input size and channels the weights expect
    device = resolve_device(cfg.device)
    info = dist.setup(device.type)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    precision = resolve_precision(cfg.precision, device)
    if info.is_main:
        run_dir.enter_context(claim_run_dir(out, overwrite, resume))
    dist.barrier(info)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    cpu_before = sample_cpus()  # what other work uses while the data loads: see fit_threads
    # Augmentation and dropout draw from the global RNG: a different stream on every rank.
    torch.manual_seed(cfg.seed + info.rank)
    np.random.seed(cfg.seed + info.rank)
    random.seed(cfg.seed + info.rank)

    # ---------------------------------------------------------------- Data
    image_size = config.data.image_size or spec.input_size
    if info.is_main:  # rank 0 decodes into the cache while the others wait, then they map it
        data = prepare_data(config.data, image_size)
    dist.barrier(info)
    if not info.is_main:
        logging.getLogger("cnnkit").setLevel(logging.ERROR)
        data = prepare_data(config.data, image_size)
    if pretrained is not None and pretrained.preprocessing is not None:  # fed as the weights were
        pre = pretrained.preprocessing
        data = dataclasses.replace(data, mean=pre.mean, std=pre.std)
    # What config.yaml records is the resolved run: the input size and channels really used,
    # and the data folder as an absolute path (the run directory works from anywhere).
    config = dataclasses.replace(
        config,
        data=dataclasses.replace(
            config.data,
            path=data.root or config.data.path,
            image_size=image_size,
            channels=str(data.channels),
        ),
    )
    in_ram = isinstance(data.train.images, np.ndarray)
    train_images = torch.from_numpy(data.train.images).to(device) if in_ram else None
    train_labels = torch.from_numpy(np.asarray(data.train.labels)).to(device)
    global_batch = min(cfg.batch_size, len(data.train))
    global_batch -= global_batch % info.world_size
    steps = dist.shard_batches(
        torch.arange(len(data.train)), max(global_batch, 1), info.rank, info.world_size
    ).shape[0]

    # ---------------------------------------------------------------- Network
    model = build_network(spec.layers, len(data.classes), data.channels, image_size)
    if pretrained is not None and not resume and info.is_main:  # DDP copies rank 0's weights
        sha256 = load_pretrained(
            model, pretrained, data.classes, progress=progress, expect_sha256=cfg.weights_sha256
        ).sha256
        cfg = dataclasses.replace(cfg, weights_sha256=sha256)
        config = dataclasses.replace(config, train=cfg)
    if cfg.sync_bn and info.enabled:
        if device.type != "cuda":
            raise ConfigError("train.sync_bn: synchronised batchnorm needs CUDA GPUs")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    _fit_whitening(model, data)
    model = model.to(device, memory_format=torch.channels_last)
    net: nn.Module = model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.local_rank] if device.type == "cuda" else None
        )
    ema = None
    if cfg.ema:
        ema = torch.optim.swa_utils.AveragedModel(
            model,
            multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema),
            use_buffers=True,
        )
    meta = ModelMeta(
        classes=data.classes,
        channels=data.channels,
        image_size=image_size,
        resize=config.data.resize,
        mean=data.mean,
        std=data.std,
        architecture=tuple(model.architecture()),
        model_name=spec.name,
        tta=cfg.tta,
        weights=weights_record(cfg),
    )
    augment = build_augmentation(config.augment)
    run_fingerprint = fingerprint(config, data)

    # ---------------------------------------------------------------- Optimiser
    opt = _optimizer(model, cfg)
    sched = _schedule(opt, cfg, cfg.epochs * steps)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    # ---------------------------------------------------------------- Resume
    p = ckpt.Progress()
    best_logits: torch.Tensor | None = None  # known when the best epoch ran in this session
    if resume and not ckpt.list_checkpoints(out):  # killed before its first checkpoint
        log.warning("%s has no checkpoint yet; starting the run from the beginning", out)
    elif resume:
        folder, weights, saved = ckpt.find_checkpoint(out)
        check_resumable(saved["fingerprint"], run_fingerprint, force, data)
        ckpt.load_weights(model, weights, folder)
        opt.load_state_dict(saved["optimizer"])
        if saved["total_steps"] == cfg.epochs * steps:
            sched.load_state_dict(saved["scheduler"])
        else:  # more or fewer epochs than planned: same position on the new schedule
            sched.seek(saved["progress"]["epoch"] * steps + saved["progress"]["step"])
        if ema is not None and "ema" in saved:
            ema.load_state_dict(saved["ema"])
        p = ckpt.progress_from_state(saved["progress"])
        if info.is_main:
            ckpt.set_rng_state(saved["rng"])
        log.info("resumed from %s: epoch %d, step %d of %d", folder, p.epoch + 1, p.step, steps)
    if cfg.threads or not info.enabled:  # under torchrun: its OMP_NUM_THREADS, unless asked
        fit_threads(cfg.threads, adapt=not cfg.deterministic, since=cpu_before)
    if info.is_main:  # the settings now in force (a resume may extend the epochs)
        atomic_write(out / "config.yaml", lambda path: config.save(path))
        write_split_csv(out, data)
    log.info(
        "training %s (%s parameters) on %s%s, %s, batch %d, %d steps per epoch",
        spec.name,
        f"{sum(t.numel() for t in model.parameters()):,}",
        device.type,
        f" x{info.world_size}" if info.enabled else "",
        precision,
        global_batch,
        steps,
    )

    def save_state() -> None:
        if not info.is_main:
            return
        state = {
            "progress": ckpt.progress_to_state(p),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "total_steps": cfg.epochs * steps,
            "rng": ckpt.rng_state(),
            "fingerprint": run_fingerprint,
        }
        if ema is not None:
            state["ema"] = ema.state_dict()
        ckpt.save_checkpoint(out, model, state)

    # ---------------------------------------------------------------- Epochs
    with stop_on_signals() as signals, progress_bar(progress and info.is_main) as bar:
        task = bar.add_task("train", total=steps, epoch="", loss="-", acc="-", speed="")
        for epoch in range(p.epoch + 1, cfg.epochs + 1):
            if p.finished:
                break
            epoch_start = time.perf_counter()
            model.train()
            bar.reset(
                task,
                total=steps,
                completed=p.step,
                epoch=f"{epoch}/{cfg.epochs}",
                loss="-",
                acc="-",
                speed="",
            )
            order = torch.randperm(
                len(data.train),
                generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch),
            )
            batches = dist.shard_batches(order, global_batch, info.rank, info.world_size)
            loss_sum = torch.tensor(p.loss_sum, dtype=torch.float64, device=device)
            correct = torch.tensor(p.correct, dtype=torch.int64, device=device)
            first_step, last_update = p.step, epoch_start
            for step in range(p.step, steps):
                idx = batches[step]
                if train_images is not None:
                    xb = train_images[idx.to(device)]
                else:
                    xb = data.train.batch(idx.numpy())[0].to(device, non_blocking=True)
                yb = train_labels[idx.to(device)]
                x = to_model_input(xb, data.mean, data.std)  # (B, C, S, S) channels_last
                if augment is not None:
                    x = augment(x).contiguous(memory_format=torch.channels_last)
                with autocast(device, precision):
                    logits = net(x)
                    loss = criterion(logits.float(), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if ema is not None:
                    ema.update_parameters(model)
                loss_sum += loss.detach().double() * len(idx)
                correct += (logits.argmax(1) == yb).sum()
                p.step = step + 1
                now = time.perf_counter()
                if progress and info.is_main and (now - last_update > 0.25 or p.step == steps):
                    seen = p.step * len(idx)
                    rate = (p.step - first_step) * global_batch / (now - epoch_start)
                    bar.update(
                        task,
                        completed=p.step,
                        loss=f"{loss_sum.item() / seen:.4f}",
                        acc=f"{correct.item() / seen:.1%}",
                        speed=f"{rate:,.0f} img/s",
                    )
                    last_update = now
                if signals or (
                    cfg.checkpoint_every and p.step % cfg.checkpoint_every == 0 and p.step < steps
                ):
                    p.loss_sum, p.correct = loss_sum.item(), int(correct.item())
                    p.train_seconds += time.perf_counter() - epoch_start
                    p.images_seen += (p.step - first_step) * global_batch
                    first_step, epoch_start = p.step, time.perf_counter()
                    save_state()
                    if signals:
                        raise TrainingInterrupted(
                            f"interrupted by {signal.Signals(signals[0]).name}; checkpoint "
                            f"saved, continue with: cnnkit train --resume {out}"
                        )
            sums = dist.all_sum(info, torch.stack([loss_sum, correct.double()]).cpu())
            seen = steps * global_batch
            train_loss, train_acc = float(sums[0]) / seen, float(sums[1]) / seen
            p.train_seconds += time.perf_counter() - epoch_start
            p.images_seen += (steps - first_step) * global_batch
            evaluated = ema.module if ema is not None else model
            dist.broadcast_buffers(info, evaluated)  # validate what rank 0 saves
            val_loss, val_acc, val_logits = _validate(
                evaluated, data, device, precision, info, cfg.tta
            )
            row = {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_acc": train_acc,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "lr": opt.param_groups[0]["lr"],
                "seconds": time.perf_counter() - epoch_start,
            }
            p.history.append(row)
            if on_epoch is not None and info.is_main:
                on_epoch(dict(row), evaluated, data)
            log.info(
                "epoch %d/%d  train_loss %.4f  train_acc %.2f%%  val_loss %.4f  "
                "val_acc %.2f%%  lr %.2e  %.1fs",
                epoch,
                cfg.epochs,
                train_loss,
                100 * train_acc,
                val_loss,
                100 * val_acc,
                row["lr"],
                row["seconds"],
            )
            # At 100% a lower loss keeps the best weights but is no reason to go on training.
            perfect = val_acc == 1.0 and p.best_acc == 1.0
            if (
                math.isnan(val_acc)  # no validation images: keep the latest weights
                or val_acc > p.best_acc
                or (val_acc == p.best_acc and val_loss < p.best_loss)
            ):
                p.stale = p.stale + 1 if perfect else 0
                p.best_acc, p.best_loss, p.best_epoch = val_acc, val_loss, epoch
                # of the weights saved as the model; bf16 ones are not what predict (fp32) says
                best_logits = val_logits if precision == "fp32" else None
                if info.is_main:
                    save_model(out, evaluated, meta)
            else:
                p.stale += 1
            p.epoch, p.step, p.loss_sum, p.correct = epoch, 0, 0.0, 0
            elapsed = p.elapsed + time.perf_counter() - session_start
            if cfg.target_accuracy is not None and val_acc >= cfg.target_accuracy:
                p.seconds_to_target, p.stopped, p.finished = elapsed, "target_accuracy", True
            elif cfg.patience and p.stale >= cfg.patience:
                p.stopped, p.finished = "patience", True
            p.elapsed, session_start = elapsed, time.perf_counter()
            save_state()
            if signals:
                raise TrainingInterrupted(
                    f"interrupted by {signal.Signals(signals[0]).name}; "
                    f"checkpoint saved, continue with: cnnkit train "
                    f"--resume {out}"
                )

    # ---------------------------------------------------------------- Save
    if p.history and p.best_epoch != p.history[-1]["epoch"]:
        log.info(
            "kept the weights of epoch %d (best validation accuracy %.2f%%)",
            p.best_epoch,
            100 * p.best_acc,
        )
    result = TrainResult(
        run_dir=out,
        best_val_acc=p.best_acc,
        final_val_acc=p.history[-1]["val_acc"] if p.history else math.nan,
        best_epoch=p.best_epoch,
        epochs_run=len(p.history),
        wall_seconds=p.elapsed + time.perf_counter() - session_start,
        images_per_second=p.images_seen / p.train_seconds if p.train_seconds else 0.0,
        seconds_to_target=p.seconds_to_target,
        stopped_because=p.stopped,
        precision=precision,
        device=str(device),
        world_size=info.world_size,
        threads=torch.get_num_threads(),
        history=p.history,
        data=data,
        val_logits=best_logits,
    )
    if info.is_main:
        write_outputs(out, result)
    dist.barrier(info)
    return result
