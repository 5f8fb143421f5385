"""Full-integer TFLite export that keeps the n-bit grid of a tf_pfq QAT model.

Why not convert the tfmot model directly: for activations below 8 bits TensorFlow's
converter emits `quant.uniform<i4...>` tensors that TFLite's int8 kernels reject
(tensorflow/model-optimization #574), and with 8-bit activations it stores n-bit
weights as INT4 tensors (not Edge TPU compatible) and re-rounds a 3-bit grid into the
4-bit container.

The route taken here: at export time the QAT model is rebuilt as a plain TensorFlow
graph (a static batch-1 concrete function) in which every n-bit quantizer of paper
eq. 20-21 becomes an **8-bit** fake-quant op whose int8 scale equals the n-bit scale
`s = (M - m) / (2^n - 1)`:

* weights: `fake_quant(w_n, -127 s_w, 127 s_w, num_bits=8, narrow_range=True)` on
  the QAT model's n-bit weights `w_n`, per tensor or per output channel. The int8
  weight tensor in the file holds the n-bit integers `w_n / s_w` (zero point 0), so
  at most 2^n distinct values per quantization axis.
* activations with nudged n-bit range `[m, M]`: the 8-bit range
  `[M - 255 s, M]` has step `s` and puts `M` on int8 127, so int8 saturation is the
  upper clamp `min(x, M)`. The lower clamp `max(x, m)` is the fused ReLU/ReLU6 of
  the producing op when the tensor is non-negative (then `m = 0`); for a signed
  tensor (e.g. a linear bottleneck) it is an explicit MAXIMUM op (with
  `clamp_signed=False` it is left out: values below `m` are then not clamped; the
  MAXIMUM ops cost a few percent of latency on XNNPACK,
  benchmarks/results/tflite_latency.md). A signed tensor trained to `m = 0` gets a
  ReLU, fused into its producer, or after an op that fuses none (MEAN) a separate
  RELU on the output grid (`_fq_activation`).
* biases: snapped to the int32 grid `s_in * s_w` (tf_pfq's stage W already trains
  them on it), so the converter's bias rounding is exact.
* the inputs of a Concatenate carry the concat's grid (QAT gives them one shared
  range), so CONCATENATION needs no requantization and is exact. An input that
  other layers read too keeps its own grid and is requantized on the concat's edge
  only (a non-negative one by a 1x1 depthwise conv of weight 1, so that the
  converter does not move the requantization above a max pooling that other layers
  read). A ReLU layer that moves its input onto another grid is that conv too, with
  the ReLU fused: XNNPACK's standalone int8 RELU is a step off on some values.
* softmax, sigmoid and tanh lower to TFLite's int8 SOFTMAX, LOGISTIC and TANH with
  their fixed output grids (QAT trains with the same grids); hard_sigmoid is a 1x1
  depthwise conv with a fused ReLU, swish is LOGISTIC then MUL (its sigmoid rounded
  to 1/256 in between, which QAT does too: `tf_pfq.quantizers.swish_with_int8_gate`).
  Conv2DTranspose lowers to TRANSPOSE_CONV (per-tensor weights; a fused ReLU on a
  zero bias as a separate RELU on the output grid, which the converter would
  otherwise leave in float), nearest UpSampling2D to RESIZE_NEAREST_NEIGHBOR,
  bilinear UpSampling2D to RESIZE_NEAREST_NEIGHBOR and an integer-weight depthwise
  conv (`_bilinear`: int8 RESIZE_BILINEAR must keep its input's scale, so it cannot
  round onto the grid QAT trained for its output), Multiply to MUL.
* the file is checked to be integer throughout (`check_integer`): an op the
  converter left in float is an error, never a silently different model.
* op layers (`tf_pfq.layers.ops.ElementwiseOp`, which `tf_pfq.apply` makes of
  the op layers it models) lower like the Keras layer doing the same: `x + c`,
  `x - c`, `x + y`, `x - y` to ADD / SUB (a ReLU consumer fused in, so
  MobileNetV3's hard-sigmoid `ReLU(6.)(x + 3.)` is one ADD with a fused RELU6
  rounding onto the ReLU's grid), `x * c`, `x / c` (as a product by `1 / c`:
  TFLite has no int8 DIV) and `x * y` to MUL, `tf.nn.relu` / `tf.nn.relu6` to a
  fused RELU / RELU6. Each rounds once onto the grid QAT gave the op's output (the
  constant operand is an int8 tensor of its own, exact for a single value). Any
  other op layer (TFOpLambda, SlicingOpLambda, Lambda) is refused by name.
* tensors without a QAT quantizer (Add outputs with `add_bits=None`, logits, the
  model input if it has no quantizer) get an ordinary 8-bit range: the min/max
  over `representative_data` when given (widened by `OUTPUT_MARGIN` for model
  outputs, whose saturation would tie logits), otherwise a guaranteed interval
  bound propagated from the input range through the layers (no saturation,
  coarser step).
* average pooling ('valid') becomes a depthwise conv with constant `1/(kh*kw)`
  weights: TFLite's int8 AVERAGE_POOL_2D needs equal input and output scales, so the
  converter would requantize before averaging (two roundings). 'same' padding
  averages fewer values at the border (TF counts only real positions): each band
  of windows with one count is such a depthwise conv (weights 1/count), and the
  bands are concatenated on the output grid.

Which handler lowers each layer, and to which TFLite op, is the layer's entry in
`tf_pfq.layers.table`. One builder evaluates the graph three ways, each a policy
object it asks wherever they differ: `Export` (the graph the converter turns into
the integer file), `Simulate` (the QAT model's arithmetic in float) and `Calibrate`
(`Simulate`, recording the range of every float tensor over `representative_data`).

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
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from tf_pfq.compat import check_model, keras
from tf_pfq.export import int4
from tf_pfq.export.summary import inspect
from tf_pfq.graph import LayerGraph
from tf_pfq.layers.ops import ElementwiseOp
from tf_pfq.layers.table import Lowering, activation_name, entry_for, lookup
from tf_pfq.nonfinite import describe as describe_nonfinite
from tf_pfq.nonfinite import nonfinite_variables
from tf_pfq.quantize import concat_shared_ranges
from tf_pfq.quantizers import (
    EMPTY_RANGE_STEP,
    IDENTITY_MEAN_STEP,
    INT32_BIAS_RANGE,
    SWISH_GATE_RANGE,
    QuantParams,
    nudge,
)
from tf_pfq.validation import check_finite

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
# Calibrated output (logit) ranges are widened by this share of their width on each side.
OUTPUT_MARGIN = 0.1

L = keras.layers
# Handlers whose last TFLite op takes a fused ReLU (CONV_2D, DEPTHWISE_CONV_2D,
# FULLY_CONNECTED, ADD, MUL, swish's MUL); MEAN, CONCATENATION, RESIZE_* do not.
_FUSES_RELU = frozenset([Lowering.WEIGHTED, Lowering.ADD, Lowering.MULTIPLY, Lowering.ACTIVATION])
# Activations lowered to TFLite's int8 lookup-style kernels (not fused into a conv).
_LUT_ACTIVATIONS = frozenset(["softmax", "sigmoid", "tanh", "hard_sigmoid", "swish"])


@dataclasses.dataclass(frozen=True)
class LayerQuantization:
    """The trained n-bit grids of one layer.

    Attributes:
      kernel: grid of the layer's kernel (per tensor, or per output channel), or None.
      output: grid of the layer's output activation, or None when QAT leaves the
        output in float (Add outputs, logits).
      bias_scale: the int32 bias grid `s_in * s_w` QAT trained the bias on, or None
        (then the export snaps the bias to its own input scale times `s_w`).
      kernel_values: the kernel on its n-bit grid exactly as the QAT forward pass
        computes it, or None (then it is fake-quantized on `kernel`). A weight on a
        rounding tie can round either way between the two computations, and one
        flipped weight of a deep 4-bit net changes its logits by many steps.
    """

    kernel: QuantParams | None = None
    output: QuantParams | None = None
    bias_scale: np.ndarray | None = None
    kernel_values: np.ndarray | None = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """A float model plus the n-bit grids to export it with.

    Attributes:
      model: a Functional tf_keras model of plain layers with the trained (float)
        weights: the stripped QAT model.
      layers: `LayerQuantization` by layer name.
      input: grid of the model input, or None when QAT does not quantize it.
    """

    model: Any
    layers: Mapping[str, LayerQuantization]
    input: QuantParams | None = None


@dataclasses.dataclass
class _Tensor:
    value: tf.Tensor
    lo: Any  # guaranteed bounds of the real values (per tensor), float32 scalars
    hi: Any
    grid: QuantParams | None  # the n-bit / 8-bit grid the value lies on, if any
    nonneg: bool = False  # produced by a ReLU-type op (values >= 0)


def _scalar(x) -> float:
    return float(np.asarray(x).reshape(-1)[0])


def _grid8(lo: float, hi: float) -> QuantParams:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo < 1e-8:
        hi = lo + 1e-8
    return nudge(np.float32(lo), np.float32(hi), 8)


def _holds_values(lo: float, hi: float) -> bool:
    """Whether a calibrated range is one an int8 grid can be built on.

    A tensor that was 0 on every representative input (a dead branch at 2 bits)
    calibrates to [0, 0]; a grid of almost no width on it makes the requantization
    ratio of its producer too large for XNNPACK, which then refuses to prepare the
    file. The guaranteed interval bound of the tensor is used instead.
    """
    return bool(np.isfinite(lo) and np.isfinite(hi) and max(hi, 0.0) - min(lo, 0.0) > 0.0)


def _usable(grid: QuantParams | None) -> QuantParams | None:
    """A grid with a positive step: a dead (all-zero) tensor trained to [0, 0] gets a tiny one.

    TF's fake-quant maps everything to 0 on a zero-width range; TFLite needs a
    positive scale. `EMPTY_RANGE_STEP` keeps 0 exact, changes nothing measurable,
    and is the step the QAT model's integer arithmetic divides such a tensor by
    (`tf_pfq.quantizers.activation_step`), so the bias grids of its readers agree.
    """
    if grid is None:
        return None
    scale = np.asarray(grid.scale, np.float32)
    if np.all(np.isfinite(scale)) and np.all(scale > 0):
        return grid
    lo = np.minimum(np.asarray(grid.min, np.float32), 0.0)
    width = np.float32(EMPTY_RANGE_STEP * (grid.quant_max - grid.quant_min))
    hi = np.maximum(np.asarray(grid.max, np.float32), lo + width)
    return nudge(lo, hi, grid.num_bits, grid.narrow_range)


def _fq_activation(x, grid: QuantParams, nonneg: bool, clamp_signed: bool, fuses_relu=True):
    """The n-bit grid `grid` as an 8-bit fake-quant (see the module docstring).

    A tensor that may be negative but whose trained range starts at 0 needs the
    lower clamp of a ReLU. Where the producing op fuses one (CONV_2D, ADD, MUL, ...)
    the ReLU is simply put before the fake-quant. Where it cannot (MEAN), the
    converter would give the producer's output a grid of its own choosing (MEAN's
    input grid) and the RELU would requantize: two roundings where QAT has one
    (16-30 output steps on a swish, mean pool, dense net). So the tensor is first
    put on the output grid itself, and the RELU then keeps that grid (exact).
    """
    scale = np.float32(_scalar(grid.scale))
    top = np.float32(_scalar(grid.max))
    low = top - np.float32(255.0) * scale
    bottom = np.float32(_scalar(grid.min))
    if grid.num_bits < 8 and not nonneg:
        if bottom == 0.0:
            if not fuses_relu:
                x = tf.quantization.fake_quant_with_min_max_vars(x, low, top, num_bits=8)
            x = tf.nn.relu(x)
        elif clamp_signed:
            x = tf.maximum(x, bottom)
    return tf.quantization.fake_quant_with_min_max_vars(x, low, top, num_bits=8)


def _same_grid(a: QuantParams, b: QuantParams) -> bool:
    return bool(
        np.isclose(_scalar(a.scale), _scalar(b.scale), rtol=1e-6, atol=0.0)
        and np.isclose(_scalar(a.max), _scalar(b.max), rtol=1e-6, atol=1e-12)
    )


def _fq_weight(w: np.ndarray, grid: QuantParams, channel_axis_last: bool):
    scale = np.asarray(grid.scale, np.float32)
    if scale.ndim == 0 or scale.size == 1:
        s = np.float32(scale.reshape(-1)[0])
        return tf.quantization.fake_quant_with_min_max_vars(
            tf.constant(w), -127.0 * s, 127.0 * s, num_bits=8, narrow_range=True
        )
    if not channel_axis_last:
        raise ValueError("per-channel weights need the channel axis last")
    return tf.quantization.fake_quant_with_min_max_vars_per_channel(
        tf.constant(w), -127.0 * scale, 127.0 * scale, num_bits=8, narrow_range=True
    )


def _weight_values(w: np.ndarray, grid: QuantParams) -> np.ndarray:
    """The kernel on its n-bit grid (paper eq. 20), for plans without `kernel_values`.

    Uses TensorFlow's fake-quant op on the nudged range. Nudging a nudged range gives
    the same grid, but not bit for bit: a weight on an exact rounding tie can round
    the other way than in the QAT model, which quantizes on the kernel's raw range
    (`plan_from_qat` therefore hands over the QAT kernel itself). Per-channel grids
    apply along the last axis of `w`.
    """
    lo, hi = np.asarray(grid.min, np.float32), np.asarray(grid.max, np.float32)
    bits, narrow = grid.num_bits, grid.narrow_range
    with tf.init_scope():  # eager, also while the export function is traced
        if lo.size == 1:
            out = tf.quantization.fake_quant_with_min_max_vars(
                w, lo.reshape(()), hi.reshape(()), num_bits=bits, narrow_range=narrow
            )
        else:
            out = tf.quantization.fake_quant_with_min_max_vars_per_channel(
                w, lo, hi, num_bits=bits, narrow_range=narrow
            )
        return out.numpy()


def _activation_fn(name: str, layer_name: str):
    if name in ("linear", None):
        return None, False
    if name == "relu":
        return tf.nn.relu, True
    if name == "relu6":
        return tf.nn.relu6, True
    raise ValueError(
        f"Layer {layer_name!r}: activation {name!r} is not supported by the integer "
        "export; use linear, relu or relu6 (or a ReLU layer)."
    )


def _interval_linear(kernel_2d: np.ndarray, bias, lo: float, hi: float):
    """Bounds of `x @ W + b` for x in [lo, hi]^in (kernel (in, out)).

    A convolution is the same per output channel with `in` = its taps; the input
    bounds are per tensor, so a depthwise kernel reshaped to (kh * kw, channels)
    works too.
    """
    pos = np.clip(kernel_2d, 0, None)
    neg = np.clip(kernel_2d, None, 0)
    out_hi = (pos * hi + neg * lo).sum(0)
    out_lo = (pos * lo + neg * hi).sum(0)
    if bias is not None:
        out_hi, out_lo = out_hi + bias, out_lo + bias
    return float(out_lo.min()), float(out_hi.max())


def _int8_hard_sigmoid(v, grid: QuantParams):
    """hard_sigmoid as the integer file runs it: 1x1 depthwise conv + ReLU (`_lut_activation`)."""
    shape = v.shape
    rank4 = tf.reshape(v, [-1, 1, 1, shape[-1]]) if shape.rank != 4 else v
    channels = shape[-1]
    s_w = np.float32(0.2 / 127.0)
    kernel = tf.quantization.fake_quant_with_min_max_vars(
        tf.constant(np.full((1, 1, channels, 1), 0.2, np.float32)),
        -127.0 * s_w,
        127.0 * s_w,
        num_bits=8,
        narrow_range=True,
    )
    step = np.float32(_scalar(grid.scale)) * s_w
    bias = np.float32(np.round(0.5 / step) * step)
    y = tf.nn.relu(tf.nn.depthwise_conv2d(rank4, kernel, [1, 1, 1, 1], "VALID") + bias)
    return tf.reshape(y, [-1, *shape[1:]]) if shape.rank != 4 else y


class Simulate:
    """Builder policy: the QAT model's inference arithmetic, in float.

    Each method is one point where the export graph differs from what QAT computes;
    this class answers with the QAT arithmetic (n-bit fake-quant ops, kernels on
    their n-bit grid, float averages), `Export` with what the integer file computes,
    and `Calibrate` is `Simulate` that also records the range of every float tensor.
    """

    def record(self, name: str, value) -> None:
        """Sees the float tensor `value` QAT leaves without a grid (layer `name`)."""

    def quantize_activation(
        self, value, grid: QuantParams, nonneg: bool, clamp_signed: bool, fuses_relu=True
    ):
        """`value` on its n-bit output grid (`fuses_relu`: its producing op fuses a ReLU)."""
        return tf.quantization.fake_quant_with_min_max_vars(
            value, _scalar(grid.min), _scalar(grid.max), num_bits=grid.num_bits
        )

    def rounds_float_tensors(self) -> bool:
        """Whether tensors QAT leaves in float get an int8 range (an integer file needs one)."""
        return False

    def missing_input_grid(self, name: str) -> None:
        """Called when model input `name` has no grid: the simulation runs it in float."""

    def kernel(self, kernel_n: np.ndarray, grid: QuantParams, depthwise: bool, dense: bool):
        """The kernel tensor, already on its n-bit grid (`kernel_n`)."""
        return tf.constant(kernel_n)

    def dense_as_conv(self, per_channel: bool) -> bool:
        """Whether a Dense layer runs as a 1x1 conv (TFLite's FULLY_CONNECTED is per tensor)."""
        return False

    def hard_sigmoid(self, v, grid: QuantParams):
        return tf.clip_by_value(0.2 * v + 0.5, 0.0, 1.0)

    def swish_gate(self, gate):
        """The sigmoid of swish `x * sigmoid(x)` before the product, on LOGISTIC's grid.

        QAT rounds it there (`tf_pfq.quantizers.swish_with_int8_gate`), as the file does.
        """
        return tf.quantization.fake_quant_with_min_max_args(
            gate, SWISH_GATE_RANGE[0], SWISH_GATE_RANGE[1], num_bits=8
        )

    def saturation_clamps(self, grid: QuantParams | None, max_value: float) -> bool:
        """Whether int8 saturation at the grid's top replaces a ReLU's `max_value` clamp."""
        return False

    def scalar_op(self, op: ElementwiseOp, v):
        """`v <op> c` for an op layer with a number operand, as QAT computes it."""
        return op.apply_op(v)

    def requantize(self, v):
        """`v` about to move onto another grid by an activation layer (identity here)."""
        return v

    def global_mean(self, x, keepdims: bool):
        return tf.reduce_mean(x, axis=[1, 2], keepdims=keepdims)

    def average_pool(self, name: str, x, config: Mapping[str, Any]):
        padding = config["padding"].upper()
        return tf.nn.avg_pool2d(x, config["pool_size"], config["strides"], padding)


class Calibrate(Simulate):
    """Builder policy: `Simulate`, recording min/max of every float tensor in `seen`."""

    def __init__(self):
        self.seen: dict[str, tuple[float, float]] = {}

    def record(self, name: str, value) -> None:
        lo = float(tf.reduce_min(value))
        hi = float(tf.reduce_max(value))
        old = self.seen.get(name)
        if old is not None:
            lo, hi = min(lo, old[0]), max(hi, old[1])
        self.seen[name] = (lo, hi)


class Export(Simulate):
    """Builder policy: the graph the converter turns into the integer file.

    n-bit grids become 8-bit fake-quant ops of the same step (module docstring),
    every tensor gets an int8 range, and hard_sigmoid, swish and average pooling
    are written as the int8 ops that round once, as QAT does.
    """

    def quantize_activation(
        self, value, grid: QuantParams, nonneg: bool, clamp_signed: bool, fuses_relu=True
    ):
        return _fq_activation(value, grid, nonneg, clamp_signed, fuses_relu)

    def rounds_float_tensors(self) -> bool:
        return True

    def missing_input_grid(self, name: str) -> None:
        raise ValueError(
            f"Input {name!r} has no quantizer in the QAT model; pass "
            "`representative_data` or `input_range=(lo, hi)` so it gets an int8 range."
        )

    def kernel(self, kernel_n: np.ndarray, grid: QuantParams, depthwise: bool, dense: bool):
        per_channel = np.asarray(grid.scale).size > 1
        if depthwise:
            kh, kw, cin, mult = kernel_n.shape
            k = _fq_weight(kernel_n.reshape(kh, kw, 1, cin * mult), grid, True)
            return tf.reshape(k, kernel_n.shape)
        if dense and per_channel:
            return _fq_weight(kernel_n.reshape(1, 1, *kernel_n.shape), grid, True)
        return _fq_weight(kernel_n, grid, True)

    def dense_as_conv(self, per_channel: bool) -> bool:
        return per_channel

    def hard_sigmoid(self, v, grid: QuantParams):
        return _int8_hard_sigmoid(v, grid)

    def saturation_clamps(self, grid: QuantParams | None, max_value: float) -> bool:
        return grid is not None and _scalar(grid.max) <= float(max_value)

    def scalar_op(self, op: ElementwiseOp, v):
        # TFLite has no int8 DIV: `x / c` is MUL by 1 / c (a float32 ulp away from
        # the quotient, far below the output step).
        if op.kind == "divide" and op.scalar is not None:
            return v * np.float32(1.0 / op.scalar)
        return op.apply_op(v)

    def requantize(self, v):
        # A standalone RELU that moves an int8 tensor onto another grid (NASNet's
        # ReLU after an Add with several readers, 8 -> 4 bits) is off by one step
        # on ~6 % of values on XNNPACK. A 1x1 depthwise conv of weight 1 (int8 127
        # at 1/127) with the ReLU fused rounds once, like every conv here.
        # The QAT model rounds the same way (`tf_pfq.wrapper.requantized_input`).
        # A vector (after pooling) is the same conv on a 1x1 image.
        rank4 = v if v.shape.rank == 4 else tf.reshape(v, [-1, 1, 1, v.shape[-1]])
        y = _integer_depthwise(rank4, np.full((1, 1), 127.0), IDENTITY_MEAN_STEP)
        return y if v.shape.rank == 4 else tf.reshape(y, [-1, *v.shape[1:]])

    def global_mean(self, x, keepdims: bool):
        # The mean of a single position is the identity, and the converter removes a
        # MEAN over 1x1 together with its requantization onto the output grid, which
        # QAT applies (RegNetY002 at 32x32: 1 step at its SE squeeze, 26 at the
        # logits). The 1x1 depthwise conv of weight 1 keeps that rounding in the file
        # (`tf_pfq.wrapper.PfqQuantizeWrapper` rounds it the same way).
        if x.shape[1] * x.shape[2] != 1:
            return super().global_mean(x, keepdims)
        y = _integer_depthwise(x, np.full((1, 1), 127.0), IDENTITY_MEAN_STEP)
        return y if keepdims else tf.reshape(y, [-1, x.shape[-1]])

    def average_pool(self, name: str, x, config: Mapping[str, Any]):
        # TFLite's int8 AVERAGE_POOL_2D needs equal input and output scales, so the
        # converter would requantize the input to the output grid before averaging
        # (two roundings). A depthwise conv with constant weights 1/(kh*kw) on an
        # exact int8 grid averages in int32 and rounds once, like the QAT model.
        # 'same' windows at the border hold fewer values (TF and Keras average the
        # valid ones): each band of windows with one count is its own depthwise conv
        # with weights 1/count, and the bands are concatenated back (all on the
        # output grid, so CONCATENATION is exact).
        kh, kw = config["pool_size"]
        sh, sw = config["strides"]
        if config["padding"].lower() == "valid":
            return _mean_conv(x, kh, kw, sh, sw)
        rows = _same_bands(int(x.shape[1]), kh, sh)
        cols = _same_bands(int(x.shape[2]), kw, sw)
        out_rows = []
        for r0, rn, rk in rows:
            pieces = [
                _mean_conv(x[:, r0 : r0 + rn, c0 : c0 + cn, :], rk, ck, sh, sw)
                for c0, cn, ck in cols
            ]
            out_rows.append(pieces[0] if len(pieces) == 1 else tf.concat(pieces, axis=2))
        return out_rows[0] if len(out_rows) == 1 else tf.concat(out_rows, axis=1)


def _integer_depthwise(x, taps: np.ndarray, step: float, strides=(1, 1)):
    """'valid' depthwise conv of every channel with `taps * step`, int8-exact.

    `taps` (kh, kw) are integers in -127..127, so the int8 weights on the grid
    `step` hold them exactly and the file computes the same sums as TF.
    """
    s = np.float32(step)
    kernel = np.repeat(taps.astype(np.float32)[:, :, None, None], x.shape[-1], axis=2)
    k = tf.quantization.fake_quant_with_min_max_vars(
        tf.constant(kernel * s), -127.0 * s, 127.0 * s, narrow_range=True
    )
    return tf.nn.depthwise_conv2d(x, k, [1, *strides, 1], "VALID")


def _mean_conv(x, kh: int, kw: int, sh: int, sw: int):
    """The 'valid' mean over kh x kw windows as a depthwise conv with int8-exact weights."""
    return _integer_depthwise(x, np.full((kh, kw), 127.0), 1.0 / (kh * kw * 127.0), (sh, sw))


def _bilinear_taps(factor: int) -> tuple[np.ndarray, int]:
    """One axis of bilinear upsampling by `factor`, as integer taps over nearest copies.

    With half-pixel centers (what `UpSampling2D(interpolation="bilinear")` computes),
    output `j` reads input position `(j + 0.5) / f - 0.5`. After a nearest upsampling
    by f, every output is the same short average of its neighbours, whatever its
    phase: f taps of 1/f for odd f, and `[1, 2, ..., 2, 1] / 2f` (f + 1 taps) for even
    f. Returns (integer taps, denominator).
    """
    if factor % 2:
        return np.ones(factor, np.float32), factor
    return np.array([1] + [2] * (factor - 1) + [1], np.float32), 2 * factor


def _edge_pad(x, before: int, axis: int):
    """`x` with its first and last rows (or columns) repeated `before` times."""
    if before == 0:
        return x
    n = x.shape[axis]
    if axis == 1:
        first, last = x[:, :1], x[:, n - 1 :]
    else:
        first, last = x[:, :, :1], x[:, :, n - 1 :]
    return tf.concat([first] * before + [x] + [last] * before, axis=axis)


def _bilinear(x, fh: int, fw: int):
    """`UpSampling2D((fh, fw), interpolation="bilinear")` from int8-exact integer ops.

    RESIZE_NEAREST_NEIGHBOR, edge rows and columns repeated (STRIDED_SLICE and
    CONCATENATION, all on the input's grid), then a 'valid' depthwise conv whose
    weights are small integers over `(denominator_h * denominator_w)` (exact in int8):
    equal to TensorFlow's bilinear resize, clamped borders included. The conv's
    requantization is the one rounding onto the output grid, as in QAT.
    """
    taps_h, den_h = _bilinear_taps(fh)
    taps_w, den_w = _bilinear_taps(fw)
    y = tf.image.resize(x, (x.shape[1] * fh, x.shape[2] * fw), method="nearest")
    y = _edge_pad(_edge_pad(y, len(taps_h) // 2, 1), len(taps_w) // 2, 2)
    return _integer_depthwise(y, np.outer(taps_h, taps_w), 1.0 / (den_h * den_w))


def _same_bands(size: int, k: int, stride: int) -> list[tuple[int, int, int]]:
    """One axis of 'same' pooling as runs of windows of one length.

    TF pads `(out - 1) * stride + k - size` positions, the smaller half before, and
    averages only the real positions. Output positions whose windows have the same
    length and step by `stride` form a band: the 'valid' pooling with window `length`
    and the same stride over input positions `[start, start + extent)`. Returns
    (start, extent, length) per band, in output order.
    """
    out = -(-size // stride)
    before = max((out - 1) * stride + k - size, 0) // 2
    windows = []
    for i in range(out):
        lo = max(i * stride - before, 0)
        hi = min(i * stride - before + k, size)
        windows.append((lo, hi - lo))
    bands: list[list[int]] = []  # [start, length, count]
    for lo, length in windows:
        band = bands[-1] if bands else None
        if band is not None and band[1] == length and lo == band[0] + band[2] * stride:
            band[2] += 1
        else:
            bands.append([lo, length, 1])
    return [(lo, (count - 1) * stride + length, length) for lo, length, count in bands]


def layer_scope(name: str) -> str:
    """The TensorFlow name scope the export graph puts layer `name`'s ops under.

    The TFLite converter names each tensor after the TF ops it came from (several
    names joined by ";" where it fused ops), so every tensor of the file carries
    the scope of each layer it computes. Characters a scope cannot hold become "_";
    the trailing "/" makes the scope absolute, so TensorFlow never renames it
    ("conv1_1") when another op of the graph is already called "conv1".

    Example:
      >>> layer_scope("conv1"), layer_scope("block 1:add")
      ('conv1/', 'block_1_add/')
    """
    scope = re.sub(r"[^A-Za-z0-9_.\-]", "_", name)
    if not re.match(r"[A-Za-z0-9.]", scope):
        scope = f"x{scope}"
    return f"{scope}/"


class _Builder:
    """Evaluates a float model layer by layer with export-time quantization ops.

    Which handler evaluates a layer is its `tf_pfq.layers.table` entry's `lowering`;
    where the export graph and the QAT arithmetic differ the builder asks its policy
    (`Export`, `Simulate` or `Calibrate`).
    """

    def __init__(self, plan: ExportPlan, policy: Simulate, clamp_signed: bool, ranges=None):
        if not isinstance(policy, Simulate):
            raise TypeError(
                f"`policy` must be Export(), Simulate() or Calibrate(). Received: {policy!r}"
            )
        self.plan = plan
        self.policy = policy
        self.clamp_signed = clamp_signed
        self.ranges = dict(ranges or {})  # calibrated (lo, hi) by layer name
        self.graph = LayerGraph(plan.model)
        # Read eagerly: inside the traced function Keras cannot fetch variable values.
        self.weights = {layer.name: layer.get_weights() for layer in self.graph.model.layers}
        self._handlers = {
            Lowering.WEIGHTED: self._weighted,
            Lowering.ACTIVATION: self._activation,
            Lowering.AVERAGE: self._pool,
            Lowering.RESIZE: self._upsample,
            Lowering.PASS_THROUGH: self._pass_through,
        }
        self._merges = {
            Lowering.ADD: self._add,
            Lowering.MULTIPLY: self._multiply,
            Lowering.OP: self._op,
        }

    # --- helpers -----------------------------------------------------------------
    def _quantize_output(
        self, name: str, t: _Tensor, needs_range: bool, fuses_relu: bool | None = None
    ) -> _Tensor:
        grid = self.plan.layers.get(name, LayerQuantization()).output
        if grid is not None:
            if fuses_relu is None:
                fuses_relu = entry_for(self.graph.layer(name)).lowering in _FUSES_RELU
            value = self.policy.quantize_activation(
                t.value, grid, t.nonneg, self.clamp_signed, fuses_relu=fuses_relu
            )
            lo, hi = _scalar(grid.min), _scalar(grid.max)
            return _Tensor(value, np.float32(lo), np.float32(hi), grid, t.nonneg)
        self.policy.record(name, t.value)
        if not needs_range or not self.policy.rounds_float_tensors():
            return t
        lo, hi = float(t.lo), float(t.hi)
        if name in self.ranges and _holds_values(*self.ranges[name]):
            lo, hi = self.ranges[name]
            if self.graph.is_output(name):
                # Saturated logits tie at 127 and lose the argmax; data outside the
                # representative set gets room at the price of a coarser step.
                pad = OUTPUT_MARGIN * (hi - lo)
                lo, hi = lo - pad, hi + pad
        grid8 = _grid8(lo, hi)
        value = tf.quantization.fake_quant_with_min_max_vars(
            t.value, _scalar(grid8.min), _scalar(grid8.max), num_bits=8
        )
        return _Tensor(value, grid8.min, grid8.max, grid8, t.nonneg)

    def _grid_applies_relu(self, name: str, activation) -> bool:
        """Whether `name`'s n-bit output grid clamps as its ReLU / ReLU6 does."""
        grid = self.plan.layers.get(name, LayerQuantization()).output
        if grid is None or activation not in (tf.nn.relu, tf.nn.relu6):
            return False
        low, top, step = _scalar(grid.min), _scalar(grid.max), _scalar(grid.scale)
        if low != 0.0:
            return False
        # ReLU6: 6 and everything above it must land on the same (top) level.
        return activation is tf.nn.relu or top <= 6.0 + step / 2

    def _needs_range(self, name: str) -> bool:
        """False when the converter can fuse the next op (a quantized ReLU layer)."""
        if self.graph.is_output(name):
            return True
        consumers = self.graph.consumers_of(name)
        if len(consumers) != 1:
            return True
        consumer = self.graph.layer(consumers[0])
        fusable = entry_for(consumer).lowering is Lowering.ACTIVATION and activation_name(
            consumer
        ) in ("relu", "relu6")
        has_grid = self.plan.layers.get(consumers[0], LayerQuantization()).output is not None
        return not (fusable and has_grid)

    # --- layers ------------------------------------------------------------------
    def _input(self, name: str, x) -> _Tensor:
        self.policy.record(name, x)
        grid = self.plan.input
        if grid is None and name in self.ranges:
            grid = _grid8(*self.ranges[name])
        if grid is None:
            self.policy.missing_input_grid(name)
            return _Tensor(x, np.float32(-np.inf), np.float32(np.inf), None)
        value = tf.quantization.fake_quant_with_min_max_vars(
            x, _scalar(grid.min), _scalar(grid.max), num_bits=grid.num_bits
        )
        return _Tensor(value, grid.min, grid.max, grid)

    def _weighted(self, name: str, layer, x: _Tensor) -> _Tensor:
        config = layer.get_config()
        quant = self.plan.layers.get(name, LayerQuantization())
        if quant.kernel is None:
            raise ValueError(
                f"Layer {name!r} ({type(layer).__name__}) has no weight quantizer: the "
                "integer export needs a stage-W model. Fold batch normalization with "
                "tf_pfq.fold_batchnorm and quantize weights with "
                "tf_pfq.apply(..., weight_bits=n) first."
            )
        if config.get("data_format", "channels_last") != "channels_last":
            raise ValueError(f"Layer {name!r}: only channels_last is supported.")
        weights = self.weights[name]
        kernel = weights[0].astype(np.float32)
        bias = weights[1].astype(np.float32) if len(weights) > 1 else None
        grid = quant.kernel
        entry = entry_for(layer)
        layout = entry.kernel
        assert layout is not None  # Lowering.WEIGHTED entries have a kernel
        depthwise = layout.depthwise
        dense = entry.tflite == "FULLY_CONNECTED"
        per_channel = np.asarray(grid.scale).size > 1
        if depthwise:
            kh, kw, cin, mult = kernel.shape
        if quant.kernel_values is not None and quant.kernel_values.shape == kernel.shape:
            kernel_n = np.asarray(quant.kernel_values, np.float32)
        elif depthwise:
            flat = _weight_values(kernel.reshape(kh, kw, cin * mult), grid)
            kernel_n = flat.reshape(kernel.shape)
        else:
            kernel_n = _weight_values(kernel, grid)
        # Bias on the int32 grid s_in * s_w (what TFLite stores).
        s_in = _scalar(x.grid.scale) if x.grid is not None else None
        if bias is not None and s_in is not None:
            step = np.float32(s_in) * np.asarray(grid.scale, np.float32)
            if quant.bias_scale is not None and np.allclose(
                quant.bias_scale, step, rtol=1e-5, atol=0.0
            ):
                step = np.asarray(quant.bias_scale, np.float32)
            # Clipped as QAT clips it (`tf_pfq.quantizers.quantize_bias`): a bias
            # beyond int32 on a very fine grid (a kernel of zeros) saturates in both.
            units = np.clip(np.round(bias / step), *INT32_BIAS_RANGE)
            bias = (units * step).astype(np.float32)

        k = self.policy.kernel(kernel_n, grid, depthwise, dense)

        v = x.value
        if dense:
            if v.shape.rank != 2:
                raise ValueError(f"Layer {name!r}: Dense on a rank-{v.shape.rank} input.")
            if self.policy.dense_as_conv(per_channel):
                # TFLite's FULLY_CONNECTED takes per-tensor weights only; a 1x1 CONV_2D
                # carries the per-channel grid.
                y = tf.nn.conv2d(tf.reshape(v, [-1, 1, 1, v.shape[-1]]), k, 1, "VALID")
                y = tf.reshape(y, [-1, kernel.shape[1]])
            else:
                y = tf.matmul(v, k)
            k2d = kernel_n
        elif depthwise:
            if config["dilation_rate"] not in ((1, 1), [1, 1]):
                raise ValueError(f"Layer {name!r}: dilation is not supported by the export.")
            strides = [1, *config["strides"], 1]
            y = tf.nn.depthwise_conv2d(v, k, strides, config["padding"].upper())
            k2d = kernel_n.reshape(kh * kw, cin * mult)
        elif entry.tflite == "TRANSPOSE_CONV":
            # The kernel is (kh, kw, out, in).
            if config["dilation_rate"] not in ((1, 1), [1, 1]) or config.get("output_padding"):
                raise ValueError(
                    f"Layer {name!r}: Conv2DTranspose with dilation or output_padding is "
                    "not supported by the integer export."
                )
            out_shape = layer.compute_output_shape(v.shape)
            y = tf.nn.conv2d_transpose(
                v, k, [v.shape[0], *out_shape[1:]], config["strides"], config["padding"].upper()
            )
            # Each output sums at most every (tap, input channel) pair once.
            k2d = kernel_n.transpose(0, 1, 3, 2).reshape(-1, kernel_n.shape[2])
        elif entry.tflite == "CONV_2D" and type(layer) is entry.cls:
            # A grouped kernel (kh, kw, cin / groups, cout) converts to a grouped
            # CONV_2D, which TFLite's builtin kernels and XNNPACK run.
            y = tf.nn.conv2d(
                v,
                k,
                config["strides"],
                config["padding"].upper(),
                dilations=config["dilation_rate"],
            )
            k2d = kernel_n.reshape(-1, kernel_n.shape[-1])
        else:
            raise ValueError(f"Layer {name!r}: unsupported weighted layer {type(layer).__name__}.")
        if bias is not None:
            y = y + bias
        # Interval bound of the output (used only when QAT left it in float).
        lo, hi = _interval_linear(k2d, bias, float(x.lo), float(x.hi))
        activation, nonneg = _activation_fn(config.get("activation"), name)
        fuses_relu = None
        if entry.tflite == "TRANSPOSE_CONV" and self._grid_applies_relu(name, activation):
            # The converter fuses a ReLU into TRANSPOSE_CONV only behind a bias add;
            # with a zero bias (folded away) it keeps the op in float. Quantize the
            # raw output on the int8 grid and clamp with a separate RELU on that
            # grid instead, as for a MEAN (`_fq_activation`): one rounding, exact.
            activation, nonneg, fuses_relu = None, False, False
        if activation is not None:
            y = activation(y)
            lo = max(lo, 0.0)
            hi = min(hi, 6.0) if activation is tf.nn.relu6 else hi
        t = _Tensor(y, np.float32(lo), np.float32(hi), None, nonneg)
        return self._quantize_output(name, t, self._needs_range(name), fuses_relu)

    def _activation(self, name: str, layer, x: _Tensor) -> _Tensor:
        act = activation_name(layer)
        if act in _LUT_ACTIVATIONS:
            return self._lut_activation(name, act, layer, x)
        return self._relu(name, layer, x)

    def _lut_activation(self, name: str, act: str, layer, x: _Tensor) -> _Tensor:
        """softmax, sigmoid, tanh, hard_sigmoid and swish on int8 inputs.

        SOFTMAX, LOGISTIC and TANH are TFLite's int8 kernels with their fixed output
        grids (the QAT model quantizes these outputs with the same grids).
        hard_sigmoid `clip(0.2 x + 0.5, 0, 1)` is one 1x1 depthwise conv with weight
        0.2 (exact in int8: 127 steps of 0.2/127), bias 0.5 and a fused ReLU, whose
        output grid [0, 255/256] does the upper clamp: one rounding, as in QAT.
        swish `x * sigmoid(x)` is LOGISTIC then MUL; the sigmoid is rounded to its
        1/256 grid in between, as QAT does (`tf_pfq.quantizers.swish_with_int8_gate`).
        """
        v = x.value
        if x.grid is None:
            raise ValueError(
                f"Layer {name!r} ({act}): its input has no quantization grid; the "
                "integer export needs the input of a softmax/sigmoid/tanh/swish quantized."
            )
        if act == "softmax":
            axis = layer.get_config().get("axis", -1) if isinstance(layer, L.Softmax) else -1
            if axis not in (-1, v.shape.rank - 1, [-1]):
                raise ValueError(
                    f"Layer {name!r}: softmax over axis {axis} is not supported by the "
                    "integer export (TFLite's SOFTMAX works on the last axis)."
                )
            y, lo, hi = tf.nn.softmax(v), 0.0, 1.0
        elif act == "sigmoid":
            y, lo, hi = tf.math.sigmoid(v), 0.0, 1.0
        elif act == "tanh":
            y, lo, hi = tf.math.tanh(v), -1.0, 1.0
        elif act == "hard_sigmoid":
            y, lo, hi = self.policy.hard_sigmoid(v, x.grid), 0.0, 1.0
        else:  # swish
            y = v * self.policy.swish_gate(tf.math.sigmoid(v))
            lo, hi = min(-0.2785, float(x.lo)), max(float(x.hi), 0.0)
        t = _Tensor(y, np.float32(lo), np.float32(hi), None, act != "tanh" and act != "swish")
        return self._quantize_output(name, t, needs_range=True)

    def _relu(self, name: str, layer, x: _Tensor) -> _Tensor:
        config = layer.get_config()
        if isinstance(layer, ElementwiseOp):  # tf.nn.relu / tf.nn.relu6
            max_value = 6.0 if layer.kind == "relu6" else None
            fn = tf.nn.relu6 if layer.kind == "relu6" else tf.nn.relu
        elif isinstance(layer, L.Activation):
            fn, _ = _activation_fn(config["activation"], name)
            fn = fn or (lambda v: v)
            max_value = 6.0 if config["activation"] == "relu6" else None
        else:
            if config.get("negative_slope") or config.get("threshold"):
                raise ValueError(
                    f"Layer {name!r}: ReLU with negative_slope or threshold is not supported."
                )
            max_value = config.get("max_value")
            if max_value is None:
                fn = tf.nn.relu
            elif float(max_value) == 6.0:
                fn = tf.nn.relu6
            elif self.policy.saturation_clamps(
                self.plan.layers.get(name, LayerQuantization()).output, max_value
            ):
                fn = tf.nn.relu  # int8 saturation at the grid's top is the tighter clamp
            else:
                limit = np.float32(max_value)

                def fn(v):
                    return tf.minimum(tf.nn.relu(v), limit)

        v = x.value
        out_grid = self.plan.layers.get(name, LayerQuantization()).output
        if x.grid is not None and out_grid is not None and not _same_grid(x.grid, out_grid):
            v = self.policy.requantize(v)
        y = fn(v)
        hi = float(x.hi) if max_value is None else min(float(x.hi), float(max_value))
        t = _Tensor(y, np.float32(0.0), np.float32(max(hi, 0.0)), x.grid, True)
        return self._quantize_output(name, t, needs_range=False)

    def _add(self, name: str, inputs: list[_Tensor]) -> _Tensor:
        y = inputs[0].value
        for t in inputs[1:]:
            y = y + t.value
        lo = sum(float(t.lo) for t in inputs)
        hi = sum(float(t.hi) for t in inputs)
        t = _Tensor(y, np.float32(lo), np.float32(hi), None)
        # An Add feeding only a quantized ReLU has no grid of its own: the ReLU is
        # fused into ADD and rounds once, as in the QAT model.
        return self._quantize_output(name, t, needs_range=self._needs_range(name))

    def _op(self, name: str, inputs: list[_Tensor]) -> _Tensor:
        """An ElementwiseOp: the op in float, then its output grid (one rounding).

        `+` / `-` feeding only a quantized ReLU get no grid of their own (the ReLU is
        fused into ADD / SUB, as in the QAT model); products always need one.
        """
        op = self.graph.layer(name)
        x = inputs[0]
        lo, hi = float(x.lo), float(x.hi)
        if op.tensors == 2:
            y = inputs[1]
            value = op.apply_op(x.value, y.value)
            y_lo, y_hi = float(y.lo), float(y.hi)
            if op.kind == "add":
                lo, hi = lo + y_lo, hi + y_hi
            elif op.kind == "subtract":
                lo, hi = lo - y_hi, hi - y_lo
            else:
                corners = [lo * y_lo, lo * y_hi, hi * y_lo, hi * y_hi]
                lo, hi = min(corners), max(corners)
            nonneg = x.nonneg and y.nonneg and op.kind != "subtract"
        else:
            c = float(op.scalar)
            value = self.policy.scalar_op(op, x.value)
            if op.kind in ("add", "subtract"):
                shift = c if op.kind == "add" else -c
                lo, hi = lo + shift, hi + shift
                nonneg = x.nonneg and shift >= 0
            else:
                factor = c if op.kind == "multiply" else 1.0 / c
                lo, hi = sorted((lo * factor, hi * factor))
                nonneg = x.nonneg and factor >= 0
        t = _Tensor(value, np.float32(lo), np.float32(hi), None, nonneg)
        sums = op.kind in ("add", "subtract")
        return self._quantize_output(name, t, self._needs_range(name) if sums else True)

    def _pool(self, name: str, layer, x: _Tensor) -> _Tensor:
        config = layer.get_config()
        if isinstance(layer, L.GlobalAveragePooling2D):
            y = self.policy.global_mean(x.value, config.get("keepdims", False))
        else:
            y = self.policy.average_pool(name, x.value, config)
        t = _Tensor(y, x.lo, x.hi, None, x.nonneg)
        return self._quantize_output(name, t, needs_range=True)

    def _pass_through(self, name: str, layer, x: _Tensor) -> _Tensor:
        config = layer.get_config()
        v = x.value
        if isinstance(layer, (L.Dropout, L.SpatialDropout2D, L.InputLayer)):
            y = v
        elif isinstance(layer, L.Flatten):
            y = tf.reshape(v, [v.shape[0], -1])
        elif isinstance(layer, L.Reshape):
            y = tf.reshape(v, [v.shape[0], *config["target_shape"]])
        elif isinstance(layer, L.MaxPooling2D):
            y = tf.nn.max_pool2d(
                v, config["pool_size"], config["strides"], config["padding"].upper()
            )
        elif isinstance(layer, L.GlobalMaxPooling2D):
            y = tf.reduce_max(v, axis=[1, 2], keepdims=config.get("keepdims", False))
        elif isinstance(layer, L.ZeroPadding2D):
            (top, bottom), (left, right) = config["padding"]
            y = tf.pad(v, [[0, 0], [top, bottom], [left, right], [0, 0]])
        else:  # Cropping2D
            (top, bottom), (left, right) = config["cropping"]
            y = v[:, top : v.shape[1] - bottom, left : v.shape[2] - right, :]
        t = _Tensor(y, x.lo, x.hi, x.grid, x.nonneg)
        return self._quantize_output(name, t, needs_range=self.graph.is_output(name))

    def _upsample(self, name: str, layer, x: _Tensor) -> _Tensor:
        # RESIZE_NEAREST_NEIGHBOR keeps the grid. Bilinear is not RESIZE_BILINEAR:
        # TFLite's int8 kernel must keep its input's scale and rounds its ties its
        # own way, while QAT gives the interpolation a grid of its own (one
        # rounding). `_bilinear` computes it as a conv that rounds onto that grid.
        if layer.interpolation == "nearest":
            t = _Tensor(layer.call(x.value), x.lo, x.hi, x.grid, x.nonneg)
            return self._quantize_output(name, t, needs_range=self.graph.is_output(name))
        if layer.interpolation != "bilinear":
            raise ValueError(
                f"Layer {name!r}: UpSampling2D with interpolation={layer.interpolation!r} "
                "is not supported by the integer export (nearest and bilinear are)."
            )
        if layer.data_format != "channels_last":
            raise ValueError(f"Layer {name!r}: only channels_last is supported.")
        y = _bilinear(x.value, *layer.size)
        t = _Tensor(y, x.lo, x.hi, None, x.nonneg)
        return self._quantize_output(name, t, needs_range=True)

    def _multiply(self, name: str, inputs: list[_Tensor]) -> _Tensor:
        # MUL rescales the int32 product once onto the output grid, as QAT rounds.
        y, lo, hi = inputs[0].value, float(inputs[0].lo), float(inputs[0].hi)
        for t in inputs[1:]:
            y = y * t.value
            corners = [lo * float(t.lo), lo * float(t.hi), hi * float(t.lo), hi * float(t.hi)]
            lo, hi = min(corners), max(corners)
        t = _Tensor(y, np.float32(lo), np.float32(hi), None)
        return self._quantize_output(name, t, needs_range=True)

    def _concat(self, name: str, layer, inputs: list[_Tensor]) -> _Tensor:
        grid = self.plan.layers.get(name, LayerQuantization()).output
        exporting = self.policy.rounds_float_tensors() and grid is not None
        # A signed n-bit grid whose lower end is not 0 needs a MAXIMUM clamp. After the
        # CONCATENATION it would hide the concat's grid from the converter, which then
        # concatenates on a grid of its own and requantizes (two roundings); on each
        # input before it (the same values) the grid reaches the CONCATENATION.
        bottom = np.float32(_scalar(grid.min)) if grid is not None else np.float32(0.0)
        clamp_inputs = (
            exporting
            and grid is not None
            and self.clamp_signed
            and grid.num_bits < 8
            and bottom != 0.0
            and not all(t.nonneg for t in inputs)
        )
        values = []
        for t in inputs:
            v = t.value
            if (
                exporting
                and grid is not None
                and t.grid is not None
                and not _same_grid(t.grid, grid)
            ):
                # An input on another grid is requantized to the concat's. The
                # converter does that where the grid was set, above any
                # grid-preserving ops (max pooling, padding) in between, so their
                # other readers (DenseNet's pre-activation BN after pool1) would read
                # the concat's grid instead of their own; and its own requantizing op
                # rounds in fixed point, which QAT does not model (an 8-bit concat of
                # a signed input: 1 step). The input's own grid and `Export.requantize`
                # (which QAT models) keep the requantization on this edge.
                v = self.policy.quantize_activation(v, t.grid, t.nonneg, self.clamp_signed)
                v = self.policy.requantize(v)
            if clamp_inputs and not t.nonneg:
                v = tf.maximum(v, bottom)
            values.append(v)
        y = tf.concat(values, axis=layer.get_config()["axis"])
        lo = min(float(t.lo) for t in inputs)
        hi = max(float(t.hi) for t in inputs)
        if clamp_inputs:
            assert grid is not None
            value = self.policy.quantize_activation(y, grid, False, clamp_signed=False)
            return _Tensor(value, bottom, np.float32(_scalar(grid.max)), grid, False)
        t = _Tensor(y, np.float32(lo), np.float32(hi), None)
        return self._quantize_output(name, t, needs_range=True)

    def __call__(self, x):
        graph = self.graph
        tensors: dict[str, _Tensor] = {}
        for name in graph.order:
            layer = graph.layer(name)
            if graph.is_shared(name):
                raise ValueError(f"Layer {name!r} is shared (called more than once).")
            inbound = [tensors[n] for n in graph.inputs_of(name)]
            entry = lookup(layer, "the integer export")
            # The scope names the layer's ops, and so its tensors in the .tflite
            # (`tf_pfq.export.compare_layers` maps layers to tensors by it).
            with tf.name_scope(layer_scope(name)):
                if entry.lowering is Lowering.INPUT:
                    tensors[name] = self._input(name, x)
                elif entry.lowering in self._handlers:
                    tensors[name] = self._handlers[entry.lowering](name, layer, inbound[0])
                elif entry.lowering in self._merges:
                    tensors[name] = self._merges[entry.lowering](name, inbound)
                elif entry.lowering is Lowering.CONCAT:
                    tensors[name] = self._concat(name, layer, inbound)
                elif entry.refusal is not None:
                    raise ValueError(entry.refusal(name, layer))
                else:
                    raise ValueError(
                        f"Layer {name!r} of class {type(layer).__name__} is not supported "
                        "by the integer export."
                    )
        outputs = [tensors[o.layer].value for o in graph.outputs]
        return outputs[0] if len(outputs) == 1 else outputs


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


def calibrate(plan: ExportPlan, representative_data, batch_size: int = 64) -> dict:
    """Min/max of every float (unquantized) tensor of the plan's graph over data.

    Args:
      plan: the `ExportPlan`.
      representative_data: float inputs (N, H, W, C) as an array, or a
        `tf.data.Dataset` of input batches or (inputs, labels) batches.
      batch_size: evaluation batch size.

    Returns:
      {layer name: (lo, hi)} for the input (when it has no quantizer) and every layer
      output QAT leaves in float.

    Raises:
      ValueError: the data does not have the model's per-example input shape, or
        holds NaN/Inf (the first bad example is named).
    """
    policy = Calibrate()
    builder = _Builder(plan, policy, clamp_signed=True)
    if isinstance(representative_data, tf.data.Dataset):
        batches = [
            np.asarray(b[0] if isinstance(b, (tuple, list)) else b, np.float32)
            for b in representative_data.as_numpy_iterator()
        ]
        data = np.concatenate(batches) if batches else np.zeros((0,), np.float32)
    else:
        data = np.asarray(representative_data, np.float32)
    expected = tuple(plan.model.inputs[0].shape)[1:]
    if data.ndim != len(expected) + 1 or tuple(data.shape[1:]) != expected or not len(data):
        raise ValueError(
            f"`representative_data` must be a non-empty batch of inputs of shape "
            f"(N, {', '.join(str(d) for d in expected)}). Received: shape {data.shape}"
        )
    check_finite(data, "representative_data")  # a NaN would become a NaN int8 scale
    for start in range(0, len(data), batch_size):
        builder(tf.constant(data[start : start + batch_size]))
    return policy.seen


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
      clamp_signed: see the module docstring.

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


def plan_from_qat(qat_model) -> ExportPlan:
    """Reads a `tf_pfq.apply` QAT model into an `ExportPlan`.

    Uses `tf_pfq.strip` (float layers with the trained weights) and
    `tf_pfq.quantize.quantization_params` (the nudged grids of every quantizer; its
    module docstring lists which tensor carries which quantizer).

    Args:
      qat_model: a stage-W model from `tf_pfq.apply(..., weight_bits=n)`.

    Returns:
      The `ExportPlan`.

    Raises:
      ValueError: the model quantizes no weights (a stage-A model).
    """
    from tf_pfq.quantize import quantization_params, strip

    params = quantization_params(qat_model)
    model = strip(qat_model)
    graph = LayerGraph(model)
    if not any(p.kernel is not None for p in params.values()):
        raise ValueError(
            f"`qat_model` ({qat_model.name}) quantizes activations only (stage A). The "
            "integer export needs n-bit weights: fold batch normalization with "
            "tf_pfq.fold_batchnorm, wrap with tf_pfq.apply(..., weight_bits=n) and "
            "fine-tune (stage W) first."
        )
    input_name = graph.input_names[0]
    input_params = params.get(input_name)
    layers = {
        name: LayerQuantization(
            kernel=_usable(p.kernel),
            output=_usable(p.output),
            bias_scale=p.bias_scale,
            kernel_values=p.kernel_values,
        )
        for name, p in params.items()
        if name != input_name
    }
    # The layers whose output only feeds a Concatenate use the concat's range: give
    # them its grid, so every concat input is already on it (no requantization).
    for source, concat in concat_shared_ranges(model, activation_bits=8).items():
        grid = layers.get(concat, LayerQuantization()).output
        if grid is not None and layers.get(source, LayerQuantization()).output is None:
            layers[source] = dataclasses.replace(
                layers.get(source, LayerQuantization()), output=grid
            )
    return ExportPlan(
        model=model,
        layers=layers,
        input=_usable(input_params.output) if input_params is not None else None,
    )


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
    return int4.apply_storage(tflite, weight_storage)


def check_finite_model(qat_model) -> None:
    """Raises when a weight or an activation range of the QAT model is NaN or infinite.

    Such a model has no integer form, and its NaN scales make the TFLite converter
    fail deep inside (or crash the process), so it is refused before conversion.

    Raises:
      ValueError: naming the first layer whose range and whose weights are not finite.
    """
    check_model(qat_model, "qat_model")
    found = nonfinite_variables(qat_model)
    if found:
        raise ValueError(
            f"`qat_model` ({qat_model.name}) is not finite: {describe_nonfinite(found)}. "
            "Its training diverged (tf_pfq.training.fit stops at the first such step); "
            "fine-tune again from the last good weights with a lower learning rate."
        )


# TFLite stores scales as float32 and its converter refuses those outside the normal
# float32 range; an int32 bias step below it is an underflowed product s_in * s_w.
_SMALLEST_SCALE = float(np.finfo(np.float32).tiny)


def check_plan_scales(plan: ExportPlan) -> None:
    """Raises when a grid of the plan has a step TFLite cannot store (0, NaN, Inf, denormal).

    Raises:
      ValueError: naming the layer, the tensor (output, kernel or bias) and the step.
    """
    steps: list[tuple[str, str, Any]] = [
        ("input", plan.model.layers[0].name, plan.input and plan.input.scale)
    ]
    for name, quant in plan.layers.items():
        steps.append(("output", name, quant.output and quant.output.scale))
        steps.append(("kernel", name, quant.kernel and quant.kernel.scale))
        steps.append(("bias", name, quant.bias_scale))
    for tensor, name, step in steps:
        if step is None:
            continue
        scale = np.asarray(step, np.float64)
        bad = ~np.isfinite(scale) | (scale < _SMALLEST_SCALE) | (scale > np.finfo(np.float32).max)
        if np.any(bad):
            raise ValueError(
                f"Layer {name!r}: its {tensor} step {float(scale.reshape(-1)[np.argmax(bad)])!r} "
                "is outside what TFLite can store (a positive normal float32); the QAT "
                "model's range or weights there are degenerate."
            )


# The scale ratios XNNPACK's int8 kernels accept (`xnn_create_*_qs8`): a weighted op's
# requantization scale s_in * s_w / s_out below 2^8; MUL's s_a * s_b / s_out and each
# ADD input's s_in / s_out in [2^-16, 2^8) and [2^-10, 2^8).
_WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")
_RATIO_LIMITS = {"weighted": (0.0, 2.0**8), "MUL": (2.0**-16, 2.0**8), "ADD": (2.0**-10, 2.0**8)}


def _scale_ratios(op) -> tuple[str, np.ndarray] | None:
    inputs = [t for t in op.inputs if t is not None and t.scales]
    if not op.outputs or not op.outputs[0].scales:
        return None
    out = np.float32(op.outputs[0].scales[0])
    if op.op in _WEIGHTED_OPS and len(inputs) >= 2:
        # TRANSPOSE_CONV's inputs are (output shape, weights, data): the shape has no scale.
        w, x = inputs[:2] if op.op == "TRANSPOSE_CONV" else inputs[1::-1]
        return "weighted", np.float32(x.scales[0]) * np.asarray(w.scales, np.float32) / out
    if op.op == "MUL" and len(inputs) == 2:
        product = np.float32(inputs[0].scales[0]) * np.float32(inputs[1].scales[0])
        return "MUL", np.asarray([product / out])
    if op.op in ("ADD", "SUB"):
        return "ADD", np.asarray([np.float32(t.scales[0]) / out for t in inputs])
    return None


def check_xnnpack_limits(tflite: bytes) -> None:
    """Raises when an op's scales are outside what XNNPACK's int8 kernel accepts.

    XNNPACK (LiteRT's default CPU path) refuses such a conv (the interpreter then
    fails to prepare) or leaves such an ADD or MUL to TFLite's builtin kernel, which
    rounds otherwise than the QAT model (which rounds as XNNPACK does). It happens
    when a range is far from the values it holds: a fine-tuning that moved the
    weights faster than the moving-average ranges followed.

    Raises:
      ValueError: naming the op, the layers in its tensor's name, the ratio and the
        limits.
    """
    for op in inspect(tflite).ops:
        found = _scale_ratios(op)
        if found is None:
            continue
        kind, ratios = found
        lo, hi = _RATIO_LIMITS[kind]
        bad = (ratios < lo) | (ratios >= hi) | ~np.isfinite(ratios)
        if np.any(bad):
            ratio = float(ratios[np.argmax(bad)])
            layers = sorted({part.split("/")[0] for part in op.outputs[0].name.split(";")})
            raise ValueError(
                f"Layer {layers[0]!r} ({op.op}, tensor {op.outputs[0].name!r}): its scale "
                f"ratio {ratio:.3g} is outside [{lo:g}, {hi:g}), which XNNPACK's int8 "
                f"{op.op} needs (it would refuse the file or leave the op to a kernel that "
                "rounds otherwise). The output range there is far from the values the "
                "layer computes; fine-tune until the ranges follow the weights."
            )


def check_integer(tflite: bytes) -> None:
    """Raises unless every compute op of the file is integer.

    The TFLite converter quietly keeps an op in float (between a DEQUANTIZE and a
    QUANTIZE) when it cannot quantize it, for instance where a fake-quant op it
    needs was folded away. Such a file runs, but it is not the QAT model, does not
    run on integer-only hardware, and is not what `to_tflite` promises, so it is
    never returned. Only the QUANTIZE of a float model input and the DEQUANTIZE of
    a float model output (`io_dtype="float32"`) may touch float tensors.

    Raises:
      ValueError: naming each float op and its output tensor (whose name holds
        the Keras layer's).
    """
    summary = inspect(tflite)
    bad = []
    for op in summary.ops:
        if summary.is_io_conversion(op):
            continue
        tensors = [t for t in (*op.inputs, *op.outputs) if t is not None]
        if any(t.dtype.startswith("float") for t in tensors):
            bad.append(f"op {op.index} {op.op} -> {op.outputs[0].name!r}")
    if bad:
        raise ValueError(
            "The TFLite converter left these ops in float, so the file would not be "
            "the integer QAT model: "
            + "; ".join(bad[:8])
            + (" ..." if len(bad) > 8 else "")
            + ". Please report the model; the layer names are in the tensor names."
        )


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
