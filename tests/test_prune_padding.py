"""tf_pfq.prune where removed constants meet zero padding: exact by default.

A 'same' k x k consumer (or a ZeroPadding2D before one) sees 0 at the border, not
the constant, so a bias alone is exact in the interior only (padding="approximate",
the paper's "as far as possible"). The default merges such constants into one kept
constant-carrier channel per tensor, exact at the border too; a depthwise consumer
keeps the channel. Every test compares outputs to float round-off, with the
approximation on the same net as the negative control. Constants are non-zero
(swish, beta > 0), where the border shows.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from test_prune_helpers import (
    ROUND_OFF,
    all_weights,
    assert_same_outputs,
    assert_weights_equal,
    max_change,
    plant_dead,
    randomize_bn,
)

import tf_pfq
from tf_pfq import testing
from tf_pfq.compat import keras
from tf_pfq.ranges import ActivationRange

L = keras.layers

# swish(beta) of each planted channel; channel 4 has the largest constant.
PLANTS = ((1, 0.9), (4, 2.5), (6, -0.4))


@pytest.fixture(autouse=True)
def _keras_seed():
    keras.utils.set_random_seed(0)


def _x(size, n=4, seed=1):
    # Wide inputs: some nets here end in small logits otherwise.
    return 4 * np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _stem(inputs, filters=8):
    x = L.Conv2D(filters, 1, use_bias=False, name="conv1")(inputs)
    x = L.BatchNormalization(name="conv1_bn")(x)
    return L.Activation("swish", name="conv1_act")(x)


def _head(x):
    x = L.Activation("swish", name="head_act")(x)
    return L.Dense(5, name="logits")(L.GlobalAveragePooling2D(name="pool")(x))


def _planted(build, size):
    inputs = keras.Input((size, size, 3))
    model = keras.Model(inputs, build(_stem(inputs)))
    randomize_bn(model)
    for channel, beta in PLANTS:
        plant_dead(model, "conv1_bn", channel, beta=beta)
    return model


def _negative_control(model, x):
    """The approximation on the same net: off by far more than round-off."""
    pruned, report = tf_pfq.prune(model, padding="approximate", calibration_data=x)
    assert not report.exact and report.absorption == "approximate"
    assert "interior" in str(report)
    scale = float(np.max(np.abs(model(x))))
    assert max_change(model, pruned, x) > 100 * ROUND_OFF * scale
    return pruned, report


# -- a 'same' convolution consumer ----------------------------------------------------


def _same_conv(strides=1, consumer_bn=False, size=9):
    def build(x):
        x = L.Conv2D(6, 3, strides, "same", use_bias=not consumer_bn, name="conv2")(x)
        if consumer_bn:
            x = L.BatchNormalization(name="conv2_bn")(x)
        return _head(x)

    return _planted(build, size)


@pytest.mark.parametrize(
    ("strides", "size", "consumer_bn"),
    [(1, 9, False), (2, 9, False), (2, 8, False), (1, 9, True)],  # 8 / 2: one-sided pad
)
def test_same_conv_consumer_is_exact_through_one_carrier(strides, size, consumer_bn):
    model = _same_conv(strides, consumer_bn, size)
    x = _x(size)
    pruned, report = tf_pfq.prune(model, calibration_data=x)
    assert report.exact and report.absorption == "exact"
    assert report.num_pruned == 2 and report.num_kept == 1 and report.num_carriers == 1
    # The carrier is the largest constant (every ratio <= 1), kept with the reason.
    assert list(report.layer("conv1_bn").kept) == [4]
    assert report.layer("conv1_bn").kept[4].startswith("constant carrier")
    assert pruned.get_layer("conv2").kernel.shape[2] == 6
    assert report.max_output_change <= ROUND_OFF * float(np.max(np.abs(model(x))))
    assert_same_outputs(model, pruned, x)
    if consumer_bn:
        assert_same_outputs(model, pruned, x, training=True)
    _negative_control(model, x)


def test_carrier_holds_its_constant_and_the_others_weights():
    model = _same_conv()
    pruned, _ = tf_pfq.prune(model)
    # gamma = 0 and a zero filter: the carrier is beta exactly, with zero folded weights.
    # Channels 1 and 6 went, so the carrier, channel 4, is now channel 3.
    np.testing.assert_array_equal(pruned.get_layer("conv1_bn").gamma.numpy()[3], 0.0)
    assert not np.any(pruned.get_layer("conv1").kernel.numpy()[..., 3])
    swish = {c: b / (1 + np.exp(-b)) for c, b in PLANTS}
    kernel = model.get_layer("conv2").kernel.numpy()
    expected = kernel[:, :, 4] + sum(swish[c] / swish[4] * kernel[:, :, c] for c in (1, 6))
    np.testing.assert_allclose(pruned.get_layer("conv2").kernel.numpy()[:, :, 3], expected, 1e-6)
    folded, _ = tf_pfq.fold_batchnorm(pruned)
    assert not np.any(folded.get_layer("conv1").kernel.numpy()[..., 3])
    assert_same_outputs(model, folded, _x(9))


def test_approximate_reproduces_the_interior_only_bias():
    model = _same_conv()
    pruned, report = _negative_control(model, _x(9))
    assert report.num_pruned == 3 and report.num_kept == 0
    swish = {c: b / (1 + np.exp(-b)) for c, b in PLANTS}
    kernel, bias = model.get_layer("conv2").get_weights()
    expected = bias + sum(swish[c] * kernel[:, :, c].sum(axis=(0, 1)) for c in swish)
    np.testing.assert_allclose(pruned.get_layer("conv2").bias.numpy(), expected, rtol=1e-5)
    inner = keras.Model(model.input, model.get_layer("conv2").output)
    inner_pruned = keras.Model(pruned.input, pruned.get_layer("conv2").output)
    a, b = inner(_x(9)).numpy(), inner_pruned(_x(9)).numpy()
    np.testing.assert_allclose(b[:, 1:-1, 1:-1], a[:, 1:-1, 1:-1], atol=1e-5)  # interior


# -- ZeroPadding2D, then a convolution, pooling or a Dense ----------------------------


def _zero_padded(tail):
    def build(x):
        x = L.ZeroPadding2D(((1, 0), (0, 1)), name="pad")(x)
        return tail(L.Dropout(0.2, name="drop")(x))

    return _planted(build, 9)


@pytest.mark.parametrize(
    "tail",
    [
        # ResNetV2 / EfficientNet style: pad, then a 'valid' strided conv.
        lambda x: _head(L.Conv2D(6, 3, 2, "valid", name="conv2")(x)),
        # An activation with f(0) = 0 and an average pooling keep the border a multiple.
        lambda x: _head(L.Conv2D(6, 1, name="conv2")(L.AveragePooling2D(name="avg")(L.ReLU()(x)))),
        # Global averaging of a padded map reaches a Dense.
        lambda x: L.Dense(5, name="logits")(L.GlobalAveragePooling2D(name="gap")(x)),
    ],
    ids=["strided-valid-conv", "relu-avgpool-1x1", "gap-dense"],
)
def test_zero_padding_before_a_consumer_is_exact(tail):
    model = _zero_padded(tail)
    x = _x(9)
    pruned, report = tf_pfq.prune(model)
    assert report.exact and report.num_pruned >= 1 and report.num_carriers == 1
    assert_same_outputs(model, pruned, x)
    _negative_control(model, x)


def test_zero_padding_then_an_offset_keeps_the_channel():
    # sigmoid(0) != 0: the border no longer is a multiple of the padded map.
    model = _zero_padded(lambda x: _head(L.Conv2D(6, 1, name="conv2")(L.Activation("sigmoid")(x))))
    pruned, report = tf_pfq.prune(model)
    assert report.num_pruned == 0 and report.num_kept == 3 and report.exact
    assert "zero padding in 'pad'" in report.layer("conv1_bn").kept[1]
    assert_same_outputs(model, pruned, _x(9))


def test_two_padded_branches_of_an_add_share_the_border():
    def build(x):
        a = L.ZeroPadding2D(1, name="pad")(x)
        b = L.ReLU(name="relu")(a)  # relu(0) = 0: the same map S
        return _head(L.Conv2D(6, 3, name="conv2")(L.Add(name="add")([a, b])))

    model = _planted(build, 7)
    pruned, report = tf_pfq.prune(model)
    assert report.exact and report.num_pruned == 2 and report.num_carriers == 1
    assert_same_outputs(model, pruned, _x(7))


# -- depthwise consumers: the channel stays ------------------------------------------


@pytest.mark.parametrize("zero_pad", [False, True])
def test_depthwise_consumer_keeps_nonzero_constants_and_stays_exact(zero_pad):
    def build(x):
        if zero_pad:
            x = L.ZeroPadding2D(1, name="pad")(x)
        x = L.DepthwiseConv2D(3, 2 if zero_pad else 1, "valid" if zero_pad else "same", name="dw")(
            x
        )
        return _head(L.Conv2D(6, 1, name="pw")(x))

    model = _planted(build, 9)
    x = _x(9)
    pruned, report = tf_pfq.prune(model, calibration_data=x)
    assert report.exact and report.num_carriers == 0
    for channel, _ in PLANTS:
        assert "depthwise" in report.layer("conv1_bn").kept[channel]
    assert_same_outputs(model, pruned, x)
    _negative_control(model, x)


def test_depthwise_consumer_removes_a_zero_constant():
    def build(x):
        x = L.DepthwiseConv2D(3, padding="same", name="dw")(L.ReLU(name="relu")(x))
        return _head(L.Conv2D(6, 1, name="pw")(x))

    model = _planted(build, 9)
    # relu of a negative swish is 0 exactly: channels 3 and 6 go, across the padding.
    plant_dead(model, "conv1_bn", 3, beta=-3.0)
    pruned, report = tf_pfq.prune(model)
    assert report.layer("conv1").removed == [3, 6] and report.layer("dw").removed == [3, 6]
    assert_same_outputs(model, pruned, _x(9))


# -- transposed convolutions ----------------------------------------------------------


@pytest.mark.parametrize("strides", [1, 2])
def test_transposed_conv_consumer_is_exact(strides):
    model = _planted(lambda x: _head(L.Conv2DTranspose(6, 3, strides, "same", name="up")(x)), 6)
    pruned, report = tf_pfq.prune(model)
    assert report.exact and report.num_pruned == 2 and report.num_carriers == 1
    assert_same_outputs(model, pruned, _x(6))
    _, approximate = tf_pfq.prune(model, padding="approximate")
    if strides == 2:  # periodic taps: the approximation keeps them
        assert approximate.num_pruned == 0
    else:
        assert not approximate.exact


# -- one carrier per tensor, several consumers, the rest of the pipeline ----------------


def _three_consumers():
    def build(x):
        a = L.Conv2D(4, 3, padding="same", name="a")(x)  # border: carrier
        b = L.Conv2D(4, 1, name="b")(x)  # 1x1: bias
        c = L.Conv2D(4, 3, name="c")(L.ZeroPadding2D(1, name="pad")(x))  # carrier too
        return _head(L.Concatenate(name="concat")([a, b, c]))

    return _planted(build, 8)


def test_consumers_of_one_tensor_share_the_carrier():
    model = _three_consumers()
    pruned, report = tf_pfq.prune(model)
    assert report.exact and report.num_pruned == 2 and report.num_carriers == 1
    for name in ("a", "c"):
        assert any(
            "input 4 carries the constants of inputs 1, 6" in n for n in report.layer(name).notes
        )
    assert any("bias +=" in n for n in report.layer("b").notes)
    assert_same_outputs(model, pruned, _x(8))


def test_input_model_unchanged_and_second_pass_idempotent():
    model = _three_consumers()
    weights, config = all_weights(model), model.get_config()
    pruned, _ = tf_pfq.prune(model)
    assert_weights_equal(all_weights(model), weights)
    assert model.get_config() == config
    again, report = tf_pfq.prune(pruned)
    # The carrier is dead again (gamma 0, zero filter) and carries only itself.
    assert report.num_pruned == 0 and report.num_carriers == 1 and report.exact
    assert_same_outputs(pruned, again, _x(8))


def test_channel_multiple_keeps_carriers_exact():
    model = _same_conv()
    pruned, report = tf_pfq.prune(model, channel_multiple=4)
    assert pruned.get_layer("conv1").filters % 4 == 0 and report.exact
    assert_same_outputs(model, pruned, _x(9))


@pytest.mark.slow
def test_carrier_survives_qat_fold_and_export():
    model = _three_consumers()
    images = np.random.default_rng(2).uniform(-1, 1, (40, 8, 8, 3)).astype(np.float32)
    result = testing.run_chain(model, images, bits=4, num_test=16)
    if result.error is not None:
        raise AssertionError(result.stages) from result.error
    assert result.prune["prune_exact"] and result.prune["prune_max_change"] < 1e-4
    assert result.max_weight_levels <= 16
    assert result.p99_steps <= 2.0, (result.p99_steps, result.max_steps)


def test_quantized_constants_merge_with_their_quantized_ratio():
    # A second PfQ after stage A: each constant is Q(act(beta)) on the layer's grid.
    model = _same_conv()
    grid = ActivationRange(0.0, 3.0, num_bits=2)  # levels 0, 1, 2, 3
    pruned, report = tf_pfq.prune(model, activation_ranges={"conv1_act": grid})
    swish = {c: b / (1 + np.exp(-b)) for c, b in PLANTS}
    q = {c: float(grid.quantize(np.float32(v))) for c, v in swish.items()}
    assert q == {1: 1.0, 4: 2.0, 6: 0.0}  # swish: 0.64, 2.31, -0.16
    # Channel 6 is 0 on the grid: removed, nothing to carry; 1 merges into 4 at 1 / 2.
    assert report.num_pruned == 2 and list(report.layer("conv1_bn").kept) == [4]
    kernel = model.get_layer("conv2").kernel.numpy()
    expected = kernel[:, :, 4] + q[1] / q[4] * kernel[:, :, 1]
    np.testing.assert_allclose(pruned.get_layer("conv2").kernel.numpy()[:, :, 3], expected, 1e-6)


# -- the option, its deprecated spelling, the report ----------------------------------


def test_exact_only_is_deprecated_for_padding_keep():
    model = _same_conv()
    with pytest.warns(DeprecationWarning, match="padding='keep'"):
        _, old = tf_pfq.prune(model, exact_only=True)
    _, new = tf_pfq.prune(model, padding="keep")
    assert old.to_dict() == new.to_dict()
    assert new.num_pruned == 0 and new.num_kept == 3 and new.absorption == "keep"
    assert "padding='keep'" in new.layer("conv1_bn").kept[1]
    with pytest.warns(DeprecationWarning, match="deprecated"):
        _, default = tf_pfq.prune(model, exact_only=False)
    assert default.absorption == "exact" and default.num_carriers == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tf_pfq.prune(model)  # the default does not warn


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"padding": "interior"}, ValueError, "`padding` must be one of"),
        ({"padding": None}, TypeError, "`padding` must be one of"),
        ({"padding": "approximate", "exact_only": True}, ValueError, "contradicts"),
    ],
)
def test_bad_padding_is_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        tf_pfq.prune(_same_conv(), **kwargs)


def test_report_names_the_absorption_and_the_change():
    model = _same_conv()
    x = _x(9)
    _, report = tf_pfq.prune(model, calibration_data=x)
    text = str(report)
    assert "absorption: exact (1 constant carrier past zero padding)" in text
    assert "max |output change| on calibration data" in text
    data = report.to_dict()
    assert data["absorption"] == "exact" and data["constant_carriers"] == 1
    _, report = tf_pfq.prune(model, absorb=False)
    assert report.absorption == "none" and "absorb=False" in str(report)
