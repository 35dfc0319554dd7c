"""Batched augmentation: each switch does what it says, draws differ per image and epoch."""

from __future__ import annotations

import pytest
import torch

from cnnkit.config import AugmentConfig
from cnnkit.training.augment import affine_matrices, build_augmentation, warp_affine

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


def test_a_shift_alone_moves_each_image_by_whole_pixels_reflecting_the_edge() -> None:
    torch.manual_seed(1)
    x = torch.randn(48, 2, 8, 8)
    y = build_augmentation(AugmentConfig(**{**OFF, "translate": 0.25}))(x)  # up to 2 pixels
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    offsets = set()
    for i in range(len(x)):
        # exactly one window of the reflect-padded image, no resampling
        found = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(y[i], padded[i, :, dy : dy + 8, dx : dx + 8])
        ]
        assert len(found) == 1
        offsets.add(found[0])
    assert len(offsets) > 10  # drawn per image, over the whole range
    assert {o[0] for o in offsets} == set(range(5)) == {o[1] for o in offsets}


def test_a_shift_with_mirroring_keeps_both_and_tiny_shifts_change_nothing() -> None:
    x = _batch(32)
    y = build_augmentation(AugmentConfig(**{**OFF, "hflip": True, "translate": 0.1}))(x)
    assert y.shape == x.shape and not torch.equal(y, x)
    # 0.01 of 16 pixels rounds to no shift at all: only the mirroring remains
    z = build_augmentation(AugmentConfig(**{**OFF, "hflip": True, "translate": 0.01}))(x)
    assert all(torch.equal(z[i], x[i]) or torch.equal(z[i], x[i].flip(2)) for i in range(32))


# --------------------------------------------------- the warp against kornia, its reference


def _warp_parameters(n: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(n + h + w)
    shift = torch.randn(n, 2) * 3
    center = torch.tensor([(w - 1) / 2, (h - 1) / 2]).expand(n, 2)
    flips = torch.where(torch.rand(n, 2) < 0.5, -1.0, 1.0)
    scale = (1 + torch.randn(n, 2) * 0.1) * flips
    return shift, center, scale, torch.randn(n) * 20, torch.randn(n) * 0.2


@pytest.mark.parametrize(("n", "h", "w"), [(16, 24, 20), (4, 64, 64), (3, 7, 5)])
def test_matrices_and_warp_are_kornias(n: int, h: int, w: int) -> None:
    from kornia.geometry import transform as kornia  # the reference (a dev dependency)

    shift, center, scale, angle, shear = _warp_parameters(n, h, w)
    ours = affine_matrices(shift, center, scale, angle, shear)
    theirs = kornia.get_affine_matrix2d(shift, center, scale, angle, shear, torch.zeros_like(shear))
    # the same products of the same float32 factors, only grouped differently
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-5)
    x = torch.randn(n, 3, h, w)
    expected = kornia.warp_affine(x, theirs[:, :2], (h, w), align_corners=False)
    # Both sample the same positions, computed in float32 in a different order: a few ulps of
    # a coordinate up to 64 (~1e-5 px) times a neighbour difference up to 2 max|x| (~8).
    torch.testing.assert_close(warp_affine(x, ours), expected, rtol=0, atol=1e-3)


def test_identity_matrix_warps_to_the_image_and_a_shift_moves_it() -> None:
    x = torch.randn(2, 3, 9, 11)
    eye = torch.eye(3).expand(2, 3, 3)
    torch.testing.assert_close(warp_affine(x, eye), x, rtol=0, atol=1e-5)
    right = eye.clone()
    right[:, 0, 2] = 2.0  # two pixels to the right, 0 in the uncovered columns
    y = warp_affine(x, right)
    torch.testing.assert_close(y[..., 2:], x[..., :-2], rtol=0, atol=1e-5)
    assert torch.equal(y[..., :2], torch.zeros_like(y[..., :2]))
