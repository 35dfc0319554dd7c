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
import re
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

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
from cnnkit.export.runtime import Pt2Classifier
from cnnkit.export.verify import (
    DEFAULT_BATCH_SIZES,
    DEFAULT_TOLERANCE,
    Logits,
)
from cnnkit.model_io import ModelMeta

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
    overwrite: bool = False,
) -> ExportReport:
    """Export ``run_dir``'s model to ``out`` (default ``RUN_DIR/model.pt2``) and verify it."""
    start = time.perf_counter()
    path = output_path(run_dir, out, ".pt2", overwrite)
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
        exported = Pt2Classifier(tmp)  # checked as predict runs it
        return lambda images: exported.logits(images).numpy()

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


# Every entry a weights-only cnnkit export holds, below the archive's root folder. Anything
# else is refused: torch reads entries through miniz, whose lookups ignore case, so a name is
# compared exactly and no two names may differ only in case.
_ALLOWED_ENTRIES = re.compile(
    r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/model\.json|data/sample_inputs/model\.pt|extra/cnnkit\.json"
    r"|data/weights/model_weights_config\.json|data/weights/weight_[0-9]{1,6}"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_[0-9]{1,6})"
)
_PAYLOAD_NAME = {
    "weights": re.compile(r"weight_[0-9]{1,6}"),
    "constants": re.compile(r"tensor_[0-9]{1,6}"),
}
_MAX_CONFIG_BYTES = 16 << 20


def _vet_archive(path: str | Path) -> None:
    """Refuse any archive that is more than tensors, a graph and cnnkit's metadata.

    ``torch.export.load`` unpickles custom-object and opaque-object constants with the
    unrestricted pickle, and weights or constants marked ``use_pickle`` with
    ``weights_only=False``. cnnkit exports have none of these, so only the entries a
    weights-only export needs are allowed (by exact name, case-insensitively unique), and the
    weights and constants tables may name only raw tensor payloads.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            roots = {name.split("/", 1)[0] for name in names}
            if len(roots) != 1 or any("/" not in name for name in names):
                raise CheckpointError(f"{path}: not a torch.export archive (no single root)")
            (root,) = roots
            lowered: set[str] = set()
            for name in names:
                inner = name.split("/", 1)[1]
                if not _ALLOWED_ENTRIES.fullmatch(inner):
                    raise CheckpointError(
                        f"{path}: refused, it holds an entry a weights-only export does not "
                        f"({_safe(name)}); it may carry pickled Python objects"
                    )
                if inner.lower() in lowered:
                    raise CheckpointError(f"{path}: refused, duplicate entry {_safe(name)}")
                lowered.add(inner.lower())
            _vet_graph(path, archive, f"{root}/models/model.json")
            for kind, pattern in _PAYLOAD_NAME.items():
                config_name = f"{root}/data/{kind}/model_{kind}_config.json"
                if config_name in names:
                    _vet_payload_config(path, archive, config_name, pattern)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"{path}: not a torch.export archive ({exc})") from None


def _vet_payload_config(
    path: str | Path, archive: zipfile.ZipFile, name: str, pattern: re.Pattern[str]
) -> None:
    """Every weight or constant of the table is a raw tensor payload, never a pickle."""
    if archive.getinfo(name).file_size > _MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path}: refused, {_safe(name)} is too large")
    try:
        table = json.loads(archive.read(name))
        entries = table["config"]
        if not isinstance(entries, dict):
            raise TypeError("config is not a mapping")
        payloads = list(entries.values())
        if not all(isinstance(entry, dict) for entry in payloads):
            raise TypeError("an entry is not a mapping")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: {_safe(name)} is damaged ({exc})") from None
    for entry in payloads:
        if entry.get("use_pickle") is not False:
            raise CheckpointError(f"{path}: refused, it holds pickled Python objects ({name})")
        if not isinstance(entry.get("path_name"), str) or not pattern.fullmatch(entry["path_name"]):
            raise CheckpointError(
                f"{path}: refused, {_safe(name)} names a payload that is not a tensor"
            )


# What a graph may call: ATen operators (tensor arithmetic, no I/O) and tuple indexing.
_TARGET = re.compile(r"torch\.ops\.aten\.[a-z0-9_]{1,60}\.[A-Za-z0-9_]{1,60}|_operator\.getitem")
# Symbolic sizes are parsed by sympy, which evaluates Python: only these words may appear.
_EXPR_TOKEN = re.compile(
    r"\s+|[0-9]+(\.[0-9]+)?|'[a-z]{1,3}[0-9]{1,6}'|[A-Za-z]{1,20}[0-9]{0,6}|[-+*/%(),=<>!]"
)
_EXPR_WORDS = frozenset(
    [
        "Symbol",
        "Integer",
        "Rational",
        "Float",
        "positive",
        "integer",
        "real",
        "True",
        "False",
        "Mod",
        "PythonMod",
        "FloorDiv",
        "CeilDiv",
        "CleanDiv",
        "Max",
        "Min",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "And",
        "Or",
        "Not",
        "Abs",
        "floor",
        "ceiling",
        "Pow",
        "PowByNatural",
        "IntTrueDiv",
        "FloatTrueDiv",
        "ToFloat",
        "TruncToInt",
        "oo",
    ]
)
_GRAPH_ONLY_KEYS = ("as_custom_obj", "as_operator", "as_graph", "as_sym_float")  # never in ours


def _safe_expr(text: str) -> bool:
    """True when every token of a sympy expression is a number, an operator, a size symbol
    (``s31``) or one of ``_EXPR_WORDS``: nothing that could name a Python built-in."""
    if len(text) > 500:
        return False
    at = 0
    while at < len(text):
        match = _EXPR_TOKEN.match(text, at)
        if match is None:
            return False
        word = match.group()
        if (
            word[0].isalpha()
            and word not in _EXPR_WORDS
            and not re.fullmatch(r"[a-z]{1,3}[0-9]{1,6}", word)
        ):
            return False
        at = match.end()
    return True


def _vet_graph(path: str | Path, archive: zipfile.ZipFile, name: str) -> None:
    """The program's graph calls only ATen operators, has no guard code (which torch turns
    into Python and runs) and only plain size expressions (which sympy evaluates)."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        return  # torch.export.load reports the missing graph
    if info.file_size > 64 * _MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path}: refused, {_safe(name)} is too large")
    try:
        graph = json.loads(archive.read(name))
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(
            f"{path}: {_safe(name)} is damaged ({first_line(exc, 100)})"
        ) from None

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: refused, its graph {why}")

    stack: list[object] = [graph]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            if key == "target" and not (isinstance(value, str) and _TARGET.fullmatch(value)):
                raise refuse(f"calls something other than a tensor operator ({_safe(str(value))})")
            if key == "expr_str" and not (isinstance(value, str) and _safe_expr(value)):
                raise refuse(
                    f"holds a size expression that is not plain arithmetic ({_safe(str(value))})"
                )
            if key == "guards_code" and value:
                raise refuse("carries guard code")
            if key in _GRAPH_ONLY_KEYS or (key == "custom_obj_values" and value):
                raise refuse(f"holds Python objects ({key})")
            stack.append(value)


def _safe(name: str) -> str:
    """An archive entry's name as printable ASCII, at most 120 characters."""
    return ascii(name)[1:-1][:120]


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
    only the entries of a weights-only export are allowed (``_vet_archive``), and every
    ``torch.load`` inside is forced to ``weights_only``.
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
