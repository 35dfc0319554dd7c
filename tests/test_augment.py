"""Batched augmentation: each switch does what it says, draws differ per image and epoch."""

from __future__ import annotations

import torch

from cnnkit.config import AugmentConfig
from cnnkit.training.augment import build_augmentation

OFF = {"hflip": False, "vflip": False, "shear": 0.0, "rotate": 0.0, "scale": 0.0}


def _batch(n: int = 64) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(n, 3, 16, 16)


def test_all_off_is_no_augmentation() -> None:
    assert build_augmentation(AugmentConfig(**OFF)) is None
    assert build_augmentation(AugmentConfig(enabled=False)) is None


def test_hflip_mirrors_about_half_the_images_exactly() -> None:
    x = _batch()
    y = build_augmentation(AugmentConfig(**{**OFF, "hflip": True}))(x)
    mirrored = [torch.equal(y[i], x[i].flip(2)) for i in range(len(x))]
    kept = [torch.equal(y[i], x[i]) for i in range(len(x))]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True))
    assert 10 < sum(mirrored) < 54


def test_vflip_turns_images_upside_down() -> None:
    x = _batch()
    y = build_augmentation(AugmentConfig(**{**OFF, "vflip": True}))(x)
    flipped = sum(torch.equal(y[i], x[i].flip(1)) for i in range(len(x)))
    assert 10 < flipped < 54


def test_warp_keeps_shape_and_differs_per_image_and_call() -> None:
    x = _batch(8)
    aug = build_augmentation(AugmentConfig(**{**OFF, "shear": 10.0, "rotate": 15.0}))
    a, b = aug(x), aug(x)
    assert a.shape == x.shape and torch.isfinite(a).all()
    assert not torch.allclose(a, b)  # redrawn on every call (every epoch)
    same = x[:1].expand(8, -1, -1, -1)
    c = aug(same)
    assert not torch.allclose(c[0], c[1])  # and for every image


def test_zero_warp_is_identity_inside_the_image() -> None:
    x = _batch(4)
    aug = build_augmentation(AugmentConfig(**{**OFF, "scale": 1e-9}))
    y = aug(x)
    assert torch.allclose(y, x, atol=1e-4)


def test_translate_shifts_content() -> None:
    x = torch.zeros(32, 1, 16, 16)
    x[:, :, 6:10, 6:10] = 1.0
    aug = build_augmentation(AugmentConfig(**{**OFF, "translate": 0.25}))
    y = aug(x)
    centres = (y[:, 0].sum(1) * torch.arange(16)).sum(1) / y[:, 0].sum((1, 2))
    assert centres.std() > 0.5  # the square moved by different amounts
