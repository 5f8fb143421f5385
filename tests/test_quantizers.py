"""Golden tables and properties of the n-bit quantizers (paper eq. 20-21)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import tf_pfq
from tf_pfq import quantizers
from tf_pfq.compat import keras
from tf_pfq.quantize_configs import PfqQuantizeConfig
from tf_pfq.quantizers import (
    OFF_LATTICE,
    PfqActivationQuantizer,
    PfqBiasQuantizer,
    PfqWeightQuantizer,
    fake_quant,
    nudge,
    quantize_bias,
    quantize_weight,
    weight_min_max,
    weight_scale,
)

BITS = [2, 3, 4, 8]
# Ranges whose ends are already on the grid (min = -z * s), so TF's zero-point
# nudging leaves them alone and eq. 20 can be written out independently below.
STEP = 0.25


def _grid_range(num_bits: int, zero_point: int):
    return -zero_point * STEP, (2**num_bits - 1 - zero_point) * STEP


def _eq20(x, lo, hi, num_bits):
    """Paper eq. 20 with s = (M - m) / (2^n - 1), written in NumPy (float64)."""
    s = (hi - lo) / (2**num_bits - 1)
    return np.floor((np.clip(x, lo, hi) - lo) / s + 0.5) * s + lo


def _boundary_inputs(lo, hi, num_bits):
    """Every level, every midpoint between levels, each +/- a little, and outside."""
    levels = lo + STEP * np.arange(2**num_bits)
    mids = levels[:-1] + STEP / 2
    tiny = STEP / 100
    points = [levels, levels - tiny, levels + tiny, mids - tiny, mids + tiny]
    outside = [lo - 1.0, lo - tiny, hi + tiny, hi + 1.0]
    return np.concatenate([*points, outside]).astype(np.float32)


@pytest.mark.parametrize("num_bits", BITS)
@pytest.mark.parametrize("zero_point", [0, 1])
def test_per_tensor_golden_table(num_bits, zero_point):
    lo, hi = _grid_range(num_bits, zero_point)
    x = _boundary_inputs(lo, hi, num_bits)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = fake_quant(xt, lo, hi, num_bits)
    grad = tape.gradient(y, xt).numpy()
    np.testing.assert_allclose(y.numpy(), _eq20(x, lo, hi, num_bits), atol=1e-6)
    inside = (x >= lo) & (x <= hi)
    np.testing.assert_array_equal(grad, inside.astype(np.float32))
    assert inside.any() and (~inside).any()


@pytest.mark.parametrize("num_bits", BITS)
def test_exactly_2_pow_n_levels(num_bits):
    lo, hi = _grid_range(num_bits, 1)
    x = np.linspace(lo - 1, hi + 1, 20001, dtype=np.float32)
    levels = np.unique(fake_quant(x, lo, hi, num_bits).numpy())
    assert len(levels) == 2**num_bits
    np.testing.assert_allclose(np.diff(levels), STEP, rtol=1e-5)
    assert 0.0 in levels  # zero is exactly representable


@pytest.mark.parametrize("num_bits", BITS)
def test_per_channel_golden_table(num_bits):
    ranges = [_grid_range(num_bits, z) for z in (0, 1, 2)]
    columns = [_boundary_inputs(lo, hi, num_bits) for lo, hi in ranges]
    x = np.stack(columns, axis=-1)  # (N, 3): one range per last-axis channel
    lo = np.array([r[0] for r in ranges], np.float32)
    hi = np.array([r[1] for r in ranges], np.float32)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = fake_quant(xt, lo, hi, num_bits)
    grad = tape.gradient(y, xt).numpy()
    for c in range(3):
        np.testing.assert_allclose(
            y.numpy()[:, c], _eq20(x[:, c], lo[c], hi[c], num_bits), atol=1e-6
        )
        inside = (x[:, c] >= lo[c]) & (x[:, c] <= hi[c])
        np.testing.assert_array_equal(grad[:, c], inside.astype(np.float32))
        dense = np.linspace(lo[c] - 1, hi[c] + 1, 5001, dtype=np.float32)
        column = np.tile(dense[:, None], (1, 3))
        assert len(np.unique(fake_quant(column, lo, hi, num_bits).numpy()[:, c])) == 2**num_bits


@pytest.mark.parametrize("num_bits", BITS)
def test_nudge_matches_the_op_on_arbitrary_ranges(num_bits):
    rng = np.random.default_rng(num_bits)
    for _ in range(5):
        lo, hi = -rng.uniform(0.01, 2.0), rng.uniform(0.01, 3.0)
        p = nudge(lo, hi, num_bits)
        x = rng.uniform(lo - 1, hi + 1, 4000).astype(np.float32)
        y = fake_quant(x, lo, hi, num_bits).numpy()
        steps = (y - p.min) / p.scale
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
        assert y.min() == pytest.approx(p.min, abs=1e-6)
        assert y.max() == pytest.approx(p.max, abs=1e-6)
        assert p.min + p.zero_point * p.scale == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("num_bits", BITS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_weight_grid_is_int8_with_zero_point_0(num_bits, per_channel):
    kernel = np.random.default_rng(1).normal(size=(3, 3, 4, 5)).astype(np.float32)
    kernel[..., 2] = np.abs(kernel[..., 2])  # an all-positive channel: min clamps to 0
    quantized = quantize_weight(kernel, num_bits, per_channel).numpy()
    scale = weight_scale(kernel, num_bits, per_channel).numpy()
    ints = quantized / scale
    np.testing.assert_allclose(ints, np.round(ints), atol=1e-3)
    limit = 127 if num_bits == 8 else 2**num_bits - 1
    assert np.abs(np.round(ints)).max() <= limit
    levels = 2**num_bits - (1 if num_bits == 8 else 0)  # 8 bits: narrow range
    per = [quantized[..., c] for c in range(5)] if per_channel else [quantized]
    for values in per:
        assert len(np.unique(values)) <= levels
    if num_bits == 8:
        lo, hi = weight_min_max(kernel, 8, per_channel)
        np.testing.assert_allclose(lo.numpy(), -hi.numpy())


@pytest.mark.parametrize("num_bits", [2, 4, 8])
def test_depthwise_per_channel_uses_each_output_channel_range(num_bits):
    # (kh, kw, cin, mult): output channel c * mult + m is kernel[..., c, m].
    rng = np.random.default_rng(2)
    kernel = rng.normal(size=(3, 3, 2, 3)).astype(np.float32)
    kernel *= np.arange(1, 7, dtype=np.float32).reshape(2, 3)  # distinct ranges
    quantized = quantize_weight(kernel, num_bits, per_channel=True, depthwise=True).numpy()
    narrow = num_bits == 8
    for c in range(2):
        for m in range(3):
            lo, hi = weight_min_max(kernel[..., c, m], num_bits)
            expected = fake_quant(kernel[..., c, m], lo, hi, num_bits, narrow).numpy()
            np.testing.assert_allclose(quantized[..., c, m], expected, atol=1e-6)
    # Negative control: the per-tensor grid is different.
    per_tensor = quantize_weight(kernel, num_bits, per_channel=False, depthwise=True).numpy()
    assert np.abs(per_tensor - quantized).max() > 1e-3
    scales = weight_scale(kernel, num_bits, per_channel=True, depthwise=True).numpy()
    assert scales.shape == (6,)


def test_weight_gradient_is_straight_through():
    kernel = tf.Variable(np.random.default_rng(3).normal(size=(4, 3)).astype(np.float32))
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(quantize_weight(kernel, 3) * 2.0)
    # STE: gradient 1 (times 2) inside the NUDGED range, 0 for an extreme element
    # that zero-point nudging moved just outside it; none through the range.
    lo, hi = weight_min_max(kernel, 3)
    grid = nudge(lo.numpy(), hi.numpy(), 3)
    w = kernel.numpy()
    inside = (w >= grid.min) & (w <= grid.max)
    np.testing.assert_allclose(tape.gradient(y, kernel).numpy(), 2.0 * inside)
    assert inside.sum() >= w.size - 1


def test_bias_on_grid_with_straight_through_gradient():
    bias = tf.Variable([0.26, -0.74, 3.0, 1e12])
    scale = tf.constant([0.5, 0.5, 0.7, 1e-3])
    with tf.GradientTape() as tape:
        y = quantize_bias(bias, scale)
        loss = tf.reduce_sum(y * 3.0)
    np.testing.assert_allclose(y.numpy()[:3], [0.5, -0.5, 2.8], rtol=1e-6)
    assert y.numpy()[3] == pytest.approx((2**31 - 1) * 1e-3, rel=1e-6)  # int32 clip
    np.testing.assert_allclose(tape.gradient(loss, bias).numpy(), 3.0)


def test_activation_quantizer_moving_average():
    # Batch extremes are widened by OFF_LATTICE (off the accumulator lattice).
    w = np.float32(1.0 + OFF_LATTICE)
    layer = keras.layers.Layer()
    quantizer = PfqActivationQuantizer(4, ema_decay=0.5)
    weights = quantizer.build(tf.TensorShape([None, 2]), "output", layer)
    first = tf.constant([[0.5, 2.0], [1.0, 3.0]])  # after a ReLU: min is 0, not 0.5
    quantizer(first, True, weights)
    np.testing.assert_allclose([weights["min"].numpy(), weights["max"].numpy()], [0.0, 3.0 * w])
    quantizer(tf.constant([[-1.0, 5.0]]), True, weights)
    expected = [-0.5 * w, 4.0 * w]
    np.testing.assert_allclose([weights["min"].numpy(), weights["max"].numpy()], expected)
    y = quantizer(tf.constant([[10.0, -10.0]]), False, weights)  # inference: no update
    np.testing.assert_allclose([weights["min"].numpy(), weights["max"].numpy()], expected)
    grid = nudge(*expected, 4)  # nudged so that 0 is a level: [-0.6, 3.9] widened
    np.testing.assert_allclose(y.numpy(), [[grid.max, grid.min]], atol=1e-6)
    assert grid.min == pytest.approx(-0.6 * w) and grid.max == pytest.approx(3.9 * w)


def test_a_batch_of_zeros_leaves_the_range_as_it_is():
    # A dead branch (a ReLU whose inputs are all negative) is 0 on a batch: averaging
    # that in would shrink the range to zero width, whose step 0 the integer
    # arithmetic of the next layer divides by.
    w = np.float32(1.0 + OFF_LATTICE)
    layer = keras.layers.Layer()
    quantizer = PfqActivationQuantizer(4, ema_decay=0.5, non_negative=True)
    weights = quantizer.build(tf.TensorShape([None, 2]), "output", layer)
    quantizer(tf.zeros([2, 2]), True, weights)  # first batch: nothing to take
    assert [weights["min"].numpy(), weights["max"].numpy()] == [-6.0, 6.0]
    assert weights["seen"].numpy() == 0.0
    quantizer(tf.constant([[0.0, 2.0]]), True, weights)  # the first informative batch
    np.testing.assert_allclose([weights["min"].numpy(), weights["max"].numpy()], [0.0, 2.0 * w])
    quantizer(tf.zeros([2, 2]), True, weights)
    np.testing.assert_allclose([weights["min"].numpy(), weights["max"].numpy()], [0.0, 2.0 * w])
    assert float(quantizers.activation_step(quantizer)) == pytest.approx(2.0 * w / 15)


def test_a_range_of_zero_width_has_the_exporters_step():
    layer = keras.layers.Layer()
    quantizer = PfqActivationQuantizer(3)
    quantizer.build(tf.TensorShape([None]), "output", layer)
    quantizer.min_var.assign(0.0)
    quantizer.max_var.assign(0.0)
    assert float(quantizers.activation_step(quantizer)) == np.float32(quantizers.EMPTY_RANGE_STEP)
    from tf_pfq.export.convert import _usable

    grid = _usable(nudge(0.0, 0.0, 3))
    assert float(grid.scale) == pytest.approx(quantizers.EMPTY_RANGE_STEP, rel=1e-6)
    assert int(grid.zero_point) == 0


def test_activation_range_keeps_lattice_values_off_rounding_ties():
    # A ReLU conv output lies on the accumulator lattice k * unit; with the range set
    # to its batch maximum (a lattice value) the step max/15 would put every
    # 15-multiple-of-half of the unit exactly on a tie. Widened, none is within 1e-5 steps.
    unit = np.float32(0.0024774)
    values = np.arange(0, 259, dtype=np.float32) * unit
    layer = keras.layers.Layer()
    quantizer = PfqActivationQuantizer(4, non_negative=True)
    weights = quantizer.build(tf.TensorShape([None]), "output", layer)
    quantizer(tf.constant(values), True, weights)
    step = float(nudge(weights["min"].numpy(), weights["max"].numpy(), 4).scale)
    frac = np.asarray(values, np.float64) / step % 1.0
    assert np.abs(frac - 0.5).min() > 1e-5
    unwidened = np.asarray(values, np.float64) / (258 * float(unit) / 15) % 1.0
    assert np.abs(unwidened - 0.5).min() < 1e-6  # the ties the widening removes


@pytest.mark.parametrize(
    "quantizer",
    [
        PfqActivationQuantizer(3, ema_decay=0.9),
        PfqWeightQuantizer(4, per_channel=True, depthwise=True),
        PfqBiasQuantizer(2, per_channel=False, depthwise=True, kernel_attr="depthwise_kernel"),
    ],
    ids=["activation", "weight", "bias"],
)
def test_quantizer_serialization_round_trip(quantizer):
    clone = type(quantizer).from_config(quantizer.get_config())
    assert clone == quantizer and clone is not quantizer
    changed = dict(quantizer.get_config())
    key = "num_bits" if "num_bits" in changed else "weight_bits"
    changed[key] = 5
    assert type(quantizer).from_config(changed) != quantizer  # negative control


def test_config_serialization_round_trip():
    config = PfqQuantizeConfig(
        PfqWeightQuantizer(3),
        PfqBiasQuantizer(3),
        PfqActivationQuantizer(4),
        kernel_attr="kernel",
    )
    clone = PfqQuantizeConfig.from_config(config.get_config())
    assert clone == config
    assert (
        PfqQuantizeConfig.from_config({**config.get_config(), "output_quantizer": None}) != config
    )


@pytest.mark.parametrize("bad", [1, 9, 0, 4.0, True, "4"])
def test_bits_validation_names_the_argument(bad):
    with pytest.raises(ValueError, match="weight_bits"):
        quantizers.check_bits(bad, "weight_bits")
    with pytest.raises(ValueError, match="num_bits"):
        PfqWeightQuantizer(bad)


def test_non_negative_shortcut_matches_the_general_range():
    x = tf.nn.relu(tf.random.normal((4, 5, 5, 3), seed=1))
    results = []
    for non_negative in (False, True):
        quantizer = PfqActivationQuantizer(3, non_negative=non_negative)
        weights = quantizer.build(x.shape, "output", keras.layers.Layer())
        y = quantizer(x, True, weights)
        results.append((y.numpy(), weights["min"].numpy(), weights["max"].numpy()))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    widened = float(tf.reduce_max(x)) * (1.0 + OFF_LATTICE)
    assert results[0][1:] == results[1][1:] == (0.0, pytest.approx(widened))


def test_bias_grid_is_hand_computed_s_in_times_s_w():
    # Checked against numbers worked out by hand, not against PfqBiasQuantizer.scale():
    # a wrong s_in (or s_w) in the code under test cannot also be in the expectation.
    layers = keras.layers
    x = keras.Input((2, 2, 2))
    y = layers.Conv2D(3, 1, name="a")(x)
    y = layers.ReLU(name="a_relu")(y)
    y = layers.Conv2D(2, 1, name="b")(y)
    model = keras.Model(x, y)
    # b's kernel spans [-0.6, 0.9]: 4-bit s_w = (0.9 - (-0.6)) / (2^4 - 1) = 0.1.
    kernel = np.array([[-0.6, 0.9], [0.3, 0.2], [0.0, -0.1]], np.float32).reshape(1, 1, 3, 2)
    model.get_layer("b").set_weights([kernel, np.array([0.033, -0.047], np.float32)])
    qat = tf_pfq.apply(model, activation_bits=4, weight_bits=4)
    relu_quantizer = qat.get_layer("quant_a_relu").quantize_config.output_quantizer
    # The input of b is on [0, 3]: 4-bit s_in = 3 / 15 = 0.2, so the bias step is 0.02.
    relu_quantizer.min_var.assign(0.0)
    relu_quantizer.max_var.assign(3.0)
    qat(np.ones((1, 2, 2, 2), np.float32), training=False)
    wrapper = qat.get_layer("quant_b")
    np.testing.assert_allclose(float(wrapper.quantize_config.bias_quantizer.scale()), 0.02, 1e-6)
    # 0.033 / 0.02 = 1.65 -> 2 steps; -0.047 / 0.02 = -2.35 -> -2 steps.
    np.testing.assert_allclose(wrapper.layer.bias.numpy(), [0.04, -0.04], atol=1e-6)


def test_bias_grid_source_is_decided_when_wrapping_and_checked():
    # Each bias quantizer records whose output quantizer gives s_in: the model input
    # for the first conv, the ReLU across a max pool (it keeps the grid) for the second.
    layers = keras.layers
    x = keras.Input((4, 4, 2), name="image")
    y = layers.ReLU(name="a_relu")(layers.Conv2D(3, 1, name="a")(x))
    y = layers.Conv2D(2, 1, name="b")(layers.MaxPooling2D(name="pool")(y))
    qat = tf_pfq.apply(keras.Model(x, y), activation_bits=4, weight_bits=4)
    bias = {n: qat.get_layer(f"quant_{n}").quantize_config.bias_quantizer for n in "ab"}
    assert {n: q.input_source for n, q in bias.items()} == {"a": "image", "b": "a_relu"}
    assert bias["b"].get_config()["input_source"] == "a_relu"
    relu = qat.get_layer("quant_a_relu").quantize_config.output_quantizer
    assert bias["b"].input_quantizer() is relu
    # A link that disagrees with the recorded decision is refused, not followed.
    bias["b"].input_source, bias["b"]._input = "a", None
    with pytest.raises(RuntimeError, match=r"planned on the output of 'a'.*grid of 'a_relu'"):
        bias["b"].input_quantizer()


def test_every_wrapped_layer_records_its_grids_and_the_wrapper_checks_them():
    # apply records, per input, whose output quantizer sets its grid: the Add reads
    # the ReLU across a max pool and the conv `c` (its own range), the fused Add's
    # ReLU consumer reads the Add itself (no grid: None), the max-with-a-number the
    # ReLU `r`. The integer wrapper links to the same quantizers.
    from tf_pfq import wrapper

    layers = keras.layers
    x = keras.Input((4, 4, 2), name="image")
    a = layers.ReLU(name="a_relu")(layers.Conv2D(2, 1, name="a")(x))
    c = layers.Conv2D(2, 2, padding="same", strides=2, name="c")(x)
    s = layers.Add(name="sum")([layers.MaxPooling2D(name="pool")(a), c])
    r = layers.ReLU(name="r")(layers.Add(name="fused")([s, c]))
    y = layers.Conv2D(2, 1, name="out")(tf.maximum(r, 0.25))
    qat = tf_pfq.apply(keras.Model(x, y), activation_bits=4, weight_bits=4)

    def config(name):
        return qat.get_layer(f"quant_{name}").quantize_config

    clamp = next(w.layer.name for w in qat.layers if "maximum" in w.name)
    assert config("sum").input_sources == ("a_relu", "c")
    assert config("fused").input_sources == ("sum", "c")
    assert config("r").input_sources == (None,)
    assert config(clamp).input_sources == ("r",)
    assert config("a").input_sources == ("image",)
    assert config("sum").get_config()["input_sources"] == ["a_relu", "c"]
    # ... and whose quantizer the file rounds each output onto: its own, the fused
    # ReLU's for the Add and for conv `a`, none for the logits.
    outputs = {n: config(n).output_source for n in ("sum", "fused", "a", "c", "out")}
    assert outputs == {"sum": "sum", "fused": "r", "a": "a_relu", "c": "c", "out": None}
    assert wrapper.add_sources(qat.get_layer("quant_fused"))[2] is config("r").output_quantizer
    found = wrapper.input_grids(qat.get_layer("quant_sum"))
    assert [f[0] for f in found] == [
        config("a_relu").output_quantizer,
        config("c").output_quantizer,
    ]
    # A graph that disagrees with the recorded decision is refused, not followed.
    config("sum").input_sources = ("c", "a_relu")
    with pytest.raises(RuntimeError, match=r"planned its inputs on the grids of \['c', 'a_relu'\]"):
        wrapper.input_grids(qat.get_layer("quant_sum"))
    with pytest.raises(RuntimeError, match=r"rewired after tf_pfq\.apply"):
        qat(np.zeros((1, 4, 4, 2), np.float32), training=False)  # the model's own call
    config("fused").output_source = "sum"
    with pytest.raises(RuntimeError, match=r"output on the grid of 'sum'.*puts it on 'r'"):
        wrapper.add_sources(qat.get_layer("quant_fused"))
    config("a").output_source = None
    with pytest.raises(RuntimeError, match=r"output on the grid of None.*puts it on 'a_relu'"):
        wrapper.output_grid(qat.get_layer("quant_a"))


@pytest.mark.parametrize("num_bits", BITS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_symmetric_scheme_is_narrow_range_centred_on_zero(num_bits, per_channel):
    kernel = np.random.default_rng(4).normal(size=(3, 3, 4, 5)).astype(np.float32)
    kernel[..., 2] = np.abs(kernel[..., 2])  # all positive: the range still mirrors
    kernel[..., 3] = 0.0  # dead channel: a tiny symmetric range, zero point centred
    quantizer = PfqWeightQuantizer(num_bits, per_channel, scheme="symmetric")
    quantized = quantizer(tf.constant(kernel), True, {}).numpy()
    grid = quantizer.params(kernel)
    assert grid.narrow_range and grid.num_levels == 2**num_bits - 1
    np.testing.assert_array_equal(grid.zero_point, 2 ** (num_bits - 1))
    np.testing.assert_allclose(grid.min, -grid.max, rtol=1e-6)
    scale = weight_scale(kernel, num_bits, per_channel, scheme="symmetric").numpy()
    np.testing.assert_allclose(scale, grid.scale, rtol=1e-5)
    ints = quantized / scale
    np.testing.assert_allclose(ints, np.round(ints), atol=1e-3)
    top = 2 ** (num_bits - 1) - 1  # 4 bits: -7..7, TFLite's INT4 narrow range
    assert np.abs(np.round(ints)).max() == top
    columns = [quantized[..., c] for c in range(5)] if per_channel else [quantized]
    for values in columns:
        assert len(np.unique(values)) <= 2**num_bits - 1
    if per_channel:  # the all-positive channel's largest weight is on +top
        np.testing.assert_allclose(np.round(ints[..., 2]).max(), top)
        np.testing.assert_array_equal(quantized[..., 3], 0.0)
    if num_bits == 8:  # 8-bit weights are symmetric under both schemes
        np.testing.assert_array_equal(quantized, quantize_weight(kernel, 8, per_channel))
    else:  # negative control: the default grid differs (one more level, offset)
        assert np.abs(quantize_weight(kernel, num_bits, per_channel).numpy() - quantized).max() > 0


def test_symmetric_depthwise_per_channel_uses_each_output_channel_range():
    kernel = np.random.default_rng(5).normal(size=(3, 3, 2, 3)).astype(np.float32)
    kernel *= np.arange(1, 7, dtype=np.float32).reshape(2, 3)
    quantized = quantize_weight(kernel, 4, True, True, scheme="symmetric").numpy()
    for c in range(2):
        for m in range(3):
            top = np.abs(kernel[..., c, m]).max()
            expected = fake_quant(kernel[..., c, m], -top, top, 4, narrow_range=True).numpy()
            np.testing.assert_allclose(quantized[..., c, m], expected, atol=1e-6)


def test_symmetric_weight_gradient_flows_straight_through():
    kernel = tf.Variable(np.random.default_rng(6).normal(size=(3, 3, 4, 6)).astype(np.float32))
    quantizer = PfqWeightQuantizer(4, per_channel=True, scheme="symmetric")
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(quantizer(kernel, True, {}) * 2.0)
    gradient = tape.gradient(y, kernel).numpy()
    # STE: 2 inside the nudged range [-7 s, 7 s] with s = |w|max / 7 (float rounding
    # may put a channel's extreme weight a hair outside), 0 outside; nothing flows
    # through the range itself.
    grid = quantizer.params(kernel)
    w = kernel.numpy()
    inside = (w >= grid.min) & (w <= grid.max)
    np.testing.assert_allclose(gradient, 2.0 * inside)
    assert inside.sum() >= w.size - w.shape[-1]


def test_symmetric_bias_grid_is_hand_computed():
    layers = keras.layers
    x = keras.Input((2, 2, 2))
    y = layers.Conv2D(3, 1, name="a")(x)
    y = layers.ReLU(name="a_relu")(y)
    y = layers.Conv2D(2, 1, name="b")(y)
    model = keras.Model(x, y)
    # |w|max = 0.9: 4-bit symmetric s_w = 2 * 0.9 / (2^4 - 2) = 0.9 / 7 (15 levels).
    kernel = np.array([[-0.6, 0.9], [0.3, 0.2], [0.0, -0.1]], np.float32).reshape(1, 1, 3, 2)
    model.get_layer("b").set_weights([kernel, np.array([0.033, -0.047], np.float32)])
    qat = tf_pfq.apply(model, activation_bits=4, weight_bits=4, weight_scheme="symmetric")
    relu_quantizer = qat.get_layer("quant_a_relu").quantize_config.output_quantizer
    relu_quantizer.min_var.assign(0.0)
    relu_quantizer.max_var.assign(3.0)  # s_in = 0.2: bias step 0.18 / 7
    qat(np.ones((1, 2, 2, 2), np.float32), training=False)
    wrapper = qat.get_layer("quant_b")
    step = 0.18 / 7
    np.testing.assert_allclose(float(wrapper.quantize_config.bias_quantizer.scale()), step, 1e-6)
    # 0.033 / step = 1.28 -> 1 step; -0.047 / step = -1.83 -> -2 steps.
    np.testing.assert_allclose(wrapper.layer.bias.numpy(), [step, -2 * step], atol=1e-6)


@pytest.mark.parametrize(
    "quantizer",
    [
        PfqWeightQuantizer(4, per_channel=True, scheme="symmetric"),
        PfqBiasQuantizer(4, per_channel=True, weight_scheme="symmetric"),
    ],
    ids=["weight", "bias"],
)
def test_weight_scheme_serialization(quantizer):
    clone = type(quantizer).from_config(quantizer.get_config())
    assert clone == quantizer
    key = "scheme" if isinstance(quantizer, PfqWeightQuantizer) else "weight_scheme"
    assert getattr(clone, key) == "symmetric"
    default = {k: v for k, v in quantizer.get_config().items() if k != key}
    assert getattr(type(quantizer).from_config(default), key) == "min_max"  # older configs
    assert type(quantizer).from_config(default) != quantizer  # negative control


def test_unknown_weight_scheme_names_the_argument():
    with pytest.raises(ValueError, match=r"`scheme`.*'asymmetric'"):
        PfqWeightQuantizer(4, scheme="asymmetric")
    with pytest.raises(ValueError, match=r"`weight_scheme`.*'sym'"):
        PfqBiasQuantizer(4, weight_scheme="sym")
    with pytest.raises(ValueError, match=r"`scheme`"):
        quantize_weight([[1.0]], 4, scheme="Symmetric")
