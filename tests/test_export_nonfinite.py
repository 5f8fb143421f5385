"""Never NaN, never a converter trace: zero-width ranges, non-finite models, converter errors.

Random graphs with a squeeze-excite block whose reduce branch was 0 on a whole
batch (planted dead channels, 2-bit activations) reached a NaN loss in their first
training steps: the range of that tensor became [0, 0], and stage W's integer
arithmetic divided by its step 0. The export then failed inside the converter on
NaN scales, or crashed the process.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

import tf_pfq
from tf_pfq import testing
from tf_pfq.compat import keras
from tf_pfq.export import convert
from tf_pfq.nonfinite import NonFiniteError, nonfinite_variables
from tf_pfq.training import TrainConfig, fit

L = keras.layers


def _se_net(dead_reduce: bool):
    """Conv-BN-ReLU, a squeeze-excite block, pooling, logits; optionally a dead reduce branch."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU(name="relu")(x)
    s = L.GlobalAveragePooling2D(keepdims=True, name="se_squeeze")(x)
    s = L.Conv2D(2, 1, name="se_reduce")(s)
    s = L.ReLU(name="se_reduce_relu")(s)
    s = L.Conv2D(4, 1, activation="sigmoid", name="se_expand")(s)
    x = L.Multiply(name="se_excite")([x, s])
    x = L.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, L.Dense(3, name="logits")(x))
    if dead_reduce:  # every reduce output is negative: the ReLU writes 0 everywhere
        kernel, _ = model.get_layer("se_reduce").get_weights()
        model.get_layer("se_reduce").set_weights([kernel * 0.0, np.full(2, -5.0, np.float32)])
    return model


def _data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 1, (n, 8, 8, 3)).astype(np.float32)
    return images, rng.integers(0, 3, n)


def _stage_w(model, images, bits=2):
    model = testing.with_live_batchnorm(model, images)
    folded, _ = tf_pfq.fold_batchnorm(model)
    qat = tf_pfq.apply(folded, activation_bits=bits, weight_bits=bits)
    qat(images, training=True)
    return qat


def _steps_off(qat, tflite, images) -> float:
    return testing.measure_export(qat, tflite, images)["max_steps"]


@pytest.mark.slow
def test_a_branch_that_is_zero_on_every_batch_trains_and_exports_exactly():
    images, labels = _data()
    qat = _stage_w(_se_net(dead_reduce=True), images)
    reduce_range = qat.get_layer("quant_se_reduce_relu").quantize_config.output_quantizer
    assert float(reduce_range.max_var.numpy() - reduce_range.min_var.numpy()) > 0
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    fit(qat, data, TrainConfig(epochs=2, learning_rate=0.05), verbose=0)
    assert nonfinite_variables(qat) == []
    tflite = tf_pfq.export.to_tflite(qat, representative_data=images)
    assert _steps_off(qat, tflite, images) <= 0.5 + 1e-3


@pytest.mark.slow
def test_a_range_of_zero_width_is_valid_in_inference_and_export():
    # What a model trained before the range update kept empty batches out holds.
    images, _ = _data()
    qat = _stage_w(_se_net(dead_reduce=True), images, bits=3)
    quantizer = qat.get_layer("quant_se_reduce_relu").quantize_config.output_quantizer
    quantizer.min_var.assign(0.0)
    quantizer.max_var.assign(0.0)
    out = qat.predict(images, verbose=0)
    assert np.isfinite(out).all()
    tflite = tf_pfq.export.to_tflite(qat, representative_data=images)
    assert _steps_off(qat, tflite, images) <= 0.5 + 1e-3


def test_the_export_refuses_a_non_finite_model_naming_the_layer():
    images, _ = _data(8)
    qat = _stage_w(_se_net(dead_reduce=False), images, bits=4)
    wrapper = qat.get_layer("quant_se_expand")
    kernel = next(w for w in wrapper.weights if w.name.endswith("kernel:0"))
    kernel.assign(tf.fill(kernel.shape, np.nan))
    with pytest.raises(ValueError, match=r"weights of layer 'se_expand' \(kernel\)"):
        tf_pfq.export.to_tflite(qat, representative_data=images)


def test_training_that_turns_the_model_non_finite_stops_naming_the_layer():
    images, labels = _data(16)
    qat = _stage_w(_se_net(dead_reduce=False), images, bits=4)
    wrapper = qat.get_layer("quant_se_reduce")
    kernel = next(w for w in wrapper.weights if w.name.endswith("kernel:0"))
    kernel.assign(tf.fill(kernel.shape, np.nan))  # the forward values break here
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    with pytest.raises(NonFiniteError, match=r"epoch 1, batch 1: the output range of layer"):
        fit(qat, data, TrainConfig(epochs=1), verbose=0)
    found = nonfinite_variables(qat)
    assert ("se_reduce", "kernel", False) in found
    # Graph order: the first broken range is at or after the layer that broke.
    first_range = next(layer for layer, _, is_range in found if is_range)
    names = [getattr(layer, "layer", layer).name for layer in qat.layers]
    assert names.index(first_range) >= names.index("se_reduce")


def test_a_plan_step_tflite_cannot_store_is_refused_naming_the_layer():
    images, _ = _data(8)
    plan = convert.plan_from_qat(_stage_w(_se_net(dead_reduce=False), images, bits=4))
    quant = plan.layers["se_reduce"]
    broken = dataclasses.replace(quant, bias_scale=np.zeros_like(quant.bias_scale))
    plan = dataclasses.replace(plan, layers={**plan.layers, "se_reduce": broken})
    with pytest.raises(ValueError, match=r"Layer 'se_reduce': its bias step 0\.0"):
        convert.check_plan_scales(plan)


@pytest.mark.slow
def test_a_converter_error_names_the_first_layer_it_cannot_convert(monkeypatch):
    images, _ = _data(8)
    plan = convert.plan_from_qat(_stage_w(_se_net(dead_reduce=False), images, bits=4))
    real = convert._convert

    def converter(plan, *args, **kwargs):
        # A converter that cannot take the excite product (the way a NaN scale fails).
        if "se_excite" in [layer.name for layer in plan.model.layers]:
            raise RuntimeError(
                "/x.py:1:1: error: 'tfl.mul' op quantization parameters violate the same "
                "scale constraint\n    note: called from"
            )
        return real(plan, *args, **kwargs)

    monkeypatch.setattr(convert, "_convert", converter)
    with pytest.raises(ValueError) as error:
        convert.plan_to_tflite(plan, representative_data=images)
    message = str(error.value)
    assert "layer 'se_excite' (Multiply)" in message
    assert "'tfl.mul' op quantization parameters violate the same scale constraint" in message


def test_a_range_xnnpack_cannot_take_is_refused_naming_the_layer():
    # A range far narrower than the values it holds (weights that moved faster than
    # the moving-average range followed): XNNPACK's CONV_2D needs s_in*s_w/s_out < 256.
    images, _ = _data(8)
    qat = _stage_w(_se_net(dead_reduce=False), images, bits=4)
    quantizer = qat.get_layer("quant_relu").quantize_config.output_quantizer
    quantizer.min_var.assign(0.0)
    quantizer.max_var.assign(1e-7)
    with pytest.raises(
        ValueError, match=r"Layers 'relu', 'conv' \(CONV_2D.*scale ratio .* outside \[0, 256\)"
    ):
        tf_pfq.export.to_tflite(qat, representative_data=images)


@pytest.mark.parametrize(
    ("tensor", "layers"),
    [
        (
            "stem_conv/add;stem_conv/Conv2D;stem_conv/add/y;;stem_conv_pad/Pad",
            ["stem_conv", "stem_conv_pad"],
        ),
        ("relu/Relu;conv/add;conv/Conv2D", ["relu", "conv"]),
        ("logits", ["logits"]),
    ],
)
def test_errors_name_the_layers_of_a_fused_tensor(tensor, layers):
    # The converter's fused names have empty parts; sorting them named the layer ''.
    from tf_pfq.export.checks import layers_of_tensor

    assert layers_of_tensor(tensor) == layers
