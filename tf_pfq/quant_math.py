"""The quantizer math: pure functions from tensors to tensors (paper eq. 20-21).

`Q(x) = round((clip(x, m, M) - m) / s) * s + m` with a straight-through gradient.
The paper writes `s = (M - m) / 2^n`, which gives 2^n + 1 levels that do not fit in
n bits; tf_pfq uses `s = (M - m) / (2^n - 1)` (exactly 2^n levels), which is what
`tf.quantization.fake_quant_with_min_max_vars` computes. That op also nudges the
range so that 0.0 is exactly on the grid (the "zero point" of integer inference)
and supplies the STE gradient (1 inside the nudged range, 0 outside); tf_pfq does
not hand-write round/clip for activations or weights. Only the int32 bias grid,
which no TF op covers (fake-quant stops at 16 bits), is rounded here.

Everything here is a function of tensors and numbers, with no Keras layer or
variable of its own, so the QAT quantizers (`tf_pfq.quantizers`), the integer
wrapper (`tf_pfq.wrapper`) and the exporter compute one grid with one expression
(a grid differing in the last bit flips roundings between QAT and the file).

Ranges:
  * activations: moving average of the batch min/max, always including 0 (so
    after a ReLU the minimum is exactly 0), each batch extreme widened by the
    relative `OFF_LATTICE` (2^-12): a batch extreme is a value of the tensor, a
    multiple of the int32 accumulator unit, and a step that is a rational multiple
    of that unit puts many outputs exactly on rounding ties, which TF's fake-quant
    and XNNPACK's requantization break differently (`batch_range`,
    `moving_average_range`);
  * weights: the tensor's current min/max including 0, per tensor (the paper) or
    per output channel; 8-bit weights are symmetric with `narrow_range` (integer
    values -127..127, TFLite's int8 weight spec), so every weight grid is an int8
    tensor with zero point 0 (for n < 8 the integers lie in [-(2^n - 1), 2^n - 1]);
    with the "symmetric" weight scheme every bit width uses the 8-bit rule,
    `[-|w|max, |w|max]` with `narrow_range`: 2^n - 1 levels whose integers are
    -(2^(n-1) - 1) .. 2^(n-1) - 1, so 4-bit weights fit TFLite's INT4 (-8..7) with
    zero point 0 (see `WEIGHT_SCHEMES`);
  * biases: int32 on the grid `s_in * s_w` of the layer's input scale times its
    weight scale, as integer inference stores them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import tensorflow as tf

__all__ = [
    "MIN_BITS",
    "OFF_LATTICE",
    "INT32_BIAS_RANGE",
    "EMPTY_RANGE_STEP",
    "bias_range",
    "MAX_BITS",
    "WEIGHT_SCHEMES",
    "SWISH_GATE_RANGE",
    "SWISH_GATE_STEP",
    "IDENTITY_MEAN_STEP",
    "mean_weight",
    "check_bits",
    "check_weight_scheme",
    "QuantParams",
    "nudge",
    "fake_quant",
    "batch_range",
    "moving_average_range",
    "activation_step",
    "weight_min_max",
    "weight_scale",
    "weight_params",
    "quantize_weight",
    "quantize_bias",
    "to_integers",
    "swish_gate",
    "swish_with_int8_gate",
]

MIN_BITS = 2
MAX_BITS = 8
# The int32 values a bias may take, as float32 holds them: 2^31 - 1 is not a float32
# (it rounds up to 2^31, which int32 cannot hold), 2^31 - 128 is the largest below.
INT32_BIAS_RANGE = (-(2.0**31), 2.0**31 - 128)
# Weight grids: "min_max" is the paper's `[min(w, 0), max(w, 0)]` with 2^n levels
# below 8 bits (the finest grid n bits hold; its zero point moves with the range)
# and symmetric narrow-range at 8 bits; "symmetric" is `[-|w|max, |w|max]` with
# narrow range at every bit width: one level fewer, but the integers are centred
# on 0, so an n-bit grid fits a signed n-bit container (4-bit weights: INT4).
WEIGHT_SCHEMES = ("min_max", "symmetric")
# Relative widening of batch activation ranges (see `batch_range`). It
# removes exact ties, not near ones: where the accumulator lattice is much finer
# than the output step, a value can still land within the float32 rounding noise
# of TF's conv sum from a tie, and TF and XNNPACK then round it 1 step apart (seen
# on Xception and RegNet; 2^-8 moved the flips to other models, it did not remove
# them). Only integer-exact QAT arithmetic would.
OFF_LATTICE = 2.0**-12
# The step of an activation range of zero width (see `activation_step`); the
# exporter's int8 grid for such a tensor has the same step.
EMPTY_RANGE_STEP = 1e-6
# TFLite's int8 LOGISTIC output grid: scale 1/256, zero point -128, i.e. [0, 255/256].
SWISH_GATE_RANGE = (0.0, 255.0 / 256.0)
SWISH_GATE_STEP = 1.0 / 256.0
# The weight step of the 1x1 depthwise conv (weight 127, i.e. 1) the export writes for
# a mean over a single position (see `tf_pfq.export.convert.Export.global_mean`).
IDENTITY_MEAN_STEP = 1.0 / 127.0


def mean_weight(positions: int) -> tuple[float, float]:
    """(integer weight, weight step) of the depthwise conv a global mean is written as.

    TFLite's int8 MEAN rounds twice (the sum times `s_in / s_out` to an integer,
    then the division by the count), which QAT cannot follow without modelling that
    kernel; a depthwise conv over all positions accumulates `sum(x_int) * w` in int32
    and rounds once, `rint(acc * s_in * w_step / s_out)`, as every weighted layer.
    The weight is 127 (the finest int8 grid of `1 / positions`) while the sums stay
    exact in float32 (`positions * 255 * 127 < 2**24`), else 1.
    """
    if positions * 255 * 127 < 2**24:
        return 127.0, 1.0 / (127.0 * positions)
    return 1.0, 1.0 / positions


def _step(width, intervals: int):
    """`width / intervals` as a true float32 division, in eager and in graphs alike.

    Grappler rewrites `x / constant` into `x * (1 / constant)`, which can differ from
    the division in the last bit: a graph (`fit`, `predict`) would then put a bias
    that sits near a rounding tie one int32 step away from where eager code and the
    exporter put it. `divide_no_nan` is not rewritten (and equals the division here,
    the divisor being a positive count).
    """
    return tf.math.divide_no_nan(width, tf.constant(float(intervals), tf.float32))


def check_bits(num_bits, argument: str = "num_bits") -> int:
    """Returns `num_bits` as an int, or raises ValueError naming `argument`.

    Example:
      >>> check_bits(4)
      4
    """
    if isinstance(num_bits, bool) or not isinstance(num_bits, (int, np.integer)):
        raise ValueError(
            f"`{argument}` must be an integer in [{MIN_BITS}, {MAX_BITS}]. "
            f"Received: {argument}={num_bits!r}"
        )
    if not MIN_BITS <= num_bits <= MAX_BITS:
        raise ValueError(
            f"`{argument}` must be in [{MIN_BITS}, {MAX_BITS}]. Received: {argument}={num_bits}"
        )
    return int(num_bits)


def check_weight_scheme(scheme, argument: str = "weight_scheme") -> str:
    """Returns `scheme` if it is one of `WEIGHT_SCHEMES`, or raises ValueError naming `argument`.

    Example:
      >>> check_weight_scheme("symmetric")
      'symmetric'
    """
    if scheme not in WEIGHT_SCHEMES:
        raise ValueError(
            f"`{argument}` must be one of {WEIGHT_SCHEMES}. Received: {argument}={scheme!r}"
        )
    return str(scheme)


@dataclasses.dataclass(frozen=True)
class QuantParams:
    """Effective grid of one fake-quant op, after TensorFlow's zero-point nudging.

    Real values are `(q - zero_point) * scale` for integers `q` in
    [quant_min, quant_max]; `min`/`max` are the nudged range ends. Arrays hold one
    entry per channel for per-channel weights, scalars otherwise.

    Attributes:
      min: nudged lower end of the range (a grid point).
      max: nudged upper end of the range (a grid point).
      scale: step `s = (M - m) / (quant_max - quant_min)` (paper eq. 21, 2^n levels).
      zero_point: the integer `q` that represents 0.0.
      num_bits: bit width n.
      narrow_range: True when the lowest level is not used (2^n - 1 levels).
    """

    min: np.ndarray
    max: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    num_bits: int
    narrow_range: bool = False

    @property
    def quant_min(self) -> int:
        return 1 if self.narrow_range else 0

    @property
    def quant_max(self) -> int:
        return 2**self.num_bits - 1

    @property
    def num_levels(self) -> int:
        return self.quant_max - self.quant_min + 1


def nudge(min_value, max_value, num_bits: int, narrow_range: bool = False) -> QuantParams:
    """The grid TensorFlow's fake-quant ops use for a range (float32, like the kernel).

    Re-implements the op's `Nudge` step so that the exporter can read the exact
    scale and zero point; `tests/test_quantizers.py` checks it against the op.

    Args:
      min_value: range minimum (scalar or per-channel array).
      max_value: range maximum, same shape.
      num_bits: bit width, 2..16 (the op's limits).
      narrow_range: quantize into [1, 2^n - 1] instead of [0, 2^n - 1].

    Returns:
      The `QuantParams` of the nudged grid.

    Example:
      >>> p = nudge(-1.0, 2.0, num_bits=2)
      >>> float(p.scale), int(p.zero_point), float(p.min), float(p.max)
      (1.0, 1, -1.0, 2.0)
    """
    lo = np.asarray(min_value, np.float32)
    hi = np.asarray(max_value, np.float32)
    quant_min = np.float32(1 if narrow_range else 0)
    quant_max = np.float32(2**num_bits - 1)
    scale = (hi - lo) / (quant_max - quant_min)
    with np.errstate(divide="ignore", invalid="ignore"):
        zero_point_from_min = quant_min - lo / scale
    # std::round in the kernel rounds half away from zero.
    rounded = np.sign(zero_point_from_min) * np.floor(np.abs(zero_point_from_min) + 0.5)
    zero_point = np.clip(np.nan_to_num(rounded), quant_min, quant_max).astype(np.float32)
    return QuantParams(
        min=((quant_min - zero_point) * scale).astype(np.float32),
        max=((quant_max - zero_point) * scale).astype(np.float32),
        scale=scale.astype(np.float32),
        zero_point=zero_point.astype(np.int32),
        num_bits=int(num_bits),
        narrow_range=bool(narrow_range),
    )


def fake_quant(x, min_value, max_value, num_bits: int, narrow_range: bool = False):
    """Paper eq. 20-21 with STE gradient: TF's fused fake-quant op, per tensor or channel.

    Args:
      x: float tensor.
      min_value: range minimum; a scalar, or a vector over the LAST axis of `x`
        for per-channel quantization.
      max_value: range maximum, same shape as `min_value`.
      num_bits: bit width n (2^n levels, or 2^n - 1 with `narrow_range`).
      narrow_range: drop the lowest level (symmetric int8 weights).

    Returns:
      `x` fake-quantized; its gradient is 1 inside the nudged range, 0 outside.

    Example:
      >>> fake_quant([-0.2, 0.4, 0.6, 3.5], 0.0, 3.0, num_bits=2).numpy().tolist()
      [0.0, 0.0, 1.0, 3.0]
    """
    x = tf.convert_to_tensor(x, tf.float32)
    min_value = tf.convert_to_tensor(min_value, tf.float32)
    max_value = tf.convert_to_tensor(max_value, tf.float32)
    if min_value.shape.rank == 0:
        return tf.quantization.fake_quant_with_min_max_vars(
            x, min_value, max_value, num_bits=num_bits, narrow_range=narrow_range
        )
    return tf.quantization.fake_quant_with_min_max_vars_per_channel(
        x, min_value, max_value, num_bits=num_bits, narrow_range=narrow_range
    )


def _channels_last(kernel, depthwise: bool):
    # A depthwise kernel (kh, kw, cin, mult) has output channel c * mult + m; merging
    # the last two axes puts that channel index last, where the per-channel op wants
    # it (and where TFLite's converter expects it: a reshape after the op breaks it).
    if depthwise:
        shape = tf.shape(kernel)
        return tf.reshape(kernel, tf.concat([shape[:2], [shape[2] * shape[3]]], 0))
    return kernel


def _weight_narrow_range(num_bits: int, scheme: str = "min_max") -> bool:
    return num_bits == 8 or scheme == "symmetric"


def weight_min_max(
    kernel,
    num_bits: int,
    per_channel: bool = False,
    depthwise: bool = False,
    scheme: str = "min_max",
):
    """The range tf_pfq quantizes a kernel with: its current min/max, always holding 0.

    n < 8 with the "min_max" scheme: `[min(w, 0), max(w, 0)]` (paper); n = 8 or
    the "symmetric" scheme: `[-|w|max, |w|max]` with `narrow_range`, so the
    integer weights are symmetric around zero point 0. A degenerate (all-zero)
    range is widened by 1e-8 so the scale stays finite (on both sides for a
    symmetric range, which keeps its zero point in the middle).

    Args:
      kernel: Conv2D (kh, kw, cin, cout), DepthwiseConv2D (kh, kw, cin, mult) or
        Dense (cin, cout) kernel.
      num_bits: weight bit width.
      per_channel: one range per output channel instead of one per tensor.
      depthwise: `kernel` is a depthwise kernel (output channel = cin * mult + m).
      scheme: one of `WEIGHT_SCHEMES`.

    Returns:
      (min, max) float32 tensors, scalars or vectors over output channels.

    Example:
      >>> lo, hi = weight_min_max([[0.5, -1.0], [2.0, 0.25]], num_bits=4, per_channel=True)
      >>> lo.numpy().tolist(), hi.numpy().tolist()
      ([0.0, -1.0], [2.0, 0.25])
    """
    w = _channels_last(tf.convert_to_tensor(kernel, tf.float32), depthwise)
    axes = list(range(len(w.shape) - 1)) if per_channel else None
    if _weight_narrow_range(num_bits, check_weight_scheme(scheme, "scheme")):
        hi = tf.maximum(tf.reduce_max(tf.abs(w), axis=axes), 5e-9)
        lo = -hi
    else:
        lo = tf.minimum(tf.reduce_min(w, axis=axes), 0.0)
        hi = tf.maximum(tf.reduce_max(w, axis=axes), 0.0)
        hi = tf.maximum(hi, lo + 1e-8)
    # The range is a statistic, not a trained quantity (as in tfmot's quantizers):
    # no gradient flows back through the reductions.
    return tf.stop_gradient(lo), tf.stop_gradient(hi)


def weight_scale(
    kernel,
    num_bits: int,
    per_channel: bool = False,
    depthwise: bool = False,
    scheme: str = "min_max",
):
    """The weight step `s_w` (paper eq. 21) of `quantize_weight`, per tensor or channel.

    Example:
      >>> float(weight_scale([[-1.0, 2.0]], num_bits=2))
      1.0
      >>> float(weight_scale([[-1.0, 2.0]], num_bits=2, scheme="symmetric"))
      2.0
    """
    lo, hi = weight_min_max(kernel, num_bits, per_channel, depthwise, scheme)
    levels = 2**num_bits - (2 if _weight_narrow_range(num_bits, scheme) else 1)
    return _step(hi - lo, levels)


def quantize_weight(
    kernel,
    num_bits: int,
    per_channel: bool = False,
    depthwise: bool = False,
    scheme: str = "min_max",
):
    """Fake-quantizes a kernel on its current range (paper eq. 20-21), STE gradient.

    Args:
      kernel: the float kernel.
      num_bits: weight bit width (2..8).
      per_channel: one range per output channel (Conv2D/DepthwiseConv2D only: keep
        Dense per tensor, TFLite rejects per-axis FullyConnected weights).
      depthwise: `kernel` has the depthwise layout (kh, kw, cin, mult).
      scheme: one of `WEIGHT_SCHEMES` ("symmetric": 2^n - 1 levels centred on 0).

    Returns:
      The fake-quantized kernel, same shape.

    Example:
      >>> quantize_weight([[-1.0, 0.2, 0.6, 2.0]], num_bits=2).numpy().tolist()
      [[-1.0, 0.0, 1.0, 2.0]]
      >>> quantize_weight([[-1.5, 0.2, 0.6, 2.0]], num_bits=2, scheme="symmetric").numpy().tolist()
      [[-2.0, 0.0, 0.0, 2.0]]
    """
    kernel = tf.convert_to_tensor(kernel, tf.float32)
    lo, hi = weight_min_max(kernel, num_bits, per_channel, depthwise, scheme)
    flat = _channels_last(kernel, depthwise)
    quantized = fake_quant(flat, lo, hi, num_bits, _weight_narrow_range(num_bits, scheme))
    return tf.reshape(quantized, tf.shape(kernel)) if depthwise else quantized


def bias_range(taps: int | None) -> tuple[float, float]:
    """The int32 units a bias may take so that the accumulator cannot wrap.

    TFLite adds the bias to the int32 sum of `taps` products (|x - z| <= 255,
    |w| <= 127). A bias near the int32 limit (a nearly-zero filter's tiny `s_w`)
    would wrap that sum and flip the output's sign where QAT's float sum does not;
    the worst sum is kept as headroom, in QAT and the file alike. Bounds are
    multiples of 128, float32's spacing below 2^31. None: the plain int32 range.

    Example:
      >>> bias_range(9)
      (-2147191936.0, 2147191936.0)
    """
    if taps is None:
        return INT32_BIAS_RANGE
    room = 2.0**31 - 128 - taps * 255 * 127
    hi = max(float(np.floor(room / 128) * 128), 2.0**30)
    return -hi, hi


def quantize_bias(bias, scale, taps: int | None = None):
    """Rounds a bias onto the int32 grid `scale = s_in * s_w`, straight-through gradient.

    Integer inference adds the bias to the int32 accumulator of `x_q * w_q`, whose
    unit is `s_in * s_w`; rounding it here during QAT makes the exported model
    match the trained one. No TF fake-quant op goes beyond 16 bits, hence the
    explicit round (the gradient passes straight through, as in eq. 20's STE).

    Args:
      bias: float bias vector.
      scale: the grid step, scalar or per output channel.
      taps: products per accumulator (`bias_range`), or None for the int32 range.

    Returns:
      `round(bias / scale) * scale`, clipped to `bias_range(taps)`.

    Example:
      >>> quantize_bias([0.26, -0.74], 0.5).numpy().tolist()
      [0.5, -0.5]
    """
    lo, hi = bias_range(taps)
    return _bias_on_grid(
        tf.convert_to_tensor(bias, tf.float32),
        tf.convert_to_tensor(scale, tf.float32),
        tf.constant(lo, tf.float32),
        tf.constant(hi, tf.float32),
    )


# Straight-through roundings are custom gradients, not `x + stop_gradient(r - x)`:
# in an inference graph stop_gradient is an identity, and grappler's arithmetic
# optimizer may then regroup `x + (r - x)` as `(x + r) - x`, which is r plus float
# noise (seen: a conv fed such "integers" rounded 1 step off the integer kernel).


@tf.custom_gradient
def _bias_on_grid(bias, scale, lo, hi):
    steps = tf.clip_by_value(tf.round(bias / scale), lo, hi)

    def grad(dy):
        return dy, tf.zeros_like(scale), tf.zeros_like(lo), tf.zeros_like(hi)

    return steps * scale, grad


@tf.custom_gradient
def to_integers(x):
    """`round(x)` forward, identity gradient (for values within float noise of integers).

    Example:
      >>> to_integers(tf.constant([2.9999998, -1.0000001])).numpy().tolist()
      [3.0, -1.0]
    """

    def grad(dy):
        return dy

    return tf.round(x), grad


@tf.custom_gradient
def _gate_on_grid(gate):
    def grad(dy):
        return dy

    rounded = tf.quantization.fake_quant_with_min_max_args(
        gate, SWISH_GATE_RANGE[0], SWISH_GATE_RANGE[1], num_bits=8
    )
    return rounded, grad


def batch_range(inputs, non_negative: bool = False):
    """The (min, max) one training batch contributes to an activation range.

    Both ends hold 0 (so after a ReLU the minimum is exactly 0) and are widened by
    the relative `OFF_LATTICE`. `non_negative` (the tensor is known to be >= 0)
    takes 0 as the minimum without a reduction pass over the tensor.

    Example:
      >>> lo, hi = batch_range(tf.constant([0.5, 2.0]))
      >>> float(lo), float(hi) == 2.0 * (1.0 + OFF_LATTICE)
      (0.0, True)
    """
    if non_negative:
        batch_min = tf.constant(0.0)
    else:
        batch_min = tf.minimum(tf.reduce_min(inputs), 0.0)
    batch_max = tf.maximum(tf.reduce_max(inputs), 0.0)
    # Off the accumulator lattice: a batch extreme is a value of the tensor,
    # i.e. an integer multiple k of the int32 accumulator unit s_in * s_w, so
    # the step (M - m) / (2^n - 1) would be a rational multiple of that unit
    # and many outputs would sit exactly on a rounding tie. TF's fake-quant and
    # XNNPACK's fp32 requantization break exact ties by float noise, in
    # opposite directions at random (1-step flips that reach the logits as
    # several output steps). Widening by OFF_LATTICE moves every such tie
    # (j + 1/2) steps from zero by (j + 1/2) * OFF_LATTICE steps, far above
    # float noise, so both round it the same way.
    return batch_min * (1.0 + OFF_LATTICE), batch_max * (1.0 + OFF_LATTICE)


def moving_average_range(range_min, range_max, seen, batch_min, batch_max, ema_decay: float):
    """The activation range after one training batch: (new min, new max, new seen).

    An exponential moving average of the batch extremes (`batch_range`); `seen` is
    0.0 until a batch said something about the range, and the first such batch sets
    the range directly. A batch that is 0 everywhere (a ReLU'd tensor whose channels
    are all negative on it, a dead squeeze-excite branch) says nothing about the
    range; averaging it in would shrink the range towards zero width, and a first
    batch would set it there. It leaves the range (and `seen`) as it is.

    Args:
      range_min: the current range minimum (a scalar tensor or variable).
      range_max: the current range maximum.
      seen: 1.0 once an informative batch was averaged in, else 0.0.
      batch_min: the batch's minimum (`batch_range`).
      batch_max: the batch's maximum.
      ema_decay: moving-average decay in [0, 1).

    Returns:
      (new_min, new_max, new_seen) tensors, with no gradient into the range.

    Example:
      >>> lo, hi, seen = moving_average_range(-6.0, 6.0, 0.0, 0.0, 2.0, 0.99)
      >>> float(lo), float(hi), float(seen)
      (0.0, 2.0, 1.0)
    """
    informative = batch_max > batch_min
    decay = tf.where(informative, ema_decay * seen, 1.0)  # first batch: 0
    # stop_gradient: backpropagating through reduce_min/max would cost a
    # second pass over the activation for a gradient the range never uses.
    new_min = tf.stop_gradient(decay * range_min + (1.0 - decay) * batch_min)
    new_max = tf.stop_gradient(decay * range_max + (1.0 - decay) * batch_max)
    return new_min, new_max, tf.where(informative, 1.0, seen)


def activation_step(quantizer) -> Any:
    """The step `s = (M - m) / (2^n - 1)` of a built `PfqActivationQuantizer` (a tensor).

    The same float32 expression as TensorFlow's fake-quant kernel (the zero-point
    nudge moves the range, not the step), so a value the quantizer wrote divided by
    it is within float rounding of an integer. A range of zero width (a tensor that
    was 0 on every batch seen) makes TF's fake-quant write 0 whatever its input; any
    step then puts that 0 on the grid, and `EMPTY_RANGE_STEP` is the one the
    exporter gives such a tensor, so that the layers reading it divide by a positive
    step and their bias grids agree with the file's.
    """
    step = _step(quantizer.max_var - quantizer.min_var, 2**quantizer.num_bits - 1)
    return tf.where(step > 0.0, step, tf.constant(EMPTY_RANGE_STEP, tf.float32))


def weight_params(
    kernel,
    num_bits: int,
    per_channel: bool = False,
    depthwise: bool = False,
    scheme: str = "min_max",
) -> QuantParams:
    """The nudged grid `quantize_weight` puts `kernel` on (for export), as numbers.

    Example:
      >>> p = weight_params([[-1.0, 2.0]], num_bits=2)
      >>> float(p.scale), int(p.zero_point)
      (1.0, 1)
    """
    lo, hi = weight_min_max(kernel, num_bits, per_channel, depthwise, scheme)
    narrow = _weight_narrow_range(num_bits, scheme)
    return nudge(lo.numpy(), hi.numpy(), num_bits, narrow)


def swish_gate(x):
    """`sigmoid(x)` rounded onto TFLite's int8 LOGISTIC grid (straight-through gradient)."""
    return _gate_on_grid(tf.math.sigmoid(x))


def swish(x):
    """`x * sigmoid(x)` with the sigmoid rounded to TFLite's int8 LOGISTIC grid.

    The activation `tf_pfq.apply` gives a swish layer in QAT (exported as
    `swish_with_int8_gate`). TFLite lowers swish as LOGISTIC then MUL, and int8
    LOGISTIC writes its output on a fixed grid (scale 1/256, zero point -128, so
    [0, 255/256]): the file rounds the sigmoid gate before the product. A QAT model
    computing the exact product rounds only the product, and the difference (below
    2^-9 |x|) flips some n-bit roundings of the swish output, which reach the logits
    as several output steps. Rounding the gate to the same grid inside QAT
    (straight-through gradient: the sigmoid's) makes QAT and the file round at the
    same places. The function is named `swish` so that the layer's config still
    serializes as the Keras "swish" activation (`strip` gives back a plain model).

    Example:
      >>> y = swish_with_int8_gate(tf.constant([1.0]))
      >>> bool(float(y[0]) == np.round(256 / (1 + np.exp(-1.0))) / 256)
      True
    """
    return x * swish_gate(x)


swish_with_int8_gate = swish
