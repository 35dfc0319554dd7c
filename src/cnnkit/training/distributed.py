"""Data-parallel training on PyTorch's own engine: torchrun + DistributedDataParallel.

Rank, local rank and world size come from the environment torchrun sets; with none set, the
run is one process and everything here is a no-op. Gloo runs on CPUs, NCCL on GPUs.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cnnkit.errors import ConfigError

__all__ = [
    "DistInfo",
    "all_sum",
    "barrier",
    "launch_torchrun",
    "setup",
    "shard_batches",
    "teardown",
]


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


def setup(device_kind: str) -> DistInfo:
    """Join the process group torchrun prepared (if any) and return this rank's place."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=5))
    return DistInfo(rank, local_rank, world)


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_sum(info: DistInfo, values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (returned; the input is left as it was)."""
    if not info.enabled:
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def shard_batches(order: torch.Tensor, global_batch: int, rank: int, world: int) -> torch.Tensor:
    """This rank's indices for every step of an epoch: ``(steps, global_batch // world)``.

    Every rank gets the same shuffled ``order`` (same seed), cuts it into global batches and
    takes its own contiguous slice of each, so a step covers one global batch exactly once
    across ranks. The tail that does not fill a global batch is left out on every rank alike
    (batchnorm needs whole batches), so no sample is seen twice within an epoch.
    """
    if global_batch % world:
        raise ConfigError(
            f"train.batch_size: the global batch ({global_batch}) must divide "
            f"evenly over {world} processes"
        )
    per_rank = global_batch // world
    steps = len(order) // global_batch
    if steps < 1 or per_rank < 1:
        raise ConfigError(
            f"{len(order)} training images cannot fill one global batch of "
            f"{global_batch} over {world} processes; use a smaller --batch-size "
            "or fewer processes"
        )
    batches = order[: steps * global_batch].view(steps, world, per_rank)
    return batches[:, rank, :].contiguous()


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Run ``cnnkit <argv>`` under torchrun with ``nproc`` local processes; its exit code."""
    import subprocess

    if nproc < 1:
        raise ConfigError(f"--nproc: expected a positive integer, got {nproc}")
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
    # Each process gets its share of the cores instead of all of them each.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)
