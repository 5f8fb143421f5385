"""tf_pfq.prune on models written with op layers (`x + 3.0`, `tf.nn.relu6`, slicing).

MobileNetV3 builds hard-swish as `x * relu6(x + 3) / 6` from op layers and a
Multiply; its squeeze-excite blocks multiply by a per-image scale. Small inputs,
untrained weights, planted dead channels (see test_prune_helpers.plant_dead).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from test_prune_helpers import ROUND_OFF, assert_same_outputs, max_change, plant_dead, randomize_bn

import tf_pfq
import tf_pfq.layers
from tf_pfq.compat import keras
from tf_pfq.graph import LayerGraph, rebuild

L = keras.layers


@pytest.fixture(autouse=True)
def _keras_seed():
    keras.utils.set_random_seed(0)


def _images(seed: int, n: int = 4, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def _mobilenet_v3_small():
    model = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3),
        weights=None,
        minimalistic=False,
        classifier_activation=None,
        include_preprocessing=False,
    )
    randomize_bn(model, _images(4))
    return model


def test_graph_reads_op_layer_calls():
    x = keras.Input((4, 4, 3), name="x")
    a = L.Conv2D(4, 1, name="a")(x)
    b = L.Conv2D(4, 1, name="b")(x)
    y = tf.math.multiply(a, b)  # the second tensor is stored in the call's kwargs
    model = keras.Model(x, [tf.nn.relu6(a + 3.0) / 6.0, y[..., :2]])
    graph = LayerGraph(model)
    # Op layers are named by a per-process counter ("tf.math.multiply_3" when other
    # tests ran first in the same worker), so the name is read from the model.
    (mul,) = [layer.name for layer in model.layers if layer.name.startswith("tf.math.multiply")]
    assert graph.inputs_of(mul) == ["a", "b"]
    assert sorted(graph.consumers_of("b")) == [mul]
    rebuilt = rebuild(model)
    data = _images(0, 2, 4)
    for before, after in zip(model(data), rebuilt(data)):
        np.testing.assert_array_equal(before, after)


def test_mobilenet_v3_small_exact_cases():
    model = _mobilenet_v3_small()
    # Residual Add with the same constant channel on both branches, then a 1x1 expand.
    plant_dead(model, "expanded_conv_1/project/BatchNorm", 3, beta=0.4)
    plant_dead(model, "expanded_conv_2/project/BatchNorm", 3, beta=-0.2)
    # Hard-swish (op layers + Multiply of two constants), pooling, then Conv_2's bias.
    plant_dead(model, "Conv_1/BatchNorm", 5, beta=0.7)
    # Reaches a squeeze-excite Multiply whose other input is live: kept.
    plant_dead(model, "expanded_conv_3/depthwise/BatchNorm", 1, beta=0.5)
    pruned, report = tf_pfq.prune(model, padding="keep")
    assert report.num_dead == 4 and report.num_pruned == 3 and report.exact
    assert report.layer("expanded_conv_3/expand").notes  # absorbed into the mean shift
    assert report.layer("Conv_1").removed == [5]
    kept = report.layer("expanded_conv_3/depthwise/BatchNorm").kept
    assert list(kept) == [1] and "squeeze_excite" in kept[1]
    assert_same_outputs(model, pruned, _images(1))


def test_mobilenet_v3_small_negative_control():
    # The same plant with a live producer filter is not a constant channel: pruning it
    # (forced by a threshold) must change the outputs, or the test above proves nothing.
    model = _mobilenet_v3_small()
    bn = model.get_layer("Conv_1/BatchNorm")
    threshold = float(bn.moving_variance.numpy()[5]) * 1.0001
    variance = bn.moving_variance.numpy()
    variance[variance < threshold] = threshold  # only channel 5 sits at the limit
    variance[5] = threshold / 2
    bn.moving_variance.assign(variance)
    pruned, report = tf_pfq.prune(
        model, threshold=lambda layer: threshold if layer.name == bn.name else 0.0
    )
    assert report.num_pruned == 1 and report.layer("Conv_1").removed == [5]
    data = _images(1)
    scale = float(np.max(np.abs(model(data))))
    assert max_change(model, pruned, data) > 100 * ROUND_OFF * scale


def test_unknown_op_keeps_channel_with_reason():
    x = keras.Input((6, 6, 3))
    h = L.Conv2D(4, 1, use_bias=False, name="conv")(x)
    h = L.BatchNormalization(name="bn")(h)
    h = tf.math.reduce_max(h, axis=-1, keepdims=True)  # mixes channels: not modelled
    model = keras.Model(x, L.Conv2D(2, 1, name="head")(h))
    randomize_bn(model)
    plant_dead(model, "bn", 2, beta=0.3)
    pruned, report = tf_pfq.prune(model)
    assert report.num_pruned == 0 and report.num_kept == 1
    assert "math.reduce_max" in report.layer("bn").kept[2]
    assert_same_outputs(model, pruned, _images(0, 2, 6))


def test_scalar_ops_pass_constants():
    x = keras.Input((6, 6, 3))
    h = L.Conv2D(4, 1, use_bias=False, name="conv")(x)
    h = L.BatchNormalization(name="bn")(h)
    h = tf.nn.relu6(h * 2.0 + 3.0) / 6.0 - 0.25
    model = keras.Model(x, L.Conv2D(2, 1, use_bias=False, name="head")(h))
    randomize_bn(model)
    plant_dead(model, "bn", 1, beta=0.6)
    pruned, report = tf_pfq.prune(model)
    assert report.num_pruned == 1 and report.exact
    assert pruned.get_layer("conv").filters == 3
    assert_same_outputs(model, pruned, _images(0, 2, 6))


def _decoder(stride: int):
    x = keras.Input((6, 6, 3))
    h = L.Conv2D(6, 1, use_bias=False, name="enc")(x)
    h = L.BatchNormalization(name="enc_bn")(h)
    h = L.ReLU(name="enc_relu")(h)
    h = L.Conv2DTranspose(5, 3, strides=stride, padding="same", use_bias=False, name="up")(h)
    h = L.BatchNormalization(name="up_bn")(h)
    h = L.ReLU(name="up_relu")(h)
    model = keras.Model(x, L.Conv2D(2, 1, name="head")(h))
    randomize_bn(model, _images(2, 4, 6))
    return model


def test_conv2d_transpose_producer_and_zero_constant_consumer():
    model = _decoder(stride=2)
    plant_dead(model, "up_bn", 3, beta=0.4)  # producer: filter 3 goes, head's bias absorbs
    plant_dead(model, "enc_bn", 1, beta=-0.5)  # relu(-0.5) = 0 into a stride-2 transpose
    pruned, report = tf_pfq.prune(model)
    assert report.num_pruned == 2 and report.exact
    assert pruned.get_layer("up").filters == 4 and pruned.get_layer("enc").filters == 5
    assert_same_outputs(model, pruned, _images(3, 2, 6))


def test_conv2d_transpose_constant_consumer():
    # Stride 2 with a non-zero constant: each output phase sees other taps. The
    # approximation keeps it; the default's carrier (here the channel itself) is exact.
    model = _decoder(stride=2)
    plant_dead(model, "enc_bn", 1, beta=0.5)
    _, report = tf_pfq.prune(model, padding="approximate")
    assert report.num_kept == 1 and "stride > 1" in report.layer("enc_bn").kept[1]
    plant_dead(model, "enc_bn", 4, beta=0.3)
    pruned, report = tf_pfq.prune(model)
    assert report.num_pruned == 1 and report.num_carriers == 1 and report.exact
    assert_same_outputs(model, pruned, _images(3, 2, 6))
    # Stride 1: exact in the interior, so inexact overall; padding="keep" keeps it.
    model = _decoder(stride=1)
    plant_dead(model, "enc_bn", 1, beta=0.5)
    data = _images(3, 2, 6)
    pruned, report = tf_pfq.prune(model, padding="approximate", calibration_data=data)
    assert report.num_pruned == 1 and not report.exact
    before, after = model(data).numpy(), pruned(data).numpy()
    inner = np.abs(before - after)[:, 1:-1, 1:-1]
    assert inner.max() <= ROUND_OFF * np.abs(before).max()  # interior exact
    assert report.max_output_change > 100 * ROUND_OFF * np.abs(before).max()  # border not
    _, report = tf_pfq.prune(model, padding="keep")
    assert report.num_pruned == 0 and report.num_kept == 1


def test_report_groups_kept_channels_by_reason():
    # Eight dead channels meet an Add whose other branch is live: one line for all.
    x = keras.Input((4, 4, 3))
    h = L.Conv2D(12, 1, use_bias=False, name="conv")(x)
    h = L.BatchNormalization(name="bn")(h)
    h = L.Add(name="add")([h, L.Conv2D(12, 1, name="side")(x)])
    model = keras.Model(x, L.Conv2D(2, 1, name="head")(h))
    randomize_bn(model)
    for channel in [0, 1, 2, 3, 5, 7, 8, 9]:
        plant_dead(model, "bn", channel, beta=0.3)
    _, report = tf_pfq.prune(model)
    assert report.num_kept == 8
    lines = [line for line in str(report).splitlines() if "kept 8 [" in line]
    assert len(lines) == 1 and "[0-3, 5, 7-9]" in lines[0] and "'add'" in lines[0]
    assert str(report).count("live channel") == 1


def _separable_net():
    x = keras.Input((8, 8, 3))
    h = L.SeparableConv2D(
        6, 3, strides=2, padding="same", depth_multiplier=2, activation="relu", name="sep1"
    )(x)
    h = L.SeparableConv2D(5, 3, padding="valid", use_bias=False, name="sep2")(h)
    h = L.BatchNormalization(name="sep2_bn")(h)
    h = L.ReLU()(h)
    h = L.GlobalAveragePooling2D()(h)
    model = keras.Model(x, L.Dense(3, name="fc")(h))
    randomize_bn(model, _images(2, 4, 8))
    return model


def test_split_separable_is_exact_and_leaves_input_alone():
    model = _separable_net()
    split = tf_pfq.layers.split_separable(model)
    classes = {layer.name: type(layer).__name__ for layer in split.layers}
    assert classes["sep1_depthwise"] == "DepthwiseConv2D" and classes["sep1"] == "Conv2D"
    assert split.get_layer("sep1").activation.__name__ == "relu"
    assert isinstance(model.get_layer("sep1"), L.SeparableConv2D)  # not modified
    data = _images(5, 2, 8)
    assert_same_outputs(model, split, data)
    assert np.ptp(model(data).numpy(), axis=0).max() > 0.01  # the output depends on x


def test_prune_and_fold_split_separable_first():
    model = _separable_net()
    plant_dead(model, "sep2_bn", 2, beta=0.4)
    pruned, report = tf_pfq.prune(model)
    assert report.num_pruned == 1 and pruned.get_layer("sep2").filters == 4
    data = _images(5, 2, 8)
    assert_same_outputs(model, pruned, data)
    folded, fold_report = tf_pfq.fold_batchnorm(model)
    assert fold_report.folded == {"sep2_bn": "sep2"}
    assert_same_outputs(model, folded, data)
