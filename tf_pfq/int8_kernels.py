"""LiteRT's int8 kernels as TF ops, so that QAT rounds as the deployed file does.

XNNPACK's int8 ADD and MUL and the requantization of a weighted layer's int32
accumulator (`int8_add`, `int8_mul`, `requantize`) round in float32 or fixed point
where TF's fake-quant rounds the exact value; near a rounding tie the two land a
step apart. LEAKY_RELU and PRELU below likewise.

A fake-quantized `leaky_relu` rounds `leaky_relu(x) / s_out` once, exactly. The file's
kernel does not: XNNPACK keeps each input-to-output ratio with 8 fraction bits and
computes `(x_int * M + 128) >> 8`, and where XNNPACK refuses the ratios TFLite's
builtin kernel multiplies by gemmlowp's 31-bit fixed-point multipliers. Either can
land one step away from the exact rounding, which compounds through a network, so
the QAT wrapper uses `int8_leaky_relu` at inference (training keeps the
differentiable fake-quant). PRELU runs on the builtin kernel only (XNNPACK takes no
int8 PRELU): its alpha is stored int8 per tensor, symmetric (`prelu_alpha_grid`),
and both products go through the same fixed-point multipliers (`int8_prelu`).

The numbers were measured bit for bit against `ai_edge_litert`
(tests/test_int8_activation_kernels.py holds the numpy models and the interpreter
runs); no library exposes these kernels' arithmetic, hence written here.
"""

from __future__ import annotations

import tensorflow as tf

from tf_pfq.quant_math import to_integers

__all__ = [
    "int8_add",
    "int8_mul",
    "requantize",
    "quantize_multiplier",
    "multiply_by_quantized_multiplier",
    "int8_leaky_relu",
    "prelu_alpha_grid",
    "prelu_alpha_on_grid",
    "int8_prelu",
]

# XNNPACK's qs8 LEAKY_RELU takes ratios whose 8-fraction-bit multipliers fit.
_XNN_RATIO_MIN = 2.0**-8
_XNN_RATIO_MAX = 128.0
_XNN_NEGATIVE_MIN = -127.99609375


def quantize_multiplier(real):
    """TFLite's `QuantizeMultiplier` of float tensor `real`: (int64 q31 multiplier, shift).

    `real = multiplier * 2^(shift - 31)`, the multiplier rounded half away from zero.

    Example:
      >>> q, shift = quantize_multiplier(tf.constant([0.75, 3.0]))
      >>> q.numpy().tolist(), shift.numpy().tolist()
      ([1610612736, 1610612736], [0, 2])
    """
    m = tf.cast(real, tf.float64)
    bits = tf.bitcast(tf.abs(m), tf.int64)
    exponent = tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, 52), 0x7FF) - 1022
    # |m| * 2^-exponent lies in [0.5, 1) and is exact: the power of two is built from bits.
    power = tf.bitcast(tf.bitwise.left_shift(1023 - exponent, 52), tf.float64)
    q = tf.floor(tf.abs(m) * power * 2.0**31 + 0.5)
    carry = q >= 2.0**31
    q = tf.where(carry, q / 2.0, q)
    exponent = tf.where(carry, exponent + 1, exponent)
    q = tf.cast(q, tf.int64) * tf.cast(tf.sign(m), tf.int64)
    zero = (m == 0.0) | (exponent < -31)
    return tf.where(zero, tf.zeros_like(q), q), tf.where(zero, tf.zeros_like(exponent), exponent)


def multiply_by_quantized_multiplier(x, real):
    """gemmlowp's `MultiplyByQuantizedMultiplier(x, QuantizeMultiplier(real))` on int64 `x`.

    Example:
      >>> x = tf.constant([-3, -1, 1, 3, 5], tf.int64)
      >>> multiply_by_quantized_multiplier(x, tf.constant(0.5)).numpy().tolist()
      [-1, 0, 1, 2, 3]
    """
    q, shift = quantize_multiplier(real)
    left, right = tf.maximum(shift, 0), tf.maximum(-shift, 0)
    ab = tf.bitwise.left_shift(x, left) * q
    nudge = tf.where(ab >= 0, tf.constant(1 << 30, tf.int64), tf.constant(1 - (1 << 30), tf.int64))
    high = tf.truncatediv(ab + nudge, tf.constant(1 << 31, tf.int64))
    mask = tf.bitwise.left_shift(tf.constant(1, tf.int64), right) - 1
    threshold = tf.bitwise.right_shift(mask, 1) + tf.cast(high < 0, tf.int64)
    rounded_up = tf.cast(tf.bitwise.bitwise_and(high, mask) > threshold, tf.int64)
    return tf.bitwise.right_shift(high, right) + rounded_up


def int8_leaky_relu(x, alpha: float, step_in, step_out):
    """`leaky_relu(x, alpha)` on the output grid as LiteRT's int8 LEAKY_RELU computes it.

    Args:
      x: float values on the input grid (`step_in` times integers relative to the
        input's zero point).
      alpha: the layer's negative slope.
      step_in, step_out: the input and output grid steps.

    Returns:
      float values, `step_out` times the kernel's output integers (relative to the
      output's zero point; the caller clamps them onto the output range).

    Example:
      >>> x = tf.constant([-0.5, 0.25, 0.5])  # integers -2, 1, 2; ratio 2.5
      >>> (int8_leaky_relu(x, 0.2, 0.25, 0.1).numpy() / 0.1).round().tolist()
      [-1.0, 3.0, 5.0]
    """
    step_in = tf.cast(step_in, tf.float32)
    step_out = tf.cast(step_out, tf.float32)
    ratio = step_in / step_out
    negative = ratio * alpha
    integers = tf.round(tf.cast(x, tf.float32) / step_in)
    # XNNPACK: M = rint(256 r) per sign, then (x M + 128) >> 8; every term exact in float32.
    multiplier = tf.where(integers >= 0.0, tf.round(256.0 * ratio), tf.round(256.0 * negative))
    xnnpack = tf.floor((integers * multiplier + 128.0) / 256.0)
    whole = tf.cast(integers, tf.int64)
    builtin = tf.where(
        whole >= 0,
        multiply_by_quantized_multiplier(whole, ratio),
        multiply_by_quantized_multiplier(whole, (step_in * alpha) / step_out),
    )
    delegated = (
        (ratio >= _XNN_RATIO_MIN)
        & (ratio <= _XNN_RATIO_MAX)
        & (tf.abs(negative) >= _XNN_RATIO_MIN)
        & (negative >= _XNN_NEGATIVE_MIN)
        & (negative <= _XNN_RATIO_MAX)
    )
    return tf.where(delegated, xnnpack, tf.cast(builtin, tf.float32)) * step_out


def prelu_alpha_grid(alpha):
    """(int8 integers, step) of a PReLU alpha as the converter stores it.

    One symmetric scale for the whole tensor, `max|alpha| / 127`, zero point 0,
    integers `rint(alpha / step)`; an all-zero alpha (Keras' initial value) gets step 1.

    Example:
      >>> integers, step = prelu_alpha_grid(tf.constant([0.25, -0.5, 0.1]))
      >>> integers.numpy().tolist(), round(float(step) * 127, 6)
      ([64.0, -127.0, 25.0], 0.5)
    """
    alpha = tf.cast(alpha, tf.float32)
    step = tf.reduce_max(tf.abs(alpha)) / 127.0
    step = tf.where(step > 0.0, step, 1.0)
    return tf.round(alpha / step), step


def prelu_alpha_on_grid(alpha):
    """`alpha` rounded onto `prelu_alpha_grid`, with a straight-through gradient.

    Example:
      >>> (prelu_alpha_on_grid(tf.constant([0.3, -0.5])).numpy() * 254).round().tolist()
      [76.0, -127.0]
    """
    alpha = tf.cast(alpha, tf.float32)
    integers, step = prelu_alpha_grid(tf.stop_gradient(alpha))
    return alpha + tf.stop_gradient(integers * step - alpha)


def int8_prelu(x, alpha, step_in, step_out):
    """PReLU on the output grid as TFLite's builtin int8 PRELU computes it.

    Args:
      x: float values on the input grid (`step_in` times integers relative to the
        input's zero point).
      alpha: the layer's alpha (float; put on its int8 grid here), broadcast to `x`.
      step_in, step_out: the input and output grid steps.

    Returns:
      float values, `step_out` times the kernel's output integers (relative to the
      output's zero point; the caller clamps them onto the output range).

    Example:
      >>> x = tf.constant([-0.5, 0.5])  # integers -2, 2 at step 0.25; -0.25 is 2.5 steps
      >>> (int8_prelu(x, tf.constant([0.5]), 0.25, 0.1).numpy() / 0.1).round().tolist()
      [-3.0, 5.0]
    """
    step_in = tf.cast(step_in, tf.float32)
    step_out = tf.cast(step_out, tf.float32)
    alpha_int, alpha_step = prelu_alpha_grid(alpha)
    whole = tf.cast(tf.round(tf.cast(x, tf.float32) / step_in), tf.int64)
    positive = multiply_by_quantized_multiplier(whole, step_in / step_out)
    product = whole * tf.cast(alpha_int, tf.int64)
    negative = multiply_by_quantized_multiplier(product, (step_in * alpha_step) / step_out)
    return tf.cast(tf.where(whole >= 0, positive, negative), tf.float32) * step_out


# XNNPACK's int8 ADD keeps its larger input-to-output scale ratio with this many
# fraction bits (the ratio in [2^20, 2^21) after the shift).
_ADD_MULTIPLIER_BITS = 20


def _float32(x):
    return tf.cast(x, tf.float32)


def int8_mul(a, b, step_a, step_b, step_out):
    """`a * b` rounded onto the grid `step_out` as XNNPACK's int8 MUL rounds it.

    XNNPACK multiplies the integers exactly, `acc = a_int * b_int`, and rounds once,
    `rint(float(acc) * scale)` (ties to even), with the float32 `scale = (s_a * s_b) /
    s_out` computed in that order. The Keras product of the two fake-quantized floats
    rounds `a * b` and then `(a * b - min) / s_out` instead: the same value up to
    float32 noise, which flips a product that sits near a rounding tie. A squeeze-
    excite gate on LOGISTIC's 256-level grid times a 4-bit tensor makes thousands of
    distinct products, enough for a few to sit there, and each flip repeats at every
    position with that pair (EfficientNet, RegNetY: tens of output steps). Computing
    XNNPACK's integers makes the two agree. Hand-written after XNNPACK's
    `qs8-vmul` fp32 kernels (`minmax-fp32-scalar`).

    Args:
      a, b: float tensors on the grids of step `step_a`, `step_b` (zero on the grid).
      step_a, step_b, step_out: float32 scalar steps.

    Returns:
      The float values `out_int * step_out` (before the output range's clamp).

    Example:
      >>> float(int8_mul(0.75, 0.5, 0.25, 0.125, 0.0625))
      0.375
    """
    scale = (_float32(step_a) * _float32(step_b)) / _float32(step_out)
    acc = to_integers(_float32(a) / _float32(step_a)) * to_integers(_float32(b) / _float32(step_b))
    return tf.round(acc * scale) * _float32(step_out)


def requantize(acc, input_weight_step, step_out):
    """A weighted layer's int32 accumulator rounded onto `step_out` as XNNPACK rounds it.

    XNNPACK's CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED and TRANSPOSE_CONV compute
    `rint(float(acc) * scale)` (ties to even) with the float32 `scale = (s_in * s_w)
    / s_out` per output channel; Keras' `fake_quant(acc * s_in * s_w)` rounds the
    product, then `(y - min) / s_out`. Where the accumulator takes many values (wide
    layers) a few land within float32 noise of a tie and round one step apart; later
    layers carry the step to the logits (Xception, RegNetX002: 14-19 output steps).

    Args:
      acc: the float32 accumulator (integers: `tf_pfq.wrapper`'s integer arithmetic).
      input_weight_step: `s_in * s_w`, a scalar or per output channel (last axis).
      step_out: the output grid's step.

    Returns:
      `rint(acc * scale) * step_out`, on the output grid before its clamps.
    """
    scale = _float32(input_weight_step) / _float32(step_out)
    return tf.round(acc * scale) * _float32(step_out)


def int8_add(a, b, step_a, step_b, step_out):
    """`a + b` rounded onto the grid `step_out` as XNNPACK's int8 ADD rounds it.

    XNNPACK (LiteRT's CPU path) adds int8 tensors in fixed point: each input's scale
    ratio `s_a / s_out` becomes an integer multiplier `A = rint(ratio * 2^shift)`
    with 21 significant bits, and the output is `(A a_int + B b_int + 2^(shift-1)) >>
    shift`. The multipliers differ from the true ratios by up to 2^-21 of them, so a
    sum within ~1e-4 steps of a rounding tie can round the other way than the exact
    float sum does; in a low-bit net only a few thousand (a_int, b_int) pairs occur,
    and one such pair repeats at every position it occurs (seen on MobileNetV2: 11 of
    6144 values of one Add one int8 step off, which later 4-bit layers grew to 46
    logit steps). Computing the same integers here makes the Keras model and the
    file agree. Hand-written after XNNPACK's `xnn_init_qs8_add_minmax_scalar_params`
    and its `qs8-vadd` kernels; no library exposes the rounding.

    Args:
      a, b: float tensors on the grids of step `step_a`, `step_b` (zero on the grid).
      step_a, step_b, step_out: float32 scalar steps.

    Returns:
      The float values `out_int * step_out` (before the output range's clamp).

    Example:
      >>> float(int8_add(1.3811314, -0.8419381, 0.026560219, 0.28064603, 0.03267851))
      0.5555346608161926
    """
    ratio_a = tf.cast(step_a, tf.float32) / tf.cast(step_out, tf.float32)
    ratio_b = tf.cast(step_b, tf.float32) / tf.cast(step_out, tf.float32)
    largest = tf.maximum(ratio_a, ratio_b)
    exponent = tf.bitwise.right_shift(tf.bitcast(largest, tf.int32), 23) - 127
    shift = _ADD_MULTIPLIER_BITS - exponent
    scale = tf.pow(tf.constant(2.0, tf.float32), tf.cast(shift, tf.float32))  # exact

    def multiplier(ratio):
        return tf.cast(tf.round(ratio * scale), tf.int32)  # lrintf: ties to even

    def integers(x, step):
        return tf.cast(tf.round(x / step), tf.int32)

    acc = (
        tf.bitwise.left_shift(1, shift - 1)
        + multiplier(ratio_a) * integers(a, step_a)
        + multiplier(ratio_b) * integers(b, step_b)
    )
    return tf.cast(tf.bitwise.right_shift(acc, shift), tf.float32) * step_out
