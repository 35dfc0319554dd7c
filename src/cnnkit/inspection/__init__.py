"""See inside a network: every layer's output for an image, kernels, and Grad-CAM heat maps.

``explain_conv`` / ``explain_pool`` compute the learning material's worked examples step by
step; ``explain_pixel`` writes out the same arithmetic for any value of a trained model;
``inspect_image`` writes the layer-by-layer page for one image and a trained model.
"""

from cnnkit.inspection.explain import explain_conv, explain_pool
from cnnkit.inspection.gradcam import default_cam_layer, grad_cam
from cnnkit.inspection.maps import LayerOutput, layer_outputs, normalize_map
from cnnkit.inspection.pixel import PixelExplanation, explain_pixel
from cnnkit.inspection.walkthrough import InspectResult, inspect_image

__all__ = [
    "InspectResult",
    "LayerOutput",
    "PixelExplanation",
    "default_cam_layer",
    "explain_conv",
    "explain_pixel",
    "explain_pool",
    "grad_cam",
    "inspect_image",
    "layer_outputs",
    "normalize_map",
]
