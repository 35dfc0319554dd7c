"""Ship a trained model: verified ONNX and ``torch.export`` files, and an ONNX predictor.

    report = export_onnx("runs/shapes")          # runs/shapes/model.onnx, checked
    print(report.parity.max_abs_diff)
    load_predictor("runs/shapes/model.onnx").predict(["circle.png"])

Exports take uint8 NHWC images (what ``load_image`` returns) and normalise inside the graph;
the metadata in the file names the classes and the preprocessing (see ``graph``).
"""

from cnnkit.export.base import ExportReport
from cnnkit.export.graph import ExportModule, metadata_for, sample_images
from cnnkit.export.onnx_export import export_onnx
from cnnkit.export.pt2_export import export_pt2, load_pt2
from cnnkit.export.runtime import (
    OnnxClassifier,
    Pt2Classifier,
    is_onnx_file,
    is_pt2_file,
    load_predictor,
)
from cnnkit.export.verify import Parity, check_parity

__all__ = [
    "ExportModule",
    "ExportReport",
    "OnnxClassifier",
    "Parity",
    "Pt2Classifier",
    "check_parity",
    "export_onnx",
    "export_pt2",
    "is_onnx_file",
    "is_pt2_file",
    "load_predictor",
    "load_pt2",
    "metadata_for",
    "sample_images",
]
