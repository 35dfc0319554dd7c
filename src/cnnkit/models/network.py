"""``Network``: a CNN built from a validated layer list, with one interface for every tool.

Like timm's models it exposes ``forward_features`` (the convolutional part, up to the flatten
or global pooling) and ``forward_head`` (flatten and dense layers to class scores), plus
``feature_maps`` that returns every layer's output for inspection.

Initialisation (the learning material's "random Gaussian"): conv kernels and dense weights are
drawn from a normal distribution with mean 0 and standard deviation ``sqrt(2 / fan_in)`` (He
initialisation, which keeps the signal's scale through ReLU layers), where ``fan_in`` is
``in_channels * kernel * kernel`` for a conv and ``in_features`` for a dense layer. Biases
start at 0; batchnorm at scale 1, shift 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from cnnkit.models.layers import LayerInfo, LayerSpec, infer_shapes

__all__ = ["Network", "Whiten", "build_layer"]


class Scale(nn.Module):
    """Multiply by a constant (a fixed temperature on the logits)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class GlobalAvgPool(nn.Module):
    """(B, C, H, W) -> (B, C): the mean of each feature map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class GlobalMaxPool(nn.Module):
    """(B, C, H, W) -> (B, C): the largest value of each feature map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(2, 3))


class Whiten(nn.Conv2d):
    """Frozen patch whitening: filters are the eigenvectors of the training images' patch
    covariance, scaled by ``1 / sqrt(eigenvalue + eps)``, each in both signs (so a ReLU after
    it keeps all information). Set once from data by ``fit``; never trained."""

    def __init__(self, channels: int, kernel: int, eps: float) -> None:
        n = channels * kernel * kernel
        super().__init__(channels, 2 * n, kernel, bias=False)
        self.eps = float(eps)
        self.weight.requires_grad_(False)
        nn.init.zeros_(self.weight)

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        """Set the filters from normalised images ``x`` (N, C, H, W)."""
        c, k = self.in_channels, self.kernel_size[0]
        patches = x.float().unfold(2, k, 1).unfold(3, k, 1)  # (N, C, H', W', k, k)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k).double()
        patches = patches - patches.mean(0, keepdim=True)
        cov = patches.T @ patches / max(1, len(patches) - 1)  # (c*k*k, c*k*k)
        values, vectors = torch.linalg.eigh(cov)
        filters = (vectors.T / torch.sqrt(values + self.eps)[:, None]).float()
        filters = filters.view(-1, c, k, k)
        self.weight.copy_(torch.cat([filters, -filters]))


def build_layer(info: LayerInfo) -> nn.Module:
    """The torch module for one layer, given its resolved input shape."""
    p, kind = info.spec.params, info.spec.type
    if kind == "conv":
        conv = nn.Conv2d(
            info.in_shape[0], p["filters"], p["kernel"], p["stride"], p["padding"], bias=p["bias"]
        )
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (info.in_shape[0] * p["kernel"] ** 2)))
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
        return conv
    if kind == "dense":
        dense = nn.Linear(info.in_shape[0], p["units"])
        nn.init.normal_(dense.weight, 0.0, math.sqrt(2.0 / info.in_shape[0]))
        nn.init.zeros_(dense.bias)
        return dense
    if kind == "relu":
        return nn.ReLU()
    if kind == "gelu":
        return nn.GELU()
    if kind == "maxpool":
        return nn.MaxPool2d(p["kernel"], p["stride"], p["padding"])
    if kind == "avgpool":
        return nn.AvgPool2d(p["kernel"], p["stride"], p["padding"])
    if kind == "gap":
        return GlobalAvgPool()
    if kind == "gmp":
        return GlobalMaxPool()
    if kind == "dropout2d":
        return nn.Dropout2d(p["rate"])
    if kind == "dropout":
        return nn.Dropout(p["rate"])
    if kind == "batchnorm":
        norm = nn.BatchNorm2d(info.in_shape[0], eps=p["eps"], momentum=p["momentum"])
        norm.weight.requires_grad_(p["scale"])  # scale false: the gain stays 1
        return norm
    if kind == "flatten":
        return nn.Flatten()
    if kind == "scale":
        return Scale(p["factor"])
    if kind == "whiten":
        return Whiten(info.in_shape[0], p["kernel"], p["eps"])
    raise AssertionError(f"no module for layer type {kind!r}")  # parse_layers rejects it first


class Network(nn.Module):
    """A sequential CNN: ``layers[i]`` computes ``infos[i].out_shape`` from the one before."""

    def __init__(self, layers: list[LayerSpec], in_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.infos = infer_shapes(layers, in_shape)
        self.in_shape = in_shape
        self.layers = nn.ModuleDict({info.name: build_layer(info) for info in self.infos})
        # Index of the first layer of the head: the flatten/gap that ends the feature maps.
        self.head_start = next(
            (i for i, info in enumerate(self.infos) if len(info.out_shape) == 1), len(self.infos)
        )

    @property
    def num_classes(self) -> int:
        return self.infos[-1].out_shape[0]

    def architecture(self) -> list[dict[str, Any]]:
        """The layer list, as plain data (it rebuilds this network with ``Network``)."""
        return [info.spec.to_dict() for info in self.infos]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, C', H', W') the last feature maps."""
        for module in list(self.layers.values())[: self.head_start]:
            x = module(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C', H', W') feature maps -> (B, classes) logits."""
        for module in list(self.layers.values())[self.head_start :]:
            x = module(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, classes) logits; softmax of them gives the probabilities."""
        for module in self.layers.values():
            x = module(x)
        return x

    def feature_maps(self, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Every layer's output, in order, as ``(name, tensor)``."""
        out = []
        for name, module in self.layers.items():
            x = module(x)
            out.append((name, x))
        return out
