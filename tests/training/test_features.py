"""``training.features``: a frozen backbone's features, computed once per image and cached.

Hits, misses and invalidation: the same images read back without computing, new images
computed alone, other weights (or an image file changed) never served old features, a
damaged store computed again. Values are checked against the network's own forward pass in
fp32 (folding reorders products: a few float32 ulps of the values summed).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnkit.data.dataset import ImageArray
from cnnkit.data.images import to_model_input
from cnnkit.data.preprocessing import Preprocessing
from cnnkit.models import build_network, load_model_spec
from cnnkit.training.features import FeatureExtractor, cached_features, feature_variants

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture
def images(tmp_path: Path) -> ImageArray:
    """Six random 32x32 images, each standing for a file (the cache stamps files)."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        path = tmp_path / "imgs" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * (i + 1))
        paths.append(str(path))
    pixels = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    return ImageArray(pixels, np.arange(6) % 3, tuple(paths))


def _net(seed: int = 0):
    torch.manual_seed(seed)
    net = build_network(load_model_spec("mobilenet_v2").layers, 3, 3, 32)
    return net.eval()


def _extractor(net, root: Path, precision: str = "fp32") -> FeatureExtractor:
    return FeatureExtractor.create(
        net, net.head_start + 1, preprocessing=Preprocessing(32, 3, MEAN, STD, "crop"),
        precision=precision, device=torch.device("cpu"), cache_root=root,
    )  # fmt: skip


def test_features_are_the_pooled_output_of_the_frozen_layers(images, tmp_path) -> None:
    net = _net()
    got, computed = _extractor(net, tmp_path / "cache").features(images)
    x = to_model_input(torch.from_numpy(images.images), MEAN, STD)
    with torch.no_grad():
        want = net.run_layers(x, 0, net.head_start + 1)  # (6, 1280): global average pooling
    assert computed == 6 and got.shape == want.shape == (6, 1280)
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    mirrored, _ = _extractor(net, tmp_path / "cache").features(images, "hflip")
    with torch.no_grad():
        want = net.run_layers(x.flip(3), 0, net.head_start + 1)
    assert float((mirrored - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_a_second_look_computes_nothing_and_new_images_alone(images, tmp_path) -> None:
    net, root = _net(), tmp_path / "cache"
    four = ImageArray(images.images[:4], images.labels[:4], images.paths[:4])
    first, computed = _extractor(net, root).features(four)
    assert computed == 4
    again, computed = _extractor(net, root).features(images)  # two more images, in a new run
    assert computed == 2
    assert torch.equal(again[:4], first)
    shuffled = ImageArray(images.images[::-1], images.labels[::-1], images.paths[::-1])
    back, computed = _extractor(net, root).features(shuffled)
    assert computed == 0 and torch.equal(back, again.flip(0))  # rows follow the images asked
    assert len(list((root / "features").glob("*.npz"))) == 1


def test_other_weights_never_get_the_cached_features(images, tmp_path) -> None:
    net, root = _net(), tmp_path / "cache"
    before, _ = _extractor(net, root).features(images)
    with torch.no_grad():  # the head is not part of the features: changing it costs nothing
        net.layers[net.infos[-1].name].weight.add_(1.0)
    assert _extractor(net, root).features(images)[1] == 0
    with torch.no_grad():  # a backbone weight: another key, every image computed again
        net.layers["features.1.conv.0.0"].weight.mul_(1.5)
    after, computed = _extractor(net, root).features(images)
    assert computed == 6 and not torch.allclose(after, before)
    with torch.no_grad():  # batchnorm statistics are part of what the layers compute
        net.layers["features.0.1"].running_mean.add_(0.1)
    assert _extractor(net, root).features(images)[1] == 6
    assert _extractor(net, root, "bf16").features(images)[1] == 6  # another precision


def test_a_changed_image_file_is_computed_again_alone(images, tmp_path) -> None:
    net, root = _net(), tmp_path / "cache"
    _extractor(net, root).features(images)
    st = os.stat(images.paths[2])
    os.utime(images.paths[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _extractor(net, root).features(images)[1] == 1


def test_a_damaged_store_is_computed_again(images, tmp_path, caplog) -> None:
    net, root = _net(), tmp_path / "cache"
    extractor = _extractor(net, root)
    good, _ = extractor.features(images)
    extractor.path("plain").write_bytes(b"not a zip file")
    with caplog.at_level("WARNING", logger="cnnkit"):
        again, computed = extractor.features(images)
    assert computed == 6 and torch.equal(again, good)
    assert "is damaged" in caplog.text


def test_a_store_that_cannot_be_written_costs_only_the_computation(
    images, tmp_path, caplog
) -> None:
    net, blocked = _net(), tmp_path / "cache"
    blocked.write_text("a file where the cache folder goes")
    with caplog.at_level("WARNING", logger="cnnkit"):
        got, computed = _extractor(net, blocked).features(images)
    want, _ = _extractor(net, tmp_path / "writable").features(images)
    assert computed == 6 and torch.equal(got, want)
    assert "the feature cache is not saved: cannot write" in caplog.text
    assert blocked.read_text() == "a file where the cache folder goes"
    assert _extractor(net, blocked).features(images)[1] == 6  # nothing was stored


def test_variants_follow_the_augmentation_and_are_stacked(images, tmp_path, caplog) -> None:
    assert feature_variants(True, True, False) == ("plain", "hflip")
    assert feature_variants(True, True, True) == ("plain", "hflip", "vflip", "hvflip")
    assert feature_variants(False, True, True) == ("plain",)
    with caplog.at_level("INFO", logger="cnnkit"):
        both = cached_features(_extractor(_net(), tmp_path), images, ("plain", "hflip"), "train")
    assert both.shape == (6, 2, 1280)
    assert "features of 12 train images and flips computed" in caplog.text
