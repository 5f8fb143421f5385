"""Small nets that reproduce what kept ResNet, DenseNet and NASNet from being exact.

Each test is one cause found on `benchmarks/zoo.py`'s models, measured there, and
rebuilt here at a size that runs in seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from test_prune_helpers import assert_same_outputs, plant_dead, randomize_bn

import tf_pfq
from tf_pfq import pfq_math
from tf_pfq.compat import keras
from tf_pfq.export import litert
from tf_pfq.export.summary import inspect

L = keras.layers


@pytest.fixture(autouse=True)
def _keras_seed():
    keras.utils.set_random_seed(0)


def _x(shape, n=4, seed=1):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


# -- ResNet's stem: ReLU -> ZeroPadding2D -> MaxPooling2D ------------------------------


def _stem(pool_padding="valid", pad=1, pool=3, strides=2):
    inputs = keras.Input((9, 9, 3))
    x = L.Conv2D(6, 3, padding="same", use_bias=False, name="conv1")(inputs)
    x = L.BatchNormalization(name="conv1_bn")(x)
    x = L.Activation("relu", name="conv1_relu")(x)
    x = L.ZeroPadding2D(pad, name="pool1_pad")(x)
    x = L.MaxPooling2D(pool, strides, padding=pool_padding, name="pool1")(x)
    x = L.Conv2D(5, 1, name="conv2")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, L.Dense(4, name="logits")(x))
    randomize_bn(model)
    return model


@pytest.mark.parametrize("pool_padding", ["valid", "same"])
def test_max_pooling_hides_zero_padding_of_a_positive_constant(pool_padding):
    model = _stem(pool_padding)
    plant_dead(model, "conv1_bn", 2, beta=0.7)  # relu(0.7) > 0 >= the padded zeros
    plant_dead(model, "conv1_bn", 4, beta=-0.5)  # relu: 0
    pruned, report = tf_pfq.prune(model, calibration_data=_x((9, 9, 3)), padding="keep")
    assert report.num_pruned == 2 and report.exact
    assert report.layer("conv1").removed == [2, 4]
    assert_same_outputs(model, pruned, _x((9, 9, 3)))


def test_zero_padding_without_max_pooling_stays_a_border_effect():
    # Negative control: a pad wider than the pool leaves windows of zeros only.
    model = _stem(pad=3, pool=2, strides=2)
    plant_dead(model, "conv1_bn", 2, beta=0.7)
    _, report = tf_pfq.prune(model, padding="keep")
    assert report.num_pruned == 0
    assert "zero padding in ZeroPadding2D 'pool1_pad'" in report.layer("conv1_bn").kept[2]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((112, 1, 1, 3, 2, "valid"), True),  # ResNet50's pool1
        ((4, 3, 3, 2, 2, "valid"), False),  # [0, 0] at the start
        ((4, 1, 1, 2, 2, "same"), True),
        ((4, 0, 2, 1, 1, "valid"), False),  # a 1-wide window on the padding
    ],
)
def test_windows_hold_real(args, expected):
    assert pfq_math.windows_hold_real(*args) is expected


# -- NASNet: AveragePooling2D(padding='same') ------------------------------------------


@pytest.mark.parametrize(
    ("size", "pool", "strides"),
    [(7, 3, 1), (8, 3, 2), (7, 3, 2), (5, 2, 1), (6, 1, 2), (9, 4, 3), (2, 3, 1)],
)
def test_same_average_pooling_lowering_counts_real_positions(size, pool, strides):
    from tf_pfq.export.convert import Export

    x = tf.constant(_x((size, size + 1, 3)))
    config = {"pool_size": (pool, pool), "strides": (strides, strides), "padding": "same"}
    lowered = Export().average_pool("pool", x, config)
    expected = tf.nn.avg_pool2d(x, pool, strides, "SAME")
    np.testing.assert_allclose(lowered.numpy(), expected.numpy(), atol=1e-6)


def _nasnet_like():
    inputs = keras.Input((11, 11, 3))
    x = L.Conv2D(8, 3, padding="same", name="stem")(inputs)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.Activation("relu", name="stem_relu")(x)
    a = L.AveragePooling2D(3, strides=1, padding="same", name="avg_s1")(x)
    b = L.Conv2D(8, 1, name="side")(x)
    x = L.Add(name="add")([a, b])
    x = L.AveragePooling2D(3, strides=2, padding="same", name="avg_s2")(x)
    x = L.Activation("relu", name="relu")(x)
    x = L.Conv2D(8, 3, name="conv")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, L.Dense(10, name="logits")(x))


def test_same_average_pooling_exports_within_half_a_step():
    from test_export_layers import fidelity

    p99, worst, agreement, tflite = fidelity(_nasnet_like)
    assert worst <= 0.5 + 1e-3, (p99, worst)
    assert agreement == 1.0
    assert "AVERAGE_POOL_2D" not in _ops(tflite)


def _ops(tflite):
    return [op.op for op in inspect(tflite).ops]


# -- NASNet's adjust path: ReLU -> ZeroPadding2D -> Cropping2D -> pooling -------------


def test_constant_channel_crosses_cropping():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 1, use_bias=False, name="conv1")(inputs)
    x = L.BatchNormalization(name="conv1_bn")(x)
    x = L.Activation("relu", name="relu")(x)
    x = L.ZeroPadding2D(((0, 1), (0, 1)), name="pad")(x)
    x = L.Cropping2D(((1, 0), (1, 0)), name="crop")(x)
    x = L.AveragePooling2D(1, strides=2, name="avg")(x)
    x = L.Conv2D(5, 1, name="conv2")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, L.Dense(4, name="logits")(x))
    randomize_bn(model)
    plant_dead(model, "conv1_bn", 1, beta=-0.6)  # relu: 0, exact across the padding
    plant_dead(model, "conv1_bn", 3, beta=0.6)  # the padded row/column: kept
    pruned, report = tf_pfq.prune(model, padding="keep")
    assert report.layer("conv1").removed == [1]
    assert "zero padding in ZeroPadding2D 'pad'" in report.layer("conv1_bn").kept[3]
    assert report.exact
    assert_same_outputs(model, pruned, _x((8, 8, 3)))
    # The approximation removes the positive one too, a border effect the report names.
    _, report = tf_pfq.prune(model, padding="approximate")
    assert report.layer("conv1").removed == [1, 3] and not report.exact
    # The default keeps it as a constant carrier into conv2, exact.
    pruned, report = tf_pfq.prune(model)
    assert report.layer("conv1").removed == [1] and report.num_carriers == 1
    assert_same_outputs(model, pruned, _x((8, 8, 3)))


# -- ResNet50: a weight on an exact rounding tie ---------------------------------------


def test_export_uses_the_qat_kernel_bit_for_bit():
    # Measured on ResNet50's conv2_block2_3_conv: -0.2587003 sits 4.5 steps above the
    # nudged minimum of [-0.56367046, 0.54504496]. TF's fake-quant on the raw range
    # (QAT) rounds it down, on the nudged range (the exporter's grid) up: one weight
    # a step off, and 88 % top-1 agreement after 50 more 4-bit layers.
    from tf_pfq.export import convert
    from tf_pfq.quantizers import PfqWeightQuantizer, quantize_weight

    values = np.array([-0.56367046, 0.54504496, -0.2587003], np.float32).reshape(1, 1, 3, 1)
    grid = PfqWeightQuantizer(4).params(values)
    tie = np.abs(quantize_weight(values, 4).numpy() - convert._weight_values(values, grid))
    assert tie.max() == pytest.approx(float(grid.scale), rel=1e-5)  # the cause, still there

    inputs = keras.Input((4, 4, 3))
    model = keras.Model(inputs, L.Conv2D(1, 1, name="conv")(inputs))
    model.get_layer("conv").set_weights([values, np.zeros(1, np.float32)])
    qat = tf_pfq.apply(model, activation_bits=4, weight_bits=4)
    x = np.random.default_rng(0).uniform(0, 1, (8, 4, 4, 3)).astype(np.float32)
    qat(x, training=True)
    plan = convert.plan_from_qat(qat)
    np.testing.assert_array_equal(
        plan.layers["conv"].kernel_values, quantize_weight(values, 4).numpy()
    )
    np.testing.assert_allclose(convert.simulate(plan, x), qat.predict(x, verbose=0), atol=1e-6)
    out = litert.predict(litert.make_interpreter(tf_pfq.export.to_tflite(qat)), x)
    step = inspect(tf_pfq.export.to_tflite(qat)).outputs[0].scales[0]
    assert np.abs(out - qat.predict(x, verbose=0)).max() <= 0.5 * step + 1e-6


# -- ResNet50 / DenseNet121 at 32x32: 'same' 3x3 convs on 1x1 maps -------------------


@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize(("size", "exact"), [((1, 1), True), ((1, 4), False), ((2, 2), False)])
def test_same_conv_on_a_one_wide_axis_reads_one_tap(depthwise, size, exact):
    # Along an axis of size 1 every window has the image in its centre tap, so the
    # constant adds the same everywhere; a 2-wide axis still has a border effect.
    inputs = keras.Input((*size, 3))
    x = L.Conv2D(6, 1, use_bias=False, name="conv1")(inputs)
    x = L.BatchNormalization(name="conv1_bn")(x)
    x = L.Activation("relu", name="relu")(x)
    if depthwise:
        x = L.DepthwiseConv2D(3, padding="same", name="conv2")(x)
        x = L.Conv2D(4, 1, name="conv3")(x)
    else:
        x = L.Conv2D(5, 3, padding="same", name="conv2")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, L.Dense(4, name="logits")(x))
    randomize_bn(model)
    plant_dead(model, "conv1_bn", 2, beta=0.9)
    x = 4.0 * _x((*size, 3), n=16)
    pruned, report = tf_pfq.prune(model, padding="approximate", calibration_data=x)
    assert report.layer("conv1").removed == [2]
    assert report.exact is exact
    if exact:
        assert_same_outputs(model, pruned, x)
    else:
        assert report.max_output_change > 1e-3
    pruned, report = tf_pfq.prune(model)  # the default keeps the border exact
    assert report.exact and report.layer("conv1").removed == ([2] if exact else [])
    assert_same_outputs(model, pruned, x)


# -- DenseNet: a max pooling read by a pre-activation BN and by a Concatenate ---------


def _densenet_like():
    inputs = keras.Input((12, 12, 3))
    x = L.Conv2D(8, 3, padding="same", name="conv1")(inputs)
    x = L.BatchNormalization(name="conv1_bn")(x)
    x = L.Activation("relu", name="conv1_relu")(x)
    x = L.ZeroPadding2D(1, name="pad")(x)
    x = L.MaxPooling2D(3, strides=2, name="pool1")(x)
    y = L.BatchNormalization(name="block_0_bn")(x)  # pre-activation: a 1x1 affine
    y = L.Activation("relu", name="block_0_relu")(y)
    y = L.Conv2D(8, 1, name="block_1_conv")(y)
    y = L.BatchNormalization(name="block_1_bn")(y)
    y = L.Activation("relu", name="block_1_relu")(y)
    y = L.Conv2D(4, 3, padding="same", name="block_2_conv")(y)  # signed
    x = L.Concatenate(name="concat")([x, y])
    x = L.BatchNormalization(name="final_bn")(x)
    x = L.Activation("relu", name="final_relu")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, L.Dense(10, name="logits")(x))


def test_concat_input_requantized_on_its_own_edge():
    from test_export_layers import fidelity

    p99, worst, agreement, _ = fidelity(_densenet_like)
    assert worst <= 1.0, (p99, worst, agreement)


# -- NASNet: a ReLU layer that requantizes a shared 8-bit Add output to 4 bits --------


def _shared_add_relu():
    inputs = keras.Input((10, 10, 3))
    x = L.Conv2D(16, 3, padding="same", name="stem")(inputs)
    a = L.Conv2D(16, 1, name="a")(x)
    b = L.Conv2D(16, 1, name="b")(x)
    s = L.Add(name="add")([a, b])  # two readers: its own 8-bit grid
    r = L.Activation("relu", name="relu")(s)  # 8-bit -> 4-bit
    r = L.Conv2D(16, 3, padding="same", name="c")(r)
    x = L.Add(name="add2")([r, L.Conv2D(16, 1, name="d")(s)])
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, L.Dense(10, name="logits")(x))


def test_requantizing_relu_rounds_like_qat():
    from test_export_layers import fidelity

    p99, worst, agreement, _ = fidelity(_shared_add_relu)
    assert worst <= 1.0, (p99, worst, agreement)


# -- DenseNet169 at 75x75: a signed Concatenate whose inputs sit on other grids --------


def _signed_concat():
    # A transition's linear 1x1 conv and average pooling (signed, read by two layers:
    # its own grid) concatenated with a linear conv (signed, on the concat's grid).
    inputs = keras.Input((9, 9, 3))
    x = L.Conv2D(12, 3, padding="same", name="stem")(inputs)
    x = L.AveragePooling2D(2, name="pool")(L.Conv2D(12, 1, name="transition")(x))
    y = L.BatchNormalization(name="pre_bn")(x)  # DenseNet's pre-activation BN
    y = L.Conv2D(16, 1, name="bottleneck")(L.Activation("relu", name="r")(y))
    y = L.BatchNormalization(name="bottleneck_bn")(y)
    y = L.Activation("relu", name="r2")(y)
    y = L.Conv2D(8, 3, padding="same", use_bias=False, name="grow")(y)
    x = L.Concatenate(name="concat")([x, y])
    x = L.Conv2D(16, 1, name="mix")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, L.Dense(10, name="logits")(x))


@pytest.mark.parametrize("seed", [0, 1])
def test_signed_concat_is_exact_and_concatenates_on_its_grid(seed):
    from test_export_layers import fidelity

    p99, worst, agreement, tflite = fidelity(_signed_concat, seed=seed)
    ops = [op.op for op in inspect(tflite).ops]
    after = ops[ops.index("CONCATENATION") + 1 :]
    # No requantization of the concatenated tensor: it is already on the concat's grid.
    assert not after or after[0] != "QUANTIZE", ops
    assert worst <= 1.0, (p99, worst, agreement)
