"""Stage W's weighted layers accumulate integers (`tf_pfq.wrapper.PfqQuantizeWrapper`).

The integer file sums `x_int * w_int` exactly; QAT must compute the same sum, or a
value near a rounding tie comes out one step apart and later layers grow the step.
These tests hold the wrapper to the exact integer result, to tfmot's float wrapper
(equal values up to float noise, equal gradients), and check that it saves, loads and
steps aside where its input is not on a grid.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot

import tf_pfq
from tf_pfq.compat import keras
from tf_pfq.export import litert
from tf_pfq.quantizers import activation_step, nudge
from tf_pfq.wrapper import PfqQuantizeWrapper, add_sources, integer_source

L = keras.layers


def _wide_net(dropout: bool = False, depthwise: bool = False):
    # 3x3 taps over 192 channels: 1728 products per output, enough for float32
    # partial sums to carry rounding noise.
    inputs = keras.Input((6, 6, 8), name="image")
    x = L.Conv2D(192, 1, activation="relu", name="expand")(inputs)
    if dropout:
        x = L.Dropout(0.25, name="drop")(x)
    if depthwise:
        x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = L.Conv2D(16, 3, name="wide")(x)
    return keras.Model(inputs, x)


def _stage_w(model, bits: int = 4, per_channel: bool = True, seed: int = 0):
    keras.utils.set_random_seed(seed)
    qat = tf_pfq.apply(
        model, activation_bits=bits, weight_bits=bits, per_channel_weights=per_channel
    )
    images = np.random.default_rng(seed).normal(0, 1, (8, 6, 6, 8)).astype(np.float32)
    qat(images, training=True)  # the moving-average ranges
    return qat, images


def _with_tfmot_wrappers(qat):
    """The same QAT model computed by tfmot's float `QuantizeWrapperV2`."""

    def clone(layer):
        if isinstance(layer, PfqQuantizeWrapper):
            return tfmot.quantization.keras.QuantizeWrapperV2.from_config(layer.get_config())
        return type(layer).from_config(layer.get_config())

    with tf_pfq.quantize_scope():
        other = keras.models.clone_model(qat, clone_function=clone)
    other.set_weights(qat.get_weights())
    return other


def _integer_reference(qat, images, name: str) -> np.ndarray:
    """`float32(sum x_int * w_int + b_int) * float32(s_in * s_w)`, summed in float64."""
    wrapper = qat.get_layer(f"quant_{name}")
    quantizer, _ = integer_source(wrapper)
    feeding = qat.get_layer(wrapper.inbound_nodes[0].inbound_layers.name)
    x = keras.Model(qat.input, feeding.output)(images).numpy()
    s_in = activation_step(quantizer).numpy()
    kernel = wrapper._weight_vars[0][0]
    config = wrapper.quantize_config
    s_w = config.weight_quantizer.scale(kernel).numpy()
    w_q = config.weight_quantizer(kernel, training=False, weights={}).numpy()
    x_int = np.round(x / s_in).astype(np.float64)
    w_int = np.round(w_q / s_w).astype(np.float64)
    assert np.max(np.abs(x_int * s_in - x)) < 1e-5 * max(1.0, np.abs(x).max())
    acc = tf.nn.conv2d(x_int, w_int, 1, "VALID").numpy()
    bias = wrapper.layer.bias.numpy().astype(np.float64)
    b_int = np.round(bias / (np.float64(s_in) * s_w))
    return (acc + b_int).astype(np.float32) * np.float32(s_in * s_w)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wide_conv_equals_the_integer_sum_bit_for_bit(per_channel, seed):
    qat, images = _stage_w(_wide_net(), per_channel=per_channel, seed=seed)
    assert integer_source(qat.get_layer("quant_wide")) is not None
    out = qat(images, training=False).numpy()  # the last layer: no output quantizer
    np.testing.assert_array_equal(out, _integer_reference(qat, images, "wide"))


@pytest.mark.parametrize("depthwise", [False, True])
def test_values_and_gradients_match_tfmot_float_wrapper(depthwise):
    qat, images = _stage_w(_wide_net(depthwise=depthwise))
    reference = _with_tfmot_wrappers(qat)
    assert not any(isinstance(layer, PfqQuantizeWrapper) for layer in reference.layers)
    out, ref = qat(images, training=False).numpy(), reference(images, training=False).numpy()
    # Equal up to float noise; where the noise crosses a rounding tie of an inner
    # activation the two differ by that activation's step times a weight, so compare
    # in bulk: almost all values equal, every value close.
    assert np.mean(np.abs(out - ref) <= 1e-4 * np.abs(ref).max()) >= 0.97
    # A loss linear in the output, so that both get the same upstream gradient.
    direction = tf.constant(np.random.default_rng(1).normal(size=out.shape), tf.float32)
    grads = []
    for model in (qat, reference):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(images, training=True) * direction)
        grads.append(tape.gradient(loss, model.trainable_weights))
    for name, a, b in zip([w.name for w in qat.trainable_weights], *grads):
        assert a is not None and b is not None, name
        # An integer sum can be exactly 0 where the float sum is a tiny +-noise, and
        # relu'(0) = 0: such a position drops out of one output channel's gradient.
        # Those few positions aside, the gradients are the same.
        a, b = a.numpy(), b.numpy()
        assert np.linalg.norm(a - b) <= 0.05 * np.linalg.norm(b), name


def test_saved_model_loads_with_the_integer_wrapper(tmp_path):
    qat, images = _stage_w(_wide_net())
    path = tf_pfq.save(qat, str(tmp_path / "qat.h5"))
    loaded = tf_pfq.load(path)
    assert isinstance(loaded.get_layer("quant_wide"), PfqQuantizeWrapper)
    np.testing.assert_array_equal(loaded(images).numpy(), qat(images).numpy())


def test_dropout_keeps_the_integer_path_at_inference_only():
    qat, images = _stage_w(_wide_net(dropout=True))
    _, grid_in_training = integer_source(qat.get_layer("quant_wide"))
    assert not grid_in_training  # dropout rescales the values it keeps
    np.testing.assert_array_equal(
        qat(images, training=False).numpy(), _integer_reference(qat, images, "wide")
    )
    keras.utils.set_random_seed(3)
    trained = qat(images, training=True).numpy()
    assert np.all(np.isfinite(trained))


def test_stage_a_and_float_inputs_keep_tfmot_arithmetic():
    model = _wide_net()
    stage_a = tf_pfq.apply(model, activation_bits=4)
    assert all(
        integer_source(layer) is None
        for layer in stage_a.layers
        if isinstance(layer, PfqQuantizeWrapper)
    )
    qat = tf_pfq.apply(model, activation_bits=4, weight_bits=4)
    assert integer_source(qat.get_layer("quant_expand")) is not None  # 8-bit input grid
    qat = tf_pfq.apply(model, activation_bits=4, weight_bits=4, input_bits=None)
    # The first conv reads the float model input: no grid, so no integer path.
    assert integer_source(qat.get_layer("quant_expand")) is None
    assert integer_source(qat.get_layer("quant_wide")) is not None


def _near_tie_pairs(step_a, step_b, step_out, out_range, a_range, b_range):
    """(a_int, b_int) pairs the exact sum and XNNPACK's fixed-point ADD round apart.

    `out_range` and the others: the integers each grid holds, centred on its zero point.
    """
    a, b = np.meshgrid(np.arange(*a_range), np.arange(*b_range), indexing="ij")
    exact = np.floor((a * np.float64(step_a) + b * np.float64(step_b)) / step_out + 0.5)
    ratios = np.float32(step_a) / np.float32(step_out), np.float32(step_b) / np.float32(step_out)
    shift = 20 - int(np.floor(np.log2(max(ratios))))
    mult = [int(np.rint(np.float32(r) * np.float32(2.0**shift))) for r in ratios]
    fixed = (2 ** (shift - 1) + mult[0] * a + mult[1] * b) >> shift
    inside = (exact >= out_range[0]) & (exact < out_range[1])  # away from the clamps
    return a[(exact != fixed) & inside], b[(exact != fixed) & inside]


def _centred(lo, hi):
    zero = int(nudge(lo, hi, 8).zero_point)
    return -zero, 256 - zero


@pytest.mark.parametrize("relu", [False, True])
def test_add_rounds_like_the_integer_file_at_near_ties(relu):
    # a and b: 8-bit copies of the two input channels (b on a coarser grid than the
    # input's, so that every b_int can be fed); their Add on an output grid whose
    # step is no simple ratio of theirs (its own, or a ReLU's that integer inference
    # fuses into the ADD). Pairs whose exact sum lies within XNNPACK's multiplier
    # error of a rounding tie are fed on purpose.
    inputs = keras.Input((1, 1024, 2), name="x")
    a = L.Conv2D(1, 1, use_bias=False, name="a")(inputs)
    b = L.Conv2D(1, 1, use_bias=False, name="b")(inputs)
    x = L.Add(name="add")([a, b])
    out_name = "add"
    if relu:
        x = L.ReLU(name="relu")(x)
        out_name = "relu"
    model = keras.Model(inputs, L.Conv2D(1, 1, name="out")(x))
    model.get_layer("a").set_weights([np.array([1.0, 0.0], np.float32).reshape(1, 1, 2, 1)])
    model.get_layer("b").set_weights([np.array([0.0, 1.0], np.float32).reshape(1, 1, 2, 1)])
    qat = tf_pfq.apply(model, activation_bits=8, weight_bits=8)
    ranges = {"a": (-3.452359676361084, 3.320496082305908), "b": (-5.9, 6.3)}
    ranges[out_name] = (0.0, 5.7) if relu else (-6.1, 5.9)
    for layer in qat.layers:
        quantizer = getattr(layer, "quantizer", None)  # the model-input quantizer
        if quantizer is not None:
            quantizer.min_var.assign(ranges["a"][0])
            quantizer.max_var.assign(ranges["a"][1])
    for name, (lo, hi) in ranges.items():
        quantizer = qat.get_layer(f"quant_{name}").quantize_config.output_quantizer
        quantizer.min_var.assign(lo)
        quantizer.max_var.assign(hi)
    sources = add_sources(qat.get_layer("quant_add"))
    assert (
        sources is not None
        and sources[2] is qat.get_layer(f"quant_{out_name}").quantize_config.output_quantizer
    )
    step_a, step_b, step_out = (float(activation_step(q)) for q in sources)
    a_range = _centred(*ranges["a"])
    b_max = int(ranges["a"][1] / step_b) - 1  # b_int * step_b must fit the input range
    b_range = (-b_max, b_max + 1)
    out_range = _centred(*ranges[out_name])
    pairs_a, pairs_b = _near_tie_pairs(step_a, step_b, step_out, out_range, a_range, b_range)
    assert len(pairs_a) > 0  # the exact sum would round these pairs the other way
    rng = np.random.default_rng(0)
    a_int = np.concatenate([pairs_a, rng.integers(*a_range, 1024 - len(pairs_a))])
    b_int = np.concatenate([pairs_b, rng.integers(*b_range, 1024 - len(pairs_b))])
    data = np.stack([a_int * step_a, b_int * step_b], -1).astype(np.float32)
    data = data.reshape(1, 1, 1024, 2)
    sub = keras.Model(qat.input, qat.get_layer(f"quant_{out_name}").output)
    keras_add = sub(data, training=False).numpy()
    # The fed pairs arrive as they were meant to.
    inner = keras.Model(
        qat.input, [qat.get_layer("quant_a").output, qat.get_layer("quant_b").output]
    )
    got_a, got_b = (t.numpy().reshape(-1) for t in inner(data, training=False))
    np.testing.assert_array_equal(np.round(got_a / step_a), a_int)
    np.testing.assert_array_equal(np.round(got_b / step_b), b_int)
    tflite = tf_pfq.export.to_tflite(sub, representative_data=data)
    file_add = litert.predict(litert.make_interpreter(tflite), data)
    np.testing.assert_array_equal(np.round(file_add / step_out), np.round(keras_add / step_out))
