"""Pictures of what the network does with one image, ready for a web page.

Every layer's feature maps (``layer_outputs``, each map scaled with ``normalize_map``) and
the Grad-CAM heat map (``grad_cam``) blended over the input, all as PNG ``data:`` URLs so the
page can show them without another request.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from cnnkit.checkpoint import ModelMeta
from cnnkit.inspection import default_cam_layer, grad_cam, layer_outputs, normalize_map
from cnnkit.models.network import Network

__all__ = ["explain_image", "heat_overlay", "png_data_url"]


def png_data_url(pixels: np.ndarray) -> str:
    """uint8 ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` to ``data:image/png;base64,...``."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def heat_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a ``(H, W)`` heat map in [0, 1] (inferno colours) over a uint8 ``(H, W, C)`` image."""
    from matplotlib import colormaps

    rgb = image if image.shape[2] == 3 else np.repeat(image, 3, axis=2)  # (H, W, 3)
    colours = colormaps["inferno"](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0  # (H, W, 3)
    blended = (1.0 - alpha) * rgb.astype(np.float64) + alpha * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


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
                    png_data_url(normalize_map(out.values[c]))
                    for c in range(min(channels, max_maps))
                ],
            }
        )
    return {
        "class": meta.classes[index],
        "probabilities": {c: round(float(p), 6) for c, p in zip(meta.classes, probs, strict=True)},
        "input": png_data_url(pixels),
        "gradcam": png_data_url(heat_overlay(pixels, heat)),
        "gradcam_layer": default_cam_layer(model),
        "layers": layers,
    }
