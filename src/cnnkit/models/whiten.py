"""Frozen patch whitening (the CIFAR-10 speed records' first layer), one record (see
``layer_base``): a kernel x kernel convolution whose filters are set from the training
images' patch covariance, not learned."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from cnnkit.errors import ConfigError
from cnnkit.models.layer_base import Fields, Inferred, LayerInfo, LayerType, register

__all__ = ["Whiten"]


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


@register
class WhitenType(LayerType):
    # Frozen patch whitening (the CIFAR-10 speed records' first layer): a kernel x kernel conv
    # whose filters are set from the training images' patch covariance, not learned.
    kind = "whiten"
    fields: ClassVar[dict[str, Any]] = {"kernel": 2, "eps": 5e-4}
    needs_maps = True
    explain = (
        "Patch whitening: a frozen convolution whose kernels are set from the training "
        "images so that neighbouring pixels become uncorrelated; it is never trained."
    )

    def check(self, f: Fields) -> None:
        f.int("kernel")
        f.number("eps", "a positive number", lambda v: v > 0)

    def infer(self, spec, shape, where, path) -> Inferred:
        c, h, w = shape
        k = spec.params["kernel"]
        ho, wo = h - k + 1, w - k + 1
        if ho < 1 or wo < 1:
            raise ConfigError(f"{where}: a {k}x{k} kernel does not fit the {h}x{w} input")
        out = (2 * c * k * k, ho, wo)
        params = 2 * c * k * k * c * k * k  # frozen: set from the data, not trained
        return Inferred(out, params, 2 * c * k * k * out[0] * ho * wo)

    def build(self, info: LayerInfo) -> nn.Module:
        return Whiten(info.in_shape[0], info.spec.params["kernel"], info.spec.params["eps"])
