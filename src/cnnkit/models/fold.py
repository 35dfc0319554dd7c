"""A network made fast for inference only: batchnorm folded in, activations fused, bf16.

A frozen or evaluated network computes the same function with fewer passes over memory:

- **Batchnorm folded into the convolution before it.** In eval mode batchnorm is an affine
  map per channel, ``y = (x - mean) * gamma / sqrt(var + eps) + beta``, so a convolution
  followed by it is one convolution with its filters scaled by ``gamma / sqrt(var + eps)``
  and a bias of ``(bias - mean) * scale + beta``. On EfficientNet-Lite0 batchnorm took a
  quarter of the forward time (one read and one write of every feature map).
- **ReLU and ReLU6 fused into that convolution** as a oneDNN post-op (the convolution
  writes the clipped values directly) on CPUs whose torch has oneDNN; elsewhere they run
  after it, in place.
- **channels_last** memory and, where the hardware runs it natively (``precision="bf16"``),
  bf16 weights and activations throughout, not autocast's casts around each layer.

The copy shares nothing with the original and has no gradients; the original (the one that
trains, is saved and is exported) is never changed. Folding in fp32 changes values only by
rounding (about 1e-6 of their size); bf16 by about 1e-2, as bf16 autocast does.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from cnnkit.models.blocks import Residual
from cnnkit.models.layer_types import TFSameConv2d
from cnnkit.models.network import Network

__all__ = ["FastNetwork", "FusedConv2d", "fold_batchnorm", "inference_copy"]

ACTIVATIONS = {nn.ReLU: ("relu", []), nn.ReLU6: ("hardtanh", [0.0, 6.0])}


@functools.cache
def _onednn_fusion(dtype: torch.dtype = torch.float32) -> bool:
    """True when torch's oneDNN convolution with a pointwise post-op runs here in ``dtype``
    (its bf16 kernels need AVX-512 or AVX-NE-CONVERT, and ``ONEDNN_MAX_CPU_ISA`` may forbid
    them on a CPU that has them)."""
    op = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ones(1, 1, 1, 1, dtype=dtype)
        x = torch.full((1, 1, 2, 2), -1.0, dtype=dtype)
        y = op(x, w, None, [0, 0], [1, 1], [1, 1], 1, "relu", [], "")
    except (RuntimeError, NotImplementedError):
        return False
    return bool((y == 0).all())


class FusedConv2d(nn.Module):
    """A convolution (batchnorm already folded in) with its activation as a post-op.

    ``activation`` is ``relu``, ``relu6`` or None; ``pads`` TensorFlow's asymmetric SAME
    padding when the original was a ``TFSameConv2d``. Inference only (no gradient)."""

    def __init__(self, conv: nn.Conv2d, activation: str | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        bias = conv.bias.detach().clone() if conv.bias is not None else None
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.pads = conv.pads if isinstance(conv, TFSameConv2d) else None
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pads is not None:
            x = nn.functional.pad(x, self.pads)
        if x.device.type == "cpu" and _onednn_fusion(x.dtype):
            name, scalars = {"relu": ("relu", []), "relu6": ("hardtanh", [0.0, 6.0])}.get(
                self.activation or "", ("none", [])
            )
            return torch.ops.mkldnn._convolution_pointwise(
                x, self.weight, self.bias, self.padding, self.stride, self.dilation,
                self.groups, name, scalars, "",
            )  # fmt: skip
        y = nn.functional.conv2d(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )
        if self.activation == "relu":
            return y.relu_()
        return y.clamp_(0.0, 6.0) if self.activation == "relu6" else y

    def extra_repr(self) -> str:
        out, per_group, k, _ = self.weight.shape
        return (
            f"{per_group * self.groups}, {out}, kernel_size={k}, stride={tuple(self.stride)}, "
            f"groups={self.groups}, activation={self.activation}"
        )


def _chains(net: Network) -> list[tuple[nn.Module, list[str]]]:
    """Each run of modules that feed only the next one: (parent, the names in order).

    The network's own layers, each residual block's main path and its projection shortcut;
    an intermediate output inside a chain is used by nothing but the module after it."""
    chains: list[tuple[nn.Module, list[str]]] = [(net.layers, [i.name for i in net.infos])]
    for module in net.modules():
        if isinstance(module, Residual):
            chains.append((module, list(module.main)))
            if module.shortcut == "projection":
                names = [f"downsample.{name}" for name, _ in module.downsample.named_children()]
                chains.append((module, names))
    return chains


@torch.no_grad()
def _fold(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    """Fold eval-mode ``norm`` into ``conv``, in place (``conv`` then computes both)."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)  # (out,)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
    conv.bias = nn.Parameter((bias - norm.running_mean) * scale + norm.bias, requires_grad=False)


def fold_batchnorm(net: Network, fuse: bool = False) -> Network:
    """A copy of ``net`` in eval mode with every batchnorm that follows a convolution folded
    into it (the batchnorm becomes ``nn.Identity``); ``fuse`` also turns each convolution
    and the ReLU/ReLU6 right after it into one ``FusedConv2d``. The same function as
    ``net.eval()`` up to rounding."""
    net = copy.deepcopy(net).eval()
    for parent, names in _chains(net):
        modules = [parent.get_submodule(n) for n in names]
        for i in range(len(modules) - 1):
            conv, norm = modules[i], modules[i + 1]
            if isinstance(conv, nn.Conv2d) and type(norm) is nn.BatchNorm2d:
                _fold(conv, norm)
                modules[i + 1] = nn.Identity()
                parent.set_submodule(names[i + 1], modules[i + 1])
        if not fuse:
            continue
        for i, conv in enumerate(modules):
            if not isinstance(conv, nn.Conv2d):
                continue
            after = next((j for j in range(i + 1, len(modules)) if not _identity(modules[j])), None)
            kind = type(modules[after]) if after is not None else None
            activation = {nn.ReLU: "relu", nn.ReLU6: "relu6"}.get(kind)  # type: ignore[arg-type]
            if activation is not None:
                modules[after] = nn.Identity()  # type: ignore[index]
                parent.set_submodule(names[after], modules[after])  # type: ignore[index]
            parent.set_submodule(names[i], FusedConv2d(conv, activation))
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _identity(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity | nn.Dropout | nn.Dropout2d)


class FastNetwork(nn.Module):
    """``inference_copy``'s result: the folded network and the dtype it computes in.

    ``forward(x)`` and ``run_layers(x, start, stop)`` take float32 (B, C, H, W) (or what an
    earlier ``run_layers`` returned) and return float32."""

    def __init__(self, net: Network, dtype: torch.dtype) -> None:
        super().__init__()
        self.net, self.dtype = net, dtype

    def run_layers(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        x = x.to(self.dtype)
        if x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net.run_layers(x, start, stop).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_layers(x)


def inference_copy(net: Network, device: torch.device, precision: str = "fp32") -> FastNetwork:
    """``net`` folded and fused for inference on ``device``, channels_last, in bf16 when
    ``precision`` is ``bf16`` (give ``runtime.resolve_precision``'s answer)."""
    fast = fold_batchnorm(net, fuse=True).to(device, memory_format=torch.channels_last)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return FastNetwork(fast.to(dtype), dtype).eval()
