"""Augmentation drawn anew for every image of every batch, as one warp per batch (kornia).

Mirror (horizontal flip), vertical flip, skew (shear), rotation, zoom and shift are folded
into one affine matrix per image, and the whole batch is resampled in a single
``kornia.geometry.transform.warp_affine`` call. That is about 3x faster on a CPU than chaining
kornia's separate random-augmentation modules, which resample once per transform. Random draws
come from torch's global generator, so a resumed run continues the same stream.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnkit.config import AugmentConfig

__all__ = ["BatchAugment", "build_augmentation"]


def _uniform(n: int, amount: float, device: torch.device) -> torch.Tensor:
    """n draws from U(-amount, amount)."""
    return (torch.rand(n, device=device) * 2 - 1) * amount


class BatchAugment(nn.Module):
    """(B, C, H, W) float batch -> the same batch, each image randomly flipped and warped.

    Areas the warp uncovers are 0, which is the mean colour after normalisation.
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.warps = bool(cfg.shear or cfg.rotate or cfg.scale or cfg.translate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from kornia.geometry.transform import get_affine_matrix2d, warp_affine

        n, _, h, w = x.shape
        cfg, dev = self.cfg, x.device
        flip_x = torch.ones(n, device=dev)
        flip_y = torch.ones(n, device=dev)
        if cfg.hflip:
            flip_x = torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0)
        if cfg.vflip:
            flip_y = torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0)
        if not self.warps:  # flips only: index instead of resampling
            x = torch.where(flip_x.view(n, 1, 1, 1) < 0, x.flip(3), x)
            return torch.where(flip_y.view(n, 1, 1, 1) < 0, x.flip(2), x)
        zoom = 1.0 + _uniform(n, cfg.scale, dev)
        scale = torch.stack([zoom * flip_x, zoom * flip_y], dim=1)  # (n, 2), sign = flip
        shift = torch.stack(
            [_uniform(n, cfg.translate * w, dev), _uniform(n, cfg.translate * h, dev)], dim=1
        )
        center = torch.tensor([(w - 1) / 2, (h - 1) / 2], device=dev).expand(n, 2)
        shear = torch.deg2rad(_uniform(n, cfg.shear, dev))
        matrix = get_affine_matrix2d(
            shift, center, scale, _uniform(n, cfg.rotate, dev), shear, torch.zeros_like(shear)
        )  # (n, 3, 3)
        return warp_affine(x, matrix[:, :2].to(x.dtype), (h, w), align_corners=False)


def build_augmentation(cfg: AugmentConfig) -> nn.Module | None:
    """The augmentation module for ``cfg``, or None when it would change nothing."""
    if not cfg.enabled:
        return None
    if not (cfg.hflip or cfg.vflip or cfg.shear or cfg.rotate or cfg.scale or cfg.translate):
        return None
    return BatchAugment(cfg)
