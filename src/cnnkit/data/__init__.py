"""Data: safe image decoding, folder data sets, the decode cache and the shapes generator."""

from cnnkit.data.cache import DecodedImages, decode_cached, default_cache_root
from cnnkit.data.dataset import ImageArray, PreparedData, load_split, prepare_data
from cnnkit.data.folder import FolderLayout, ImageList, scan_folder, stratified_split
from cnnkit.data.images import load_image, open_image, to_model_input
from cnnkit.data.preprocessing import Preprocessing
from cnnkit.data.shapes import SHAPE_CLASSES, draw_shape, generate_shapes

__all__ = [
    "SHAPE_CLASSES",
    "DecodedImages",
    "FolderLayout",
    "ImageArray",
    "ImageList",
    "PreparedData",
    "Preprocessing",
    "decode_cached",
    "default_cache_root",
    "draw_shape",
    "generate_shapes",
    "load_image",
    "load_split",
    "open_image",
    "prepare_data",
    "scan_folder",
    "stratified_split",
    "to_model_input",
]
