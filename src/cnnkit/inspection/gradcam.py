"""Grad-CAM: which parts of the image pushed the network towards a class.

Selvaraju et al. (2017): take the feature maps ``A`` of the last layer that still has spatial
maps, and the gradient of the class score with respect to them. Each map's weight is its mean
gradient; the heat map is ``ReLU(sum_k weight_k * A_k)``, upsampled to the image and scaled to
[0, 1]. Only positive evidence for the class is shown; 0 means "no evidence here".
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cnnkit.errors import ConfigError
from cnnkit.models.network import Network

__all__ = ["default_cam_layer", "grad_cam"]


def default_cam_layer(model: Network) -> str:
    """The last layer before the head whose output is a spatial map larger than 1x1.

    For the presets this is the ReLU after the last convolution (``fast``) or the ReLU that
    ends the feature extractor (``seed``): the most abstract maps that still know "where".
    """
    spatial = [info for info in model.infos[: model.head_start] if len(info.out_shape) == 3]
    if not spatial:
        raise ConfigError("grad_cam: the model has no layer with spatial feature maps")
    larger = [info for info in spatial if info.out_shape[1] * info.out_shape[2] > 1]
    return (larger or spatial)[-1].name


def grad_cam(
    model: Network,
    x: torch.Tensor,
    class_index: int | None = None,
    *,
    layer: str | None = None,
) -> tuple[np.ndarray, int]:
    """Heat map ``(H, W)`` float32 in [0, 1] at the input's resolution, and the class used.

    ``x`` is one preprocessed image ``(1, C, H, W)``; ``class_index`` defaults to the predicted
    class; ``layer`` (a name such as ``relu4``) defaults to ``default_cam_layer(model)``.
    """
    if x.ndim != 4 or x.shape[0] != 1:
        raise ConfigError(
            f"grad_cam: expected one image of shape (1, C, H, W), got {tuple(x.shape)}"
        )
    names = [info.name for info in model.infos]
    target = layer or default_cam_layer(model)
    if target not in names:
        raise ConfigError(f"grad_cam: unknown layer {target!r}, expected one of {', '.join(names)}")
    info = model.infos[names.index(target)]
    if len(info.out_shape) != 3:
        raise ConfigError(f"grad_cam: layer {target!r} outputs a vector, not feature maps")
    classes = model.num_classes
    if class_index is not None and not 0 <= class_index < classes:
        raise ConfigError(f"grad_cam: class index {class_index} out of range 0..{classes - 1}")

    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    device = param.device if param is not None else x.device
    try:
        # Works even when called under torch.inference_mode() (a web server, say).
        with torch.inference_mode(False), torch.enable_grad():
            h = x.detach().clone().float().to(device)
            activation = None
            for name in (info.name for info in model.infos):  # every layer, groups opened
                module = model.layers[name]
                if activation is not None:
                    h = module(h)
                    continue
                with torch.no_grad():  # no graph before the maps: nothing there needs one
                    h = module(h)
                if name == target:
                    activation = h.detach().requires_grad_(True)  # (1, K, h, w), a leaf
                    h = activation
            logits = h  # (1, classes)
            chosen = int(logits[0].argmax()) if class_index is None else int(class_index)
            assert activation is not None
            (grads,) = torch.autograd.grad(logits[0, chosen], activation)  # (1, K, h, w)
    finally:
        model.train(was_training)
    weights = grads.mean(dim=(2, 3), keepdim=True)  # (1, K, 1, 1)
    cam = F.relu((weights * activation.detach()).sum(dim=1, keepdim=True))  # (1, 1, h, w)
    cam = F.interpolate(cam, size=tuple(x.shape[2:]), mode="bilinear", align_corners=False)
    cam = cam[0, 0].clamp_min(0)  # (H, W)
    peak = float(cam.max())
    heat = (cam / peak) if peak > 0 else torch.zeros_like(cam)
    return heat.cpu().numpy().astype(np.float32), chosen
