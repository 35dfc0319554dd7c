"""Augmentation drawn anew for every image of every batch, as one warp per batch (kornia).

Mirror (horizontal flip), vertical flip, skew (shear), rotation, zoom and shift are folded
into one affine matrix per image, and the whole batch is resampled in a single
``kornia.geometry.transform.warp_affine`` call. That is about 3x faster on a CPU than chaining
kornia's separate random-augmentation modules, which resample once per transform. When
shifting is the only warp (the CIFAR-10 speed records' recipe: mirror and translate), each
image moves by whole pixels instead, its edge reflected into the uncovered strip: no
resampling blur, so training images stay as sharp as the ones the model is tested on.
Random draws come from torch's global generator, so a resumed run continues the same stream.
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

    Areas a warp uncovers are 0, which is the mean colour after normalisation; a shift on its
    own reflects the image's edge instead (see the module docstring).
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.warps = bool(cfg.shear or cfg.rotate or cfg.scale)

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
        if not self.warps:  # flips and whole-pixel shifts: index instead of resampling
            x = torch.where(flip_x.view(n, 1, 1, 1) < 0, x.flip(3), x)
            x = torch.where(flip_y.view(n, 1, 1, 1) < 0, x.flip(2), x)
            return shift_pixels(x, cfg.translate)  # (no shift: x itself)
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


def shift_pixels(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """Each image of ``x`` (B, C, H, W) moved by its own whole number of pixels, at most
    ``fraction`` of the side each way, the edge reflected into the uncovered strip."""
    n, _, h, w = x.shape
    ry, rx = min(round(fraction * h), h - 1), min(round(fraction * w), w - 1)
    if not (ry or rx):
        return x
    padded = nn.functional.pad(x, (rx, rx, ry, ry), mode="reflect")
    dev = x.device
    top = torch.randint(0, 2 * ry + 1, (n, 1), device=dev) + torch.arange(h, device=dev)
    left = torch.randint(0, 2 * rx + 1, (n, 1), device=dev) + torch.arange(w, device=dev)
    rows = torch.arange(n, device=dev).view(n, 1, 1)
    out = padded[rows, :, top.view(n, h, 1), left.view(n, 1, w)]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


def build_augmentation(cfg: AugmentConfig) -> nn.Module | None:
    """The augmentation module for ``cfg``, or None when it would change nothing."""
    if not cfg.enabled:
        return None
    if not (cfg.hflip or cfg.vflip or cfg.shear or cfg.rotate or cfg.scale or cfg.translate):
        return None
    return BatchAugment(cfg)
