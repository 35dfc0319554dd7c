"""Pictures of what the network does with one image, ready for a web page.

Every layer's feature maps (``layer_outputs``, each map scaled with ``normalize_map``) and
the Grad-CAM heat map (``grad_cam``) blended over the input, all as PNG ``data:`` URLs so the
page can show them without another request. The pictures are drawn by ``inspection.render``,
the same code that draws ``cnnkit inspect``'s pages, so the web page and the report agree
pixel for pixel.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cnnkit.inspection import default_cam_layer, grad_cam, layer_outputs, normalize_map
from cnnkit.inspection.render import data_uri, overlay
from cnnkit.model_io import ModelMeta
from cnnkit.models.network import Network

__all__ = ["explain_image"]


def explain_image(
    model: Network, meta: ModelMeta, pixels: np.ndarray, max_maps: int = 8
) -> dict[str, Any]:
    """Class, probabilities, Grad-CAM overlay and up to ``max_maps`` maps per spatial layer.

    ``pixels`` is the preprocessed uint8 ``(S, S, C)`` image the model is fed.
    """
    param = next(model.parameters())
    x = meta.preprocessing.to_model_input(torch.tensor(pixels[None]))  # (1, C, S, S)
    x = x.to(param.device, param.dtype)
    outputs = layer_outputs(model, x)
    with torch.no_grad():
        probs = torch.softmax(model(x).float(), dim=1)[0].cpu().numpy()  # (classes,)
    heat, index = grad_cam(model, x)  # (S, S) in [0, 1], predicted class
    layers = []
    for out in outputs:
        if not out.is_map:
            continue
        channels = out.values.shape[0]
        layers.append(
            {
                "name": out.name,
                "type": out.type,
                "shape": list(out.values.shape),  # (C, H, W)
                "min": round(out.min, 6),
                "max": round(out.max, 6),
                "maps": [
                    data_uri(normalize_map(out.values[c])) for c in range(min(channels, max_maps))
                ],
            }
        )
    return {
        "class": meta.classes[index],
        "probabilities": {c: round(float(p), 6) for c, p in zip(meta.classes, probs, strict=True)},
        "input": data_uri(pixels),
        "gradcam": data_uri(overlay(pixels, heat)),
        "gradcam_layer": default_cam_layer(model),
        "layers": layers,
    }
