"""Op layers from functional code (`x + 3.0`, `tf.nn.relu6(x)`, `x * y`) through QAT and
the integer export: each modelled op is quantized like the Keras layer doing the same
and lowered to the int8 op that rounds once onto the same grid, so the file
reproduces the Keras QAT model on XNNPACK (99th percentile of |logit difference| <= 2
int8 output steps, maximum <= 4, as for the Keras layers in test_export_layers.py).
Ops tf_pfq does not model are refused naming the op and the layer.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from test_prune_helpers import randomize_bn

import tf_pfq
from tf_pfq.compat import keras
from tf_pfq.export import litert
from tf_pfq.export.summary import inspect
from tf_pfq.layers import ops, table
from tf_pfq.layers.table import Lowering, Quant

L = keras.layers
SHAPE = (10, 10, 3)


def _conv_bn(x, filters, name, kernel=3):
    x = L.Conv2D(filters, kernel, padding="same", name=name)(x)
    return L.BatchNormalization(name=f"{name}_bn")(x)


def _hard_sigmoid(x):
    return L.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)  # tf_keras MobileNetV3's


def op_net():
    """Every modelled op: scalar +, -, *, /, tf.nn.relu6, x * y, hard-swish, x + y."""
    inputs = keras.Input(SHAPE, name="image")
    x = _conv_bn(inputs, 8, "stem")
    x = L.Multiply(name="hswish")([x, _hard_sigmoid(x)])  # MobileNetV3's hard-swish
    y = _conv_bn(x, 8, "gate_conv", kernel=1)
    gate = tf.nn.relu6(y + 3.0) / 6.0  # the same hard-sigmoid written with TF ops
    x = x * gate  # two tensors
    z = _conv_bn(x, 8, "branch")
    z = tf.nn.relu(z - 0.5)
    x = x + z * 0.75  # a scaled branch added to the trunk (two tensors)
    x = _conv_bn(x, 8, "tail")
    x = x * tf.nn.relu6(x + 3.0) * (1.0 / 6.0)  # hard-swish with two op products
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, L.Dense(10, name="logits")(x), name="op_net")


def _fidelity(seed):
    keras.utils.set_random_seed(seed)
    model = op_net()
    randomize_bn(model, seed=seed)
    rng = np.random.default_rng(seed)
    data = rng.uniform(0, 1, (64, *SHAPE)).astype(np.float32)
    qat_a = tf_pfq.apply(model, activation_bits=4)  # stage A takes op layers too
    qat_a(data[:48], training=True)
    folded, _ = tf_pfq.fold_batchnorm(tf_pfq.strip(qat_a))
    qat = tf_pfq.apply(folded, activation_bits=4, weight_bits=4)
    qat(data[:48], training=True)
    keras_out = qat.predict(data[48:], verbose=0)
    tflite = tf_pfq.export.to_tflite(qat, representative_data=data[:48])
    out = litert.predict(litert.make_interpreter(tflite), data[48:])
    step = inspect(tflite).outputs[0].scales[0]
    err = np.abs(out - keras_out).reshape(-1) / step
    return qat, tflite, float(np.percentile(err, 99)), float(err.max())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_op_net_exports_with_the_qat_grids(seed):
    qat, tflite, p99, worst = _fidelity(seed)
    print(f"op_net seed {seed}: p99 {p99:.2f} steps, max {worst:.2f} steps")
    assert p99 <= 2.0, p99
    assert worst <= 4.0, worst
    summary = inspect(tflite)
    assert {t.dtype for t in summary.tensors} <= {"int8", "int32"}
    assert max(tf_pfq.export.weight_levels(tflite).values()) <= 16
    counts = summary.op_counts()
    assert "DIV" not in counts and counts.get("MUL", 0) >= 5, counts
    # Every op output QAT quantized is an n-bit (or add_bits) tensor of its own grid.
    quantized = {
        layer.layer.name
        for layer in qat.layers
        if getattr(getattr(layer, "quantize_config", None), "output_quantizer", None)
    }
    assert any(name.startswith("tf.math.multiply") for name in quantized), quantized
    assert any(name.startswith("tf.math.truediv") for name in quantized), quantized


def test_hard_sigmoid_add_is_fused_into_its_relu6():
    # `ReLU(6.)(x + 3.)`: the add gets no quantizer (ADD with a fused RELU6 rounds once
    # onto the ReLU's grid); the scaling by 1/6 and the product get their own grids.
    inputs = keras.Input(SHAPE, name="image")
    x = L.Conv2D(4, 1, name="conv")(inputs)
    hs = _hard_sigmoid(x)
    model = keras.Model(inputs, L.Conv2D(2, 1, name="out")(L.Multiply(name="mul")([x, hs])))
    selected = tf_pfq.quantize.quantized_tensors(model, activation_bits=4)
    names = {layer.name: type(layer).__name__ for layer in model.layers}
    add = next(n for n in names if n.startswith("tf.__operators__.add"))
    scale = next(n for n in names if n.startswith("tf.math.multiply"))
    relu = next(n for n, cls in names.items() if cls == "ReLU")
    assert add not in selected
    assert selected[relu] == selected[scale] == selected["mul"] == selected["conv"] == 4


def test_modelled_ops_resolve_to_their_entries():
    inputs = keras.Input(SHAPE)
    other = keras.Input(SHAPE)
    outputs = [
        inputs + 3.0,
        inputs - 1.0,
        inputs * 0.5,
        inputs / 6.0,
        inputs * other,
        inputs - other,
        tf.nn.relu6(inputs),
        tf.nn.relu(inputs),
        inputs / other,  # no int8 DIV
        tf.math.cumsum(inputs, axis=1),
        tf.math.maximum(inputs, other),  # with a number it is modelled: test_clamp_ops.py
    ]
    model = ops.replace_op_layers(keras.Model([inputs, other], outputs))
    by_output = [model.get_layer(t.node.layer.name) for t in model.outputs]
    expected = [
        (Quant.ADD, Lowering.OP),
        (Quant.ADD, Lowering.OP),
        (Quant.OUTPUT, Lowering.OP),
        (Quant.OUTPUT, Lowering.OP),
        (Quant.OUTPUT, Lowering.OP),
        (Quant.ADD, Lowering.OP),
        (Quant.OUTPUT, Lowering.ACTIVATION),
        (Quant.OUTPUT, Lowering.ACTIVATION),
    ] + [(Quant.REFUSED, Lowering.REFUSED)] * 3
    for layer, (quant, lowering) in zip(by_output, expected, strict=True):
        entry = table.entry_for(layer)
        assert (entry.quant, entry.lowering) == (quant, lowering), layer.name
        modelled = lowering is not Lowering.REFUSED
        assert isinstance(layer, ops.ElementwiseOp) == modelled, layer.name
        assert (entry in table.op_entries()) == modelled
    assert (by_output[3].kind, by_output[3].scalar) == ("divide", 6.0)
    assert table.activation_name(by_output[6]) == "relu6"
    # The same function, operands in the same order (`x - y`, not `y - x`).
    rng = np.random.default_rng(0)
    data = [rng.normal(size=(2, *SHAPE)).astype(np.float32) for _ in range(2)]
    want = keras.Model([inputs, other], outputs)(data)
    got = model(data)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)
    # Pruning reads an ElementwiseOp of one tensor as a function of each channel, and
    # `x * y`, `x + y` as Multiply and Add (`x - y` keeps the channels reaching it).
    channels = [table.entry_for(layer).channels for layer in by_output[:8]]
    assert channels == [table.Channels.PASS_THROUGH] * 4 + [
        table.Channels.MERGE,
        table.Channels.PASS_THROUGH,  # x - y
        table.Channels.PASS_THROUGH,
        table.Channels.PASS_THROUGH,
    ]
    assert table.entry_for(model.get_layer(outputs[4].node.layer.name)).absorb is (
        table.Absorb.PRODUCT
    )
    f = table.entry_for(by_output[0]).elementwise(by_output[0], {})
    assert float(f(tf.constant(1.0))) == 4.0
    assert table.entry_for(by_output[5]).elementwise(by_output[5], {}) is None
    for entry in table.op_entries():
        # Only max / min with a number keep their input's grid (no rounding).
        assert entry.preserves_grid(None) == (entry.quant is Quant.CLAMP)
        assert entry.lowering is not Lowering.REFUSED


def test_prune_removes_a_dead_channel_through_op_products_and_sums():
    # After `replace_op_layers` (a stripped QAT model, before a second PfQ) the
    # hard-swish `x * relu6(x + 3) / 6` and a residual `x + y` carry the constant.
    inputs = keras.Input(SHAPE, name="image")
    x = L.Conv2D(4, 3, use_bias=False, padding="same", name="conv")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = x * (tf.nn.relu6(x + 3.0) / 6.0)
    y = L.BatchNormalization(name="bn2")(L.DepthwiseConv2D(1, name="dw")(x))
    x = x + y
    x = L.GlobalAveragePooling2D(name="pool")(x)
    model = ops.replace_op_layers(keras.Model(inputs, L.Dense(2, name="logits")(x)))
    assert sum(isinstance(layer, ops.ElementwiseOp) for layer in model.layers) == 5
    # Channel 1 dead as weight decay leaves it: a zero filter, the BN output constant.
    conv = model.get_layer("conv")
    conv.set_weights([conv.get_weights()[0] * np.array([1.0, 0.0, 1.0, 1.0], np.float32)])
    model.get_layer("bn").moving_variance.assign([1.0, 1e-9, 1.0, 1.0])
    model.get_layer("bn").beta.assign([0.0, 0.7, 0.0, 0.0])
    data = np.random.default_rng(0).uniform(0, 1, (8, *SHAPE)).astype(np.float32)
    pruned, report = tf_pfq.prune(model, calibration_data=data)
    assert pruned.get_layer("conv").filters == 3, [r.kept for r in report.layers]
    assert report.exact
    np.testing.assert_allclose(pruned(data), model(data), atol=1e-5)


def _cumsum_model():
    inputs = keras.Input(SHAPE, name="image")
    x = L.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = tf.math.cumsum(x, axis=1)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, L.Dense(2, name="logits")(x))


def test_unmodelled_op_is_refused_by_apply_and_export_and_kept_by_prune():
    model = _cumsum_model()
    op = next(layer.name for layer in model.layers if type(layer).__name__ == "TFOpLambda")
    with pytest.raises(ValueError, match=rf"{op}.*TFOpLambda.*'math.cumsum'.*apply cannot"):
        tf_pfq.apply(model, activation_bits=4)
    # The export refuses it too (a plan built by hand: apply never makes one with it).
    inputs = keras.Input(SHAPE, name="image")
    plan = tf_pfq.export.convert.ExportPlan(
        model=keras.Model(inputs, tf.math.cumsum(inputs, axis=1)), layers={}
    )
    op = plan.model.layers[-1].name
    with pytest.raises(ValueError, match=rf"{op}.*TFOpLambda.*'math.cumsum'.*export cannot"):
        tf_pfq.export.convert.simulate(plan, np.zeros((1, *SHAPE), np.float32))
    # Pruning keeps the dead channel whose constant reaches it, and says why.
    model.get_layer("bn").moving_variance.assign([1.0, 0.0, 1.0, 1.0])
    pruned, report = tf_pfq.prune(model)
    row = next(r for r in report.layers if r.name == "bn")
    assert row.removed == [] and pruned.get_layer("conv").filters == 4
    assert "cumsum" in row.kept[1], row.kept


def test_a_qat_model_with_op_layers_saves_and_loads(tmp_path):
    keras.utils.set_random_seed(0)
    model = op_net()
    folded, _ = tf_pfq.fold_batchnorm(model)
    qat = tf_pfq.apply(folded, activation_bits=4, weight_bits=4)
    x = np.random.default_rng(0).uniform(0, 1, (8, *SHAPE)).astype(np.float32)
    qat(x, training=True)
    assert any(
        type(layer.layer).__name__ == "ElementwiseOp"
        for layer in qat.layers
        if hasattr(layer, "layer")
    )
    loaded = tf_pfq.load(tf_pfq.save(qat, str(tmp_path / "qat.h5")))
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), qat.predict(x, verbose=0))
