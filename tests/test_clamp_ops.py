"""`tf.maximum(x, c)` / `tf.minimum(x, c)` through QAT and the integer export.

TFLite's int8 MAXIMUM / MINIMUM with a number keep their input's scale and store the
number on that grid (tests/test_int8_activation_kernels.py measures it): nothing is
rounded but the number. The QAT model computes with the number snapped onto its
input's grid, and the export writes it there, so the file is exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import tf_pfq
from tf_pfq import testing
from tf_pfq.compat import keras
from tf_pfq.export.summary import inspect
from tf_pfq.layers import ops
from tf_pfq.layers.table import Lowering, Quant, entry_for

L = keras.layers


def _net():
    # Numbers off every grid, one above the range (min(x, 50.0) is x), one below zero
    # and one above the range on a side branch (max(x, 40.0) is the range's top: the
    # case the negative control below needs, since every consumer reads its input as
    # integers and would round an in-range number onto the grid itself).
    inputs = keras.Input((12, 12, 3), name="image")
    x = L.Conv2D(8, 3, padding="same", name="c0")(inputs)
    x = L.BatchNormalization(name="bn0")(x)
    x = L.ReLU(name="act0")(x)
    side = L.Conv2D(12, 3, padding="same", strides=2, name="side")(tf.maximum(x, 40.0))
    x = tf.maximum(x, 0.337)
    x = tf.minimum(x, 50.0)
    x = L.Conv2D(12, 3, padding="same", strides=2, name="c1")(x)
    x = L.BatchNormalization(name="bn1")(x)
    x = tf.minimum(x, 0.61)
    x = tf.maximum(x, -0.45)
    x = L.Add(name="add")([x, side])
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, L.Dense(10, name="logits")(x))


def test_max_and_min_with_a_number_resolve_to_the_clamp_entry():
    inputs = keras.Input((4, 4, 2))
    other = keras.Input((4, 4, 2))
    model = keras.Model(
        [inputs, other],
        [tf.maximum(inputs, 0.5), tf.math.minimum(inputs, -1), tf.maximum(inputs, other)],
    )
    replaced = ops.replace_op_layers(model)
    layers = [replaced.get_layer(t.node.layer.name) for t in replaced.outputs]
    assert [(type(x).__name__, getattr(x, "kind", None)) for x in layers] == [
        ("ElementwiseOp", "maximum"),
        ("ElementwiseOp", "minimum"),
        ("TFOpLambda", None),  # two tensors: no shared grid is arranged, refused
    ]
    for layer in layers[:2]:
        entry = entry_for(layer)
        assert (entry.quant, entry.lowering) == (Quant.CLAMP, Lowering.CLAMP)
        assert entry.preserves_grid(layer)
    assert entry_for(layers[2]).quant is Quant.REFUSED
    data = [np.random.default_rng(0).normal(size=(2, 4, 4, 2)).astype(np.float32)] * 2
    for a, b in zip(model(data), replaced(data), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("kind", ["maximum", "minimum"])
def test_clamp_kinds_need_a_number(kind):
    with pytest.raises(ValueError, match=f"kind='{kind}' needs a number"):
        ops.ElementwiseOp(kind)


def test_qat_computes_with_the_number_on_its_input_grid():
    inputs = keras.Input((6, 6, 2))
    x = L.Conv2D(4, 1, name="conv")(inputs)
    x = L.ReLU(name="relu")(x)
    model = keras.Model(inputs, L.Conv2D(2, 1, name="head")(tf.maximum(x, 0.337)))
    qat = tf_pfq.apply(model, activation_bits=3)
    images = np.random.default_rng(1).uniform(-1, 1, (16, 6, 6, 2)).astype(np.float32)
    qat(images, training=True)  # sets the ranges
    name = next(layer.name for layer in qat.layers if "maximum" in layer.name)
    probe = keras.Model(qat.input, [qat.get_layer("quant_relu").output, qat.get_layer(name).output])
    relu, clamped = (t.numpy() for t in probe(images, training=False))
    quantizer = qat.get_layer("quant_relu").quantize_config.output_quantizer
    step = float(tf_pfq.quant_math.activation_step(quantizer))
    number = round(0.337 / step) * step
    assert abs(number - 0.337) > 1e-3  # the number is off the grid
    np.testing.assert_allclose(clamped, np.maximum(relu, number), atol=1e-6)
    np.testing.assert_allclose(clamped / step, np.rint(clamped / step), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_clamp_net_exports_within_half_a_step(bits):
    keras.utils.set_random_seed(bits)
    model, _ = testing.with_dead_channels(_net(), num_layers=2, seed=bits)
    images = np.random.default_rng(bits).uniform(0, 1, (96, 12, 12, 3)).astype(np.float32)
    result = testing.run_chain(model, images, bits=bits, num_test=32)
    assert result.error is None, result.error
    assert result.max_steps <= 0.5 + 1e-3, result  # rounding, plus float32 round-off
    ops_in_file = {op.op for op in inspect(result.tflite).ops}
    assert {"MAXIMUM", "MINIMUM"} <= ops_in_file, ops_in_file


@pytest.mark.slow
def test_without_snapping_the_number_the_file_parts(monkeypatch):
    # Negative control: QAT with the number as written (40.0, not the range's top
    # the file stores) is off the file by more than half a step, so the test above
    # can fail.
    monkeypatch.setattr(
        tf_pfq.wrapper.PfqQuantizeWrapper,
        "_clamp",
        lambda self, inputs, training, **kw: self.layer.apply_op(inputs),
    )
    keras.utils.set_random_seed(4)
    model, _ = testing.with_dead_channels(_net(), num_layers=2, seed=4)
    images = np.random.default_rng(4).uniform(0, 1, (96, 12, 12, 3)).astype(np.float32)
    result = testing.run_chain(model, images, bits=4, num_test=32)
    assert result.error is None and result.max_steps > 0.5, result
