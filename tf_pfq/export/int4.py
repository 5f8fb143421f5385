"""Packed 4-bit weight storage: INT4 tensors (two values per byte) in a `.tflite`.

The integer export (`tf_pfq.export.convert`) stores n-bit weights in int8 tensors
with zero point 0, holding the n-bit integers `w_n / s_w`. TFLite's flatbuffer also
has an INT4 tensor type, which TFLite's builtin CONV_2D, DEPTHWISE_CONV_2D and
FULLY_CONNECTED kernels accept as filters (they unpack it to int8 when the model is
prepared). `repack_int4` rewrites such an int8 weight tensor as INT4 in place of the
int8 bytes, keeping its scales and zero points, so the grid and the builtin kernels'
outputs do not change and the weight bytes halve.

Why a post-pass over the flatbuffer and not the converter's own INT4 output: the
converter emits INT4 only for symmetric narrow-range fake-quant weights, while
tf_pfq's default n-bit weight grids below 8 bits are the paper's
`[min(w, 0), max(w, 0)]` ranges (asymmetric), and it would not write the other
tensors the way `convert` does (n-bit activations on 8-bit grids). Repacking the
file the export already wrote keeps exactly the trained grid, whichever scheme.

The averaging kernel that the export writes for AveragePooling2D (a depthwise conv
whose weights are all int8 127) is not a trained weight and stays int8.

Which grids fit: INT4 holds -8..7 with zero point 0. A `2^n`-level grid with zero
point `z` holds the integers `-z .. 2^n - 1 - z`, so every 2- and 3-bit grid fits,
and a 4-bit grid only when its zero point is 8 (e.g. a roughly symmetric range
whose negative end is the larger one). `tf_pfq.apply(..., weight_scheme="symmetric")`
trains every grid symmetric narrow-range (integers -(2^(n-1) - 1) .. 2^(n-1) - 1,
zero point 0 in the file), so every 2-, 3- and 4-bit model fits. Weights that do
not fit raise an error that names the op and tensor: writing them would change the
model.

Where it runs: LiteRT's default CPU path (XNNPACK) takes INT4 filters only for
FULLY_CONNECTED; INT4 convolutions then run on TFLite's builtin kernels, which are
slower. INT4 gives the smallest file; int8 storage the fastest CPU inference. The
Edge TPU needs int8 weights.
"""

from __future__ import annotations

import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils

__all__ = [
    "INT4_OPS",
    "WEIGHT_STORAGES",
    "apply_storage",
    "check_plan",
    "pack_int4",
    "repack_int4",
    "unpack_int4",
]

WEIGHT_STORAGES = ("int8", "int4")
INT4_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
_OP_CODES = {getattr(schema.BuiltinOperator, name): name for name in INT4_OPS}


def pack_int4(values: np.ndarray) -> np.ndarray:
    """Packs integers in -8..7 two per byte, TFLite's INT4 layout (first value low nibble).

    An odd count leaves the high nibble of the last byte 0.

    Example:
      >>> pack_int4(np.array([1, -1, 7], np.int8)).tolist()
      [241, 7]
    """
    flat = np.asarray(values).reshape(-1).astype(np.int16)
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError(f"INT4 holds -8..7. Received values in [{flat.min()}, {flat.max()}]")
    nibbles = (flat & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, count: int) -> np.ndarray:
    """The first `count` signed values of INT4 bytes (inverse of `pack_int4`).

    Example:
      >>> unpack_int4(np.array([241, 7], np.uint8), 3).tolist()
      [1, -1, 7]
    """
    packed = np.asarray(packed, np.uint8).reshape(-1)
    nibbles = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(-1)[:count]
    return (nibbles.astype(np.int8) ^ 8) - 8  # sign-extend 4 bits


def _tensor_name(tensor) -> str:
    name = tensor.name
    return name.decode() if isinstance(name, bytes) else str(name)


def repack_int4(tflite_bytes: bytes, keep_wide: bool = False) -> bytes:
    """Rewrites the int8 weights of CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED as INT4.

    Scales, zero points and every other tensor stay as they are, so TFLite's
    builtin kernels compute the same outputs as with the int8 weights.

    Args:
      tflite_bytes: a `.tflite` flatbuffer whose weights are int8 (e.g. from
        `tf_pfq.export.to_tflite` at `weight_bits <= 4`).
      keep_wide: leave a weight whose integers leave -8..7 int8 instead of raising
        (a mixed-precision model's wider layers).

    Returns:
      The flatbuffer with INT4 weights.

    Raises:
      ValueError: a weight is not int8 with zero point 0, or holds values outside
        -8..7 (a 4-bit grid whose zero point is not 8); the message names the
        tensor and op.

    Example:
      >>> import tensorflow as tf
      >>> from tf_pfq.export import inspect
      >>> w = tf.constant([[[[-0.7], [0.1], [0.3], [0.7]]]])
      >>> @tf.function(input_signature=[tf.TensorSpec([1, 2, 2, 4])])
      ... def f(x):  # an int8 weight grid of step 0.1: integers -7, 1, 3, 7
      ...     x = tf.quantization.fake_quant_with_min_max_vars(x, 0.0, 1.0)
      ...     k = tf.quantization.fake_quant_with_min_max_vars(w, -12.7, 12.7, narrow_range=True)
      ...     y = tf.nn.conv2d(x, k, 1, "VALID")
      ...     return tf.quantization.fake_quant_with_min_max_vars(y, -2.0, 2.0)
      >>> converter = tf.lite.TFLiteConverter.from_concrete_functions(
      ...     [f.get_concrete_function()], f)
      >>> converter.optimizations = [tf.lite.Optimize.DEFAULT]
      >>> summary = inspect(repack_int4(converter.convert()))
      >>> list(summary.weight_storage().values()), list(summary.weight_levels().values())
      (['int4'], [4])
    """
    return _repack(tflite_bytes, keep_wide)[0]


def _repack(tflite_bytes: bytes, keep_wide: bool) -> tuple[bytes, int]:
    """(`repack_int4`'s bytes, the number of weight tensors packed)."""
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_bytes))
    done: set[int] = set()
    problems = []
    for subgraph in model.subgraphs:
        for k, op in enumerate(subgraph.operators or ()):
            code = model.operatorCodes[op.opcodeIndex]
            builtin = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
            op_name = _OP_CODES.get(builtin)
            if op_name is None or len(op.inputs) < 2 or op.inputs[1] < 0:
                continue
            tensor = subgraph.tensors[op.inputs[1]]
            if tensor.type == schema.TensorType.INT4 or tensor.buffer in done:
                continue
            where = f"weight {_tensor_name(tensor)!r} of {op_name} op {k}"
            data = model.buffers[tensor.buffer].data
            q = tensor.quantization
            zero_points = np.asarray(
                q.zeroPoint if q is not None and q.zeroPoint is not None else []
            )
            if tensor.type != schema.TensorType.INT8 or data is None or len(data) == 0:
                problems.append(f"{where}: not a constant int8 tensor")
                continue
            if zero_points.size and np.any(zero_points != 0):
                problems.append(f"{where}: zero point is not 0")
                continue
            values = np.frombuffer(np.asarray(data, np.uint8).tobytes(), np.int8)
            lo, hi = int(values.min()), int(values.max())
            if (lo < -8 or hi > 7) and lo == hi:
                # A one-level constant kernel the export made (average pooling as a
                # depthwise conv, all 127), not a trained weight: it stays int8.
                continue
            if (lo < -8 or hi > 7) and keep_wide:
                continue
            if lo < -8 or hi > 7:
                problems.append(
                    f"{where}: integers span [{lo}, {hi}], outside INT4's [-8, 7] (a 4-bit "
                    "grid fits only with zero point 8)"
                )
                continue
            model.buffers[tensor.buffer].data = pack_int4(values)
            tensor.type = schema.TensorType.INT4
            done.add(tensor.buffer)
    if problems:
        raise ValueError(
            "Cannot store these weights as INT4 without changing the model; export "
            "with weight_storage='int8', or train with weight_bits <= 3 or "
            "tf_pfq.apply(..., weight_scheme='symmetric'):\n  " + "\n  ".join(problems)
        )
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), len(done)


def _check_name(weight_storage: str) -> None:
    if weight_storage not in WEIGHT_STORAGES:
        raise ValueError(
            f"`weight_storage` must be one of {WEIGHT_STORAGES}. Received: "
            f"weight_storage={weight_storage!r}"
        )


def check_plan(plan, weight_storage: str) -> None:
    """Checks before conversion that every weight grid of `plan` fits `weight_storage`.

    Args:
      plan: a `tf_pfq.export.ExportPlan`.
      weight_storage: "int8" (always fits) or "int4".

    Raises:
      ValueError: unknown `weight_storage`; for "int4", no layer with weights of
        4 bits or fewer, or such a grid whose integers leave -8..7; the message names
        the layers. Wider layers of a mixed-precision model stay int8.

    Example:
      >>> check_plan(None, "int8")
      >>> check_plan(None, "int5")
      Traceback (most recent call last):
      ...
      ValueError: `weight_storage` must be one of ('int8', 'int4'). Received: weight_storage='int5'
    """
    _check_name(weight_storage)
    if weight_storage == "int8":
        return
    wide, narrow, outside = [], [], []
    for name, quant in plan.layers.items():
        grid = quant.kernel
        if grid is None:
            continue
        if grid.num_bits > 4:
            wide.append(f"{name!r} ({grid.num_bits} bits)")
            continue
        narrow.append(name)
        zero_point = np.asarray(grid.zero_point, np.float64)
        lo = float(np.min(grid.quant_min - zero_point))
        hi = float(np.max(grid.quant_max - zero_point))
        if lo < -8 or hi > 7:
            outside.append(f"{name!r} (integers {lo:g}..{hi:g})")
    if wide and not narrow:
        raise ValueError(
            "weight_storage='int4' needs weight_bits <= 4; these layers have wider "
            f"weights: {', '.join(wide)}. Use weight_storage='int8'."
        )
    if outside:
        raise ValueError(
            "weight_storage='int4' cannot hold these layers' weight grids with zero point "
            "0 (INT4 holds -8..7; a 2^n-level grid with zero point z holds -z..2^n-1-z, so "
            f"a 4-bit grid fits only with z = 8): {', '.join(outside)}. Use "
            "weight_storage='int8', or train with weight_bits <= 3 or "
            "tf_pfq.apply(..., weight_scheme='symmetric') (15 levels centred on 0)."
        )


def apply_storage(tflite_bytes: bytes, weight_storage: str, plan=None) -> bytes:
    """The export's bytes with the requested weight storage ("int8": unchanged).

    With `plan` (the `ExportPlan` checked by `check_plan`) and "int4", the layers of
    4 bits or fewer are packed and wider ones (mixed precision) stay int8; the
    packed count is checked against the plan, so a narrow layer left int8 raises.

    Example:
      >>> apply_storage(b"TFL3", "int8")
      b'TFL3'
    """
    _check_name(weight_storage)
    if weight_storage == "int8":
        return tflite_bytes
    kernels = [q.kernel for q in plan.layers.values() if q.kernel is not None] if plan else []
    narrow = sum(1 for grid in kernels if grid.num_bits <= 4)
    if narrow == len(kernels):  # uniform: every weight must pack
        return repack_int4(tflite_bytes)
    packed_bytes, packed = _repack(tflite_bytes, keep_wide=True)
    if packed < narrow:
        raise ValueError(
            f"weight_storage='int4': {narrow} layers have weights of 4 bits or fewer but "
            f"only {packed} weight tensors of the file fit INT4; export with "
            "weight_storage='int8'."
        )
    return packed_bytes
