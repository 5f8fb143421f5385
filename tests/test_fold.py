"""BatchNormalization folding (paper eq. 5-6): equivalence and negative controls."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import tf_pfq
from tf_pfq.compat import keras
from tf_pfq.fold import fold_weights
from tf_pfq.graph import rebuild

L = keras.layers
# Folding reorders float32 products (W * s instead of (W x) * s): each layer adds
# round-off of a few ulps (~1e-7 relative), amplified through 30-50 layers with
# random statistics (measured here: 2e-6 on MobileNet, 3.5e-6 on MobileNetV2,
# max |diff| / max |output|). A fold that forgets one BN's epsilon changes the
# output by 4e-2 of its scale.
RELATIVE_TOLERANCE = 3e-5


def _randomize_bn(model, seed=0, calibrate=None):
    """Random BN statistics; with `calibrate` images, centred on the real ones.

    Uncalibrated random statistics let a deep random-init net's signal die out
    (outputs nearly independent of the input), which would make an equivalence
    check weak; calibrated ones keep every layer input-dependent.
    """
    rng = np.random.default_rng(seed)
    bns = [layer for layer in model.layers if isinstance(layer, L.BatchNormalization)]
    if calibrate is not None:
        for layer in bns:
            layer.momentum = 0.0  # one training-mode pass stores the batch statistics
        model(calibrate, training=True)
    for layer in bns:
        c = layer.moving_mean.shape[0]
        mean, variance = layer.moving_mean.numpy(), layer.moving_variance.numpy()
        if calibrate is None:
            mean, variance = np.zeros(c), np.ones(c)
        weights = []
        if layer.scale:
            weights.append(rng.uniform(0.5, 1.5, c))
        if layer.center:
            weights.append(rng.normal(0, 0.3, c))
        weights += [
            mean + rng.normal(0, 0.3, c) * np.sqrt(variance),
            variance * rng.uniform(0.5, 2.0, c),
        ]
        layer.set_weights(weights)
    return model


def _relative_error(model, folded, x):
    expected = model(x, training=False).numpy()
    got = folded(x, training=False).numpy()
    # The check means something only if the output depends on the input.
    assert np.abs(expected[0] - expected[1]).max() > 0.1 * np.abs(expected).max()
    return np.abs(got - expected).max() / np.abs(expected).max()


def _application(builder, alpha):
    model = builder(input_shape=(96, 96, 3), alpha=alpha, weights=None, classifier_activation=None)
    images = np.random.default_rng(5).uniform(-1, 1, (8, 96, 96, 3)).astype(np.float32)
    return _randomize_bn(model, calibrate=images)


def _bn(x, gamma, beta, mean, variance, eps):
    return gamma * (x - mean) / np.sqrt(variance + eps) + beta


@pytest.mark.parametrize("use_bias", [False, True])
def test_fold_weights_dense_and_depthwise(use_bias):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 4))
    kernel = rng.normal(size=(4, 3))
    bias = rng.normal(size=3) if use_bias else None
    stats = [
        rng.uniform(0.5, 1.5, 3),
        rng.normal(size=3),
        rng.normal(size=3),
        rng.uniform(0.1, 2, 3),
    ]
    k, b = fold_weights(kernel, bias, *stats, epsilon=1e-3)
    y = x @ kernel + (0 if bias is None else bias)
    np.testing.assert_allclose(x @ k + b, _bn(y, *stats, 1e-3), rtol=1e-5, atol=1e-5)
    # Depthwise, multiplier 2: output channel c * 2 + m.
    images = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
    dw = rng.normal(size=(3, 3, 3, 2)).astype(np.float32)
    stats6 = [
        rng.uniform(0.5, 1.5, 6),
        rng.normal(size=6),
        rng.normal(size=6),
        rng.uniform(0.1, 2, 6),
    ]
    conv = tf.nn.depthwise_conv2d(images, dw, [1, 1, 1, 1], "VALID").numpy()
    k, b = fold_weights(dw, None, *stats6, epsilon=1e-3, depthwise=True)
    folded = tf.nn.depthwise_conv2d(images, k, [1, 1, 1, 1], "VALID").numpy() + b
    np.testing.assert_allclose(folded, _bn(conv, *stats6, 1e-3), rtol=1e-4, atol=1e-4)
    # Negative control: the (mult, cin) reading of the channel index is wrong.
    wrong = dw * (stats6[0] / np.sqrt(stats6[3] + 1e-3)).reshape(2, 3).T
    out = tf.nn.depthwise_conv2d(images, wrong.astype(np.float32), [1, 1, 1, 1], "VALID")
    assert np.abs(out.numpy() + b - _bn(conv, *stats6, 1e-3)).max() > 1e-2


@pytest.mark.parametrize(
    ("builder", "alpha", "num_bn"),
    [
        (keras.applications.MobileNet, 0.25, 27),
        (keras.applications.MobileNetV2, 0.35, 52),
    ],
    ids=["mobilenet", "mobilenet_v2"],
)
def test_fold_keras_applications(builder, alpha, num_bn):
    model = _application(builder, alpha)
    config, weights = model.get_config(), [w.copy() for w in model.get_weights()]
    folded, report = tf_pfq.fold_batchnorm(model)
    assert len(report.folded) == num_bn and not report.unfolded
    assert not any(isinstance(layer, L.BatchNormalization) for layer in folded.layers)
    x = np.random.default_rng(2).uniform(-1, 1, (2, 96, 96, 3)).astype(np.float32)
    assert _relative_error(model, folded, x) < RELATIVE_TOLERANCE
    # Input untouched.
    assert model.get_config() == config
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)
    # Figure 2 data: the range of every folded kernel, read from the folded model.
    name = next(iter(report.folded.values()))
    layer = folded.get_layer(name)
    kernel = layer.depthwise_kernel if isinstance(layer, L.DepthwiseConv2D) else layer.kernel
    assert report.weight_ranges[name].dynamic_range == pytest.approx(
        float(kernel.numpy().max() - kernel.numpy().min())
    )
    assert report.weight_ranges[name].folded
    assert len(report.weight_ranges) == sum(
        isinstance(layer, (L.Conv2D, L.DepthwiseConv2D, L.Dense)) for layer in folded.layers
    )


def test_wrong_fold_is_detected():
    model = _application(keras.applications.MobileNetV2, 0.35)
    folded, report = tf_pfq.fold_batchnorm(model)
    x = np.random.default_rng(3).uniform(-1, 1, (2, 96, 96, 3)).astype(np.float32)
    assert _relative_error(model, folded, x) < RELATIVE_TOLERANCE
    # The same rewrite with one BN's epsilon forgotten (sqrt(V) instead of sqrt(V + eps)).
    bn_name, conv_name = next(iter(report.folded.items()))
    bn, conv = model.get_layer(bn_name), model.get_layer(conv_name)
    kernel, bias = fold_weights(
        conv.get_weights()[0], None, *[w.numpy() for w in bn.weights], epsilon=0.0
    )
    good = {n: folded.get_layer(n).get_weights() for n in report.folded.values()}
    configs = {n: folded.get_layer(n).get_config() for n in report.folded.values()}
    wrong = rebuild(
        model,
        remove=list(report.folded),
        layer_configs=configs,
        weights={**good, conv_name: [kernel, bias]},
    )
    assert _relative_error(model, wrong, x) > 100 * RELATIVE_TOLERANCE


def test_unfoldable_batchnorms_are_listed_and_kept():
    keras.utils.set_random_seed(1)  # unseeded initializers also draw from `random`
    inputs = keras.Input((8, 8, 3), name="image")
    a = L.Conv2D(4, 3, padding="same", activation="relu", name="conv_relu")(inputs)
    a = L.BatchNormalization(name="bn_after_activation")(a)
    b = L.Conv2D(4, 1, name="conv_two_uses")(a)
    c = L.BatchNormalization(name="bn_after_shared_output")(b)
    d = L.Add(name="add")([b, c])
    d = L.BatchNormalization(name="bn_after_add")(d)
    e = L.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False, name="dw")(d)
    e = L.BatchNormalization(name="bn_dw")(e)
    e = L.GlobalAveragePooling2D(name="pool")(e)
    f = L.Dense(3, name="fc")(e)
    f = L.BatchNormalization(name="bn_fc")(f)
    model = keras.Model(inputs, f)
    _randomize_bn(model, calibrate=np.random.default_rng(6).normal(size=(8, 8, 8, 3)))
    folded, report = tf_pfq.fold_batchnorm(model, per_channel_affine=False)
    assert report.folded == {"bn_dw": "dw", "bn_fc": "fc"} and not report.affine
    assert set(report.unfolded) == {"bn_after_activation", "bn_after_shared_output", "bn_after_add"}
    assert "fused activation" in report.unfolded["bn_after_activation"]
    assert "Add" in report.unfolded["bn_after_add"]
    x = np.random.default_rng(4).normal(size=(3, 8, 8, 3)).astype(np.float32)
    assert _relative_error(model, folded, x) < RELATIVE_TOLERANCE
    # By default the three become per-channel affines (1x1 depthwise), same names.
    folded, report = tf_pfq.fold_batchnorm(model)
    assert set(report.affine) == {"bn_after_activation", "bn_after_shared_output", "bn_after_add"}
    assert not report.unfolded and "fused activation" in report.affine["bn_after_activation"]
    assert all(isinstance(folded.get_layer(n), L.DepthwiseConv2D) for n in report.affine)
    # A BN's gamma and beta trained, so its affine does.
    assert all(folded.get_layer(n).trainable_weights for n in report.affine)
    assert folded.get_layer("dw").use_bias and folded.get_layer("fc").use_bias
    x = np.random.default_rng(4).normal(size=(3, 8, 8, 3)).astype(np.float32)
    assert _relative_error(model, folded, x) < RELATIVE_TOLERANCE
    assert "Folded 2" in str(report)


def test_fold_rejects_non_models():
    with pytest.raises(TypeError, match="tf_keras"):
        tf_pfq.fold_batchnorm("model")


def _transpose_net():
    x = keras.Input((6, 6, 4))
    h = L.Conv2DTranspose(4, 3, strides=2, padding="same", use_bias=False, name="up")(x)
    h = L.BatchNormalization(name="up_bn")(h)
    h = L.ReLU()(h)
    return _randomize_bn(keras.Model(x, L.Conv2D(3, 1, name="head")(h)), seed=5)


def test_fold_conv2d_transpose_scales_output_axis():
    model = _transpose_net()
    x = np.random.default_rng(6).uniform(-1, 1, (2, 6, 6, 4)).astype(np.float32)
    folded, report = tf_pfq.fold_batchnorm(model)
    assert report.folded == {"up_bn": "up"}
    assert _relative_error(model, folded, x) < RELATIVE_TOLERANCE
    # Negative control: scaling the last kernel axis (the input channels of a
    # Conv2DTranspose, square here so no shape error hides the mistake) is wrong.
    bn, up = model.get_layer("up_bn"), model.get_layer("up")
    kernel, bias = fold_weights(
        up.get_weights()[0], None, *[w.numpy() for w in bn.weights], epsilon=bn.epsilon
    )
    config = folded.get_layer("up").get_config()
    wrong = rebuild(
        model, remove=["up_bn"], layer_configs={"up": config}, weights={"up": [kernel, bias]}
    )
    assert _relative_error(model, wrong, x) > 100 * RELATIVE_TOLERANCE


def test_batchnorm_on_input_and_after_concat_becomes_affine():
    keras.utils.set_random_seed(1)
    # Pre-activation / DenseNet-style: BN on the input and after a concat.
    inputs = keras.Input((8, 8, 3))
    h = L.BatchNormalization(name="bn_input")(inputs)
    a = L.Conv2D(4, 3, padding="same", name="conv_a")(h)
    h = L.Concatenate(name="concat")([h, a])
    h = L.BatchNormalization(name="bn_concat")(h)
    h = L.ReLU()(h)
    model = keras.Model(inputs, L.Conv2D(2, 1, name="head")(h))
    _randomize_bn(model, seed=2)
    x = np.random.default_rng(5).normal(size=(3, 8, 8, 3)).astype(np.float32)
    folded, report = tf_pfq.fold_batchnorm(model)
    assert set(report.affine) == {"bn_input", "bn_concat"} and not report.unfolded
    assert not any(isinstance(layer, L.BatchNormalization) for layer in folded.layers)
    assert _relative_error(model, folded, x) < RELATIVE_TOLERANCE
    assert "per-channel affine" in str(report)
    # Negative control: the affine without epsilon is detectably wrong.
    bn = model.get_layer("bn_concat")
    bn.epsilon = 0.5
    assert _relative_error(model, folded, x) > 100 * RELATIVE_TOLERANCE
