"""Full-integer TFLite export that keeps the n-bit grid of a tf_pfq QAT model: the driver.

Why not convert the tfmot model directly: for activations below 8 bits TensorFlow's
converter emits `quant.uniform<i4...>` tensors that TFLite's int8 kernels reject
(tensorflow/model-optimization #574), and with 8-bit activations it stores n-bit
weights as INT4 tensors (not Edge TPU compatible) and re-rounds a 3-bit grid into the
4-bit container.

The route taken here: at export time the QAT model is rebuilt as a plain TensorFlow
graph (a static batch-1 concrete function) in which every n-bit quantizer of paper
eq. 20-21 becomes an **8-bit** fake-quant op whose int8 scale equals the n-bit scale
`s = (M - m) / (2^n - 1)`, and TensorFlow's converter turns that graph into the
file. `to_tflite` runs the steps, each the job of one module:

* `tf_pfq.export.plan`: what each layer is quantized to (`plan_from_qat` reads the
  QAT model's grids into an `ExportPlan`);
* `tf_pfq.export.checks`: the refusals, before conversion (NaN/Inf weights or
  ranges, steps TFLite cannot store) and after (ops the converter left in float,
  scale ratios XNNPACK's int8 kernels refuse): a file that is not the QAT model is
  an error, never a silently different model;
* `tf_pfq.export.calibration`: int8 ranges of the tensors QAT leaves in float, over
  `representative_data`;
* `tf_pfq.export.lowering`: the graph, layer by layer: which ops each layer
  becomes and why, on the grids of `tf_pfq.export.grids`, with the integer-exact
  constructions of `tf_pfq.export.int8_ops` and the weighted layers of
  `tf_pfq.export.weighted`. One builder evaluates the graph three ways, each a
  policy of `tf_pfq.export.policies`: `Export` (the graph the converter turns into
  the integer file), `Simulate` (the QAT model's arithmetic in float) and
  `Calibrate` (`Simulate`, recording the range of every float tensor);
* this module: the conversion itself, naming the layer a converter error is about,
  and the public helpers (`build_function`, `simulate`, `plan_to_tflite`, `save`).

Every op in the result is int8 (weights int8, biases int32), shapes are static, and
the converter needs no calibration pass. Stage-A models (activation quantizers only,
batch normalization unfolded) are rejected: fold BN with `tf_pfq.fold_batchnorm` and
run stage W first; exporting float weights to int8 would silently change the model.

Numerically, XNNPACK's int8 kernels compute `round(acc * s_in * s_w / s_out)` with a
single rounding, like the QAT model's fake-quant, so when every tensor of the QAT
model has a grid (`tf_pfq.apply`'s default `add_bits=8`) the XNNPACK logits are
within half an int8 output step of the Keras QAT logits (measured at 4 and 3 bits;
benchmarks/results/export_fidelity.md). With the paper's float Add outputs the export
has to round each Add output to int8, and that noise flips some n-bit roundings
downstream (top-1 agreement 99.7 % at A4/W4, 94 % at A3/W3 on the digits net).
TFLite's builtin kernels (optimized and reference) disagree with exact rounding on a
few percent of conv outputs and agree much less at low bit widths.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import numpy as np
import tensorflow as tf

from tf_pfq.compat import keras
from tf_pfq.export import int4
from tf_pfq.export.calibration import calibrate as calibrate
from tf_pfq.export.checks import check_finite_model as check_finite_model
from tf_pfq.export.checks import check_integer as check_integer
from tf_pfq.export.checks import check_plan_scales as check_plan_scales
from tf_pfq.export.checks import check_xnnpack_limits as check_xnnpack_limits
from tf_pfq.export.grids import _weight_values as _weight_values
from tf_pfq.export.int8_ops import _bilinear as _bilinear
from tf_pfq.export.lowering import OUTPUT_MARGIN as OUTPUT_MARGIN
from tf_pfq.export.lowering import _Builder
from tf_pfq.export.lowering import layer_scope as layer_scope
from tf_pfq.export.plan import ExportPlan, plan_from_qat
from tf_pfq.export.plan import LayerQuantization as LayerQuantization
from tf_pfq.export.plan import _usable as _usable
from tf_pfq.export.policies import Calibrate as Calibrate
from tf_pfq.export.policies import Export, Simulate
from tf_pfq.graph import LayerGraph

# The names above imported "as" themselves are re-exported: this module was the whole
# export once, and tests, benchmarks and other modules import them from here.

__all__ = [
    "ExportPlan",
    "plan_from_qat",
    "to_tflite",
    "LayerQuantization",
    "IO_DTYPES",
    "build_function",
    "plan_to_tflite",
    "save",
    "simulate",
]

IO_DTYPES = {"int8": tf.int8, "uint8": tf.uint8, "float32": tf.float32}


def _input_spec(plan: ExportPlan) -> tf.TensorSpec:
    model = plan.model
    if len(model.inputs) != 1:
        raise ValueError(
            f"The integer export supports single-input models; {model.name!r} has "
            f"{len(model.inputs)} inputs."
        )
    shape = tuple(model.inputs[0].shape)[1:]
    if any(d is None for d in shape):
        raise ValueError(
            f"Model {model.name!r} has a dynamic input shape {shape}; the Edge TPU and "
            "the static export need fixed (H, W, C)."
        )
    return tf.TensorSpec([1, *shape], tf.float32, name=model.inputs[0].name.split(":")[0])


def build_function(
    plan: ExportPlan,
    *,
    ranges: Mapping[str, tuple[float, float]] | None = None,
    clamp_signed: bool = True,
):
    """The export graph: a `tf.function` of static batch 1 with 8-bit fake-quant ops.

    Args:
      plan: the `ExportPlan`.
      ranges: calibrated (lo, hi) for tensors QAT leaves in float (see `calibrate`);
        missing ones use interval bounds.
      clamp_signed: insert MAXIMUM ops for the lower end of signed n-bit tensors.

    Returns:
      A `tf.function` with one `[1, H, W, C]` float32 input signature.
    """
    spec = _input_spec(plan)
    builder = _Builder(plan, Export(), clamp_signed, ranges)
    return tf.function(builder.__call__, input_signature=[spec], autograph=False)


def simulate(plan: ExportPlan, images: np.ndarray) -> np.ndarray:
    """The plan's n-bit forward pass in float (what the QAT model computes at inference).

    Args:
      plan: the `ExportPlan`.
      images: float inputs (N, ...).

    Returns:
      The model outputs, float32 numpy.
    """
    builder = _Builder(plan, Simulate(), clamp_signed=True)
    return builder(tf.constant(np.asarray(images, np.float32))).numpy()


def plan_to_tflite(
    plan: ExportPlan,
    *,
    representative_data=None,
    io_dtype: str = "int8",
    input_range: tuple[float, float] | None = None,
    clamp_signed: bool = True,
) -> bytes:
    """Converts an `ExportPlan` to full-integer TFLite flatbuffer bytes.

    Args:
      plan: the float model and its n-bit grids.
      representative_data: float inputs used only to set the 8-bit ranges of the
        tensors QAT leaves in float (input without quantizer, Add outputs, pooled
        means, logits). Without it those ranges are interval bounds.
      io_dtype: "int8", "uint8" or "float32" model input and output.
      input_range: (lo, hi) of the model input when it has no quantizer and no
        `representative_data` is given.
      clamp_signed: clamp the lower end of signed n-bit tensors with MAXIMUM ops
        (see `tf_pfq.export.grids`).

    Returns:
      The `.tflite` flatbuffer.

    Raises:
      ValueError: bad `io_dtype`, unsupported layer, stage-A model, missing input range.
    """
    if io_dtype not in IO_DTYPES:
        raise ValueError(
            f"`io_dtype` must be one of {sorted(IO_DTYPES)}. Received: io_dtype={io_dtype!r}"
        )
    ranges: dict[str, tuple[float, float]] = {}
    if representative_data is not None:
        ranges.update(calibrate(plan, representative_data))
    if input_range is not None:
        lo, hi = input_range
        ranges[LayerGraph(plan.model).input_names[0]] = (float(lo), float(hi))
    try:
        return _convert(plan, ranges, io_dtype, clamp_signed)
    except Exception as e:  # ConverterError and friends: say which layer
        raise ValueError(converter_failure(e, plan, ranges, clamp_signed)) from e


def _convert(plan: ExportPlan, ranges, io_dtype: str, clamp_signed: bool) -> bytes:
    function = build_function(plan, ranges=ranges, clamp_signed=clamp_signed)
    concrete = function.get_concrete_function()
    module = tf.Module()
    module.f = function
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], module)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.inference_input_type = IO_DTYPES[io_dtype]
    converter.inference_output_type = IO_DTYPES[io_dtype]
    return converter.convert()


def converter_failure(
    error: BaseException, plan: ExportPlan, ranges=None, clamp_signed: bool = True
) -> str:
    """The message for a TFLite converter error: which layer, then the converter's words.

    The converter locates its errors by the Python line that built an op, which
    says nothing about the layer. So the layer is found by converting prefixes of
    the graph (a layer with everything before it in graph order): the first prefix
    that fails ends with the layer whose ops the converter cannot take. That costs
    a few conversions (a bisection), paid only when the export fails.
    """
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if "error:" in line]
    reason = (lines[0].split("error:", 1)[1].strip() if lines else text.strip()) or repr(error)
    layer = _first_failing_layer(plan, ranges or {}, clamp_signed)
    if layer is None:
        return (
            f"The TFLite converter failed on model {plan.model.name!r}, and no prefix of "
            f"its graph fails alone: {reason[:400]}. Please report the model."
        )
    return (
        f"The TFLite converter failed on layer {layer.name!r} ({type(layer).__name__}), the "
        f"first layer in graph order whose int8 ops it cannot convert: {reason[:400]}"
    )


def _first_failing_layer(plan: ExportPlan, ranges, clamp_signed: bool):
    graph = LayerGraph(plan.model)
    order = [n for n in graph.order if n not in graph.input_names]

    def fails(k: int) -> bool:
        kept = set(order[: k + 1])
        ends = [
            n
            for n in order[: k + 1]
            if n == order[k] or any(c not in kept for c in graph.consumers_of(n))
        ]
        outputs = [plan.model.get_layer(n).output for n in ends]
        prefix = keras.Model(plan.model.inputs, outputs, name=plan.model.name)
        try:
            _convert(dataclasses.replace(plan, model=prefix), ranges, "float32", clamp_signed)
        except Exception:
            return True
        return False

    if not order or not fails(len(order) - 1):
        return None
    lo, hi = 0, len(order) - 1
    while lo < hi:  # the first prefix that fails
        mid = (lo + hi) // 2
        if fails(mid):
            hi = mid
        else:
            lo = mid + 1
    return plan.model.get_layer(order[lo])


def to_tflite(
    qat_model,
    *,
    representative_data=None,
    io_dtype: str = "int8",
    input_range: tuple[float, float] | None = None,
    clamp_signed: bool = True,
    weight_storage: str = "int8",
) -> bytes:
    """Exports a stage-W tf_pfq QAT model to a full-integer `.tflite` keeping its n-bit grid.

    Every op is int8 (int32 biases), shapes are static with batch 1, each weight
    tensor holds at most 2^n integer levels per quantization axis and each tensor
    QAT quantized holds at most 2^n levels (paper eq. 20-21); see the module
    docstring for how.

    Args:
      qat_model: a model from `tf_pfq.apply(..., weight_bits=n)` (fine-tuned).
      representative_data: optional float inputs (N, H, W, C), or a
        `tf.data.Dataset` of input or (input, label) batches, that set the int8
        ranges of the tensors QAT leaves in float (Add outputs, logits); without
        them those ranges are guaranteed interval bounds (coarser).
      io_dtype: "int8", "uint8" or "float32" model input and output.
      input_range: (lo, hi) of the input when it has no quantizer and no data.
      clamp_signed: clamp the lower end of signed n-bit tensors with MAXIMUM ops
        (exact; False is faster on XNNPACK but lets values below the range through).
      weight_storage: "int8" (the n-bit integers in int8 tensors; fastest on
        XNNPACK, Edge TPU compatible) or "int4" (packed two per byte: smallest file,
        same grid and builtin-kernel outputs; see `tf_pfq.export.int4`).

    Returns:
      The flatbuffer bytes (write them with `save`).

    Raises:
      ValueError: a stage-A model, an unsupported layer, a bad `io_dtype`, a
        model input without a range, `representative_data` with NaN/Inf, or a bad
        `weight_storage` / weights INT4 cannot hold (the message names the layers).
      TypeError: not a tf_keras model.

    Example:
      >>> import tf_pfq
      >>> from tf_pfq import models
      >>> m = models.mobilenet_v1(input_shape=(8, 8, 3), widths=(4,), strides=(1,))
      >>> folded, _ = tf_pfq.fold_batchnorm(m)
      >>> qat = tf_pfq.apply(folded, activation_bits=4, weight_bits=4)
      >>> summary = tf_pfq.export.inspect(to_tflite(qat, input_range=(0.0, 1.0)))
      >>> sorted({t.dtype for t in summary.tensors}), max(summary.weight_levels().values())
      (['int32', 'int8'], 16)
    """
    check_finite_model(qat_model)
    plan = plan_from_qat(qat_model)
    check_plan_scales(plan)
    int4.check_plan(plan, weight_storage)  # before the (slow) conversion
    tflite = plan_to_tflite(
        plan,
        representative_data=representative_data,
        io_dtype=io_dtype,
        input_range=input_range,
        clamp_signed=clamp_signed,
    )
    check_integer(tflite)
    check_xnnpack_limits(tflite)
    return int4.apply_storage(tflite, weight_storage, plan)


def save(tflite_bytes: bytes, path: str | os.PathLike) -> str:
    """Writes `.tflite` bytes to `path` (creating its folder); returns the path.

    Example:
      >>> import tempfile
      >>> path = save(b"TFL3", os.path.join(tempfile.mkdtemp(), "m", "model.tflite"))
      >>> os.path.getsize(path)
      4
    """
    if not isinstance(tflite_bytes, (bytes, bytearray)):
        raise TypeError(
            f"`tflite_bytes` must be bytes. Received an object of class "
            f"{type(tflite_bytes).__name__}."
        )
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "wb") as f:
        f.write(tflite_bytes)
    return path
