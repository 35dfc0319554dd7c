"""Models: layer lists, presets and the ``Network`` built from them."""

from cnnkit.models.layers import LayerInfo, LayerSpec, infer_shapes, parse_layers
from cnnkit.models.network import Network
from cnnkit.models.registry import ModelSpec, build_network, list_presets, load_model_spec
from cnnkit.models.weights import load_pretrained, plan_weights

__all__ = [
    "LayerInfo",
    "LayerSpec",
    "ModelSpec",
    "Network",
    "build_network",
    "infer_shapes",
    "list_presets",
    "load_model_spec",
    "load_pretrained",
    "parse_layers",
    "plan_weights",
]
