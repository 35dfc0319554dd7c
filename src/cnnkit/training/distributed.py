"""Data-parallel training on PyTorch's own engine: torchrun + DistributedDataParallel.

Rank, local rank and world size come from the environment torchrun sets; with none set, the
run is one process and everything here is a no-op. Gloo runs on CPUs, NCCL on GPUs.

Every collective (barrier, all-reduce, DDP's gradient averaging) gives up after
``CNNKIT_DIST_TIMEOUT`` seconds (default 1800, PyTorch's own default for gloo). The longest
wait in a healthy run is the other ranks waiting while rank 0 decodes the cache the first
time, so raise it for a data set that takes longer than that to decode. A rank that dies
closes its connections, so the others usually fail at once; torchrun then stops them all.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from cnnkit.errors import CnnkitError, ConfigError
from cnnkit.threads import allowed_cpus

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistInfo",
    "all_sum",
    "barrier",
    "broadcast_buffers",
    "launch_torchrun",
    "setup",
    "shard_batches",
    "teardown",
    "timeout",
]

DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job; ``is_main`` gates every print and save."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: str | None = None) -> int:
    raw = os.environ.get(name, default)
    if raw is None:
        raise ConfigError(
            f"{name} is not set but WORLD_SIZE is: start several processes with torchrun "
            "(or 'cnnkit train --nproc N'), which sets RANK, LOCAL_RANK and WORLD_SIZE"
        )
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected an integer, got {raw!r}") from None


def timeout() -> datetime.timedelta:
    """How long a collective may wait for the other ranks (``CNNKIT_DIST_TIMEOUT`` seconds)."""
    raw = os.environ.get("CNNKIT_DIST_TIMEOUT", "")
    if not raw:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(
            f"CNNKIT_DIST_TIMEOUT: expected a positive number of seconds, got {raw!r}"
        )
    return datetime.timedelta(seconds=seconds)


def setup(device_kind: str) -> DistInfo:
    """Join the process group torchrun prepared (if any) and return this rank's place."""
    world = _env_int("WORLD_SIZE", "1")
    if world <= 1:
        return DistInfo()
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", "0")
    if not dist.is_initialized():
        if device_kind == "cuda":
            gpus = torch.cuda.device_count()
            if local_rank >= gpus:
                raise ConfigError(
                    "process {rank} (local rank {value}) has no GPU of its own: this machine "
                    "has {limit} CUDA GPU(s); start at most {limit} processes per machine, or "
                    "train on the CPU with {train.device=cpu}",
                    setting="train.device",
                    value=local_rank,
                    limit=gpus,
                    rank=rank,
                )
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo", timeout=timeout())
        atexit.register(_destroy_at_exit)
    return DistInfo(rank, local_rank, world)


def _destroy_at_exit() -> None:
    # Release the group's sockets/communicators however the process ends (PyTorch warns
    # about a group left alive at exit); a group broken by a dead peer may refuse.
    if dist.is_initialized():
        with contextlib.suppress(Exception):  # exiting anyway: nothing left to protect
            dist.destroy_process_group()


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def _waiting_for_others(info: DistInfo, what: str) -> Iterator[None]:
    """Turn a collective's failure into one line that points at the real cause.

    A collective fails when another process died (its own error is printed above) or did
    not arrive within the timeout; the backend's message alone reads like a crash here.
    """
    try:
        yield
    except RuntimeError as exc:  # gloo and NCCL raise RuntimeError (or DistBackendError)
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CnnkitError(
            f"process {info.rank} of {info.world_size} stopped while {what}: another "
            "process of this job failed (its error comes first) or did not answer within "
            f"CNNKIT_DIST_TIMEOUT ({timeout().total_seconds():g} s) [{detail}]"
        ) from None


def is_main_process() -> bool:
    """Whether this process reports and writes the run's files: the only one, or torchrun's
    rank 0 (known from the environment, before ``setup``)."""
    return os.environ.get("RANK", "0") == "0"


def barrier(info: DistInfo) -> None:
    if info.enabled:
        with _waiting_for_others(info, "waiting for the other processes"):
            dist.barrier()


def broadcast_buffers(info: DistInfo, module: nn.Module) -> None:
    """Give every rank rank 0's buffers (batchnorm running statistics), in place.

    DDP broadcasts them at the start of each forward pass, but the last training step then
    updates them on every rank from its own local batch; without this, each rank would
    validate its shard with statistics slightly different from the model rank 0 saves.
    """
    if info.enabled:
        with _waiting_for_others(info, "receiving rank 0's batchnorm statistics"):
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)


def broadcast_module(info: DistInfo, module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers, in place: the starting weights that
    rank 0 alone loaded, before anything (a frozen backbone's features) is computed from
    them. DDP does the same when it wraps a module, but only for what it wraps."""
    if info.enabled:
        with _waiting_for_others(info, "receiving rank 0's weights"):
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)


def all_sum(info: DistInfo, values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (returned; the input is left as it was)."""
    if not info.enabled:
        return values
    out = values.clone()
    with _waiting_for_others(info, "summing figures over the processes"):
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def shard_batches(order: torch.Tensor, global_batch: int, rank: int, world: int) -> torch.Tensor:
    """This rank's indices for every step of an epoch: ``(steps, global_batch // world)``.

    Every rank gets the same shuffled ``order`` (same seed), cuts it into global batches and
    takes its own contiguous slice of each, so a step covers one global batch exactly once
    across ranks. The tail that does not fill a global batch is left out on every rank alike
    (batchnorm needs whole batches), so no sample is seen twice within an epoch.
    """
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"rank {rank} is not one of the {world} processes of this job")
    if len(order) < world:
        raise ConfigError(
            f"{len(order)} training images cannot be shared by {world} processes (each needs "
            "at least one image per step); use fewer processes or more data"
        )
    if global_batch < world:
        raise ConfigError(
            "{setting}: the global batch ({value}) must be at least the number of processes "
            "({limit}), one image per process per step",
            setting="train.batch_size",
            value=global_batch,
            limit=world,
        )
    if global_batch % world:
        raise ConfigError(
            "{setting}: the global batch ({value}) must divide evenly over {world} processes",
            setting="train.batch_size",
            value=global_batch,
            world=world,
        )
    per_rank = global_batch // world
    steps = len(order) // global_batch
    if steps < 1:
        raise ConfigError(
            "{images} training images cannot fill one global batch of {value} over {world} "
            "processes; use a smaller {setting} or fewer processes",
            setting="train.batch_size",
            value=global_batch,
            images=len(order),
            world=world,
        )
    batches = order[: steps * global_batch].view(steps, world, per_rank)
    return batches[:, rank, :].contiguous()


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Run ``cnnkit <argv>`` under torchrun with ``nproc`` local processes; its exit code."""
    import subprocess

    if nproc < 1:
        raise ConfigError(
            "{setting}: expected a positive integer, got {value}", setting="nproc", value=nproc
        )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "cnnkit",
        *argv,
    ]
    env = dict(os.environ)
    # Each process gets its share of the cores it may run on, instead of all of them each.
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(allowed_cpus()) // nproc)))
    return subprocess.call(cmd, env=env)
