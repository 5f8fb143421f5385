"""tf_pfq.prune on small models: one numerical-equivalence test per rewrite, with
negative controls, the kept-with-reason cases, errors and serialization."""

from __future__ import annotations

import numpy as np
import pytest
from test_prune_helpers import (
    ROUND_OFF,
    all_weights,
    assert_same_outputs,
    assert_weights_equal,
    live_threshold,
    max_change,
    plant_dead,
    randomize_bn,
)

import tf_pfq
from tf_pfq.compat import keras
from tf_pfq.ranges import ACTIVATION_RANGES_ATTR, ActivationRange

L = keras.layers


@pytest.fixture(autouse=True)
def _keras_seed():
    # Unseeded Keras initializers draw from Python's `random` as well.
    keras.utils.set_random_seed(0)


def _x(shape, n=4, seed=1):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def _conv_bn_relu(x, filters, kernel, name, padding="same", strides=1):
    x = L.Conv2D(filters, kernel, strides, padding=padding, use_bias=False, name=name)(x)
    x = L.BatchNormalization(name=f"{name}_bn")(x)
    return L.ReLU(6.0, name=f"{name}_relu")(x)


def _head(x):
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return L.Dense(5, name="logits")(x)


def _chain(consumer_bias: bool, consumer_bn: bool, kernel=1, padding="same"):
    """conv -> BN -> ReLU6 -> consumer conv [-> BN] -> ReLU -> pool -> dense."""
    inputs = keras.Input((8, 8, 3))
    x = _conv_bn_relu(inputs, 6, 3, "conv1")
    x = L.Conv2D(7, kernel, padding=padding, use_bias=consumer_bias, name="conv2")(x)
    if consumer_bn:
        x = L.BatchNormalization(name="conv2_bn")(x)
    x = L.ReLU(name="conv2_relu")(x)
    model = keras.Model(inputs, _head(x))
    randomize_bn(model)
    return model


# -- Conv2D consumers --------------------------------------------------------------


def test_conv_consumer_with_bias_absorbs_constant_into_bias():
    model = _chain(consumer_bias=True, consumer_bn=False)
    plant_dead(model, "conv1_bn", 2, beta=0.8)
    pruned, report = tf_pfq.prune(model)
    assert pruned.get_layer("conv1").filters == 5
    assert pruned.get_layer("conv2").kernel.shape == (1, 1, 5, 7)
    assert report.num_pruned == 1 and report.exact
    assert report.max_residual_std < 0.05  # V = eps / 1000: a true constant
    kernel, bias = model.get_layer("conv2").get_weights()
    expected = bias + np.minimum(0.8, 6.0) * kernel[0, 0, 2, :]
    np.testing.assert_allclose(pruned.get_layer("conv2").bias.numpy(), expected, rtol=1e-6)
    assert_same_outputs(model, pruned, _x((8, 8, 3)))


def test_absorb_false_removes_without_compensation():
    # "PfQ w/o bias correction": the pruned model equals the input model with the
    # dead channel's output set to 0 (gamma = beta = 0), not the input model.
    model = _chain(consumer_bias=True, consumer_bn=False)
    plant_dead(model, "conv1_bn", 2, beta=0.8)
    pruned, report = tf_pfq.prune(model, absorb=False)
    assert pruned.get_layer("conv1").filters == 5 and report.num_pruned == 1
    np.testing.assert_array_equal(
        pruned.get_layer("conv2").bias.numpy(), model.get_layer("conv2").bias.numpy()
    )
    zeroed = keras.models.clone_model(model)
    zeroed.set_weights(model.get_weights())
    gamma, beta, mean, var = zeroed.get_layer("conv1_bn").get_weights()
    gamma[2], beta[2] = 0.0, 0.0
    zeroed.get_layer("conv1_bn").set_weights([gamma, beta, mean, var])
    x = _x((8, 8, 3))
    assert_same_outputs(zeroed, pruned, x)
    assert max_change(model, pruned, x) > 1e-3


def test_conv_consumer_negative_control_live_channel_changes_outputs():
    model = _chain(consumer_bias=True, consumer_bn=False)
    threshold, _ = live_threshold(model, "conv1_bn")
    pruned, report = tf_pfq.prune(model, threshold=threshold)
    assert report.num_pruned == 1  # same code path as above
    assert report.max_residual_std > 0.4  # the report's data-free warning sign
    x = _x((8, 8, 3))
    scale = float(np.max(np.abs(model(x))))
    assert max_change(model, pruned, x) > 100 * ROUND_OFF * scale


@pytest.mark.parametrize("training", [False, True])
def test_conv_consumer_without_bias_shifts_following_bn_mean(training):
    model = _chain(consumer_bias=False, consumer_bn=True)
    plant_dead(model, "conv1_bn", 4, beta=1.3)
    pruned, report = tf_pfq.prune(model)
    assert not pruned.get_layer("conv2").use_bias
    before, after = model.get_layer("conv2_bn"), pruned.get_layer("conv2_bn")
    np.testing.assert_array_equal(after.beta.numpy(), before.beta.numpy())
    assert np.any(after.moving_mean.numpy() != before.moving_mean.numpy())
    assert any("moving_mean" in n for r in report.layers for n in r.notes)
    assert_same_outputs(model, pruned, _x((8, 8, 3)), training=training)


def test_conv_consumer_without_bias_or_bn_gets_a_bias():
    model = _chain(consumer_bias=False, consumer_bn=False)
    plant_dead(model, "conv1_bn", 0, beta=0.5)
    pruned, _ = tf_pfq.prune(model)
    assert pruned.get_layer("conv2").use_bias
    assert_same_outputs(model, pruned, _x((8, 8, 3)))


def test_zero_constant_needs_no_compensation():
    model = _chain(consumer_bias=False, consumer_bn=False, kernel=3)
    plant_dead(model, "conv1_bn", 1, beta=-0.4)  # ReLU6(-0.4) == 0
    pruned, report = tf_pfq.prune(model)
    assert not pruned.get_layer("conv2").use_bias
    assert report.exact and report.num_pruned == 1
    assert_same_outputs(model, pruned, _x((8, 8, 3)))


def test_valid_padding_3x3_consumer_is_exact():
    model = _chain(consumer_bias=True, consumer_bn=False, kernel=3, padding="valid")
    plant_dead(model, "conv1_bn", 3, beta=0.9)
    pruned, report = tf_pfq.prune(model)
    assert report.exact
    assert_same_outputs(model, pruned, _x((8, 8, 3)))


def test_same_padding_3x3_consumer_approximation_border_effect_is_measured():
    model = _chain(consumer_bias=True, consumer_bn=False, kernel=3)
    plant_dead(model, "conv1_bn", 3, beta=0.9)
    x = _x((8, 8, 3), n=8)
    exact, report = tf_pfq.prune(model)  # the default: a constant carrier, exact
    assert report.exact and report.num_carriers == 1
    assert_same_outputs(model, exact, x)
    pruned, report = tf_pfq.prune(model, padding="approximate", calibration_data=x)
    assert not report.exact
    assert any("interior" in n for n in report.layer("conv2").notes)
    change = max_change(model, pruned, x)
    assert change > 100 * ROUND_OFF  # the border sees 0 instead of the constant
    assert change <= report.max_output_change * (1 + 1e-6)
    # The interior is exact: the consumer's output away from the border is unchanged.
    inner = keras.Model(model.input, model.get_layer("conv2").output)
    inner_pruned = keras.Model(pruned.input, pruned.get_layer("conv2").output)
    a, b = inner(x).numpy(), inner_pruned(x).numpy()
    np.testing.assert_allclose(b[:, 1:-1, 1:-1], a[:, 1:-1, 1:-1], atol=1e-5)
    assert np.max(np.abs(b - a)) > 1e-2


@pytest.mark.parametrize("padding", ["keep", "exact"])
@pytest.mark.parametrize("zero_pad", [False, True])
def test_keep_and_exact_keep_channels_that_meet_depthwise_padding(zero_pad, padding):
    model = _separable(dw_padding="valid" if zero_pad else "same", zero_pad=zero_pad)
    plant_dead(model, "pw1_bn", 2, beta=0.8)  # border effect: kept
    plant_dead(model, "pw1_bn", 3, beta=-0.8)  # act 0: exact, removed
    plant_dead(model, "dw_bn", 4, beta=0.5)  # 1x1 consumer: exact, removed
    pruned, report = tf_pfq.prune(model, padding=padding)
    assert report.exact and report.num_pruned == 2 and report.absorption == padding
    assert "zero padding in " in report.layer("pw1_bn").kept[2]
    assert report.layer("pw1").removed == [3, 4]
    assert_same_outputs(model, pruned, _x((8, 8, 3)))


# -- Dense, Flatten, Reshape ---------------------------------------------------------


def test_flatten_dense_sums_all_rows_of_the_channel():
    inputs = keras.Input((4, 4, 3))
    x = _conv_bn_relu(inputs, 5, 3, "conv1", padding="valid")  # 2x2x5
    x = L.Flatten(name="flatten")(x)
    model = keras.Model(inputs, L.Dense(6, name="fc")(x))
    randomize_bn(model)
    plant_dead(model, "conv1_bn", 1, beta=0.7)
    pruned, report = tf_pfq.prune(model)
    assert pruned.get_layer("fc").kernel.shape == (16, 6)  # 4 positions x 4 channels
    assert report.exact
    assert_same_outputs(model, pruned, _x((4, 4, 3)))


def test_dense_producer_and_consumer_with_bn_mean_shift():
    inputs = keras.Input((10,))
    x = L.Dense(8, use_bias=False, name="fc1")(inputs)
    x = L.BatchNormalization(name="fc1_bn")(x)
    x = L.Activation("relu", name="fc1_relu")(x)
    x = L.Dropout(0.5, name="drop")(x)
    x = L.Dense(6, use_bias=False, name="fc2")(x)
    x = L.BatchNormalization(name="fc2_bn")(x)
    model = keras.Model(inputs, L.Dense(3, name="out")(x))
    randomize_bn(model)
    plant_dead(model, "fc1_bn", 5, beta=0.6)
    pruned, _ = tf_pfq.prune(model)
    assert pruned.get_layer("fc1").units == 7
    assert_same_outputs(model, pruned, _x((10,), n=16))


def test_channels_last_reshape_passes_constants():
    inputs = keras.Input((4, 4, 3))
    x = _conv_bn_relu(inputs, 5, 1, "conv1")
    x = L.Reshape((16, 5), name="reshape")(x)
    x = L.Dense(4, name="fc")(x)
    model = keras.Model(inputs, L.Flatten(name="flat")(x))
    randomize_bn(model)
    plant_dead(model, "conv1_bn", 0, beta=0.3)
    pruned, _ = tf_pfq.prune(model)
    assert pruned.get_layer("reshape").target_shape == (16, 4)
    assert_same_outputs(model, pruned, _x((4, 4, 3)))


# -- DepthwiseConv2D: cascade and backward dead code ---------------------------------


def _separable(dw_padding="same", zero_pad=False, dw_strides=1):
    inputs = keras.Input((8, 8, 3))
    x = _conv_bn_relu(inputs, 6, 1, "pw1")
    if zero_pad:
        x = L.ZeroPadding2D(((0, 1), (0, 1)), name="pad")(x)
    x = L.DepthwiseConv2D(3, dw_strides, padding=dw_padding, use_bias=False, name="dw")(x)
    x = L.BatchNormalization(name="dw_bn")(x)
    x = L.ReLU(6.0, name="dw_relu")(x)
    x = _conv_bn_relu(x, 7, 1, "pw2")
    model = keras.Model(inputs, _head(x))
    randomize_bn(model)
    return model


@pytest.mark.parametrize("zero_pad", [False, True])
def test_depthwise_consumer_cascade_zero_constant_is_exact(zero_pad):
    model = _separable(dw_padding="valid" if zero_pad else "same", zero_pad=zero_pad, dw_strides=2)
    plant_dead(model, "pw1_bn", 2, beta=-1.0)
    pruned, report = tf_pfq.prune(model)
    for name in ("pw1", "pw1_bn", "dw", "dw_bn"):
        assert report.layer(name).removed == [2], name
    assert pruned.get_layer("pw2").kernel.shape[2] == 5
    assert report.exact
    assert_same_outputs(model, pruned, _x((8, 8, 3)))


@pytest.mark.parametrize("zero_pad", [False, True])
def test_depthwise_cascade_nonzero_constant_approximation_has_border_effect(zero_pad):
    model = _separable(dw_padding="valid" if zero_pad else "same", zero_pad=zero_pad)
    plant_dead(model, "pw1_bn", 2, beta=0.8)
    bn = model.get_layer("dw_bn")
    gamma, beta, mean, var = bn.get_weights()
    beta[2] = 3.0  # keep channel 2 inside ReLU6's linear range, so the border shows
    bn.set_weights([gamma, beta, mean, var])
    x = _x((8, 8, 3), n=8)
    pruned, report = tf_pfq.prune(model, padding="approximate", calibration_data=x)
    assert not report.exact
    change = max_change(model, pruned, x)
    assert 100 * ROUND_OFF < change <= report.max_output_change * (1 + 1e-6)
    # The default keeps the channel: a depthwise conv cannot share a carrier.
    pruned, report = tf_pfq.prune(model, calibration_data=x)
    assert report.exact and report.num_pruned == 0 and "depthwise" in str(report)
    assert_same_outputs(model, pruned, x)


def test_depthwise_valid_cascade_nonzero_constant_is_exact():
    model = _separable(dw_padding="valid")
    plant_dead(model, "pw1_bn", 2, beta=0.8)
    pruned, report = tf_pfq.prune(model)
    assert report.exact and report.layer("dw").removed == [2]
    assert_same_outputs(model, pruned, _x((8, 8, 3)))


@pytest.mark.parametrize("training", [False, True])
def test_dead_depthwise_channel_removes_its_input_filter(training):
    model = _separable()
    plant_dead(model, "dw_bn", 4, beta=0.9)
    pruned, report = tf_pfq.prune(model)
    # Backward clean-up: the pw1 filter that only fed depthwise channel 4 goes too.
    for name in ("pw1", "pw1_bn", "dw", "dw_bn"):
        assert report.layer(name).removed == [4], name
    assert report.num_pruned == 1 and report.num_removed == 2
    assert_same_outputs(model, pruned, _x((8, 8, 3)), training=training)


def test_dead_depthwise_channel_kept_when_its_input_feeds_another_layer():
    inputs = keras.Input((8, 8, 3))
    x = _conv_bn_relu(inputs, 6, 1, "pw1")
    y = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    y = L.BatchNormalization(name="dw_bn")(y)
    y = L.Concatenate(name="concat")([x, y])
    model = keras.Model(inputs, _head(y))
    randomize_bn(model)
    plant_dead(model, "dw_bn", 1, beta=0.2)
    pruned, report = tf_pfq.prune(model)
    assert report.num_pruned == 0 and report.num_kept == 1
    assert "still reads" in report.layer("dw_bn").kept[1]
    assert_same_outputs(model, pruned, _x((8, 8, 3)))


# -- Concatenate and Add -------------------------------------------------------------


def test_concatenate_offsets():
    inputs = keras.Input((6, 6, 3))
    a = _conv_bn_relu(inputs, 4, 3, "a")
    b = _conv_bn_relu(inputs, 5, 3, "b")
    x = L.Concatenate(name="concat")([a, b])
    x = L.Conv2D(6, 1, name="mix")(x)
    model = keras.Model(inputs, _head(x))
    randomize_bn(model)
    plant_dead(model, "b_bn", 3, beta=0.6)
    pruned, report = tf_pfq.prune(model)
    kernel = model.get_layer("mix").get_weights()[0]
    np.testing.assert_array_equal(
        pruned.get_layer("mix").get_weights()[0], np.delete(kernel, 4 + 3, axis=2)
    )
    assert report.layer("b").removed == [3] and report.layer("a").removed == []
    assert_same_outputs(model, pruned, _x((6, 6, 3)))


def _residual():
    inputs = keras.Input((6, 6, 3))
    s = _conv_bn_relu(inputs, 6, 3, "stem")
    r = _conv_bn_relu(s, 8, 1, "branch")
    r = L.Conv2D(6, 1, use_bias=False, name="project")(r)
    r = L.BatchNormalization(name="project_bn")(r)
    x = L.Add(name="add")([s, r])
    x = L.ReLU(name="add_relu")(x)
    model = keras.Model(inputs, _head(x))
    randomize_bn(model)
    return model


def test_residual_branch_inner_channel_is_pruned():
    model = _residual()
    plant_dead(model, "branch_bn", 5, beta=0.4)
    pruned, report = tf_pfq.prune(model)
    assert report.num_pruned == 1 and pruned.get_layer("branch").filters == 7
    for training in (False, True):
        assert_same_outputs(model, pruned, _x((6, 6, 3)), training=training)


def test_add_with_live_other_branch_keeps_the_channel():
    model = _residual()
    plant_dead(model, "project_bn", 2, beta=0.4)
    pruned, report = tf_pfq.prune(model)
    assert report.num_pruned == 0 and report.num_kept == 1
    assert "Add 'add'" in report.layer("project_bn").kept[2]
    assert_weights_equal(all_weights(pruned), all_weights(model))


def test_add_with_both_branches_constant_removes_both():
    model = _residual()
    plant_dead(model, "stem_bn", 2, beta=0.4)
    plant_dead(model, "project_bn", 2, beta=-0.3)
    pruned, report = tf_pfq.prune(model)
    assert report.num_pruned == 2
    assert pruned.get_layer("logits").kernel.shape == (5, 5)
    assert_same_outputs(model, pruned, _x((6, 6, 3)))


# -- kept with a reason ------------------------------------------------------------


def _with_after_bn(make_tail):
    inputs = keras.Input((6, 6, 3))
    x = _conv_bn_relu(inputs, 4, 1, "conv")
    model = keras.Model(inputs, make_tail(x))
    randomize_bn(model)
    plant_dead(model, "conv_bn", 1, beta=0.5)
    return model


@pytest.mark.parametrize(
    ("tail", "reason"),
    [
        (lambda x: x, "model output 'conv_relu'"),
        (lambda x: L.Softmax(name="softmax")(x), "Softmax 'softmax'"),
        (lambda x: L.LayerNormalization(name="ln")(x), "LayerNormalization 'ln'"),
    ],
)
def test_unabsorbable_constant_keeps_the_channel(tail, reason):
    model = _with_after_bn(tail)
    pruned, report = tf_pfq.prune(model)
    assert report.num_pruned == 0 and report.num_kept == 1
    assert reason in report.layer("conv_bn").kept[1]
    assert reason in str(report)
    assert_weights_equal(all_weights(pruned), all_weights(model))


def test_nested_consumer_is_flattened_and_absorbs():
    # A nested sub-model is inlined before the pass, so its Dense absorbs the constant.
    model = _with_after_bn(lambda x: keras.Sequential([L.Dense(2, name="fc")], name="inner")(x))
    pruned, report = tf_pfq.prune(model)
    assert report.num_pruned == 1 and report.num_kept == 0
    assert pruned.get_layer("fc").kernel.shape[0] == 3
    assert_same_outputs(model, pruned, _x((6, 6, 3)))


def test_shared_consumer_keeps_the_channel():
    shared = L.Dense(3, name="shared")
    model = _with_after_bn(lambda x: L.Add()([shared(x), shared(L.ReLU()(x))]))
    _, report = tf_pfq.prune(model)
    assert report.num_kept == 1 and "shared layer 'shared'" in report.layer("conv_bn").kept[1]


def test_a_layer_keeps_at_least_one_channel():
    model = _chain(consumer_bias=True, consumer_bn=False)
    for channel in range(6):
        plant_dead(model, "conv1_bn", channel, beta=0.1 * channel)
    pruned, report = tf_pfq.prune(model)
    assert pruned.get_layer("conv1").filters == 1 and report.num_kept == 1
    assert "it is the last channel of " in report.layer("conv1_bn").kept[5]
    assert_same_outputs(model, pruned, _x((8, 8, 3)))


# -- thresholds, quantized constants -----------------------------------------------


def test_threshold_float_and_callable():
    model = _chain(consumer_bias=True, consumer_bn=False)
    variance = model.get_layer("conv1_bn").moving_variance.numpy()
    limit = float(np.sort(variance)[2])  # two channels below it
    _, report = tf_pfq.prune(model, threshold=limit)
    assert report.num_dead == 2 and report.layer("conv1_bn").dead == sorted(
        np.flatnonzero(variance < limit).tolist()
    )
    _, report = tf_pfq.prune(model, threshold=lambda layer: limit if layer.name == "x" else 0.0)
    assert report.num_dead == 0


def test_quantized_activation_constant_is_used():
    model = _chain(consumer_bias=True, consumer_bn=False)
    plant_dead(model, "conv1_bn", 2, beta=0.8)
    ranges = {"conv1_relu": ActivationRange(0.0, 6.0, num_bits=2)}  # levels 0, 2, 4, 6
    kernel, bias = model.get_layer("conv2").get_weights()
    pruned, _ = tf_pfq.prune(model, activation_ranges=ranges)
    np.testing.assert_allclose(pruned.get_layer("conv2").bias.numpy(), bias, rtol=1e-6)
    setattr(model, ACTIVATION_RANGES_ATTR, {"conv1_relu": ActivationRange(0.0, 3.0, 2)})
    pruned, _ = tf_pfq.prune(model)  # from the model's attribute: 0.8 -> 1 on {0, 1, 2, 3}
    expected = bias + 1.0 * kernel[0, 0, 2, :]
    np.testing.assert_allclose(pruned.get_layer("conv2").bias.numpy(), expected, rtol=1e-6)
    assert getattr(pruned, ACTIVATION_RANGES_ATTR).keys() == {"conv1_relu"}


# -- unchanged models, errors, input untouched, serialization --------------------------


def test_model_without_bn_is_returned_unchanged():
    model = keras.Sequential(
        [keras.Input((6, 6, 3)), L.Conv2D(4, 3), L.ReLU(), L.Flatten(), L.Dense(2)]
    )
    pruned, report = tf_pfq.prune(model)
    assert report.num_dead == report.num_removed == 0 and report.exact
    assert_weights_equal(all_weights(pruned), all_weights(model))
    assert "dead BN channels: 0" in str(report)


def test_model_without_dead_channels_is_returned_unchanged():
    model = _separable()
    pruned, report = tf_pfq.prune(model, calibration_data=_x((8, 8, 3)))
    assert report.num_dead == 0 and report.params_after == report.params_before
    assert report.max_output_change == 0.0
    assert_weights_equal(all_weights(pruned), all_weights(model))


def test_input_model_is_not_modified():
    model = _separable()
    plant_dead(model, "dw_bn", 4, beta=0.9)
    plant_dead(model, "pw1_bn", 1, beta=0.3)
    weights = all_weights(model)
    config = model.get_config()
    tf_pfq.prune(model)
    assert_weights_equal(all_weights(model), weights)
    assert model.get_config() == config


def test_sequential_model_is_pruned():
    model = keras.Sequential(
        [
            keras.Input((6, 6, 3)),
            L.Conv2D(5, 3, use_bias=False, name="conv"),
            L.BatchNormalization(name="bn"),
            L.ReLU(name="relu"),
            L.MaxPooling2D(name="pool"),
            L.Flatten(name="flat"),
            L.Dense(3, name="fc"),
        ]
    )
    randomize_bn(model)
    plant_dead(model, "bn", 3, beta=0.9)
    pruned, report = tf_pfq.prune(model)
    assert report.num_pruned == 1 and pruned.get_layer("fc").kernel.shape == (2 * 2 * 4, 3)
    assert_same_outputs(model, pruned, _x((6, 6, 3)))


class _Subclassed(keras.Model):
    def call(self, x):
        return x


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="_Subclassed"):
        tf_pfq.prune(_Subclassed())
    with pytest.raises(TypeError, match="list"):
        tf_pfq.prune([1, 2])
    with pytest.raises(TypeError, match="Dense"):
        tf_pfq.prune(L.Dense(2))
    model = _chain(consumer_bias=True, consumer_bn=False)
    with pytest.raises(ValueError, match="threshold"):
        tf_pfq.prune(model, threshold=-1e-3)
    with pytest.raises(ValueError, match="conv1_bn"):
        tf_pfq.prune(model, threshold=lambda layer: -1.0)
    with pytest.raises(TypeError, match="threshold"):
        tf_pfq.prune(model, threshold="eps")


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_pruned_model_saves_and_loads(tmp_path, suffix):
    model = _separable()
    plant_dead(model, "dw_bn", 4, beta=0.9)
    plant_dead(model, "pw1_bn", 1, beta=0.3)
    pruned, _ = tf_pfq.prune(model)
    path = str(tmp_path / f"pruned{suffix}")
    pruned.save(path)
    loaded = keras.models.load_model(path)
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in pruned.layers]
    x = _x((8, 8, 3))
    np.testing.assert_array_equal(loaded(x).numpy(), pruned(x).numpy())
