"""See inside a network: every layer's output for an image, kernels, and Grad-CAM heat maps."""

from cnnkit.inspection.gradcam import default_cam_layer, grad_cam
from cnnkit.inspection.maps import LayerOutput, layer_outputs, normalize_map

__all__ = ["LayerOutput", "default_cam_layer", "grad_cam", "layer_outputs", "normalize_map"]
