"""Refuse an ONNX file that is not what ``cnnkit export`` writes, before onnxruntime sees it.

An ``.onnx`` file is a program: a few hundred bytes of ``Expand``, ``Tile`` or broadcasting
can ask onnxruntime for gigabytes at the first prediction, initialisers can name external
files, and the metadata can ask for a size of 30,000 pixels. ``check_onnx`` reads the file itself
(at most ``MAX_ONNX_BYTES``) and accepts only what a cnnkit export is:

- metadata that ``ModelMeta`` accepts (size, channels, classes, finite mean and std);
- standard operators from ``ALLOWED_OPS`` (those of a CNN: convolutions, including grouped
  and depthwise ones, pooling, normalisation, activations, residual adds, squeeze-excitation
  gates, dense layers), with no functions, subgraphs, sparse or external data;
- one uint8 input ``(batch, S, S, C)`` matching the metadata, outputs logits and
  probabilities with one score per class;
- weights of at most ``MAX_INITIALIZER_VALUES`` values, and intermediate tensors whose
  per-image sizes, inferred from the shapes, stay within ``MAX_ACTIVATIONS`` (the bounds
  ``models.limits`` puts on a network built from a run directory).
"""

from __future__ import annotations

from typing import Any

from cnnkit.errors import CheckpointError
from cnnkit.export.graph import INPUT_NAME, OUTPUT_NAMES, meta_from_metadata
from cnnkit.extras import require
from cnnkit.model_io import ModelMeta
from cnnkit.models.limits import MAX_ACTIVATIONS, MAX_PARAMS

__all__ = ["ALLOWED_OPS", "MAX_INITIALIZER_VALUES", "MAX_ONNX_BYTES", "check_onnx"]

MAX_INITIALIZER_VALUES = 2 * MAX_PARAMS  # weights plus batchnorm statistics and constants
MAX_ONNX_BYTES = 4 * MAX_INITIALIZER_VALUES + (16 << 20)  # float32 values and metadata

ALLOWED_OPS = frozenset(
    {
        # layers
        "Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
        "BatchNormalization", "InstanceNormalization", "LayerNormalization", "Gemm", "MatMul",
        "Dropout", "ReduceMean", "ReduceMax", "ReduceSum", "Pad",
        # activations and gates (ReLU6 is a Clip, squeeze-excitation a (Hard)Sigmoid and Mul)
        "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Gelu", "Erf", "Tanh", "Sigmoid",
        "HardSigmoid", "HardSwish", "Softplus", "Clip", "Softmax", "LogSoftmax",
        # arithmetic: normalisation inside the graph, residual adds, scaling
        "Add", "Sub", "Mul", "Div", "Neg", "Sqrt", "Reciprocal", "Pow", "Abs", "Max", "Min",
        # layout and shape bookkeeping
        "Cast", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity",
        "Constant", "Shape", "Gather", "Concat", "Slice",
    }
)  # fmt: skip
# Operators whose output never holds more values than their first input: an output whose
# shape inference leaves open (a reshape to -1) is bounded by that input.
NOT_LARGER = frozenset(
    {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Transpose", "Cast", "Slice"}
)


def _refuse(where: str, why: str) -> CheckpointError:
    return CheckpointError(f"{where}: not a cnnkit export ({why})")


def _dims(value_info: Any) -> list[int] | None:
    """The dims of a typed value, None unless every one is a known number."""
    if value_info.type.WhichOneof("value") != "tensor_type":
        return None
    tensor = value_info.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    return None if any(d < 0 for d in dims) else dims


def _numel(dims: list[int] | Any) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _check_operators(model: Any, onnx: Any, where: str) -> int:
    """Operators, opsets and weights; returns the number of weight values."""
    if model.functions or model.graph.sparse_initializer or model.training_info:
        raise _refuse(where, "holds functions, sparse weights or training graphs")
    domains = {o.domain for o in model.opset_import} - {"", "ai.onnx"}
    if domains:
        raise _refuse(where, f"uses operators of domain {sorted(domains)[0]!r}")
    values = 0
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ALLOWED_OPS:
            raise _refuse(where, f"operator {node.op_type!r} of node {node.name!r}")
        for attr in node.attribute:
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise _refuse(where, f"node {node.name!r} holds a subgraph")
            if attr.type == onnx.AttributeProto.TENSOR:
                values += _numel(attr.t.dims)
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
            raise _refuse(where, f"weight {tensor.name!r} refers to an external file")
        if any(d < 0 for d in tensor.dims):
            raise _refuse(where, f"weight {tensor.name!r} has a negative dimension")
        values += _numel(tensor.dims)
    if values > MAX_INITIALIZER_VALUES:
        raise _refuse(where, f"{values:,} weight values, more than {MAX_INITIALIZER_VALUES:,}")
    return values


def _check_signature(model: Any, meta: ModelMeta, onnx: Any, where: str) -> None:
    """The one uint8 image input ``(batch, S, S, C)`` and the two outputs."""
    weights = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    outputs = tuple(o.name for o in model.graph.output)
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME or outputs != OUTPUT_NAMES:
        raise _refuse(where, f"expected input {INPUT_NAME!r} and outputs {', '.join(OUTPUT_NAMES)}")
    tensor = inputs[0].type.tensor_type
    dims = list(tensor.shape.dim)
    want = list(meta.preprocessing.shape)
    if (
        tensor.elem_type != onnx.TensorProto.UINT8
        or len(dims) != 4
        or not dims[0].dim_param
        or [d.dim_value for d in dims[1:]] != want
    ):
        raise _refuse(
            where, f"input {INPUT_NAME!r} is not uint8 (batch, {', '.join(map(str, want))})"
        )


def _sizes(model: Any, onnx: Any, where: str, batch: int) -> dict[str, tuple[str, int]]:
    """(operator, number of values) of every node output for a batch of ``batch`` images,
    from shape inference on the graph alone: the file's own shape annotations are dropped
    (they could understate), the batch dimension is set to ``batch``."""
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]
    image = next(i for i in bare.graph.input if i.name == INPUT_NAME)
    image.type.tensor_type.shape.dim[0].dim_value = batch
    try:
        inferred = onnx.shape_inference.infer_shapes(bare, strict_mode=True, data_prop=True)
    except Exception as exc:  # onnx raises InferenceError and others: the graph is inconsistent
        raise _refuse(where, f"shapes cannot be inferred: {str(exc).strip()[:160]}") from None
    typed = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}
    known = {t.name: _numel(t.dims) for t in model.graph.initializer}
    known[INPUT_NAME] = _numel(d.dim_value for d in image.type.tensor_type.shape.dim)
    sizes = {}
    for node in inferred.graph.node:
        for name in filter(None, node.output):  # "": an optional output left out
            dims = _dims(typed[name]) if name in typed else None
            if dims is not None:
                known[name] = _numel(dims)
            elif node.op_type in NOT_LARGER and node.input and node.input[0] in known:
                known[name] = known[node.input[0]]
            else:
                raise _refuse(where, f"the size of {name!r} ({node.op_type}) is not known")
            sizes[name] = (node.op_type, known[name])
    for output in OUTPUT_NAMES:
        if output in typed:
            sizes[output] = ("output", _numel(_dims(typed[output]) or [-1]))
    return sizes


def _check_sizes(model: Any, meta: ModelMeta, onnx: Any, where: str, max_batch: int) -> None:
    """Every intermediate tensor within ``MAX_ACTIVATIONS`` values for one image, and none
    growing faster than the batch up to ``max_batch`` images (the most cnnkit sends at once):
    so a batch never takes more than ``max_batch`` times what one image does."""
    one, many = _sizes(model, onnx, where, 1), _sizes(model, onnx, where, max_batch)
    for name, (op, size) in one.items():
        if size > MAX_ACTIVATIONS:
            raise _refuse(where, f"{op} output {name!r} holds {size:,} values for one image")
        if many[name][1] > max_batch * size:
            raise _refuse(where, f"{op} output {name!r} grows faster than the batch")
    total = sum(size for _, size in one.values())
    if total > MAX_ACTIVATIONS:
        raise _refuse(where, f"intermediate tensors hold {total:,} values for one image")
    for output in OUTPUT_NAMES:
        if one[output][1] != len(meta.classes):
            raise _refuse(where, f"{output!r} does not give one score per class")


def check_onnx(data: bytes, where: str, max_batch: int) -> ModelMeta:
    """The metadata of the ONNX file ``data`` (named ``where`` in errors) after checking that
    it is a cnnkit export within cnnkit's bounds for batches of up to ``max_batch`` images;
    ``CheckpointError`` says what is not."""
    onnx = require("onnx", "export", "reading an ONNX model")
    if len(data) > MAX_ONNX_BYTES:
        raise CheckpointError(f"{where}: over {MAX_ONNX_BYTES:,} bytes, too large for a model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError, or a message nested too deeply
        raise CheckpointError(f"{where}: not a valid ONNX model ({str(exc)[:160]})") from None
    meta = meta_from_metadata({p.key: p.value for p in model.metadata_props}, where)
    _check_operators(model, onnx, where)
    _check_signature(model, meta, onnx, where)
    _check_sizes(model, meta, onnx, where, max_batch)
    return meta
