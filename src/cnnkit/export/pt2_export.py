"""``export_pt2``: a run directory to a verified ``torch.export`` program (``.pt2``).

The program has the same contract as the ONNX export (uint8 NHWC in, logits and probabilities
out, dynamic batch) and carries the same metadata as an extra file, ``cnnkit.json``. It is
loaded back with ``torch.export.load`` and compared with the original before it gets its name.
(TorchScript is deprecated in this PyTorch, so there is no TorchScript export.)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.export.pt2_archive.constants import (
    CONSTANTS_DIR,
    CUSTOM_OBJ_FILENAME_PREFIX,
    OPAQUE_OBJ_FILENAME_PREFIX,
)

from cnnkit.checkpoint import ModelMeta
from cnnkit.errors import CheckpointError, ExportError, first_line
from cnnkit.export.base import (
    ExportReport,
    export_inputs,
    output_path,
    quiet_exporter,
    write_verified,
)
from cnnkit.export.graph import (
    meta_from_metadata,
    metadata_for,
)
from cnnkit.export.verify import (
    DEFAULT_BATCH_SIZES,
    DEFAULT_TOLERANCE,
    Logits,
)

__all__ = ["METADATA_FILE", "export_pt2", "load_pt2"]

METADATA_FILE = "cnnkit.json"
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def export_pt2(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    check_images: int = 64,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
) -> ExportReport:
    """Export ``run_dir``'s model to ``out`` (default ``RUN_DIR/model.pt2``) and verify it."""
    start = time.perf_counter()
    path = output_path(run_dir, out, ".pt2")
    model, meta, module, example, batch = export_inputs(run_dir)
    try:
        with quiet_exporter(), torch.no_grad():
            program = torch.export.export(module, (example,), dynamic_shapes={"image": {0: batch}})
    except Exception as exc:  # torch.export raises many types; the reason is what matters
        raise ExportError(f"pt2 export of {run_dir} failed: {first_line(exc)}") from exc

    def write(tmp: Path) -> Logits:
        buffer = io.BytesIO()  # saved through a buffer: the archive's folder is not the tmp name
        with quiet_exporter():
            torch.export.save(
                program, buffer, extra_files={METADATA_FILE: json.dumps(metadata_for(meta))}
            )
        tmp.write_bytes(buffer.getvalue())
        loaded, _ = load_pt2(tmp)
        return loaded

    return write_verified(
        path,
        run_dir,
        model,
        meta,
        fmt="pt2",
        label="pt2",
        write=write,
        check_images=check_images,
        tolerance=tolerance,
        batch_sizes=batch_sizes,
        started=start,
    )


def _vet_archive(path: str | Path) -> None:
    """Refuse archives whose constants ``torch.export.load`` would unpickle as Python objects.

    Its custom-object and opaque-object constants go through the unrestricted pickle; cnnkit
    exports have neither. (Tensors pickled inside the archive are loaded ``weights_only``.)
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path}: not a torch.export archive ({exc})") from None
    unsafe = (
        f"/{CONSTANTS_DIR}{CUSTOM_OBJ_FILENAME_PREFIX}",
        f"/{CONSTANTS_DIR}{OPAQUE_OBJ_FILENAME_PREFIX}",
    )
    for name in names:
        if any(marker in f"/{name}" for marker in unsafe):
            raise CheckpointError(f"{path}: refused, it holds pickled Python objects ({name})")


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside, even one asking for ``weights_only=False``, is restricted to
    tensors and plain containers (torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``)."""
    before = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[FORCE_WEIGHTS_ONLY]
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = before


def load_pt2(path: str | Path) -> tuple[Logits, ModelMeta]:
    """A ``.pt2`` export as a function uint8 ``(B, S, S, C)`` -> logits ``(B, classes)``.

    ``torch.export.load`` unpickles parts of the archive; here nothing in it can run code:
    archives with pickled Python objects are refused, and tensors load ``weights_only``.
    """
    _vet_archive(path)
    extra = {METADATA_FILE: ""}
    try:
        with quiet_exporter(), _weights_only_loads():
            program = torch.export.load(str(path), extra_files=extra)
    except Exception as exc:  # a damaged archive raises anything from zipfile to pickle errors
        raise CheckpointError(
            f"{path}: not a loadable torch.export program ({first_line(exc, 200)})"
        ) from None
    meta = meta_from_metadata(json.loads(extra[METADATA_FILE] or "{}"), str(path))
    module = program.module()

    @torch.no_grad()
    def logits(images: np.ndarray) -> np.ndarray:
        return module(torch.from_numpy(np.ascontiguousarray(images)))[0].numpy()

    return logits, meta
