"""tf_pfq.export.to_tflite: full-integer ops, static shapes, the n-bit grid, errors.

Small untrained (random-weight) models are enough here: what is tested is the
structure of the file and that it reproduces the plan's n-bit arithmetic; the
accuracy-level fidelity on trained digits models is in test_export_fidelity.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import tf_pfq
from tf_pfq import models
from tf_pfq.compat import keras
from tf_pfq.export import convert, litert
from tf_pfq.export.summary import activation_levels, inspect

L = keras.layers
SHAPE = (12, 12, 3)


def _qat(bits=4, per_channel=False, add_bits=None, seed=0):
    keras.utils.set_random_seed(seed)
    model = models.mobilenet_v2(input_shape=SHAPE, stem=8, blocks=((8, 1, 1), (8, 1, 2)), last=16)
    # Non-trivial BN statistics so folding produces varied weights and biases.
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, gamma.shape),
                    rng.normal(0, 0.2, beta.shape),
                    rng.normal(0, 0.1, mean.shape),
                    rng.uniform(0.5, 1.5, var.shape),
                ]
            )
    folded, _ = tf_pfq.fold_batchnorm(model)
    qat = tf_pfq.apply(
        folded,
        activation_bits=bits,
        weight_bits=bits,
        per_channel_weights=per_channel,
        add_bits=add_bits,
    )
    data = rng.uniform(0, 1, (48, *SHAPE)).astype(np.float32)
    # One training-mode pass sets every moving-average activation range.
    qat(data, training=True)
    return qat, data


@pytest.fixture(scope="module")
def exported4():
    qat, data = _qat(4, per_channel=True)
    return qat, data, tf_pfq.export.to_tflite(qat, representative_data=data)


def _n_bit_scales(qat) -> set[float]:
    params = tf_pfq.quantization_params(qat)
    return {
        float(p.output.scale)
        for p in params.values()
        if p.output is not None and p.output.num_bits < 8
    }


def test_all_ops_integer_and_static(exported4):
    _, _, tflite = exported4
    summary = inspect(tflite)
    for t in summary.tensors:
        assert t.dtype in ("int8", "int32"), (t.name, t.dtype)
        if t.dtype == "int32":
            assert t.is_constant, t.name  # biases and shape operands only
        assert not t.is_dynamic, t.name
    assert summary.inputs[0].shape == (1, *SHAPE)
    assert "QUANTIZE" not in summary.op_counts() and "DEQUANTIZE" not in summary.op_counts()
    for op in summary.ops:
        if op.op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            assert op.inputs[1].dtype == "int8" and op.inputs[1].zero_points[0] == 0


def test_weight_grid_survives(exported4):
    qat, _, tflite = exported4
    levels = inspect(tflite).weight_levels()
    weighted = {n for n, p in tf_pfq.quantization_params(qat).items() if p.kernel is not None}
    pools = {
        layer.name.removeprefix("quant_")
        for layer in qat.layers
        if isinstance(getattr(layer, "layer", layer), keras.layers.GlobalAveragePooling2D)
    }
    constant = {
        t.name: t for t in inspect(tflite).tensors if t.name in levels and len(t.shape) >= 2
    }
    kernels = {n: t for n, t in constant.items() if n.split("/")[0] in weighted}
    assert {n.split("/")[0] for n in kernels} == weighted
    # The rest are the global mean's constant weights (a depthwise conv of 1/count).
    for name in set(constant) - set(kernels):
        assert name.split("/")[0] in pools and levels[name] == 1, name
    for name in kernels:
        assert levels[name] <= 2**4, (name, levels[name])
    # The grid is used, not collapsed onto fewer bits.
    assert max(levels[name] for name in kernels) > 2**3


def test_weight_levels_negative_control():
    # Plain post-training int8 quantization of the same float weights spreads them
    # over many more than 16 levels: the level count can tell the grids apart.
    qat, data = _qat(4)
    float_model = tf_pfq.strip(qat)
    converter = tf.lite.TFLiteConverter.from_keras_model(float_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([x[None]] for x in data[:8])
    levels = inspect(converter.convert()).weight_levels()
    assert max(levels.values()) > 2**4


def test_activation_grid_survives(exported4):
    qat, data, tflite = exported4
    scales = _n_bit_scales(qat)
    summary = inspect(tflite)
    # The pre-clamp output of a signed tensor feeds the MAXIMUM that clamps it.
    pre_clamp = {op.inputs[0].name for op in summary.ops if op.op == "MAXIMUM"}
    levels = activation_levels(tflite, data)
    checked = 0
    for t in summary.tensors:
        if t.is_constant or t.name in pre_clamp or not t.scales:
            continue
        if any(np.isclose(t.scales[0], s, rtol=1e-5) for s in scales):
            assert levels[t.name] <= 2**4, (t.name, levels[t.name])
            checked += 1
    # conv1, expand, dw, project (x2 blocks) and last outputs, and the pooled mean.
    assert checked >= len(scales) - 1
    # Negative control: the 8-bit input tensor does use more than 16 levels.
    assert levels[summary.inputs[0].name] > 2**4


def test_matches_plan_arithmetic(exported4):
    # The n-bit forward pass in float (== the Keras QAT model) vs XNNPACK.
    qat, data, tflite = exported4
    keras_out = qat.predict(data, verbose=0)
    plan = convert.plan_from_qat(qat)
    np.testing.assert_allclose(convert.simulate(plan, data), keras_out, rtol=1e-5, atol=1e-5)
    out = litert.predict(litert.make_interpreter(tflite), data)
    output_scale = inspect(tflite).outputs[0].scales[0]
    err = np.abs(out - keras_out)
    # Float Add outputs are rounded to int8 in the file; that noise occasionally flips
    # an n-bit rounding downstream, which moves a few logits by several output steps.
    # Measured for this model and seed: median 0.25 output steps, maximum 2.8 % of the
    # logit range; the bounds leave about a factor 2 for other CPUs' kernels. (A
    # different seed at 3 bits reached median 2.9 steps, so this is not a general bound.)
    assert np.median(err) <= 0.5 * output_scale
    assert err.max() <= 0.05 * (keras_out.max() - keras_out.min())


def test_add_bits_8_is_nearly_exact():
    # With Add outputs quantized (add_bits=8) every tensor has a QAT grid: only the
    # output rounding (half a step) and Add's fixed-point rescaling remain.
    qat, data = _qat(4, add_bits=8, seed=1)
    tflite = tf_pfq.export.to_tflite(qat, representative_data=data)
    keras_out = qat.predict(data, verbose=0)
    out = litert.predict(litert.make_interpreter(tflite), data)
    step = inspect(tflite).outputs[0].scales[0]
    assert np.median(np.abs(out - keras_out)) <= 0.5 * step + 1e-6
    np.testing.assert_array_equal(out.argmax(1), keras_out.argmax(1))


@pytest.mark.parametrize("io_dtype", ["int8", "uint8", "float32"])
def test_io_dtypes(io_dtype):
    qat, data = _qat(3, seed=2)
    tflite = tf_pfq.export.to_tflite(qat, representative_data=data, io_dtype=io_dtype)
    summary = inspect(tflite)
    assert summary.inputs[0].dtype == io_dtype and summary.outputs[0].dtype == io_dtype
    counts = summary.op_counts()
    if io_dtype == "float32":
        assert counts["QUANTIZE"] == 1 and counts["DEQUANTIZE"] == 1
    # Every tensor between the boundary ops is integer.
    boundary = {summary.inputs[0].name, summary.outputs[0].name}
    for t in summary.tensors:
        if t.name not in boundary:
            assert t.dtype in ("int8", "int32"), (t.name, t.dtype)
    out = litert.predict(litert.make_interpreter(tflite), data)
    assert out.shape == (len(data), 10)
    # The I/O type only changes the boundary: uint8 is int8 shifted by 128 with the same
    # scale, float32 adds QUANTIZE/DEQUANTIZE with the int8 parameters. So every I/O
    # type gives the int8 file's outputs exactly, and those match Keras as closely as
    # the int8 export does (measured for this model: median 0.33 output steps, every
    # argmax equal).
    int8 = tf_pfq.export.to_tflite(qat, representative_data=data, io_dtype="int8")
    np.testing.assert_allclose(out, litert.predict(litert.make_interpreter(int8), data), atol=1e-6)
    keras_out = qat.predict(data, verbose=0)
    step = inspect(int8).outputs[0].scales[0]
    assert np.median(np.abs(out - keras_out)) <= 0.5 * step
    np.testing.assert_array_equal(out.argmax(1), keras_out.argmax(1))


def test_interval_ranges_without_data():
    # No representative data: Add/logit ranges are interval bounds, which hold every
    # value (no saturation at the output).
    qat, data = _qat(4, seed=3)
    tflite = tf_pfq.export.to_tflite(qat)
    keras_out = qat.predict(data, verbose=0)
    out_detail = inspect(tflite).outputs[0]
    lo = (-128 - out_detail.zero_points[0]) * out_detail.scales[0]
    hi = (127 - out_detail.zero_points[0]) * out_detail.scales[0]
    assert keras_out.min() > lo and keras_out.max() < hi
    out = litert.predict(litert.make_interpreter(tflite), data)
    assert np.mean(out.argmax(1) == keras_out.argmax(1)) > 0.8


def test_clamp_signed_false_has_no_maximum(exported4):
    qat, data, tflite = exported4
    assert inspect(tflite).op_counts().get("MAXIMUM", 0) == 2  # one per project conv
    fast = tf_pfq.export.to_tflite(qat, representative_data=data, clamp_signed=False)
    assert "MAXIMUM" not in inspect(fast).op_counts()


def test_stage_a_model_is_rejected():
    model = models.mobilenet_v1(input_shape=(8, 8, 3), widths=(4, 8), strides=(1, 2))
    qat = tf_pfq.apply(model, activation_bits=4)
    with pytest.raises(ValueError, match="fold_batchnorm"):
        tf_pfq.export.to_tflite(qat, input_range=(0.0, 1.0))


def test_representative_dataset_and_shape_check():
    qat, data = _qat(4, seed=7)
    from_array = tf_pfq.export.to_tflite(qat, representative_data=data)
    dataset = tf.data.Dataset.from_tensor_slices((data, np.zeros(len(data)))).batch(16)
    from_dataset = tf_pfq.export.to_tflite(qat, representative_data=dataset)
    assert from_array == from_dataset
    with pytest.raises(ValueError, match=r"\(N, 12, 12, 3\)"):
        tf_pfq.export.to_tflite(qat, representative_data=data[:, :8])


def test_bad_arguments():
    qat, _ = _qat(4, seed=4)
    with pytest.raises(ValueError, match="io_dtype"):
        tf_pfq.export.to_tflite(qat, io_dtype="int16")
    with pytest.raises(TypeError, match="tf_keras"):
        tf_pfq.export.to_tflite(object())
    plan = convert.plan_from_qat(qat)
    no_input = convert.ExportPlan(plan.model, plan.layers, input=None)
    with pytest.raises(ValueError, match="input_range"):
        convert.plan_to_tflite(no_input)


def test_unsupported_layer_named():
    inputs = keras.Input((4, 4, 2))
    x = L.Conv2D(3, 1, name="conv")(inputs)
    x = L.LayerNormalization(name="norm")(x)
    model = keras.Model(inputs, L.Dense(2, name="dense")(L.Flatten()(x)))
    grid = tf_pfq.quantizers.nudge(-1.0, 1.0, 4)
    plan = convert.ExportPlan(
        model,
        {n: convert.LayerQuantization(kernel=grid) for n in ("conv", "dense")},
        input=tf_pfq.quantizers.nudge(0.0, 1.0, 8),
    )
    with pytest.raises(ValueError, match=r"'norm'.*LayerNormalization"):
        convert.plan_to_tflite(plan)


def test_input_model_unchanged(exported4):
    qat, data, _ = exported4
    before = [w.copy() for w in qat.get_weights()]
    tf_pfq.export.to_tflite(qat, representative_data=data[:4])
    for a, b in zip(before, qat.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_save_roundtrip(tmp_path, exported4):
    _, data, tflite = exported4
    path = tf_pfq.export.save(tflite, tmp_path / "sub" / "m.tflite")
    a = litert.predict(litert.make_interpreter(path), data[:3])
    b = litert.predict(litert.make_interpreter(tflite), data[:3])
    np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match="bytes"):
        tf_pfq.export.save("not bytes", tmp_path / "x.tflite")


def test_sequential_with_pooling_padding_flatten():
    # Grid-preserving layers (max pooling, zero padding, flatten) and average pooling
    # pass through the export; the model is Sequential.
    keras.utils.set_random_seed(5)
    model = keras.Sequential(
        [
            keras.Input((10, 10, 2)),
            L.Conv2D(6, 3, activation="relu", name="conv"),
            L.MaxPooling2D(2, name="max"),
            L.ZeroPadding2D(1, name="pad"),
            L.AveragePooling2D(2, name="avg"),
            L.Flatten(name="flat"),
            L.Dense(4, name="out"),
        ]
    )
    qat = tf_pfq.apply(model, activation_bits=4, weight_bits=4)
    data = np.random.default_rng(5).uniform(0, 1, (32, 10, 10, 2)).astype(np.float32)
    qat(data, training=True)
    tflite = tf_pfq.export.to_tflite(qat, representative_data=data)
    counts = inspect(tflite).op_counts()
    # Average pooling is a depthwise conv with constant 1/(kh*kw) weights (one rounding).
    assert {"CONV_2D", "MAX_POOL_2D", "PAD", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"} <= set(counts)
    assert "QUANTIZE" not in counts and "AVERAGE_POOL_2D" not in counts
    keras_out = qat.predict(data, verbose=0)
    out = litert.predict(litert.make_interpreter(tflite), data)
    step = inspect(tflite).outputs[0].scales[0]
    assert np.abs(out - keras_out).max() <= step  # every tensor has a QAT grid here

    # Without an input quantizer, a Sequential model's input takes `input_range`.
    no_input_q = tf_pfq.apply(model, activation_bits=4, weight_bits=4, input_bits=None)
    no_input_q(data, training=True)
    with pytest.raises(ValueError, match="input_range"):
        tf_pfq.export.to_tflite(no_input_q)
    exported = tf_pfq.export.to_tflite(no_input_q, input_range=(0.0, 1.0))
    assert inspect(exported).inputs[0].scales[0] == pytest.approx(1 / 255)


def test_relu_max_value_clamped_by_saturation():
    # ReLU(max_value=1.5): the output grid tops out at <= 1.5, so int8 saturation is
    # the upper clamp and no MINIMUM op is needed.
    keras.utils.set_random_seed(6)
    inputs = keras.Input((8, 8, 2))
    x = L.Conv2D(6, 3, name="conv")(inputs)
    x = L.ReLU(1.5, name="relu")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inputs, L.Dense(3, name="out")(x))
    qat = tf_pfq.apply(model, activation_bits=4, weight_bits=4)
    data = np.random.default_rng(6).uniform(0, 1, (32, 8, 8, 2)).astype(np.float32)
    qat(data, training=True)
    assert float(tf_pfq.quantization_params(qat)["relu"].output.max) <= 1.5
    tflite = tf_pfq.export.to_tflite(qat, representative_data=data)
    counts = inspect(tflite).op_counts()
    assert "MINIMUM" not in counts and "RELU" not in counts  # fused into the conv
    keras_out = qat.predict(data, verbose=0)
    out = litert.predict(litert.make_interpreter(tflite), data)
    step = inspect(tflite).outputs[0].scales[0]
    # Rounding ties of the mean (both grids saturate at 1.5, so they coincide) can
    # break either way in float; all but such outliers are within half a step.
    assert np.median(np.abs(out - keras_out)) <= 0.5 * step + 1e-7
