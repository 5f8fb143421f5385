"""LeakyReLU through QAT and the integer export: one table entry, one lowering, one rounding.

The file computes LeakyReLU as one int8 LEAKY_RELU whose rounding is not the exact
one (tests/test_int8_activation_kernels.py measures it). `tf_pfq.int8_kernels`
models it in TF; the QAT wrapper uses it at inference, so the exported file matches
the Keras QAT model within half an output step.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from test_int8_activation_kernels import LEAKY_CASES, _convert, _fq, _run, leaky_relu_model

from tf_pfq import int8_kernels, testing
from tf_pfq.compat import keras
from tf_pfq.export.summary import inspect
from tf_pfq.layers.table import Lowering, entry_for

L = keras.layers


@pytest.mark.parametrize("case", range(len(LEAKY_CASES)))
def test_tf_kernel_model_matches_the_interpreter_on_every_level(case):
    (lo_in, hi_in), alpha, (lo_out, hi_out) = LEAKY_CASES[case]
    model = _convert(
        lambda x: _fq(tf.nn.leaky_relu(_fq(x, lo_in, hi_in), alpha), lo_out, hi_out), [1, 256]
    )
    xq = np.arange(-128, 128).reshape(1, -1)
    out, (s_in, z_in), (s_out, z_out), _, _ = _run(model, xq)
    x = ((xq - z_in) * np.float32(s_in)).astype(np.float32)
    got = int8_kernels.int8_leaky_relu(x, alpha, s_in, s_out).numpy() / np.float32(s_out)
    got = np.clip(np.rint(got) + z_out, -128, 127)
    np.testing.assert_array_equal(got, out)
    # The numpy model of the same kernel agrees too (two independent writings).
    np.testing.assert_array_equal(
        got, np.clip(leaky_relu_model(xq - z_in, s_in, s_out, alpha) + z_out, -128, 127)
    )


def _net(alpha=0.2):
    inputs = keras.Input((12, 12, 3), name="image")
    x = inputs
    for i, filters in enumerate((8, 12, 12)):
        x = L.Conv2D(filters, 3, padding="same", strides=2 if i else 1, name=f"c{i}")(x)
        x = L.BatchNormalization(name=f"bn{i}")(x)
        x = L.LeakyReLU(alpha, name=f"act{i}")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, L.Dense(10, name="logits")(x))


def test_table_says_leaky_relu_is_its_own_op():
    entry = entry_for(L.LeakyReLU())
    assert entry.lowering is Lowering.LEAKY_RELU and not entry.fuses(L.LeakyReLU())


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_leaky_relu_net_exports_within_half_a_step(bits):
    keras.utils.set_random_seed(bits)
    model, _ = testing.with_dead_channels(_net(), num_layers=2, seed=bits)
    images = np.random.default_rng(bits).uniform(0, 1, (96, 12, 12, 3)).astype(np.float32)
    result = testing.run_chain(model, images, bits=bits, num_test=32)
    assert result.error is None, result.error
    assert result.p99_steps <= 0.5 and result.max_steps <= 0.5, result
    assert result.saturated == 0.0
    assert "LEAKY_RELU" in {op.op for op in inspect(result.tflite).ops}


@pytest.mark.slow
def test_without_the_kernel_rounding_the_8_bit_file_parts(monkeypatch):
    # Negative control: QAT with the exact rounding is more than half a step off the
    # file at 8 bits (1.27 p99 / 1.46 max when measured), so the test above can fail.
    from tf_pfq import wrapper

    monkeypatch.setattr(
        wrapper, "int8_leaky_relu", lambda x, a, s_in, s_out: tf.nn.leaky_relu(x, a)
    )
    keras.utils.set_random_seed(8)
    model, _ = testing.with_dead_channels(_net(), num_layers=2, seed=8)
    images = np.random.default_rng(8).uniform(0, 1, (96, 12, 12, 3)).astype(np.float32)
    result = testing.run_chain(model, images, bits=8, num_test=32)
    assert result.error is None and result.max_steps > 0.5, result
