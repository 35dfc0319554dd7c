"""The training loop: one plain function, in sections, for CPU and GPU alike.

Setup -> Data -> Network -> Optimiser -> Epochs (train, validate, stop?) -> Save.

The hot path works on whole batches: uint8 images gathered by index from the decode cache,
normalised and augmented as one tensor, channels_last, bf16 autocast where the hardware runs it
natively. Losses and accuracies are summed on the device and read once per progress update,
not once per step.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnkit.checkpoint import ModelMeta, atomic_write, save_model
from cnnkit.config import RunConfig, TrainConfig
from cnnkit.console import console
from cnnkit.data.dataset import PreparedData, prepare_data
from cnnkit.data.images import to_model_input
from cnnkit.engine import (
    autocast,
    batched_logits,
    resolve_device,
    resolve_precision,
    use_all_cores,
)
from cnnkit.errors import RunDirError
from cnnkit.models.network import Network
from cnnkit.models.registry import build_network, load_model_spec
from cnnkit.plots import plot_curves
from cnnkit.training.augment import build_augmentation

__all__ = ["TrainResult", "train"]

log = logging.getLogger("cnnkit")
METRIC_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


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
    history: list[dict[str, float]] = field(default_factory=list)

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
        }


def _prepare_run_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RunDirError(
            f"--out {out} already holds files; choose a new folder or pass --overwrite"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create run directory {out}: {exc.strerror}") from None


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and batchnorm parameters (1-D tensors), as is standard.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, foreach=True
        )
    opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return opt(groups, lr=cfg.lr, betas=(0.9, 0.99), foreach=True)


def _schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=cfg.lr,
            total_steps=total_steps,
            pct_start=0.25,
            anneal_strategy="cos",
            div_factor=10.0,
            final_div_factor=100.0,
            cycle_momentum=False,
        )
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=total_steps, eta_min=cfg.lr / 100
        )
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def _progress(enabled: bool):
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


def evaluate_split(
    model: Network, data: PreparedData, device: torch.device, precision: str
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over the whole validation split."""
    if len(data.val) == 0:
        return float("nan"), float("nan")
    logits = batched_logits(model, data.val.images, data.mean, data.std, device, precision)
    labels = torch.from_numpy(np.asarray(data.val.labels))
    loss = nn.functional.cross_entropy(logits, labels).item()
    acc = (logits.argmax(1) == labels).float().mean().item()
    return loss, acc


def train(
    config: RunConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True
) -> TrainResult:
    """Train ``config`` and write a complete run directory to ``out``."""
    # ---------------------------------------------------------------- Setup
    started = time.perf_counter()
    out = Path(out)
    cfg = config.train
    spec = load_model_spec(config.model)
    _prepare_run_dir(out, overwrite)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    use_all_cores()
    torch.manual_seed(cfg.seed)
    order_rng = torch.Generator().manual_seed(cfg.seed)

    # ---------------------------------------------------------------- Data
    image_size = config.data.image_size or spec.input_size
    data = prepare_data(config.data, image_size)
    train_images = data.train.images
    on_device: torch.Tensor | None = None
    if isinstance(train_images, np.ndarray):  # in RAM: one tensor, indexed per batch
        on_device = torch.from_numpy(train_images).to(device)
    train_labels = torch.from_numpy(np.asarray(data.train.labels)).to(device)
    n_train = len(data.train)
    batch = min(cfg.batch_size, n_train)
    steps_per_epoch = max(1, n_train // batch)  # the ragged tail is dropped (batchnorm)

    # ---------------------------------------------------------------- Network
    model = build_network(spec.layers, len(data.classes), data.channels, image_size)
    model = model.to(device, memory_format=torch.channels_last)
    resolved = RunConfig(model=config.model, data=config.data, augment=config.augment, train=cfg)
    atomic_write(out / "config.yaml", lambda p: resolved.save(p))
    meta = ModelMeta(
        classes=data.classes,
        channels=data.channels,
        image_size=image_size,
        resize=config.data.resize,
        mean=data.mean,
        std=data.std,
        architecture=tuple(model.architecture()),
        model_name=spec.name,
    )
    augment = build_augmentation(config.augment)

    # ---------------------------------------------------------------- Optimiser
    opt = _optimizer(model, cfg)
    sched = _schedule(opt, cfg, cfg.epochs * steps_per_epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    log.info(
        "training %s (%s parameters) on %s, %s, batch %d, %d steps per epoch",
        spec.name,
        f"{sum(p.numel() for p in model.parameters()):,}",
        device.type,
        precision,
        batch,
        steps_per_epoch,
    )

    # ---------------------------------------------------------------- Epochs
    history: list[dict[str, float]] = []
    best_acc, best_loss, best_epoch, stale = -1.0, math.inf, 0, 0
    seconds_to_target: float | None = None
    stopped = "epochs"
    images_seen, train_seconds = 0, 0.0
    with _progress(progress) as bar:
        task = bar.add_task("train", total=steps_per_epoch, epoch="", loss="-", acc="-", speed="")
        for epoch in range(1, cfg.epochs + 1):
            epoch_start = time.perf_counter()
            model.train()
            bar.reset(
                task,
                total=steps_per_epoch,
                epoch=f"{epoch}/{cfg.epochs}",
                loss="-",
                acc="-",
                speed="",
            )
            order = torch.randperm(n_train, generator=order_rng)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            last_update = epoch_start
            for step in range(steps_per_epoch):
                idx = order[step * batch : (step + 1) * batch]
                if on_device is not None:
                    xb = on_device[idx.to(device)]
                else:
                    xb = data.train.batch(idx.numpy())[0].to(device, non_blocking=True)
                yb = train_labels[idx.to(device)]
                x = to_model_input(xb, data.mean, data.std)  # (B, C, S, S) channels_last
                if augment is not None:
                    x = augment(x).contiguous(memory_format=torch.channels_last)
                with autocast(device, precision):
                    logits = model(x)
                    loss = criterion(logits.float(), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.detach() * len(idx)
                correct += (logits.argmax(1) == yb).sum()
                now = time.perf_counter()
                if progress and (now - last_update > 0.25 or step == steps_per_epoch - 1):
                    seen = (step + 1) * batch
                    bar.update(
                        task,
                        completed=step + 1,
                        loss=f"{loss_sum.item() / seen:.4f}",
                        acc=f"{correct.item() / seen:.1%}",
                        speed=f"{seen / (now - epoch_start):,.0f} img/s",
                    )
                    last_update = now
            seen = steps_per_epoch * batch
            train_loss, train_acc = loss_sum.item() / seen, correct.item() / seen
            epoch_train_seconds = time.perf_counter() - epoch_start
            train_seconds += epoch_train_seconds
            images_seen += seen
            val_loss, val_acc = evaluate_split(model, data, device, precision)
            row = {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_acc": train_acc,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "lr": opt.param_groups[0]["lr"],
                "seconds": time.perf_counter() - epoch_start,
            }
            history.append(row)
            log.info(
                "epoch %d/%d  train_loss %.4f  train_acc %.2f%%  val_loss %.4f  "
                "val_acc %.2f%%  lr %.2e  %.0f img/s  %.1fs",
                epoch,
                cfg.epochs,
                train_loss,
                100 * train_acc,
                val_loss,
                100 * val_acc,
                row["lr"],
                seen / epoch_train_seconds,
                row["seconds"],
            )
            improved = val_acc > best_acc or (val_acc == best_acc and val_loss < best_loss)
            if improved:
                best_acc, best_loss, best_epoch, stale = val_acc, val_loss, epoch, 0
                save_model(out, model, meta)
            else:
                stale += 1
            if cfg.target_accuracy is not None and val_acc >= cfg.target_accuracy:
                seconds_to_target = time.perf_counter() - started
                stopped = "target_accuracy"
                break
            if cfg.patience is not None and stale >= cfg.patience:
                stopped = "patience"
                break

    # ---------------------------------------------------------------- Save
    if best_epoch != history[-1]["epoch"]:
        log.info(
            "kept the weights of epoch %d (best validation accuracy %.2f%%)",
            best_epoch,
            100 * best_acc,
        )
    result = TrainResult(
        run_dir=out,
        best_val_acc=best_acc,
        final_val_acc=history[-1]["val_acc"],
        best_epoch=best_epoch,
        epochs_run=len(history),
        wall_seconds=time.perf_counter() - started,
        images_per_second=images_seen / train_seconds if train_seconds else 0.0,
        seconds_to_target=seconds_to_target,
        stopped_because=stopped,
        precision=precision,
        device=str(device),
        history=history,
    )
    _write_metrics(out / "metrics.csv", history)
    atomic_write(
        out / "summary.json", lambda p: p.write_text(json.dumps(result.summary(), indent=2))
    )
    atomic_write(out / "curves.png", lambda p: plot_curves(history, p))
    return result


def _write_metrics(path: Path, history: list[dict[str, float]]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            writer.writeheader()
            for row in history:
                writer.writerow(
                    {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
                )

    atomic_write(path, write)
