"""The frozen patch-whitening layer: decorrelated unit-variance patches, never trained."""

from __future__ import annotations

import pytest
import torch

from cnnkit.errors import ConfigError
from cnnkit.models import build_network, parse_layers
from cnnkit.models.layers import infer_shapes
from cnnkit.models.network import Whiten


def test_whitened_patches_have_identity_covariance() -> None:
    torch.manual_seed(0)
    mix = torch.tensor([[1.0, 0.5, 0.0], [0.0, 2.0, 0.3], [0.2, 0.0, 0.5]])
    x = torch.einsum("ij,njhw->nihw", mix, torch.randn(64, 3, 16, 16))  # correlated channels
    layer = Whiten(3, 2, eps=1e-6)
    layer.fit(x)
    y = layer(x)  # (N, 24, 15, 15): 12 whitened directions, then their negatives
    assert y.shape == (64, 24, 15, 15)
    feats = y[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)
    cov = torch.cov(feats.T)
    assert torch.allclose(cov, torch.eye(12), atol=0.02)
    # Filters 12-23 are exactly the negatives of 0-11, but a convolution kernel may sum an
    # output channel's 12 terms in another order for another channel (blocks of channels,
    # vector tails: tests/numerics.py), so the outputs are negatives to within that rounding:
    # at most 12 * 2**-24 of the sum of the terms' magnitudes, computed here exactly.
    weight = layer.weight.abs()
    magnitude = torch.nn.functional.conv2d(x.abs(), weight[:12])  # sum |w| |x| per output
    assert ((y[:, 12:] + y[:, :12]).abs() <= 2 * 12 * 2**-24 * magnitude).all()


def test_whitening_is_frozen_and_saved() -> None:
    net = build_network(parse_layers([{"whiten": {"kernel": 2}}, "relu", "gap", "dense"]), 3, 3, 8)
    whiten = net.layers["whiten1"]
    assert not whiten.weight.requires_grad
    assert "layers.whiten1.weight" in net.state_dict()
    info = infer_shapes(parse_layers([{"whiten": {"kernel": 3}}]), (1, 8, 8))[0]
    assert info.out_shape == (18, 6, 6)


def test_bad_whitening_settings_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"layer 1 \(whiten\): eps: expected a positive"):
        parse_layers([{"whiten": {"eps": 0}}])
    with pytest.raises(ConfigError, match=r"layer 1 \(whiten\): kernel: expected a positive"):
        parse_layers([{"whiten": {"kernel": 0}}])
