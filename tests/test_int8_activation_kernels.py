"""What LiteRT's int8 LEAKY_RELU, PRELU, HARD_SWISH, MAXIMUM and MINIMUM compute, bit for bit.

The facts the QAT roundings of LeakyReLU, PReLU, hard-swish and `tf.maximum(x, c)` /
`tf.minimum(x, c)` have to follow, measured on `ai_edge_litert` (2.3.0) with tiny
float graphs (fake-quant, the op, fake-quant) converted as `tf_pfq.export` converts
(`Optimize.DEFAULT`, int8), every one of the 256 int8 input levels run through the
file on the default path (XNNPACK) and compared to a numpy model of the kernel:

* LEAKY_RELU: XNNPACK takes it when `r = s_in / s_out` and `r * alpha` are in
  [2^-8, 128] in magnitude (`alpha * r` >= -127.99609375). It keeps each ratio with
  8 fraction bits, `M = lrintf(256 r)` (ties to even), and computes
  `(x_int * M + 128) >> 8`: not the exact rounding of `leaky_relu(x) / s_out` (the
  ratio is off by up to 2^-9, i.e. up to 0.25 steps at the ends of an 8-bit
  range). Elsewhere (alpha 0.001, a range far from the values) the builtin kernel
  runs: gemmlowp's `MultiplyByQuantizedMultiplier` with the float32 ratios
  `s_in / s_out` and `(s_in * alpha) / s_out` (31-bit multiplier, two roundings).
* PRELU: only Keras' form `relu(x) + (-alpha) * relu(-x)` with alpha a plain
  constant becomes an int8 PRELU (a fake-quant on alpha breaks the converter's
  pattern and leaves PRELU in float). The converter stores alpha per tensor,
  symmetric: scale `max|alpha| / 127` (float32), zero point 0, integers
  `rint(alpha / scale)`. XNNPACK takes no int8 PRELU; the builtin kernel computes
  `MultiplyByQuantizedMultiplier(x_int, s_in / s_out)` for x >= 0 and
  `MultiplyByQuantizedMultiplier(x_int * alpha_int, (s_in * s_alpha) / s_out)`
  below, which differs from the exact rounding on a few values per tensor.
* HARD_SWISH: the converter fuses `x * relu6(x + 3) / 6` into one HARD_SWISH, which
  XNNPACK does not take; the builtin kernel's int16 fixed point is one step off the
  exact rounding of `x * relu6(x + 3) / 6 / s_out` on 15 of 5120 levels (20 random
  scale pairs; at most 1 step). The QAT model rounds twice in between (its 3-op
  form), so tf_pfq keeps exporting hard-swish as those 3 ops.
* MAXIMUM / MINIMUM with a number: input and output keep one scale and the constant
  is stored on the input's int8 grid (`rint(c / s) + z`, clipped to int8), so the
  output is the max / min of the integers: no rounding of x at all.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

F32 = np.float32


def _convert(fn, shape) -> bytes:
    f = tf.function(fn, input_signature=[tf.TensorSpec(shape, tf.float32)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter.convert()


def _run(model: bytes, xq: np.ndarray):
    """(int output, input (scale, zp), output (scale, zp), op names, interpreter), default path."""
    it = Interpreter(model_content=model)
    it.allocate_tensors()
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    it.set_tensor(i["index"], xq.astype(np.int8))
    it.invoke()
    ops = [d["op_name"] for d in it._get_ops_details()]
    out = it.get_tensor(o["index"]).astype(np.int64)
    return out, i["quantization"], o["quantization"], ops, it


def _fq(x, lo, hi):
    return tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, num_bits=8)


# --- gemmlowp fixed point (tensorflow/lite/kernels/internal/common.h) ---------------
def quantize_multiplier(real: float) -> tuple[int, int]:
    if real == 0.0:
        return 0, 0
    q, shift = np.frexp(np.float64(real))
    fixed = int(np.sign(q) * np.floor(abs(q) * 2**31 + 0.5))  # TfLiteRound
    if abs(fixed) == 2**31:
        fixed //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return fixed, int(shift)


def multiply_by_quantized_multiplier(x: np.ndarray, real: float) -> np.ndarray:
    fixed, shift = quantize_multiplier(real)
    a = np.asarray(x, np.int64) * (1 << max(shift, 0))
    ab = a * fixed
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    num = ab + nudge
    high = np.where(num >= 0, num // 2**31, -((-num) // 2**31))  # C++ division truncates
    right = max(-shift, 0)
    mask = (1 << right) - 1
    threshold = (mask >> 1) + (high < 0)
    return (high >> right) + ((high & mask) > threshold)


# --- LEAKY_RELU ------------------------------------------------------------------------
def xnnpack_takes_leaky_relu(s_in, s_out, alpha) -> bool:
    ratio = F32(s_in) / F32(s_out)
    negative = ratio * F32(alpha)
    return bool(
        2.0**-8 <= ratio <= 128.0 and abs(negative) >= 2.0**-8 and -127.99609375 <= negative <= 128
    )


def leaky_relu_model(x_int, s_in, s_out, alpha) -> np.ndarray:
    """The output integers (relative to the output zero point) of int8 LEAKY_RELU."""
    ratio = F32(s_in) / F32(s_out)
    if xnnpack_takes_leaky_relu(s_in, s_out, alpha):
        positive = int(np.rint(F32(256) * ratio))
        negative = int(np.rint(F32(256) * (ratio * F32(alpha))))
        return (np.where(x_int >= 0, x_int * positive, x_int * negative) + 128) >> 8
    alpha_ratio = float(F32(F32(s_in) * F32(alpha)) / F32(s_out))
    return np.where(
        x_int >= 0,
        multiply_by_quantized_multiplier(x_int, float(ratio)),
        multiply_by_quantized_multiplier(x_int, alpha_ratio),
    )


# (input range, alpha, output range): XNNPACK for the first four, the builtin kernel for
# the last two (|alpha * r| below 2^-8; r below 2^-8).
LEAKY_CASES = [
    ((-3.0, 4.0), 0.3, (-1.0, 3.5)),
    ((-1.3, 6.2), 0.2, (-0.4, 5.1)),
    ((-5.0, 2.0), 0.01, (-0.06, 2.2)),
    ((-2.0, 2.0), -0.5, (-1.5, 2.5)),
    ((-1.0, 1.0), 0.001, (-0.5, 1.0)),
    ((-1.0, 1.0), 0.3, (-1.0, 600.0)),
]


@pytest.mark.parametrize("case", range(len(LEAKY_CASES)))
def test_leaky_relu_rounds_as_xnnpack_or_the_builtin_kernel(case):
    (lo_in, hi_in), alpha, (lo_out, hi_out) = LEAKY_CASES[case]
    model = _convert(
        lambda x: _fq(tf.nn.leaky_relu(_fq(x, lo_in, hi_in), alpha), lo_out, hi_out), [1, 256]
    )
    xq = np.arange(-128, 128).reshape(1, -1)
    out, (s_in, z_in), (s_out, z_out), ops, _ = _run(model, xq)
    assert "LEAKY_RELU" in ops
    assert ("DELEGATE" in ops) == xnnpack_takes_leaky_relu(s_in, s_out, alpha) == (case < 4)
    x_int = xq - z_in
    expected = np.clip(leaky_relu_model(x_int, s_in, s_out, alpha) + z_out, -128, 127)
    np.testing.assert_array_equal(out, expected)


def test_xnnpack_leaky_relu_is_not_the_exact_rounding():
    # Its 8-bit ratio puts 18 of the 256 levels of the first case one step away from
    # `rint(leaky_relu(x) / s_out)`: QAT has to round as the kernel does.
    (lo_in, hi_in), alpha, (lo_out, hi_out) = LEAKY_CASES[0]
    model = _convert(
        lambda x: _fq(tf.nn.leaky_relu(_fq(x, lo_in, hi_in), alpha), lo_out, hi_out), [1, 256]
    )
    xq = np.arange(-128, 128).reshape(1, -1)
    out, (s_in, z_in), (s_out, z_out), _, _ = _run(model, xq)
    x = (xq - z_in) * np.float64(s_in)
    exact = np.clip(np.rint(np.where(x >= 0, x, alpha * x) / s_out) + z_out, -128, 127)
    off = int((out != exact).sum())
    print(f"XNNPACK LEAKY_RELU off the exact rounding on {off} of 256 levels")
    assert off > 0
    assert np.abs(out - exact).max() == 1


# --- PRELU -----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prelu_is_the_builtin_kernel_with_a_per_tensor_int8_alpha(seed):
    rng = np.random.default_rng(seed)
    channels = 6
    alpha = rng.uniform(-0.5, 1.0, channels).astype(np.float32)
    alpha[0] = 0.0
    lo_in, hi_in = -float(rng.uniform(0.5, 6)), float(rng.uniform(0.5, 6))
    lo_out, hi_out = lo_in * float(rng.uniform(0.2, 1.0)), hi_in * float(rng.uniform(0.5, 1.4))
    negated = tf.constant(-alpha.reshape(1, 1, channels))

    def prelu(x):  # tf_keras PReLU's call
        x = _fq(x, lo_in, hi_in)
        return _fq(tf.nn.relu(x) + negated * tf.nn.relu(-x), lo_out, hi_out)

    shape = [1, 16, 16, channels]
    xq = rng.integers(-128, 128, shape)
    out, (s_in, z_in), (s_out, z_out), ops, it = _run(_convert(prelu, shape), xq)
    assert ops == ["PRELU"]  # int8, and not delegated to XNNPACK
    (alpha_tensor,) = [t for t in it.get_tensor_details() if list(t["shape"]) == [1, 1, channels]]
    s_alpha, z_alpha = alpha_tensor["quantization"]
    assert alpha_tensor["dtype"] == np.int8 and z_alpha == 0
    assert F32(s_alpha) == np.abs(alpha).max() / F32(127)
    alpha_int = it.get_tensor(alpha_tensor["index"]).astype(np.int64).reshape(-1)
    np.testing.assert_array_equal(alpha_int, np.rint(alpha / F32(s_alpha)))
    x_int = xq - z_in
    positive = multiply_by_quantized_multiplier(x_int, float(F32(s_in) / F32(s_out)))
    ratio = float(F32(F32(s_in) * F32(s_alpha)) / F32(s_out))
    negative = multiply_by_quantized_multiplier(x_int * alpha_int, ratio)
    expected = np.clip(np.where(x_int >= 0, positive, negative) + z_out, -128, 127)
    np.testing.assert_array_equal(out, expected)


# --- HARD_SWISH ------------------------------------------------------------------------
def test_hard_swish_is_one_builtin_op_a_step_off_the_exact_rounding():
    rng = np.random.default_rng(0)
    off, worst = 0, 0
    for _ in range(4):
        lo_in, hi_in = -float(rng.uniform(1, 8)), float(rng.uniform(1, 8))
        lo_out, hi_out = -0.375 * float(rng.uniform(0.9, 1.2)), hi_in * float(rng.uniform(0.5, 1.2))

        def hard_swish(x, lo_in=lo_in, hi_in=hi_in, lo_out=lo_out, hi_out=hi_out):
            x = _fq(x, lo_in, hi_in)
            return _fq(x * tf.nn.relu6(x + 3.0) * (1.0 / 6.0), lo_out, hi_out)

        xq = np.arange(-128, 128).reshape(1, -1)
        out, (s_in, z_in), (s_out, z_out), ops, _ = _run(_convert(hard_swish, [1, 256]), xq)
        assert ops == ["HARD_SWISH"]
        x = (xq - z_in) * np.float64(s_in)
        exact = np.clip(np.rint(x * np.clip(x + 3, 0, 6) / 6 / s_out) + z_out, -128, 127)
        off += int((out != exact).sum())
        worst = max(worst, int(np.abs(out - exact).max()))
    print(f"HARD_SWISH off the exact rounding on {off} of 1024 levels (max {worst})")
    assert worst <= 1  # measured: 4 of these 1024 levels, each 1 step


# --- MAXIMUM / MINIMUM with a number -----------------------------------------------------
@pytest.mark.parametrize("op", [tf.maximum, tf.minimum])
@pytest.mark.parametrize("c", [0.5, 0.134, -5.0, 10.0])
def test_maximum_minimum_with_a_number_keep_the_input_grid(op, c):
    lo, hi = -2.0, 3.1
    model = _convert(lambda x: _fq(op(_fq(x, lo, hi), c), lo, hi), [1, 256])
    xq = np.arange(-128, 128).reshape(1, -1)
    out, (s_in, z_in), (s_out, z_out), ops, _ = _run(model, xq)
    assert ops == [op.__name__.upper()] and (s_in, z_in) == (s_out, z_out)
    c_int = np.clip(np.rint(c / s_in) + z_in, -128, 127)  # the constant on the input grid
    expected = np.maximum(xq, c_int) if op is tf.maximum else np.minimum(xq, c_int)
    np.testing.assert_array_equal(out, expected)
