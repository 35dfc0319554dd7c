"""Features of a frozen backbone, computed once per image and cached beside the decode cache.

While the backbone is frozen (the first ``train.freeze_epochs`` epochs of a run that starts
from weights), what it computes for an image never changes. So each image goes through it
once, in ``models.fold``'s fast inference copy (batchnorm folded, activations fused,
channels_last, bf16 where native), and an epoch of the head is a few small matrix products
over the stored vectors.

Augmentation of stored vectors: the mirror image (and, with ``augment.vflip``, the
upside-down one) is one more pass through the backbone, stored as its own *variant*; each
epoch feeds every image as one of its variants, drawn at random. Warps (shear, rotation,
zoom, shift) would need the backbone for every image in every epoch: they apply in the
fine-tune epochs only.

The store is ``CACHE/features/<key>.npz`` (``CACHE``: the decode cache's folder): ``stamps``,
each image's absolute path, size and modification time (as the decode cache stamps them),
and ``features`` (N, D) float32. ``key`` digests everything else a feature depends on: the
frozen layers' weights and buffers (their sha256, so features of other weights are never
used), their architecture, the feature layer, the input (size, channels, resize, mean,
std), the precision and the variant. Images are looked up one by one, so another split,
another run or a resume on the same folder computes only the images it has not seen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnkit.data.cache import file_stamp
from cnnkit.data.dataset import ImageArray
from cnnkit.data.preprocessing import Preprocessing
from cnnkit.errors import RunDirError
from cnnkit.files import atomic_write
from cnnkit.models.fold import FastNetwork, inference_copy
from cnnkit.models.network import Network

__all__ = ["VARIANTS", "FeatureExtractor", "feature_variants"]

log = logging.getLogger("cnnkit")
FEATURES_VERSION = 1
FOLDER = "features"
BATCH = 64
VARIANTS = {"plain": (), "hflip": (3,), "vflip": (2,), "hvflip": (2, 3)}  # dims flipped


def feature_variants(augment: bool, hflip: bool, vflip: bool) -> tuple[str, ...]:
    """The variants a head epoch draws from: the image, and its flips that augmentation
    would make."""
    if not augment:
        return ("plain",)
    flips = [("hflip", hflip), ("vflip", vflip), ("hvflip", hflip and vflip)]
    return ("plain", *(name for name, on in flips if on))


def frozen_digest(model: Network, stop: int) -> str:
    """sha256 of what the layers ``infos[:stop]`` compute with: their architecture and
    names, and every weight and buffer they hold (not batchnorm's step counter)."""
    digest = hashlib.sha256()
    for info in model.infos[:stop]:
        digest.update(json.dumps([info.name, info.spec.to_dict()], sort_keys=True).encode())
        for name, tensor in sorted(model.layers[info.name].state_dict().items()):
            if name.endswith("num_batches_tracked"):
                continue
            t = tensor.detach().to("cpu").contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class FeatureExtractor:
    """The frozen layers ``infos[:stop]`` of a network, fast, with what keys their features.

    ``stop`` is one past the feature layer (the global pooling or flatten): the features
    are that layer's output, the vectors the classification layers see."""

    fast: FastNetwork
    stop: int
    setting: str  # digest of everything but the image and the variant
    preprocessing: Preprocessing  # how the images are fed
    device: torch.device
    root: Path
    dim: int  # the length of a feature vector

    @classmethod
    def create(
        cls,
        model: Network,
        stop: int,
        *,
        preprocessing: Preprocessing,
        precision: str,
        device: torch.device,
        cache_root: Path,
    ) -> FeatureExtractor:
        c, size, _ = model.in_shape
        pre = preprocessing
        setting = json.dumps(
            [FEATURES_VERSION, frozen_digest(model, stop), model.infos[stop - 1].name,
             [c, size, pre.resize], list(pre.mean), list(pre.std), precision],
        )  # fmt: skip
        fast = inference_copy(model, device, precision)
        (dim,) = model.infos[stop - 1].out_shape
        return cls(fast, stop, setting, pre, device, cache_root / FOLDER, dim)

    def path(self, variant: str) -> Path:
        key = hashlib.sha256(f"{self.setting}|{variant}".encode()).hexdigest()[:32]
        return self.root / f"{key}.npz"

    @torch.inference_mode()
    def compute(self, images: np.ndarray, variant: str) -> torch.Tensor:
        """(N, D) float32 features of uint8 images (N, S, S, C), no cache."""
        out = []
        for start in range(0, len(images), BATCH):
            batch = torch.from_numpy(np.array(images[start : start + BATCH]))
            x = self.preprocessing.to_model_input(batch.to(self.device))  # (B, C, S, S)
            if VARIANTS[variant]:
                x = x.flip(VARIANTS[variant])
            out.append(self.fast.run_layers(x, 0, self.stop).cpu())
        return torch.cat(out) if out else torch.zeros((0, self.dim))

    def features(self, images: ImageArray, variant: str = "plain") -> tuple[torch.Tensor, int]:
        """(N, D) float32 features of ``images`` in order, and how many were computed (the
        rest came from the cache); the newly computed ones are added to it."""
        path = self.path(variant)
        stamps = [file_stamp(p) for p in images.paths]
        stored, rows = _read(path, self.dim)
        index = {s: i for i, s in enumerate(rows)}
        missing = [i for i, s in enumerate(stamps) if s not in index]
        if missing:
            new = self.compute(images.images[np.array(missing, dtype=np.int64)], variant)
            stored = torch.cat([stored, new])
            rows += [stamps[i] for i in missing]
            index.update({s: i for i, s in enumerate(rows)})
            _write(path, stored, rows)
        return stored[torch.tensor([index[s] for s in stamps], dtype=torch.int64)], len(missing)


def _read(path: Path, dim: int) -> tuple[torch.Tensor, list[str]]:
    """The store at ``path``: features (R, dim) and each row's stamp; empty when absent or
    damaged."""
    empty = torch.zeros((0, dim)), []
    if not path.is_file():
        return empty
    try:
        with np.load(path, allow_pickle=False) as f:
            stamps = [s.decode("utf-8", "surrogateescape") for s in f["stamps"].tolist()]
            features = torch.from_numpy(np.array(f["features"], dtype=np.float32))
        if features.shape != (len(stamps), dim):
            raise ValueError(f"features of shape {tuple(features.shape)} for {len(stamps)} rows")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        log.warning("feature cache %s is damaged (%s); computing it again", path, exc)
        return empty
    return features, stamps


def _write(path: Path, features: torch.Tensor, stamps: list[str]) -> None:
    """Replace the store at ``path`` whole (``atomic_write``). A cache that cannot be written
    costs the next run the same computation, nothing else."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
            encoded = np.array([s.encode("utf-8", "surrogateescape") for s in stamps])
            np.savez(f, stamps=encoded, features=features.numpy())

    try:
        atomic_write(path, write)
    except RunDirError as exc:
        log.warning("the feature cache is not saved: %s", exc)


def cached_features(
    extractor: FeatureExtractor, images: ImageArray, variants: tuple[str, ...], what: str
) -> torch.Tensor:
    """(N, V, D) features of ``images`` for each variant, saying how many were computed."""
    start = time.perf_counter()
    parts, computed = [], 0
    for variant in variants:
        feats, n = extractor.features(images, variant)
        parts.append(feats)
        computed += n
    seconds = time.perf_counter() - start
    total = len(images) * len(variants)
    if computed:
        log.info(
            "frozen backbone: features of %s computed in %.1fs (%.0f img/s), %d from the cache",
            f"{computed:,} {what} images{' and flips' if len(variants) > 1 else ''}",
            seconds, computed / max(seconds, 1e-9), total - computed,
        )  # fmt: skip
    else:
        log.info("frozen backbone: features of %s read from the cache", f"{total:,} {what} images")
    return torch.stack(parts, dim=1)
