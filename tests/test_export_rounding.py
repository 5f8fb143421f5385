"""The QAT model's inference rounds as XNNPACK's int8 kernels do, value for value.

Each test runs one int8 op on LiteRT's XNNPACK path over every input level of its
grids, with scales chosen so that many results sit exactly on a rounding tie (where
TF's fake-quant, which rounds half up, and XNNPACK, which rounds half to even, part),
and compares it with the function `tf_pfq.wrapper` computes for it at inference.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tf_pfq.export import litert
from tf_pfq.export.convert import Export
from tf_pfq.wrapper import int8_mul, requantize, requantize_edge


def _fq(x, step, zero_point):
    lo = np.float32((-128 - zero_point) * step)
    hi = np.float32((127 - zero_point) * step)
    return tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, num_bits=8)


def _run(function, specs, inputs):
    """Converts `function` to an int8 file with float I/O and runs it on XNNPACK."""
    concrete = function.get_concrete_function(*specs)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], function)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    interpreter = litert.make_interpreter(converter.convert())
    for detail, value in zip(interpreter.get_input_details(), inputs):
        interpreter.set_tensor(detail["index"], value.astype(np.float32))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


@pytest.mark.parametrize("steps", [(0.5, 1 / 256, 1 / 64), (0.3, 1 / 256, 0.0071), (1.0, 1.0, 2.0)])
def test_multiply_rounds_as_xnnpack_mul(steps):
    step_a, step_b, step_out = (np.float32(s) for s in steps)
    a_int, b_int = np.meshgrid(np.arange(-20, 21), np.arange(0, 256), indexing="ij")
    a = (a_int * step_a).astype(np.float32).reshape(1, -1)
    b = (b_int * step_b).astype(np.float32).reshape(1, -1)
    spec = tf.TensorSpec(a.shape, tf.float32)

    @tf.function
    def mul(x, y):
        product = _fq(x, step_a, 0) * _fq(y, step_b, -128)
        return _fq(product, step_out, 0)

    file = _run(mul, [spec, spec], [a, b])
    qat = np.clip(int8_mul(a, b, step_a, step_b, step_out).numpy(), -128 * step_out, 127 * step_out)
    np.testing.assert_array_equal(file, qat)
    ties = np.abs((a_int * b_int * step_a * step_b / step_out) % 1 - 0.5) < 1e-6
    if ties.any():  # negative control: fake-quant of the float product rounds ties up
        fake = _fq(tf.constant(a * b), step_out, 0).numpy()
        assert not np.array_equal(file, fake)


@pytest.mark.parametrize(
    ("step_in", "step_w", "step_out"), [(0.5, 0.25, 0.25), (0.21, 0.013, 0.0517)]
)
def test_a_conv_rounds_as_xnnpack(step_in, step_w, step_out):
    step_in, step_w, step_out = np.float32(step_in), np.float32(step_w), np.float32(step_out)
    weights = np.array([[1, -3, 5, 7]], np.float32)  # integers on the weight grid
    x_int = np.arange(-9, 10).reshape(-1, 1, 1, 1)
    x = (x_int * step_in).astype(np.float32)
    spec = tf.TensorSpec(x.shape, tf.float32)
    kernel = tf.quantization.fake_quant_with_min_max_vars(
        tf.constant((weights * step_w).reshape(1, 1, 1, 4)),
        -127 * step_w,
        127 * step_w,
        narrow_range=True,
    )

    @tf.function
    def conv(v):
        y = tf.nn.conv2d(_fq(v, step_in, 0), kernel, 1, "VALID")
        return _fq(y, step_out, 0)

    file = _run(conv, [spec], [x])
    acc = (x_int * weights.reshape(1, 1, 1, 4)).astype(np.float32)
    qat = np.clip(
        requantize(acc, step_in * step_w, step_out).numpy(), -128 * step_out, 127 * step_out
    )
    np.testing.assert_array_equal(file, qat)
    if step_out == np.float32(0.25):  # negative control: ties, which fake-quant rounds up
        fake = _fq(tf.constant(acc * step_in * step_w), step_out, 0).numpy()
        assert not np.array_equal(file, fake)


def test_a_requantizing_edge_rounds_as_the_exported_conv():
    step_in, step_out = np.float32(0.5), np.float32(0.25 * (1 + 2**-12))
    x = (np.arange(-128, 128, dtype=np.float32) * step_in).reshape(1, 1, -1, 1)
    spec = tf.TensorSpec(x.shape, tf.float32)

    @tf.function
    def edge(v):
        return _fq(Export().requantize(_fq(v, step_in, 0)), step_out, 0)

    file = _run(edge, [spec], [x])
    qat = np.clip(requantize_edge(x, step_in, step_out).numpy(), -128 * step_out, 127 * step_out)
    np.testing.assert_array_equal(file, qat)


def test_a_nearly_zero_filter_with_a_bias_cannot_wrap_the_accumulator():
    # Per-channel weights give a nearly-zero filter a tiny s_w, so its bias is beyond
    # int32 in units of s_in * s_w and saturates; the saturated bias plus the window's
    # products then wrapped the file's int32 sum (export fuzz seed 129: the channel
    # read -0.85 where QAT had 0.85, 20 steps at the logits). The bias keeps the
    # worst sum as headroom (`bias_range`), in QAT and in the file alike.
    import tf_pfq
    from tf_pfq.compat import keras
    from tf_pfq.quant_math import bias_range
    from tf_pfq.testing import measure_export

    layers = keras.layers
    inputs = keras.Input((8, 8, 2), name="image")
    conv = layers.Conv2D(2, 3, padding="same", name="conv")
    x = layers.GlobalAveragePooling2D(name="pool")(conv(inputs))
    model = keras.Model(inputs, layers.Dense(3, name="logits")(x))
    rng = np.random.default_rng(0)
    kernel = rng.normal(0, 0.3, (3, 3, 2, 2)).astype(np.float32)
    # A nearly dead filter whose bias lands just beyond int32 in units of s_in * s_w.
    kernel[..., 1] = rng.normal(0, 3e-6, (3, 3, 2))
    conv.set_weights([kernel, np.array([0.1, 0.9], np.float32)])
    qat = tf_pfq.apply(model, activation_bits=6, weight_bits=7, per_channel_weights=True)
    config = qat.get_layer("quant_conv").quantize_config
    assert config.bias_quantizer.taps == 3 * 3 * 2
    images = rng.uniform(0, 1, (40, 8, 8, 2)).astype(np.float32)
    qat(images[:32], training=True)
    tflite = tf_pfq.export.to_tflite(qat, representative_data=images[:32])
    measured = measure_export(qat, tflite, images[32:])
    lo, hi = bias_range(18)
    assert hi == -lo and hi + 18 * 255 * 127 < 2**31
    assert measured["max_steps"] <= 0.5, measured
