"""Reading a `.tflite` flatbuffer offline: ops, dtypes, quantization, levels, size, MACs.

The flatbuffer is parsed with LiteRT's own schema bindings
(`ai_edge_litert.tools.flatbuffer_utils`, over `ai_edge_litert.schema_py_generated`),
so no interpreter is needed to list ops or count weight levels. Activation levels
need data and an interpreter: `activation_levels` runs TFLite's builtin kernels with
`experimental_preserve_all_tensors=True` (XNNPACK keeps its intermediates private).

"Levels" is the number of distinct integer values a tensor holds: for a constant
weight tensor, the maximum over the slices of its quantization axis (per channel) or
over the whole tensor (per tensor). An n-bit model (paper eq. 20-21) must show at most
2^n levels per weight slice and per quantized activation.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils

__all__ = [
    "ModelSummary",
    "OpInfo",
    "TensorInfo",
    "activation_levels",
    "inspect",
    "read_model",
    "weight_levels",
]

_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_TYPE_NAMES = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
_ACT_NAMES = {v: k for k, v in vars(schema.ActivationFunctionType).items() if not k.startswith("_")}
_WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")
_NUMPY_TYPES = {
    "int8": np.int8,
    "uint8": np.uint8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "float32": np.float32,
    "float16": np.float16,
}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of the flatbuffer.

    Attributes:
      index: tensor index in the (first) subgraph.
      name: tensor name.
      dtype: "int8", "uint8", "int32", "float32", "int4", ...
      shape: static shape (a -1 in `shape_signature` marks a dynamic dimension).
      shape_signature: the shape with -1 for dynamic dimensions.
      scales: quantization scales (empty when not quantized).
      zero_points: quantization zero points.
      quantized_dimension: the axis of per-axis quantization (per tensor when
        there is a single scale).
      is_constant: the tensor has data in the file (weights, biases, shapes).
      levels: distinct values of a constant integer tensor, maximum over the
        slices of its quantization axis; None for other tensors.
    """

    index: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    shape_signature: tuple[int, ...]
    scales: tuple[float, ...]
    zero_points: tuple[int, ...]
    quantized_dimension: int
    is_constant: bool
    levels: int | None

    @property
    def per_axis(self) -> bool:
        return len(self.scales) > 1

    @property
    def is_dynamic(self) -> bool:
        return any(d < 0 for d in self.shape_signature)


@dataclasses.dataclass(frozen=True)
class OpInfo:
    """One operator: its builtin name, tensors, fused activation and estimated MACs."""

    index: int
    op: str
    inputs: tuple[TensorInfo | None, ...]
    outputs: tuple[TensorInfo, ...]
    options: dict
    fused_activation: str | None
    macs: int


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """What `inspect` returns; `str(summary)` is a printable table.

    Attributes:
      size_bytes: file size.
      ops: every operator of the main subgraph in execution order.
      tensors: every tensor of the main subgraph.
      inputs / outputs: the model's input and output tensors.
      num_subgraphs: subgraphs in the file (the Edge TPU compiler wants one).
      macs: estimated multiply-accumulates of one invoke (conv, depthwise, fully
        connected; elementwise ops count 0).
    """

    size_bytes: int
    ops: tuple[OpInfo, ...]
    tensors: tuple[TensorInfo, ...]
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    num_subgraphs: int
    macs: int

    def is_io_conversion(self, op: OpInfo) -> bool:
        """True for the float QUANTIZE at a model input and DEQUANTIZE at an output."""
        if op.op == "QUANTIZE":
            inputs = {t.index for t in self.inputs}
            return all(t is not None and t.index in inputs for t in op.inputs)
        if op.op == "DEQUANTIZE":
            outputs = {t.index for t in self.outputs}
            return all(t.index in outputs for t in op.outputs)
        return False

    def op_counts(self) -> dict[str, int]:
        """Number of operators per builtin name."""
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[op.op] = counts.get(op.op, 0) + 1
        return counts

    def weight_levels(self) -> dict[str, int]:
        """Levels of each constant quantized weight (int8/uint8/int4) tensor, by name."""
        return {
            t.name: t.levels
            for t in self.tensors
            if t.is_constant and t.levels is not None and t.dtype in ("int8", "uint8", "int4")
        }

    def weight_bits(self) -> dict[str, int]:
        """The fewest bits that hold each conv / fully-connected weight's levels, by name.

        A mixed-precision model shows each layer's own width here (a 2-bit layer
        holds at most 4 levels per slice, an 8-bit one up to 256).
        """
        levels = self.weight_levels()
        return {name: _bits(levels[name]) for name in self.weight_storage() if levels.get(name)}

    def weight_storage(self) -> dict[str, str]:
        """Storage type ("int8", "int4", ...) of each conv / fully-connected weight, by name."""
        return {
            op.inputs[1].name: op.inputs[1].dtype
            for op in self.ops
            if op.op in _WEIGHTED_OPS and len(op.inputs) > 1 and op.inputs[1] is not None
        }

    def __str__(self) -> str:
        storage: dict[str, int] = {}
        for dtype in self.weight_storage().values():
            storage[dtype] = storage.get(dtype, 0) + 1
        lines = [
            (
                f"size: {self.size_bytes} bytes ({self.size_bytes / 1024:.1f} KiB), "
                f"{len(self.ops)} ops, {self.macs / 1e6:.3f} M MACs, "
                f"{self.num_subgraphs} subgraph(s)"
            ),
            "weight storage: "
            + (", ".join(f"{n} {d}" for d, n in sorted(storage.items())) or "none"),
            "inputs:  " + ", ".join(_short(t) for t in self.inputs),
            "outputs: " + ", ".join(_short(t) for t in self.outputs),
            (
                f"{'#':>3} {'op':<18} {'act':<6} {'out dtype':<9} {'out scale':>10} {'zp':>5} "
                f"{'weight':<8} {'w scale(s)':>12} {'w levels':>8} {'w bits':>6} {'MACs':>10}"
            ),
        ]
        for op in self.ops:
            out = op.outputs[0] if op.outputs else None
            weight = None
            if op.op in _WEIGHTED_OPS and len(op.inputs) > 1 and op.inputs[1] is not None:
                weight = op.inputs[1]
            w_scale = ""
            if weight is not None and weight.scales:
                w_scale = (
                    f"{weight.scales[0]:.3g}" if not weight.per_axis else f"{len(weight.scales)} ch"
                )
            lines.append(
                f"{op.index:>3} {op.op:<18} {(op.fused_activation or ''):<6} "
                f"{(out.dtype if out else ''):<9} "
                f"{(f'{out.scales[0]:.4g}' if out and out.scales else ''):>10} "
                f"{(str(out.zero_points[0]) if out and out.zero_points else ''):>5} "
                f"{(weight.dtype if weight else ''):<8} {w_scale:>12} "
                f"{(str(weight.levels) if weight and weight.levels else ''):>8} "
                f"{(str(_bits(weight.levels)) if weight and weight.levels else ''):>6} "
                f"{op.macs:>10}"
            )
        return "\n".join(lines)


def _bits(levels: int) -> int:
    """The fewest bits whose 2^n levels hold `levels` values (at least 1)."""
    return max(1, int(np.ceil(np.log2(max(levels, 1)))))


def _short(t: TensorInfo) -> str:
    q = f" s={t.scales[0]:.4g} zp={t.zero_points[0]}" if t.scales else ""
    return f"{t.name}[{t.dtype} {list(t.shape)}{q}]"


# A TFLite flatbuffer carries this file identifier at bytes 4-8 (after the root offset).
_TFLITE_IDENTIFIER = b"TFL3"


def read_model(model: bytes | str | os.PathLike):
    """The flatbuffer as a `schema_py_generated.ModelT` object, and its size in bytes.

    Raises:
      ValueError: `model` is not a TFLite flatbuffer (the path is named).
      TypeError: `model` is neither bytes nor a path.
    """
    if isinstance(model, (bytes, bytearray, memoryview)):
        content, source = bytes(model), f"{len(model)} bytes"
    elif isinstance(model, (str, os.PathLike)):
        with open(model, "rb") as f:
            content = f.read()
        source = os.fspath(model)
    else:
        raise TypeError(
            f"`model` must be .tflite bytes or a path; received {type(model).__name__}."
        )
    if len(content) < 8 or content[4:8] != _TFLITE_IDENTIFIER:
        raise ValueError(
            f"`model` is not a .tflite flatbuffer ({source}): it lacks the TFLite file "
            f"identifier {_TFLITE_IDENTIFIER.decode()!r} at bytes 4-8."
        )
    try:
        parsed = flatbuffer_utils.read_model_from_bytearray(bytearray(content))
    except Exception as error:  # a truncated or corrupt buffer fails anywhere inside
        raise ValueError(
            f"`model` is not a readable .tflite flatbuffer ({source}): {error!r}"
        ) from error
    return parsed, len(content)


def _levels(data: np.ndarray, axis: int, per_axis: bool) -> int:
    if data.size == 0:
        return 0
    if not per_axis or data.ndim == 0:
        return int(np.unique(data).size)
    moved = np.moveaxis(data, axis, 0).reshape(data.shape[axis], -1)
    return int(max(np.unique(row).size for row in moved))


def _tensor_info(model, subgraph, index: int) -> TensorInfo:
    tensor = subgraph.tensors[index]
    dtype = _TYPE_NAMES.get(tensor.type, str(tensor.type))
    shape = tuple(int(d) for d in (tensor.shape if tensor.shape is not None else ()))
    signature = (
        tuple(int(d) for d in tensor.shapeSignature)
        if tensor.shapeSignature is not None and len(tensor.shapeSignature)
        else shape
    )
    q = tensor.quantization
    scales = tuple(float(s) for s in (q.scale if q is not None and q.scale is not None else ()))
    zero_points = tuple(
        int(z) for z in (q.zeroPoint if q is not None and q.zeroPoint is not None else ())
    )
    axis = int(q.quantizedDimension) if q is not None else 0
    buffer = model.buffers[tensor.buffer] if tensor.buffer < len(model.buffers) else None
    data = buffer.data if buffer is not None else None
    is_constant = data is not None and len(data) > 0
    levels = None
    if is_constant and dtype in _NUMPY_TYPES and dtype.startswith(("int", "uint")):
        values = np.frombuffer(np.asarray(data, np.uint8).tobytes(), _NUMPY_TYPES[dtype])
        if values.size == int(np.prod(shape)):
            levels = _levels(values.reshape(shape), axis, len(scales) > 1)
    elif is_constant and dtype == "int4":
        from tf_pfq.export.int4 import unpack_int4

        values = unpack_int4(np.asarray(data, np.uint8), int(np.prod(shape)))
        levels = _levels(values.reshape(shape), axis, len(scales) > 1)
    name = tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)
    return TensorInfo(
        index=index,
        name=name,
        dtype=dtype,
        shape=shape,
        shape_signature=signature,
        scales=scales,
        zero_points=zero_points,
        quantized_dimension=axis,
        is_constant=is_constant,
        levels=levels,
    )


def _macs(op: str, inputs, outputs) -> int:
    if not outputs or len(inputs) < 2 or inputs[1] is None:
        return 0
    out, weight = outputs[0].shape, inputs[1].shape
    if op == "CONV_2D" and len(weight) == 4:  # weight (O, kh, kw, I)
        return int(np.prod(out)) * int(np.prod(weight[1:]))
    if op == "DEPTHWISE_CONV_2D" and len(weight) == 4:  # weight (1, kh, kw, O)
        return int(np.prod(out)) * int(weight[1] * weight[2])
    if op == "FULLY_CONNECTED" and len(weight) == 2:  # weight (O, I)
        return int(np.prod(out)) * int(weight[1])
    if op == "TRANSPOSE_CONV" and len(inputs) > 2 and inputs[2] is not None:
        return int(np.prod(inputs[2].shape)) * int(np.prod(weight[1:]))
    return 0


def inspect(model: bytes | str | os.PathLike) -> ModelSummary:
    """Lists the ops, tensors, quantization and weight levels of a `.tflite` model.

    Args:
      model: flatbuffer bytes or a `.tflite` path.

    Returns:
      A `ModelSummary`; `print(summary)` shows one line per op.

    Raises:
      ValueError: `model` is not a .tflite flatbuffer (e.g. truncated or another
        file), or has no subgraph.

    Example:
      >>> import tensorflow as tf
      >>> f = tf.function(lambda x: tf.nn.relu(x), input_signature=[tf.TensorSpec([1, 4])])
      >>> converter = tf.lite.TFLiteConverter.from_concrete_functions(
      ...     [f.get_concrete_function()])
      >>> summary = inspect(converter.convert())
      >>> summary.op_counts(), summary.inputs[0].dtype, summary.macs
      ({'RELU': 1}, 'float32', 0)
    """
    model_t, size = read_model(model)
    if not model_t.subgraphs:
        raise ValueError("`model` is a .tflite flatbuffer without a subgraph.")
    subgraph = model_t.subgraphs[0]
    tensors = tuple(_tensor_info(model_t, subgraph, i) for i in range(len(subgraph.tensors)))
    ops = []
    for k, operator in enumerate(subgraph.operators or ()):
        code = model_t.operatorCodes[operator.opcodeIndex]
        builtin = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
        name = _OP_NAMES.get(builtin, f"BUILTIN_{builtin}")
        if name == "CUSTOM":
            custom = code.customCode
            name = f"CUSTOM:{custom.decode() if isinstance(custom, bytes) else custom}"
        inputs = tuple(tensors[i] if i >= 0 else None for i in operator.inputs)
        outputs = tuple(tensors[i] for i in operator.outputs)
        options = dict(vars(operator.builtinOptions)) if operator.builtinOptions else {}
        act = options.get("fusedActivationFunction")
        ops.append(
            OpInfo(
                index=k,
                op=name,
                inputs=inputs,
                outputs=outputs,
                options=options,
                fused_activation=_ACT_NAMES.get(act) if act else None,
                macs=_macs(name, inputs, outputs),
            )
        )
    return ModelSummary(
        size_bytes=size,
        ops=tuple(ops),
        tensors=tensors,
        inputs=tuple(tensors[i] for i in subgraph.inputs),
        outputs=tuple(tensors[i] for i in subgraph.outputs),
        num_subgraphs=len(model_t.subgraphs),
        macs=sum(op.macs for op in ops),
    )


def weight_levels(model: bytes | str | os.PathLike) -> dict[str, int]:
    """Distinct integer levels of each constant int8/uint8/int4 tensor (max per axis).

    Example:
      >>> import tensorflow as tf
      >>> w = tf.quantization.fake_quant_with_min_max_vars(  # 4 levels on an int8 grid
      ...     tf.constant([[[[-0.7], [0.1], [0.3], [0.7]]]]), -0.7, 0.7, narrow_range=True)
      >>> @tf.function(input_signature=[tf.TensorSpec([1, 2, 2, 4])])
      ... def f(x):
      ...     x = tf.quantization.fake_quant_with_min_max_vars(x, 0.0, 1.0)
      ...     y = tf.nn.conv2d(x, w, 1, "VALID")
      ...     return tf.quantization.fake_quant_with_min_max_vars(y, -2.0, 2.0)
      >>> converter = tf.lite.TFLiteConverter.from_concrete_functions(
      ...     [f.get_concrete_function()], f)
      >>> converter.optimizations = [tf.lite.Optimize.DEFAULT]
      >>> sorted(weight_levels(converter.convert()).values())
      [4]
    """
    return inspect(model).weight_levels()


def activation_levels(
    model: bytes | str | os.PathLike,
    images: Iterable[np.ndarray] | np.ndarray,
    *,
    backend: str = "builtin",
) -> dict[str, int]:
    """Distinct integer values each non-constant int8/uint8 tensor takes on `images`.

    Args:
      model: flatbuffer bytes or a `.tflite` path.
      images: float inputs (N, ...) run one example at a time (static batch 1).
      backend: "builtin" or "reference": kernels whose intermediates can be read.

    Returns:
      {tensor name: number of distinct integer values seen}.

    Example:
      >>> import tensorflow as tf
      >>> @tf.function(input_signature=[tf.TensorSpec([1, 4])])
      ... def f(x):  # a 2-bit grid (step 0.1) held by an 8-bit op: tf_pfq's route
      ...     x = tf.quantization.fake_quant_with_min_max_vars(x, 0.0, 2.55)
      ...     return tf.quantization.fake_quant_with_min_max_vars(
      ...         tf.nn.relu(2.0 * x), 0.3 - 25.5, 0.3)
      >>> converter = tf.lite.TFLiteConverter.from_concrete_functions(
      ...     [f.get_concrete_function()], f)
      >>> converter.optimizations = [tf.lite.Optimize.DEFAULT]
      >>> converter.inference_input_type = tf.int8
      >>> data = np.linspace(0.0, 2.0, 40, dtype=np.float32).reshape(10, 4)
      >>> sorted(activation_levels(converter.convert(), data).values())
      [4, 40]
    """
    from tf_pfq.export import litert

    if backend not in ("builtin", "reference"):
        raise ValueError(
            "`backend` must be 'builtin' or 'reference' (XNNPACK does not expose its "
            f"intermediate tensors). Received: backend={backend!r}"
        )
    interpreter = litert.make_interpreter(model, backend=backend, preserve_all_tensors=True)
    summary = inspect(model)
    candidates = [t for t in summary.tensors if not t.is_constant and t.dtype in ("int8", "uint8")]
    seen: dict[int, set] = {t.index: set() for t in candidates}
    (inp,) = interpreter.get_input_details()
    for x in images:
        interpreter.set_tensor(inp["index"], litert.quantize_input(np.asarray(x)[None], inp))
        interpreter.invoke()
        for t in candidates:
            seen[t.index].update(np.unique(interpreter.get_tensor(t.index)).tolist())
    return {t.name: len(seen[t.index]) for t in candidates}
