"""Where and how a network runs: device, precision and batched inference (threads: ``threads``).

Shared by training, evaluation, inspection and prediction, so all of them run a model the
same way. ``precision="auto"`` picks bf16 autocast on CPUs with native bf16 instructions
(AVX512-BF16 or AMX) and on CUDA GPUs that support it, else fp32.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnkit.data.images import to_model_input
from cnnkit.errors import ConfigError

__all__ = [
    "autocast",
    "batched_logits",
    "cpu_has_bf16",
    "resolve_device",
    "resolve_precision",
]


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' asked for, but no CUDA GPU is available")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device: expected auto, cpu or cuda, got {device!r}")
    return torch.device(device)


@functools.cache
def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where the hardware runs it natively, else ``fp32``."""
    if precision in ("fp32", "bf16"):
        return precision
    if precision != "auto":
        raise ConfigError(f"precision: expected auto, fp32 or bf16, got {precision!r}")
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for ``precision`` (a no-op for fp32)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@torch.inference_mode()
def batched_logits(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    mean: list[float] | tuple[float, ...],
    std: list[float] | tuple[float, ...],
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 512,
    tta: bool = False,
) -> torch.Tensor:
    """Float32 logits ``(N, classes)`` on the CPU for uint8 images ``(N, S, S, C)``.

    With ``tta`` each image's logits are averaged with those of its mirror image.
    """
    if model.training:  # eval() walks every module: skip it when already in eval mode
        model.eval()
    out = []
    n = len(images)
    for part in _chunks(n, batch_size):
        chunk = images[part]
        if isinstance(chunk, torch.Tensor):
            batch = chunk
        else:
            arr = np.asarray(chunk)
            if not arr.flags.writeable:  # a read-only memory map or a PIL-backed array
                arr = arr.copy()
            batch = torch.from_numpy(arr)
        x = to_model_input(batch.to(device, non_blocking=True), mean, std)
        with autocast(device, precision):
            logits = model(x).float()
            if tta:
                logits = (logits + model(torch.flip(x, dims=(3,))).float()) / 2
        out.append(logits.cpu())
    if not out:
        return torch.zeros((0, 0))
    return torch.cat(out)
