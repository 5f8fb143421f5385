"""Rescaling and Normalization through fold, stage W and the integer export.

`tf_pfq.fold_batchnorm` canonicalizes both as a per-channel affine `y = a x + b`:
folded into the next conv where that is exact (the model input's grid then absorbs
it), else written as a 1x1 DepthwiseConv2D. Each case checks the folded model
against the float one and the exported file against the Keras QAT model on XNNPACK
(99th percentile of |logit difference| <= 2 int8 output steps, maximum <= 4).
"""

from __future__ import annotations

import numpy as np
import pytest

import tf_pfq
from tf_pfq.compat import keras
from tf_pfq.export import litert
from tf_pfq.export.summary import inspect

L = keras.layers
SHAPE = (12, 12, 3)
MEAN, VARIANCE = [120.0, 110.0, 100.0], [3600.0, 2500.0, 4900.0]


def _images(seed=0, n=64):
    return np.random.default_rng(seed).uniform(0, 255, (n, *SHAPE)).astype(np.float32)


def _body(x):
    x = L.Conv2D(8, 3, padding="same", name="conv1")(x)
    x = L.BatchNormalization(name="conv1_bn")(x)
    x = L.Activation("swish", name="conv1_act")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return L.Dense(10, name="logits")(x)


def rescaling_net():
    inputs = keras.Input(SHAPE, name="image")
    return keras.Model(inputs, _body(L.Rescaling(1 / 255, name="rescale")(inputs)))


def offset_rescaling_net():
    inputs = keras.Input(SHAPE, name="image")
    x = L.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(inputs)
    x = L.Conv2D(8, 3, name="stem")(x)  # 'valid': the offset folds into the bias
    return keras.Model(inputs, _body(x))


def normalization_net(invert=False):
    # EfficientNet's stem: Rescaling, Normalization, ZeroPadding2D, then the conv.
    inputs = keras.Input(SHAPE, name="image")
    x = L.Rescaling(1 / 255, name="rescale")(inputs)
    if invert:
        mean, variance = [0.1, -0.2, 0.3], [4.0, 0.25, 1.0]
    else:
        mean = [m / 255 for m in MEAN]
        variance = [v / 255**2 for v in VARIANCE]
    x = L.Normalization(mean=mean, variance=variance, invert=invert, name="norm")(x)
    x = L.ZeroPadding2D(1, name="stem_pad")(x)
    x = L.Conv2D(8, 3, strides=2, name="stem")(x)
    return keras.Model(inputs, _body(x))


def _fold(model, seed=0):
    rng = np.random.default_rng(seed)
    bn = model.get_layer("conv1_bn")
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights(
        [
            rng.uniform(0.5, 1.5, gamma.shape),
            rng.normal(0, 0.2, beta.shape),
            rng.normal(0, 0.1, mean.shape),
            rng.uniform(0.5, 1.5, var.shape),
        ]
    )
    folded, report = tf_pfq.fold_batchnorm(model)
    data = _images(seed, 16)
    np.testing.assert_allclose(folded(data), model(data), rtol=1e-4, atol=1e-4)
    return folded, report


def _export_error(folded, seed=0):
    qat = tf_pfq.apply(folded, activation_bits=4, weight_bits=4)
    data = _images(seed)
    qat(data[:48], training=True)
    keras_out = qat.predict(data[48:], verbose=0)
    tflite = tf_pfq.export.to_tflite(qat, representative_data=data[:48])
    out = litert.predict(litert.make_interpreter(tflite), data[48:])
    step = inspect(tflite).outputs[0].scales[0]
    err = np.abs(out - keras_out).reshape(-1) / step
    return float(np.percentile(err, 99)), float(err.max()), tflite


def test_per_tensor_rescaling_on_the_input_folds_into_the_conv():
    keras.utils.set_random_seed(0)
    model = rescaling_net()
    folded, report = _fold(model)
    assert report.preprocessing == {
        "rescale": "folded into 'conv1' (per-tensor affine; the model input's grid absorbs it)"
    }
    assert "rescale" not in [layer.name for layer in folded.layers]
    np.testing.assert_allclose(
        folded.get_layer("conv1").kernel.numpy(),
        model.get_layer("conv1").kernel.numpy() / 255 * _bn_scale(model, "conv1_bn"),
        rtol=1e-5,
    )
    p99, worst, tflite = _export_error(folded)
    assert p99 <= 2.0 and worst <= 4.0, (p99, worst)
    ops = inspect(tflite).op_counts()
    # The one depthwise conv is the global mean's (one rounding); none is left for
    # the rescale. The MUL is swish's.
    assert ops.get("DEPTHWISE_CONV_2D", 0) == 1 and "MUL" in ops, ops


def _bn_scale(model, name):
    bn = model.get_layer(name)
    gamma, _, _, var = bn.get_weights()
    return gamma / np.sqrt(var + bn.epsilon)


def test_rescaling_offset_folds_into_the_bias_of_a_valid_conv():
    keras.utils.set_random_seed(1)
    folded, report = _fold(offset_rescaling_net(), seed=1)
    assert report.preprocessing["rescale"].startswith("folded into 'stem'")
    p99, worst, _ = _export_error(folded, seed=1)
    assert p99 <= 2.0 and worst <= 4.0, (p99, worst)


@pytest.mark.parametrize("invert", [False, True])
def test_normalization_before_zero_padding_becomes_a_per_channel_affine(invert):
    keras.utils.set_random_seed(2)
    folded, report = _fold(normalization_net(invert), seed=2)
    assert report.preprocessing["rescale"] == "merged into 'norm' (one affine)"
    assert report.preprocessing["norm"].startswith(
        "1x1 DepthwiseConv2D (per-channel affine), not folded: zero padding ('stem_pad')"
    )
    layer = folded.get_layer("norm")
    assert isinstance(layer, L.DepthwiseConv2D) and layer.kernel_size == (1, 1)
    # Fixed preprocessing stays fixed: fine-tuning must not train the affine (on raw
    # pixels one step could drive it non-finite).
    assert not layer.trainable_weights and layer.non_trainable_weights
    assert "rescale" not in [layer.name for layer in folded.layers]
    p99, worst, _ = _export_error(folded, seed=2)
    assert p99 <= 2.0 and worst <= 4.0, (p99, worst)


def test_normalization_of_the_input_folds_into_a_valid_conv():
    inputs = keras.Input(SHAPE, name="image")
    x = L.Normalization(mean=MEAN, variance=VARIANCE, name="norm")(inputs)
    model = keras.Model(inputs, L.Conv2D(4, 3, name="conv")(x))
    folded, report = tf_pfq.fold_batchnorm(model)
    assert report.preprocessing == {
        "norm": "folded into 'conv' (per-channel affine; the model input's grid absorbs it)"
    }
    data = _images(3, 8)
    np.testing.assert_allclose(folded(data), model(data), rtol=1e-4, atol=1e-4)


def test_unfoldable_preprocessing_is_kept_without_per_channel_affine():
    folded, report = tf_pfq.fold_batchnorm(normalization_net(), per_channel_affine=False)
    assert report.preprocessing["norm"].startswith("kept: zero padding")
    assert isinstance(folded.get_layer("norm"), L.Normalization)
    assert report.preprocessing["rescale"] == report.preprocessing["norm"]
    with pytest.raises(ValueError, match=r"'rescale' \(Rescaling\) is a preprocessing layer"):
        tf_pfq.apply(folded, activation_bits=4, weight_bits=4)


def test_normalization_over_another_axis_is_refused_naming_the_layer():
    inputs = keras.Input(SHAPE, name="image")
    x = L.Normalization(axis=1, mean=[0.0] * 12, variance=[1.0] * 12, name="rows")(inputs)
    model = keras.Model(inputs, L.Conv2D(4, 3, name="conv")(x))
    with pytest.raises(ValueError, match=r"'rows' \(Normalization\) normalizes axis=\(1,\)"):
        tf_pfq.fold_batchnorm(model)


def test_stage_w_and_export_refuse_unfolded_preprocessing():
    model = rescaling_net()
    with pytest.raises(ValueError, match=r"'rescale' \(Rescaling\) is a preprocessing layer"):
        tf_pfq.apply(model, activation_bits=4, weight_bits=4)
    qat = tf_pfq.apply(model, activation_bits=4)  # stage A keeps it, unquantized
    assert "quant_rescale" not in [layer.name for layer in qat.layers]


def test_identity_normalization_after_rescaling_folds_through_zero_padding():
    # EfficientNet built with weights=None: Normalization has mean 0 and variance 1, so
    # the run is `x / 255` with no offset, which zero padding keeps exact.
    inputs = keras.Input(SHAPE, name="image")
    x = L.Rescaling(1 / 255, name="rescale")(inputs)
    x = L.Normalization(mean=[0.0] * 3, variance=[1.0] * 3, name="norm")(x)
    x = L.ZeroPadding2D(1, name="stem_pad")(x)
    model = keras.Model(inputs, L.Conv2D(4, 3, strides=2, name="stem")(x))
    folded, report = tf_pfq.fold_batchnorm(model)
    assert set(report.preprocessing) == {"rescale", "norm"}
    assert "merged into 'norm'" in report.preprocessing["rescale"]
    assert "folded into 'stem'" in report.preprocessing["norm"]
    assert [layer.name for layer in folded.layers] == ["image", "stem_pad", "stem"]
    data = _images(4, 8)
    np.testing.assert_allclose(folded(data), model(data), rtol=1e-4, atol=1e-5)


def test_the_affine_stays_frozen_through_stage_w_training_and_saving(tmp_path):
    # tfmot's wrapper lists a quantized kernel as trainable even when its layer is
    # frozen; tf_pfq's wrapper keeps the frozen layer's weights out of training.
    keras.utils.set_random_seed(4)
    folded, _ = _fold(normalization_net(), seed=4)
    qat = tf_pfq.apply(folded, activation_bits=4, weight_bits=4)
    assert not any("quant_norm/" in w.name for w in qat.trainable_weights)
    assert {"quant_norm/depthwise_kernel:0", "quant_norm/bias:0"} <= {w.name for w in qat.weights}
    watched = ("quant_norm/depthwise_kernel:0", "quant_norm/bias:0", "quant_stem/kernel:0")
    before = {w.name: w.numpy().copy() for w in qat.weights if w.name in watched}
    qat.compile(keras.optimizers.SGD(1.0), keras.losses.SparseCategoricalCrossentropy(True))
    data = _images(5, 16)
    qat.fit(data, np.arange(16) % 10, epochs=1, batch_size=8, verbose=0)
    after = {w.name: w.numpy() for w in qat.weights if w.name in watched}
    np.testing.assert_array_equal(after[watched[0]], before[watched[0]])
    np.testing.assert_array_equal(after[watched[1]], before[watched[1]])
    # The trainable conv after it did move (the step was large enough to show).
    assert not np.array_equal(after[watched[2]], before[watched[2]])
    path = str(tmp_path / "qat.h5")
    tf_pfq.save(qat, path)
    loaded = tf_pfq.load(path)
    np.testing.assert_allclose(loaded.predict(data, verbose=0), qat.predict(data, verbose=0))
