"""The sections of a training run before its optimiser: Setup, Data and Network.

Each is one function that ``training.loop`` calls in order; what they settle (the device,
the processes, the resolved config, the decoded data, the network) lives in a ``Session``
and a ``Model`` that the later sections read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnkit.config import RunConfig, TrainConfig
from cnnkit.data.dataset import PreparedData, prepare_data
from cnnkit.errors import ConfigError
from cnnkit.model_io import ModelMeta
from cnnkit.models.network import Network, Whiten
from cnnkit.models.registry import ModelSpec, build_network
from cnnkit.models.weights import Pretrained, load_pretrained, weights_record
from cnnkit.runtime import resolve_device, resolve_precision
from cnnkit.threads import CpuSample, sample_cpus
from cnnkit.training import distributed as ddp
from cnnkit.training.plan import RunPlan
from cnnkit.training.session import claim_run_dir

__all__ = ["Model", "Session", "build_model", "load_data", "setup"]

log = logging.getLogger("cnnkit")


@dataclass
class Session:
    """What this run is and where it runs. ``config`` is the plan's (``training.plan``);
    ``build_model`` adds the one thing learnt by reading the weights, their sha256."""

    out: Path
    config: RunConfig
    spec: ModelSpec
    pretrained: Pretrained | None
    device: torch.device
    info: ddp.DistInfo
    precision: str
    cpu_before: CpuSample | None  # what other work used while the data loaded (threads)
    started: float  # time.perf_counter() when this session started

    @property
    def cfg(self) -> TrainConfig:
        return self.config.train

    @property
    def image_size(self) -> int:
        size = self.config.data.image_size
        assert size is not None, "a settled config has an input size"  # training.plan.settle
        return size


def setup(
    plan: RunPlan,
    out: Path,
    *,
    overwrite: bool,
    resume: bool,
    run_dir: contextlib.ExitStack,
) -> Session:
    """The device and processes, the locked run directory, the seeds."""
    started = time.perf_counter()
    cfg = plan.config.train
    device = resolve_device(cfg.device)
    info = ddp.setup(device.type)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    precision = resolve_precision(cfg.precision, device)
    if info.is_main:
        run_dir.enter_context(claim_run_dir(out, overwrite, resume))
    ddp.barrier(info)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    cpu_before = sample_cpus()  # what other work uses while the data loads: see fit_threads
    # Augmentation and dropout draw from the global RNG: a different stream on every rank.
    torch.manual_seed(cfg.seed + info.rank)
    np.random.seed(cfg.seed + info.rank)
    random.seed(cfg.seed + info.rank)
    return Session(
        out, plan.config, plan.spec, plan.pretrained, device, info, precision, cpu_before, started
    )


def load_data(s: Session) -> PreparedData:
    """Decode (once, cached) and split the images; rank 0 decodes while the others wait."""
    config = s.config
    if s.info.is_main:
        data = prepare_data(config.data, s.image_size)
    ddp.barrier(s.info)
    if not s.info.is_main:
        logging.getLogger("cnnkit").setLevel(logging.ERROR)
        data = prepare_data(config.data, s.image_size)
    pre = s.pretrained.preprocessing if s.pretrained is not None else None
    if pre is not None:  # fed as the weights were
        fed = dataclasses.replace(data.preprocessing, mean=pre.mean, std=pre.std)
        data = dataclasses.replace(data, preprocessing=fed)
    return data


@dataclass
class Model:
    """The network that trains, its weight average (``train.ema``) and what ``model.json``
    says about it."""

    model: Network
    ema: torch.optim.swa_utils.AveragedModel | None
    meta: ModelMeta

    @property
    def evaluated(self) -> nn.Module:
        """What validation scores and the run saves: the average when there is one."""
        return self.ema.module if self.ema is not None else self.model


def build_model(s: Session, data: PreparedData, resume: bool, progress: bool) -> Model:
    """The network for the data's classes, from the starting weights when given (rank 0
    loads them; DDP hands them to the others), whitening fitted, channels_last."""
    cfg = s.cfg
    pre = data.preprocessing
    model = build_network(s.spec.layers, len(data.classes), pre.channels, pre.size)
    if s.pretrained is not None and not resume and s.info.is_main:
        loaded = load_pretrained(
            model, s.pretrained, data.classes, progress=progress, expect_sha256=cfg.weights_sha256
        )
        cfg = dataclasses.replace(cfg, weights_sha256=loaded.sha256)
        s.config = dataclasses.replace(s.config, train=cfg)
    if cfg.sync_bn and s.info.enabled:
        if s.device.type != "cuda":
            raise ConfigError("train.sync_bn: synchronised batchnorm needs CUDA GPUs")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    _fit_whitening(model, data)
    model = model.to(s.device, memory_format=torch.channels_last)
    ddp.broadcast_module(s.info, model)  # the weights rank 0 loaded, on every rank
    ema = None
    if cfg.ema:
        ema = torch.optim.swa_utils.AveragedModel(
            model,
            multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema),
            use_buffers=True,
        )
    meta = ModelMeta(
        classes=data.classes,
        preprocessing=pre,
        architecture=tuple(model.architecture()),
        model_name=s.spec.name,
        tta=cfg.tta,
        weights=weights_record(cfg),
    )
    return Model(model, ema, meta)


def _fit_whitening(model: Network, data: PreparedData, sample: int = 5000) -> None:
    """Set each frozen whitening layer from the training images that reach it."""
    whitens = [name for name, m in model.layers.items() if isinstance(m, Whiten)]
    if not whitens:
        return
    idx = np.linspace(0, len(data.train) - 1, num=min(sample, len(data.train))).astype(np.int64)
    x = data.preprocessing.to_model_input(data.train.batch(idx)[0])  # (N, C, S, S)
    with torch.no_grad():
        for name, module in model.layers.items():
            if isinstance(module, Whiten):
                module.fit(x)
            x = module(x)
            if name == whitens[-1]:
                break
