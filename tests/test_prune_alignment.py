"""tf_pfq.prune(..., channel_multiple=k): channel counts left as multiples of k, exactly.

Each test checks the counts, that the pruned model still equals the input model
(alignment only keeps dead channels, it changes no compensation), and the report's
alignment reasons; the chain test also has the unaligned run as the control.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_prune_helpers import assert_same_outputs, plant_dead, randomize_bn

import tf_pfq
from tf_pfq import models
from tf_pfq.compat import keras

L = keras.layers


@pytest.fixture(autouse=True)
def _keras_seed():
    keras.utils.set_random_seed(0)


def _x(shape, n=4, seed=1):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def _conv_bn_relu(x, filters, kernel, name):
    x = L.Conv2D(filters, kernel, padding="same", use_bias=False, name=name)(x)
    x = L.BatchNormalization(name=f"{name}_bn")(x)
    return L.ReLU(6.0, name=f"{name}_relu")(x)


def _head(x):
    return L.Dense(5, name="logits")(L.GlobalAveragePooling2D(name="pool")(x))


def _chain(filters=20, dead=(2, 5, 11, 17, 18)):
    inputs = keras.Input((6, 6, 3))
    x = _conv_bn_relu(inputs, filters, 3, "conv1")
    x = L.Conv2D(7, 1, name="conv2")(x)  # 1x1 with a bias: exact absorption
    model = keras.Model(inputs, _head(L.ReLU(name="conv2_relu")(x)))
    randomize_bn(model)
    for channel in dead:
        plant_dead(model, "conv1_bn", channel, beta=0.7)
    return model


def _alignment_reasons(report, bn):
    return {c: why for c, why in report.layer(bn).kept.items() if "channel alignment" in why}


def test_chain_keeps_the_fewest_dead_channels_for_a_multiple():
    model = _chain()
    x = _x((6, 6, 3))
    unaligned, plain = tf_pfq.prune(model)
    assert unaligned.get_layer("conv1").filters == 15 and plain.num_kept == 0  # control
    pruned, report = tf_pfq.prune(model, channel_multiple=8)
    assert pruned.get_layer("conv1").filters == 16
    assert pruned.get_layer("conv2").kernel.shape == (1, 1, 16, 7)
    assert report.num_pruned == 4 and report.num_kept == 1 and report.exact
    # The highest-indexed dead channel stays, with the reason, grouped in the text.
    reason = "channel alignment: 16 of 20 channels stay, a multiple of channel_multiple=8"
    assert report.layer("conv1_bn").kept == {18: reason}
    assert f"kept 1 [18]: {reason}" in str(report)
    assert report.layer("conv1").removed == [2, 5, 11, 17]
    assert_same_outputs(model, pruned, x)
    assert_same_outputs(unaligned, pruned, x)


@pytest.mark.parametrize(("multiple", "filters"), [(4, 16), (5, 15), (3, 15), (1, 15)])
def test_chain_other_multiples(multiple, filters):
    model = _chain()
    pruned, report = tf_pfq.prune(model, channel_multiple=multiple)
    assert pruned.get_layer("conv1").filters == filters
    assert report.num_kept == filters - 15  # 15 is already a multiple of 5, 3 and 1
    assert_same_outputs(model, pruned, _x((6, 6, 3)))


def test_not_enough_channels_leaves_the_layer_as_pruned():
    # 12 - 3 = 9 channels; the next multiple of 8 is 16 > 12, which no keep reaches.
    model = _chain(filters=12, dead=(0, 4, 7))
    pruned, report = tf_pfq.prune(model, channel_multiple=8)
    assert pruned.get_layer("conv1").filters == 9 and report.num_kept == 0


def _separable():
    """pw -> BN -> ReLU -> dw -> BN -> ReLU -> pw2: pw and dw lose the same channels."""
    inputs = keras.Input((6, 6, 3))
    x = _conv_bn_relu(inputs, 20, 1, "pw")
    x = L.DepthwiseConv2D(3, padding="valid", use_bias=False, name="dw")(x)
    x = L.BatchNormalization(name="dw_bn")(x)
    x = L.ReLU(6.0, name="dw_relu")(x)
    x = _conv_bn_relu(x, 12, 1, "pw2")
    model = keras.Model(inputs, _head(x))
    randomize_bn(model)
    for channel in (1, 2, 3):
        plant_dead(model, "pw_bn", channel, beta=0.5)
    for channel in (7, 9):
        plant_dead(model, "dw_bn", channel, beta=0.3)
    return model


@pytest.mark.parametrize("training", [False, True])
def test_depthwise_pass_through_is_aligned_as_one_group(training):
    model = _separable()
    pruned, report = tf_pfq.prune(model, channel_multiple=8)
    # Without alignment both lose 1, 2, 3, 7, 9 (15 left); one channel back gives 16
    # in both, not 16 in one and 17 in the other.
    assert pruned.get_layer("pw").filters == 16
    assert pruned.get_layer("dw").depthwise_kernel.shape[2] == 16
    assert pruned.get_layer("pw2").kernel.shape[2] == 16
    assert report.layer("pw").removed == report.layer("dw").removed == [1, 2, 3, 7]
    assert set(_alignment_reasons(report, "dw_bn")) == {9}
    assert "16 of 20 channels stay" in report.layer("dw_bn").kept[9]
    assert report.num_kept == 1
    assert_same_outputs(model, pruned, _x((6, 6, 3)), training=training)


def _residual():
    inputs = keras.Input((6, 6, 3))
    s = _conv_bn_relu(inputs, 20, 3, "stem")
    r = _conv_bn_relu(s, 8, 1, "branch")
    r = L.Conv2D(20, 1, use_bias=False, name="project")(r)
    r = L.BatchNormalization(name="project_bn")(r)
    x = L.ReLU(name="add_relu")(L.Add(name="add")([s, r]))
    model = keras.Model(inputs, _head(x))
    randomize_bn(model)
    for channel in (0, 6, 10, 13, 19):
        plant_dead(model, "stem_bn", channel, beta=0.4)
        plant_dead(model, "project_bn", channel, beta=-0.2)
    return model


def test_add_branches_are_aligned_together():
    model = _residual()
    pruned, report = tf_pfq.prune(model, channel_multiple=8)
    assert pruned.get_layer("stem").filters == pruned.get_layer("project").filters == 16
    assert pruned.get_layer("logits").kernel.shape == (16, 5)
    assert set(_alignment_reasons(report, "stem_bn")) == {19}
    assert set(_alignment_reasons(report, "project_bn")) == {19}
    assert report.num_pruned == 8 and report.num_kept == 2
    assert_same_outputs(model, pruned, _x((6, 6, 3)))


def test_concatenate_inputs_are_aligned_one_by_one():
    inputs = keras.Input((6, 6, 3))
    a = _conv_bn_relu(inputs, 10, 3, "a")
    b = _conv_bn_relu(inputs, 12, 3, "b")
    x = L.Conv2D(6, 1, name="mix")(L.Concatenate(name="concat")([a, b]))
    model = keras.Model(inputs, _head(x))
    randomize_bn(model)
    for channel in (1, 4, 8):
        plant_dead(model, "a_bn", channel, beta=0.6)
    for channel in (0, 5):
        plant_dead(model, "b_bn", channel, beta=-0.1)
    pruned, report = tf_pfq.prune(model, channel_multiple=4)
    assert pruned.get_layer("a").filters == 8 and pruned.get_layer("b").filters == 12
    assert pruned.get_layer("mix").kernel.shape[2] == 20  # a sum of multiples of 4
    assert set(_alignment_reasons(report, "a_bn")) == {8}
    assert set(_alignment_reasons(report, "b_bn")) == {0, 5}
    assert_same_outputs(model, pruned, _x((6, 6, 3)))


def test_mobilenet_v2_every_pruned_layer_is_a_multiple():
    model = models.mobilenet_v2(
        input_shape=(16, 16, 3), stem=16, blocks=((16, 1, 1), (24, 2, 4), (24, 1, 4)), last=40
    )
    randomize_bn(model, _x((16, 16, 3), n=8, seed=2))
    rng = np.random.default_rng(3)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization) and not layer.name.endswith("project_bn"):
            channels = layer.moving_variance.shape[0]
            for channel in rng.choice(channels, channels // 4, replace=False):
                plant_dead(model, layer.name, int(channel), beta=-0.5)
    plain_model, plain = tf_pfq.prune(model)
    pruned, report = tf_pfq.prune(model, channel_multiple=8)
    checked = 0
    for row in report.layers:
        if row.class_name == "BatchNormalization" or not row.removed:
            continue
        before, after = row.channels_before, row.channels_after
        assert after % 8 == 0 or -(-after // 8) * 8 > before, (row.name, before, after)
        checked += 1
    assert checked >= 4
    for row in report.bn_layers:  # tied layers (expand, dw) share one reason per row
        assert len({why for why in row.kept.values() if "alignment" in why}) <= 1, row.name
    assert 0 < report.num_pruned < plain.num_pruned
    assert report.macs_after >= plain.macs_after
    x = _x((16, 16, 3), seed=4)
    assert_same_outputs(model, pruned, x)
    assert_same_outputs(plain_model, pruned, x)


@pytest.mark.parametrize("bad", [0, -8])
def test_channel_multiple_below_one_is_a_value_error(bad):
    with pytest.raises(ValueError, match=rf"`channel_multiple` must be >= 1.*={bad}"):
        tf_pfq.prune(_chain(), channel_multiple=bad)


@pytest.mark.parametrize("bad", [2.5, True, "8"])
def test_channel_multiple_of_the_wrong_type_is_a_type_error(bad):
    with pytest.raises(TypeError, match="`channel_multiple` must be None or an integer"):
        tf_pfq.prune(_chain(), channel_multiple=bad)
