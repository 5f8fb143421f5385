"""PReLU through QAT and the integer export: one int8 PRELU, alpha on its int8 grid.

The converter writes Keras' PReLU as one int8 PRELU with alpha stored int8 per
tensor (scale max|alpha| / 127) and runs it on the builtin kernel, whose fixed-point
rounding is not the exact one (tests/test_int8_activation_kernels.py). QAT keeps
alpha on that grid and rounds as that kernel does (`tf_pfq.int8_kernels`).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from test_int8_activation_kernels import _convert, _fq, _run

from tf_pfq import int8_kernels, testing
from tf_pfq.compat import keras
from tf_pfq.export.summary import inspect

L = keras.layers


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tf_kernel_model_matches_the_interpreter(seed):
    rng = np.random.default_rng(seed)
    channels = 6
    alpha = rng.uniform(-0.5, 1.0, channels).astype(np.float32)
    alpha[0] = 0.0
    lo_in, hi_in = -float(rng.uniform(0.5, 6)), float(rng.uniform(0.5, 6))
    lo_out, hi_out = lo_in * float(rng.uniform(0.2, 1.0)), hi_in * float(rng.uniform(0.5, 1.4))
    on_grid = np.asarray(int8_kernels.prelu_alpha_on_grid(alpha)).reshape(1, 1, channels)

    def prelu(x):
        x = _fq(x, lo_in, hi_in)
        return _fq(tf.nn.relu(x) + tf.constant(-on_grid) * tf.nn.relu(-x), lo_out, hi_out)

    shape = [1, 16, 16, channels]
    xq = rng.integers(-128, 128, shape)
    out, (s_in, z_in), (s_out, z_out), ops, _ = _run(_convert(prelu, shape), xq)
    assert ops == ["PRELU"]
    x = ((xq - z_in) * np.float32(s_in)).astype(np.float32)
    got = int8_kernels.int8_prelu(x, on_grid, s_in, s_out).numpy() / np.float32(s_out)
    np.testing.assert_array_equal(np.clip(np.rint(got) + z_out, -128, 127), out)


def _net():
    inputs = keras.Input((12, 12, 3), name="image")
    x = inputs
    for i, filters in enumerate((8, 12)):
        x = L.Conv2D(filters, 3, padding="same", strides=2 if i else 1, name=f"c{i}")(x)
        x = L.BatchNormalization(name=f"bn{i}")(x)
        x = L.PReLU(shared_axes=[1, 2], name=f"act{i}")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inputs, L.Dense(10, name="logits")(x))
    rng = np.random.default_rng(0)
    for i in range(2):  # Keras starts alpha at 0: give it slopes of both signs
        layer = model.get_layer(f"act{i}")
        layer.set_weights([rng.uniform(-0.3, 0.6, layer.alpha.shape).astype(np.float32)])
    return model


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_prelu_net_exports_within_half_a_step(bits):
    keras.utils.set_random_seed(bits)
    model, _ = testing.with_dead_channels(_net(), num_layers=2, seed=bits)
    images = np.random.default_rng(bits).uniform(0, 1, (96, 12, 12, 3)).astype(np.float32)
    result = testing.run_chain(model, images, bits=bits, num_test=32)
    assert result.error is None, result.error
    assert result.p99_steps <= 0.5 and result.max_steps <= 0.5, result
    assert "PRELU" in {op.op for op in inspect(result.tflite).ops}


@pytest.mark.slow
def test_without_the_kernel_rounding_the_file_parts(monkeypatch):
    # Negative control: QAT with the exact product instead of the kernel's two
    # fixed-point roundings is 9 output steps off at A4/W4 (measured: 9.04 p99).
    from tf_pfq import wrapper

    def exact(x, alpha, step_in, step_out):
        on_grid = wrapper.prelu_alpha_on_grid(alpha)
        return tf.nn.relu(x) - on_grid * tf.nn.relu(-x)

    monkeypatch.setattr(wrapper, "int8_prelu", exact)
    keras.utils.set_random_seed(4)
    model, _ = testing.with_dead_channels(_net(), num_layers=2, seed=4)
    images = np.random.default_rng(4).uniform(0, 1, (96, 12, 12, 3)).astype(np.float32)
    result = testing.run_chain(model, images, bits=4, num_test=32)
    assert result.error is None and result.max_steps > 1.0, result
