"""Augmentation drawn anew for every image of every batch, on whole batches (kornia)."""

from __future__ import annotations

from torch import nn

from cnnkit.config import AugmentConfig

__all__ = ["build_augmentation"]


def build_augmentation(cfg: AugmentConfig) -> nn.Module | None:
    """A module mapping a float batch (B, C, H, W) to a randomly changed one, or None.

    Mirror (horizontal flip), vertical flip, and one affine warp for skew (shear), rotation,
    scale and translation; areas the warp uncovers are 0, the mean colour after normalisation.
    """
    if not cfg.enabled:
        return None
    import kornia.augmentation as K  # slow to import (about 1 s): only when augmenting

    steps: list[nn.Module] = []
    if cfg.hflip:
        steps.append(K.RandomHorizontalFlip(p=0.5))
    if cfg.vflip:
        steps.append(K.RandomVerticalFlip(p=0.5))
    if cfg.shear or cfg.rotate or cfg.scale or cfg.translate:
        steps.append(
            K.RandomAffine(
                degrees=cfg.rotate,
                translate=(cfg.translate, cfg.translate) if cfg.translate else None,
                scale=(1.0 - cfg.scale, 1.0 + cfg.scale) if cfg.scale else None,
                shear=cfg.shear if cfg.shear else None,
                padding_mode="zeros",
                p=1.0,
            )
        )
    return nn.Sequential(*steps) if steps else None
