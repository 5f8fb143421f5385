"""PfQ arithmetic on NumPy arrays, checked against direct convolution and BN math."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tf_pfq import pfq_math


def test_dead_channels_is_strictly_below_threshold():
    variance = np.array([1e-3, 9.9e-4, 0.0, 2.0, 1e-3 + 1e-9])
    assert pfq_math.dead_channels(variance, 1e-3).tolist() == [1, 2]
    assert pfq_math.dead_channels(variance, 0.0).tolist() == []


def test_conv_delta_matches_convolution_of_a_constant_channel():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 4, 5)).astype(np.float32)
    x = rng.normal(size=(1, 7, 7, 4)).astype(np.float32)
    x[..., 1], x[..., 3] = 0.7, -1.2
    full = tf.nn.conv2d(x, kernel, 1, "VALID").numpy()
    kept = tf.nn.conv2d(x[..., [0, 2]], kernel[:, :, [0, 2], :], 1, "VALID").numpy()
    delta = pfq_math.input_constant_delta(kernel, [1, 3], [0.7, -1.2])
    np.testing.assert_allclose(kept + delta, full, atol=1e-5)
    # Negative control: dropping the channel without the delta is visibly wrong.
    assert np.max(np.abs(kept - full)) > 0.1


def test_conv_delta_same_padding_is_exact_in_the_interior_only():
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(3, 3, 2, 3)).astype(np.float32)
    x = rng.normal(size=(1, 6, 6, 2)).astype(np.float32)
    x[..., 1] = 0.5
    full = tf.nn.conv2d(x, kernel, 1, "SAME").numpy()
    kept = tf.nn.conv2d(x[..., :1], kernel[:, :, :1, :], 1, "SAME").numpy()
    approx = kept + pfq_math.input_constant_delta(kernel, [1], [0.5])
    np.testing.assert_allclose(approx[:, 1:-1, 1:-1], full[:, 1:-1, 1:-1], atol=1e-5)
    assert np.max(np.abs(approx - full)) > 1e-2  # the border sees zeros


def test_dense_delta_and_empty_channels():
    kernel = np.arange(12.0).reshape(4, 3)
    np.testing.assert_allclose(
        pfq_math.input_constant_delta(kernel, [0, 2], [1.0, 2.0]), kernel[0] + 2 * kernel[2]
    )
    np.testing.assert_array_equal(pfq_math.input_constant_delta(kernel, [], []), np.zeros(3))


def test_depthwise_constant_matches_depthwise_conv():
    rng = np.random.default_rng(2)
    kernel = rng.normal(size=(3, 3, 3, 2)).astype(np.float32)
    bias = rng.normal(size=6).astype(np.float32)
    x = rng.normal(size=(1, 5, 5, 3)).astype(np.float32)
    x[..., 1] = -0.4
    out = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID").numpy() + bias
    expected = pfq_math.depthwise_constant(kernel, bias, 1, -0.4)
    np.testing.assert_allclose(
        out[..., 2:4], np.broadcast_to(expected, out[..., 2:4].shape), atol=1e-5
    )


def test_flatten_indices_match_keras_flatten_order():
    x = np.arange(2 * 3 * 4).reshape(1, 2, 3, 4)
    flat = x.reshape(1, -1)[0]
    for c in range(4):
        np.testing.assert_array_equal(
            flat[pfq_math.flatten_indices((2, 3, 4), c)], x[0, ..., c].ravel()
        )


def test_keep_indices():
    assert pfq_math.keep_indices(4, set()).tolist() == [0, 1, 2, 3]
    assert pfq_math.keep_indices(4, {0, 3}).tolist() == [1, 2]


@pytest.fixture
def bn_case():
    rng = np.random.default_rng(3)
    x = rng.normal(1.0, 2.0, size=(16, 3))  # the consumer output with the channel
    delta = np.array([0.8, -1.5, 0.3])  # what the removed channel contributed
    params = {
        "gamma": rng.uniform(0.5, 1.5, 3),
        "beta": rng.normal(size=3),
        "mean": rng.normal(size=3),
        "variance": rng.uniform(0.5, 1.5, 3),
    }
    return x, delta, params


def test_moving_mean_shift_is_exact_in_inference_and_training(bn_case):
    x, delta, p = bn_case
    eps = 1e-3
    shifted = pfq_math.shift_moving_mean(p["mean"], delta)
    want = pfq_math.batchnorm_inference(x, p["gamma"], p["beta"], p["mean"], p["variance"], eps)
    got = pfq_math.batchnorm_inference(
        x - delta, p["gamma"], p["beta"], shifted, p["variance"], eps
    )
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(
        pfq_math.batchnorm_training(x - delta, p["gamma"], p["beta"], eps),
        pfq_math.batchnorm_training(x, p["gamma"], p["beta"], eps),
        rtol=1e-12,
    )


def test_paper_beta_update_is_exact_in_inference_only(bn_case):
    x, delta, p = bn_case
    eps = 1e-3
    beta = pfq_math.beta_update(p["beta"], p["gamma"], p["variance"], eps, delta)
    want = pfq_math.batchnorm_inference(x, p["gamma"], p["beta"], p["mean"], p["variance"], eps)
    got = pfq_math.batchnorm_inference(x - delta, p["gamma"], beta, p["mean"], p["variance"], eps)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # In training mode the batch mean already removes delta; eq. 18 then adds it again.
    train_want = pfq_math.batchnorm_training(x, p["gamma"], p["beta"], eps)
    train_got = pfq_math.batchnorm_training(x - delta, p["gamma"], beta, eps)
    assert np.max(np.abs(train_got - train_want)) > 0.1


def test_batchnorm_helpers_match_keras():
    from tf_pfq.compat import keras

    rng = np.random.default_rng(4)
    x = rng.normal(size=(8, 3)).astype(np.float32)
    bn = keras.layers.BatchNormalization(epsilon=1e-3)
    bn.build((None, 3))
    weights = [
        rng.uniform(0.5, 1.5, 3),
        rng.normal(size=3),
        rng.normal(size=3),
        rng.uniform(0.5, 1.5, 3),
    ]
    bn.set_weights(weights)
    g, b, m, v = weights
    np.testing.assert_allclose(
        bn(x, training=False).numpy(), pfq_math.batchnorm_inference(x, g, b, m, v, 1e-3), atol=1e-5
    )
    np.testing.assert_allclose(
        bn(x, training=True).numpy(), pfq_math.batchnorm_training(x, g, b, 1e-3), atol=1e-4
    )
