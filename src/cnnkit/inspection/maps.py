"""Every layer's output for one image, and the one way cnnkit turns a map into pixels.

The learning material notes that feature values can exceed 255, so to show a map as an image
it must be normalised. ``normalize_map`` does that the same way everywhere (the inspect pages,
the report, the web app): the map's own minimum becomes 0 and its maximum 255. The raw minimum
and maximum travel alongside in ``LayerOutput`` so a page can say what the grey levels mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cnnkit.errors import ConfigError
from cnnkit.models.network import Network

__all__ = ["LayerOutput", "layer_outputs", "normalize_map", "normalize_maps"]


@dataclass(frozen=True)
class LayerOutput:
    """One layer's output for one image: ``(C, H, W)`` feature maps or an ``(N,)`` vector."""

    name: str  # conv1, relu1, maxpool1, ... as in ``Network.infos``
    type: str  # the layer type: conv, relu, maxpool, batchnorm, dropout2d, dense, ...
    values: np.ndarray  # float32 (C, H, W) or (N,)
    min: float
    max: float

    def __repr__(self) -> str:
        shape = self.values.shape
        what = f"{shape[0]} maps of {shape[1]}x{shape[2]}" if self.is_map else f"{shape[0]} values"
        values = f"values {self.min:.4g} to {self.max:.4g}"
        return f"LayerOutput({self.name} ({self.type}): {what}, {values})"

    def _repr_png_(self) -> bytes:
        """The maps as a grid (each normalised on its own), or the vector as a strip."""
        from cnnkit.inspection.render import map_grid, png_bytes, vector_strip

        if self.is_map:
            return png_bytes(map_grid(self.values, cols=min(len(self.values), 8)))
        return png_bytes(vector_strip(self.values))

    @property
    def is_map(self) -> bool:
        """True for spatial feature maps, False for vectors (after flatten or global pooling)."""
        return self.values.ndim == 3


def normalize_map(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Scale any array to uint8 for display: its minimum -> 0, its maximum -> 255.

    A constant map (including all zeros, common after ReLU) has nothing to show and becomes
    all 0 rather than a division by zero. Non-finite values are treated as the map's minimum.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    return normalize_maps(arr.reshape(1, -1)).reshape(arr.shape)


def normalize_maps(x: np.ndarray) -> np.ndarray:
    """``normalize_map`` of each ``x[k]`` on its own, all at once: ``(C, ...)`` -> uint8.

    One vectorised pass instead of a call per map (a layer of hundreds of maps, after every
    epoch on the live training page); ``normalize_map`` is this with a single map."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 0 or arr.size == 0:
        return np.zeros(arr.shape, dtype=np.uint8)
    flat = arr.reshape(arr.shape[0], -1)  # (C, values)
    finite = np.isfinite(flat)
    everywhere = bool(finite.all())  # the usual case: no masking needed
    lo = (flat if everywhere else np.where(finite, flat, np.inf)).min(axis=1, keepdims=True)
    hi = (flat if everywhere else np.where(finite, flat, -np.inf)).max(axis=1, keepdims=True)
    drawn = hi > lo  # False for a constant map and for one without a finite value
    lo, span = np.where(drawn, lo, 0.0), np.where(drawn, hi - lo, 1.0)
    scaled = ((flat if everywhere else np.where(finite, flat, lo)) - lo) * (255.0 / span)
    out = np.clip(np.rint(scaled, out=scaled), 0, 255, out=scaled).astype(np.uint8)
    out[~drawn[:, 0]] = 0
    return out.reshape(arr.shape)


@torch.no_grad()
def layer_outputs(model: Network, x: torch.Tensor) -> list[LayerOutput]:
    """Run one preprocessed image ``(1, C, H, W)`` through ``model`` and keep every output.

    The model runs in eval mode (dropout is the identity, batchnorm uses its running
    statistics), exactly as it does when it predicts; its previous mode is restored after.
    """
    if x.ndim != 4 or x.shape[0] != 1:
        raise ConfigError(
            f"layer_outputs: expected one image of shape (1, C, H, W), got {tuple(x.shape)}"
        )
    expected = tuple(model.in_shape)
    if tuple(x.shape[1:]) != expected:
        raise ConfigError(
            f"layer_outputs: the model takes {expected} (C, H, W) input, got {tuple(x.shape[1:])}"
        )
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        if param is not None:
            x = x.to(param.device)
        maps = model.feature_maps(x.float())
    finally:
        model.train(was_training)
    types = {info.name: info.spec.type for info in model.infos}
    out = []
    for name, tensor in maps:
        values = tensor[0].detach().float().cpu().numpy().astype(np.float32, copy=False)
        values = np.ascontiguousarray(values)  # (C, H, W) or (N,)
        out.append(
            LayerOutput(
                name=name,
                type=types[name],
                values=values,
                min=float(values.min()) if values.size else 0.0,
                max=float(values.max()) if values.size else 0.0,
            )
        )
    return out
