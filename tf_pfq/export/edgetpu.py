"""A static check of a `.tflite` model against the Edge TPU compiler's documented rules.

The Edge TPU compiler (`edgetpu_compiler`) is a closed-source x86-64 Debian package
that cannot be installed in this environment, so tf_pfq cannot compile a model for
the Edge TPU nor run one. Instead `edgetpu_compatibility` reads the flatbuffer and
checks the requirements Coral documents for the compiler ("TensorFlow models on the
Edge TPU", coral.ai/docs/edgetpu/models-intro/):

* `subgraphs`: a single subgraph.
* `integer`: tensors are 8-bit integers (int8 or uint8) quantized with QAT-style
  fake-quant ranges; constant int32 biases are allowed. Float tensors are allowed
  only at the model's float input (feeding a QUANTIZE) and float output (produced
  by a DEQUANTIZE), which run on the CPU. int16, int4 and float compute ops fail.
* `static_shape`: tensor sizes are constant at compile time (no -1 in a shape
  signature: convert from a concrete function with a fixed batch).
* `constant_parameters`: weights and biases are compile-time constants.
* `rank`: tensors are 1-, 2- or 3-dimensional; a tensor with more dimensions may be
  larger than 1 only in its 3 innermost dimensions.
* `quantization`: per-axis (per-channel) quantization only on constant weights;
  activations are quantized per tensor; every scale is finite and positive.
* `supported_op` and per-op constraints: the op allow-list with the limitations the
  page lists (no fused activation on pooling and concatenation, equal x/y dilation
  for convolutions, Mean only over x/y (or z when a multiple of 4) and never over
  the batch, Pad/Pack not along the batch, Softmax on 1-D inputs of at most 16000
  elements, default fully-connected weight format, constant Concatenation inputs
  only as an all-zero pair). The first unsupported op splits the model and the
  compiler sends it and every op after it to the CPU.

A clean result means "no documented rule is broken", not "compiles": the compiler
also has undocumented limits (e.g. on-chip memory and very large tensors).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from tf_pfq.export.summary import OpInfo, TensorInfo, inspect

__all__ = ["SUPPORTED_OPS", "Problem", "edgetpu_compatibility"]

# Coral's "Supported operations" table, spelled as TFLite builtin operator names.
SUPPORTED_OPS = frozenset(
    {
        "ADD",
        "AVERAGE_POOL_2D",
        "CONCATENATION",
        "CONV_2D",
        "DEPTHWISE_CONV_2D",
        "EXPAND_DIMS",
        "FULLY_CONNECTED",
        "L2_NORMALIZATION",
        "LOGISTIC",
        "LSTM",
        "UNIDIRECTIONAL_SEQUENCE_LSTM",
        "MAXIMUM",
        "MAX_POOL_2D",
        "MEAN",
        "MINIMUM",
        "MUL",
        "PACK",
        "PAD",
        "PRELU",
        "QUANTIZE",
        "REDUCE_MAX",
        "REDUCE_MIN",
        "RELU",
        "RELU6",
        "RELU_N1_TO_1",
        "RESHAPE",
        "RESIZE_BILINEAR",
        "RESIZE_NEAREST_NEIGHBOR",
        "RSQRT",
        "SLICE",
        "SOFTMAX",
        "SPACE_TO_DEPTH",
        "SPLIT",
        "SQUARED_DIFFERENCE",
        "SQUEEZE",
        "STRIDED_SLICE",
        "SUB",
        "SUM",
        "TANH",
        "TRANSPOSE",
        "TRANSPOSE_CONV",
    }
)

_INTEGER_TYPES = ("int8", "uint8")
_WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")
_SOFTMAX_MAX_ELEMENTS = 16000


@dataclasses.dataclass(frozen=True)
class Problem:
    """One broken rule: which rule, where, and why.

    Attributes:
      rule: the rule's short name (see the module docstring).
      message: a sentence naming the op/tensor and what is wrong.
      op_index: index of the op in the subgraph, or None for model-level problems.
      op: the op's builtin name, or None.
    """

    rule: str
    message: str
    op_index: int | None = None
    op: str | None = None

    def __str__(self) -> str:
        where = f"op {self.op_index} {self.op}: " if self.op is not None else ""
        return f"[{self.rule}] {where}{self.message}"


def _check_tensor(t: TensorInfo, op: OpInfo, is_weight: bool) -> list[Problem]:
    where: dict[str, Any] = {"op_index": op.index, "op": op.op}
    problems = []
    if t.is_dynamic:
        problems.append(
            Problem(
                "static_shape",
                f"tensor {t.name!r} has a dynamic shape {list(t.shape_signature)}; convert "
                "from a concrete function with a fixed batch size.",
                **where,
            )
        )
    bad = [s for s in t.scales if not (np.isfinite(s) and s > 0)]
    if bad:
        # A NaN/Inf or non-positive scale (e.g. ranges calibrated on NaN data) makes
        # every value of the tensor meaningless, whatever the op rules say.
        problems.append(
            Problem(
                "quantization",
                f"tensor {t.name!r} has invalid scale(s) {bad[:4]}; scales must be finite "
                "and positive.",
                **where,
            )
        )
    if t.is_constant:
        return problems + _check_constant(t, is_weight, where)
    return problems + _check_activation(t, where)


def _check_constant(t: TensorInfo, is_weight: bool, where: dict) -> list[Problem]:
    if is_weight and t.dtype not in _INTEGER_TYPES:
        storage = " (export with weight_storage='int8')." if t.dtype == "int4" else "."
        message = (
            f"weight tensor {t.name!r} is {t.dtype}; the Edge TPU needs 8-bit integer "
            f"weights{storage}"
        )
        return [Problem("integer", message, **where)]
    if not is_weight and t.dtype not in (*_INTEGER_TYPES, "int32"):
        return [Problem("integer", f"constant tensor {t.name!r} is {t.dtype}.", **where)]
    return []


def _check_activation(t: TensorInfo, where: dict) -> list[Problem]:
    problems = []
    if t.dtype not in _INTEGER_TYPES:
        problems.append(
            Problem(
                "integer",
                f"tensor {t.name!r} is {t.dtype}; the Edge TPU runs only 8-bit integer "
                "(int8/uint8) tensors.",
                **where,
            )
        )
    elif not t.scales:
        problems.append(
            Problem("integer", f"tensor {t.name!r} is {t.dtype} but not quantized.", **where)
        )
    if t.per_axis:
        problems.append(
            Problem(
                "quantization",
                f"activation tensor {t.name!r} is quantized per axis "
                f"(axis {t.quantized_dimension}); activations must be per tensor.",
                **where,
            )
        )
    if any(d > 1 for d in t.shape[:-3]):
        problems.append(
            Problem(
                "rank",
                f"tensor {t.name!r} of shape {list(t.shape)} is larger than 1 outside "
                "its 3 innermost dimensions.",
                **where,
            )
        )
    return problems


def _axes(op: OpInfo) -> list[int]:
    axes_tensor = op.inputs[1] if len(op.inputs) > 1 else None
    return list(axes_tensor.shape) if axes_tensor is not None else []


# One check per documented op constraint: (op, read_const) -> problem messages.
def _no_fused_activation(op: OpInfo, read_const) -> list[str]:
    if not op.fused_activation:
        return []
    return [
        f"{op.op} has a fused activation ({op.fused_activation}); the Edge TPU supports none here."
    ]


def _same_dilation(op: OpInfo, read_const) -> list[str]:
    dh, dw = op.options.get("dilationHFactor", 1), op.options.get("dilationWFactor", 1)
    return [f"dilation differs in y ({dh}) and x ({dw}); it must be the same."] if dh != dw else []


def _default_weights_format(op: OpInfo, read_const) -> list[str]:
    if op.options.get("weightsFormat", 0) == 0:
        return []
    return ["only the default fully-connected weights format is supported."]


def _mean(op: OpInfo, read_const) -> list[str]:
    data = op.inputs[0]
    axes = read_const(op.inputs[1]) if len(op.inputs) > 1 else None
    if axes is None:
        return ["reduction axes are not constant."]
    if data is None:
        return []
    rank = len(data.shape)
    axes = [int(a) % rank for a in np.ravel(axes)]
    messages = []
    if 0 in axes and rank > 1:
        messages.append("MEAN reduces the batch dimension.")
    if rank > 1 and rank - 1 in axes and data.shape[-1] % 4:
        messages.append(f"MEAN over z needs a depth that is a multiple of 4; got {data.shape[-1]}.")
    return messages


def _pad(op: OpInfo, read_const) -> list[str]:
    pads = read_const(op.inputs[1]) if len(op.inputs) > 1 else None
    if pads is not None and np.any(np.asarray(pads).reshape(-1, 2)[0] != 0):
        return ["PAD pads the batch dimension."]
    return []


def _pack(op: OpInfo, read_const) -> list[str]:
    return ["PACK along the batch dimension."] if op.options.get("axis", 0) == 0 else []


def _softmax(op: OpInfo, read_const) -> list[str]:
    if not op.inputs or op.inputs[0] is None:
        return []
    shape = op.inputs[0].shape
    if sum(d > 1 for d in shape) > 1 or int(np.prod(shape)) > _SOFTMAX_MAX_ELEMENTS:
        return [
            (
                f"SOFTMAX input {list(shape)} must be 1-D with at most "
                f"{_SOFTMAX_MAX_ELEMENTS} elements."
            )
        ]
    return []


def _all_zero(t: TensorInfo, read_const) -> bool:
    values = read_const(t)
    zero = t.zero_points[0] if t.zero_points else 0
    return values is not None and not np.any(values != zero)


def _concatenation(op: OpInfo, read_const) -> list[str]:
    constants = [t for t in op.inputs if t is not None and t.is_constant]
    if constants and (len(op.inputs) != 2 or not all(_all_zero(t, read_const) for t in constants)):
        return [
            (
                "a constant CONCATENATION input is allowed only as an all-zero tensor in "
                "a 2-input concatenation."
            )
        ]
    return []


_OP_CONSTRAINTS: dict[str, tuple] = {
    "AVERAGE_POOL_2D": (_no_fused_activation,),
    "MAX_POOL_2D": (_no_fused_activation,),
    "CONCATENATION": (_no_fused_activation, _concatenation),
    "CONV_2D": (_same_dilation,),
    "DEPTHWISE_CONV_2D": (_same_dilation,),
    "FULLY_CONNECTED": (_default_weights_format,),
    "MEAN": (_mean,),
    "PAD": (_pad,),
    "PACK": (_pack,),
    "SOFTMAX": (_softmax,),
}


def _constant_parameters(op: OpInfo) -> list[Problem]:
    """Weights and biases of a weighted op must be compile-time constants."""
    if op.op not in _WEIGHT_OPS:
        return []
    problems = []
    for k in (1, 2) if op.op != "TRANSPOSE_CONV" else (1, 3):
        param = op.inputs[k] if k < len(op.inputs) else None
        if param is not None and not param.is_constant:
            problems.append(
                Problem(
                    "constant_parameters",
                    f"input {k} ({param.name!r}) is not a compile-time constant.",
                    op_index=op.index,
                    op=op.op,
                )
            )
    return problems


def _op_constraints(op: OpInfo, read_const) -> list[Problem]:
    problems = [
        Problem("op_constraint", message, op_index=op.index, op=op.op)
        for check in _OP_CONSTRAINTS.get(op.op, ())
        for message in check(op, read_const)
    ]
    return problems + _constant_parameters(op)


def edgetpu_compatibility(model: bytes | str | os.PathLike) -> list[Problem]:
    """Checks a `.tflite` model against the Edge TPU compiler's documented requirements.

    This is a static reading of the flatbuffer, not a compilation: the Edge TPU
    compiler cannot be installed here (see the module docstring for the rules and
    their source).

    Args:
      model: flatbuffer bytes or a `.tflite` path.

    Returns:
      The problems found, in op order; an empty list when every documented rule
      holds.

    Example:
      >>> import tensorflow as tf
      >>> f = tf.function(lambda x: tf.nn.relu(x), input_signature=[tf.TensorSpec([1, 8])])
      >>> converter = tf.lite.TFLiteConverter.from_concrete_functions(
      ...     [f.get_concrete_function()], f)
      >>> [p.rule for p in edgetpu_compatibility(converter.convert())]
      ['integer', 'integer']
    """
    from tf_pfq.export.summary import read_model

    summary = inspect(model)
    model_t, _ = read_model(model)
    subgraph = model_t.subgraphs[0]

    def read_const(t: TensorInfo | None):
        if t is None or not t.is_constant:
            return None
        buffer = model_t.buffers[subgraph.tensors[t.index].buffer]
        dtype = {"int32": np.int32, "int64": np.int64, "int8": np.int8, "uint8": np.uint8}.get(
            t.dtype
        )
        if dtype is None:
            return None
        return np.frombuffer(np.asarray(buffer.data, np.uint8).tobytes(), dtype)

    problems: list[Problem] = []
    if summary.num_subgraphs != 1:
        problems.append(
            Problem(
                "subgraphs",
                f"the model has {summary.num_subgraphs} subgraphs; the Edge TPU compiler "
                "supports one.",
            )
        )
    first_unsupported = None
    for op in summary.ops:
        boundary = summary.is_io_conversion(op)
        if op.op not in SUPPORTED_OPS and not (op.op == "DEQUANTIZE" and boundary):
            tail = (
                "."
                if first_unsupported is not None
                else ("; it and every op after it would run on the CPU.")
            )
            problems.append(
                Problem(
                    "supported_op",
                    f"{op.op} is not supported by the Edge TPU{tail}",
                    op_index=op.index,
                    op=op.op,
                )
            )
            first_unsupported = first_unsupported or op.index
        problems.extend(_tensor_problems(op, boundary))
        problems.extend(_op_constraints(op, read_const))
    # The same tensor is seen as the output of one op and the input of the next.
    unique: dict[tuple[str, str], Problem] = {}
    for p in problems:
        unique.setdefault((p.rule, p.message), p)
    return list(unique.values())


def _tensor_problems(op: OpInfo, boundary: bool) -> list[Problem]:
    """The tensor rules on `op`'s inputs and outputs (model I/O conversions exempt)."""
    problems = []
    weight_inputs = {1} if op.op in _WEIGHT_OPS else set()
    for k, t in enumerate(op.inputs):
        if t is None:
            continue
        if boundary and op.op == "QUANTIZE" and k == 0:
            if t.is_dynamic:
                problems.extend(_check_tensor(t, op, False)[:1])
            continue
        problems.extend(_check_tensor(t, op, k in weight_inputs))
    if not (boundary and op.op == "DEQUANTIZE"):
        for t in op.outputs:
            problems.extend(_check_tensor(t, op, False))
    return problems
