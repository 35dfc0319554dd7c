"""``export_onnx``: a run directory to a verified ONNX file with a dynamic batch dimension.

The graph is produced by ``torch.onnx.export`` (the torch.export-based "dynamo" exporter), in
eval mode and fp32, with the weights inside the one file. Before the file gets its final name
it is loaded back with onnxruntime and compared with the PyTorch model; a file that disagrees
is never left behind.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from cnnkit.errors import ExportError, first_line
from cnnkit.export.base import (
    ExportReport,
    export_inputs,
    output_path,
    quiet_exporter,
    write_verified,
)
from cnnkit.export.graph import (
    INPUT_NAME,
    OUTPUT_NAMES,
    metadata_for,
)
from cnnkit.export.verify import DEFAULT_BATCH_SIZES, DEFAULT_TOLERANCE, Logits
from cnnkit.extras import require, require_extra

__all__ = ["export_onnx"]

MIN_OPSET = 13


def export_onnx(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    opset: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    check_images: int = 64,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    overwrite: bool = False,
) -> ExportReport:
    """Export ``run_dir``'s model to ``out`` (default ``RUN_DIR/model.onnx``) and verify it.

    ``opset`` defaults to the exporter's own choice. Raises ``ExportError`` when the export
    fails or when onnxruntime and PyTorch differ by more than ``tolerance`` on any logit.
    """
    from cnnkit.export.runtime import OnnxClassifier

    require_extra("export", "exporting to ONNX")  # onnxscript exports, onnxruntime verifies
    onnx = require("onnx", "export", "exporting to ONNX")

    if opset is not None and opset < MIN_OPSET:
        raise ExportError(
            "{setting}: expected {limit} or newer, got {value}",
            setting="opset",
            value=opset,
            limit=MIN_OPSET,
        )
    start = time.perf_counter()
    path = output_path(run_dir, out, ".onnx", overwrite)
    model, meta, module, example, batch = export_inputs(run_dir)
    try:
        with quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                module,
                (example,),
                None,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                opset_version=opset,
                dynamic_shapes={"image": {0: batch}},
                external_data=False,
                dynamo=True,
                verbose=False,
            )
        proto = program.model_proto
        onnx.helper.set_model_props(proto, metadata_for(meta))
        proto.doc_string = (
            f"cnnkit classifier ({', '.join(meta.classes)}): uint8 NHWC images in, "
            "logits and probabilities out"
        )
        onnx.checker.check_model(proto)
        data = proto.SerializeToString()
    except Exception as exc:  # the exporter raises many types; the reason is what matters
        raise ExportError(f"ONNX export of {run_dir} failed: {first_line(exc)}") from exc
    used_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)

    def write(tmp: Path) -> Logits:
        tmp.write_bytes(data)
        exported = OnnxClassifier(tmp)
        return lambda batch_images: exported.logits(batch_images).numpy()

    return write_verified(
        path,
        run_dir,
        model,
        meta,
        fmt="onnx",
        label="ONNX",
        write=write,
        check_images=check_images,
        tolerance=tolerance,
        batch_sizes=batch_sizes,
        started=start,
        opset=used_opset,
    )
