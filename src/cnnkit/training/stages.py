"""How each phase of a run trains: what an epoch is fed and which module it runs.

A full epoch (``phases``) feeds augmented images to the whole network; a head epoch feeds
the frozen backbone's cached features (``training.features``) to the layers after it. Both
give the training step the same thing: ``feed(indices) -> (inputs, labels)`` and a module
from inputs to logits (wrapped in DDP under torchrun), plus how to score the validation
images, so the step itself is the same for both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnkit.data.cache import default_cache_root
from cnnkit.data.dataset import ImageArray, PreparedData
from cnnkit.data.images import to_model_input
from cnnkit.models.fold import inference_copy
from cnnkit.models.network import Network
from cnnkit.runtime import autocast, batched_logits
from cnnkit.training import distributed as ddp
from cnnkit.training.augment import build_augmentation
from cnnkit.training.features import FeatureExtractor, cached_features, feature_variants
from cnnkit.training.phases import Phases, set_trainable
from cnnkit.training.setup import Session

__all__ = ["FeatureFeed", "Head", "ImageFeed", "Stage", "build_stage"]

log = logging.getLogger("cnnkit")


@dataclass
class Stage:
    """What an epoch trains and how: the batches it is fed (``feed(indices) -> (x, y)``),
    the module that turns them into logits, and the validation logits of rows ``idx`` of
    the validation images for the evaluated network (``score(network, idx)``)."""

    head_only: bool
    feed: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    forward: nn.Module
    score: Callable[[nn.Module, np.ndarray], torch.Tensor]


def build_stage(
    s: Session, data: PreparedData, model: Network, phases: Phases, epoch: int
) -> Stage:
    """How the phase that ``epoch`` belongs to trains (see ``phases``), from this epoch on."""
    head_only = phases.head_only(epoch)
    set_trainable(model, phases, epoch)  # before DDP, which syncs what requires a gradient
    if line := phases.describe(epoch, model):
        log.info("%s", line)
    if not head_only:
        augment = build_augmentation(s.config.augment)
        pre = data.preprocessing
        feed = ImageFeed(data.train, s.device, pre.mean, pre.std, augment)

        def score(evaluated: nn.Module, idx: np.ndarray) -> torch.Tensor:
            images = data.val.images[idx] if s.info.enabled else data.val.images
            if s.precision == "bf16":  # folded, fused, all bf16: as fast as inference gets
                evaluated = inference_copy(evaluated, s.device, s.precision)
            return batched_logits(
                evaluated, images, pre.mean, pre.std, s.device, s.precision, tta=s.cfg.tta
            )

        return Stage(False, feed, _parallel(s, model), score)
    train_features, val_features = _head_features(s, data, model, phases)
    feed = FeatureFeed(
        train_features.to(s.device), torch.from_numpy(data.train.labels).to(s.device)
    )

    def score_head(evaluated: nn.Module, idx: np.ndarray) -> torch.Tensor:
        head = Head(evaluated, phases.feature_index).eval()
        with torch.inference_mode(), autocast(s.device, s.precision):
            v = val_features[torch.from_numpy(idx)].to(s.device)  # (n, V, D): V=2 with tta
            return torch.stack([head(v[:, i]).float() for i in range(v.shape[1])]).mean(0).cpu()

    return Stage(True, feed, _parallel(s, Head(model, phases.feature_index)), score_head)


def _parallel(s: Session, module: nn.Module) -> nn.Module:
    if not s.info.enabled:
        return module
    ids = [s.info.local_rank] if s.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def _head_features(
    s: Session, data: PreparedData, model: Network, phases: Phases
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen backbone's features of the training images (N, V, D), V their variants
    (the image and its flips when augmenting), and of the validation images (M, V', D)
    (with their mirror images for ``tta``); rank 0 computes what the cache lacks."""
    aug = s.config.augment
    root = Path(s.config.data.cache_dir) if s.config.data.cache_dir else default_cache_root()
    extractor = FeatureExtractor.create(
        model, phases.feature_index + 1, preprocessing=data.preprocessing,
        precision=s.precision, device=s.device, cache_root=root,
    )  # fmt: skip
    variants = feature_variants(aug.enabled, aug.hflip, aug.vflip)
    if len(variants) > 1:
        log.info("head epochs: augmentation is each image or its flips (%s)", ", ".join(variants))
    for turn in ("main", "others"):  # rank 0 fills the cache while the others wait
        if s.info.is_main == (turn == "main"):
            train = cached_features(extractor, data.train, variants, "training")
            val_variants = ("plain", "hflip") if s.cfg.tta else ("plain",)
            val = cached_features(extractor, data.val, val_variants, "validation")
        if turn == "main":
            ddp.barrier(s.info)
    return train, val


class Head(nn.Module):
    """The layers after the feature layer, on its output: (B, D) features -> (B, classes)."""

    def __init__(self, model: Network, feature_index: int) -> None:
        super().__init__()
        self.model, self.start = model, feature_index + 1

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.run_layers(features, self.start)


class ImageFeed:
    """Training batches from the decoded images: gathered, normalised, augmented.

    In RAM when the set fits (``data.dataset``), on the device; else gathered from the
    memory map batch by batch."""

    def __init__(
        self,
        train: ImageArray,
        device: torch.device,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: nn.Module | None,
    ) -> None:
        self.train, self.device, self.augment = train, device, augment
        self.mean, self.std = mean, std
        in_ram = isinstance(train.images, np.ndarray)
        self.images = torch.from_numpy(train.images).to(device) if in_ram else None
        self.labels = torch.from_numpy(train.labels).to(device)

    def __call__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, S, S) channels_last model inputs and (B,) labels of the images ``idx``."""
        if self.images is not None:
            xb = self.images[idx.to(self.device)]
        else:
            xb = self.train.batch(idx.numpy())[0].to(self.device, non_blocking=True)
        x = to_model_input(xb, self.mean, self.std)
        if self.augment is not None:
            x = self.augment(x).contiguous(memory_format=torch.channels_last)
        return x, self.labels[idx.to(self.device)]


class FeatureFeed:
    """Training batches of cached features: (N, V, D), each image as one of its V
    variants (the image and its flips), drawn anew for every image of every batch."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features, self.labels = features, labels

    def __call__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx.to(self.features.device)
        variants = self.features.shape[1]
        pick = torch.randint(variants, (len(idx),), device=idx.device) if variants > 1 else 0
        return self.features[idx, pick], self.labels[idx]
