"""Tests for tf_pfq.dfq (Nagel et al. 2019 data-free quantization)."""

import numpy as np
import pytest

from tf_pfq import dfq as dfq_lib
from tf_pfq.compat import keras

L = keras.layers


def _folded_model(activation="relu", padding="valid"):
    """A small BN-free (folded) net: conv -> act -> dw -> act -> pw -> act -> gap -> dense."""
    rng = np.random.default_rng(1)
    x = keras.Input((6, 6, 3))
    act = (lambda n: L.ReLU(name=n)) if activation == "relu" else (lambda n: L.ReLU(6.0, name=n))
    y = L.Conv2D(4, 3, padding=padding, name="conv")(x)
    y = act("conv_relu")(y)
    y = L.DepthwiseConv2D(3, padding="same", name="dw")(y)
    y = act("dw_relu")(y)
    y = L.Conv2D(5, 1, name="pw")(y)
    y = act("pw_relu")(y)
    y = L.GlobalAveragePooling2D(name="pool")(y)
    y = L.Dense(3, name="logits")(y)
    model = keras.Model(x, y)
    # Per-channel ranges spread over two orders of magnitude, as after BN folding.
    for layer in model.layers:
        if layer.weights:
            kernel, bias = layer.get_weights()
            spread = 10.0 ** rng.uniform(-1, 1, size=kernel.shape[-1 if layer.name != "dw" else -2])
            if layer.name == "dw":
                kernel = rng.normal(size=kernel.shape) * spread[None, None, :, None]
            else:
                kernel = rng.normal(size=kernel.shape) * spread
            layer.set_weights(
                [
                    kernel.astype(np.float32),
                    rng.normal(size=bias.shape).astype(np.float32),
                ]
            )
    return model


def _weights_quantized(model, bits):
    return dfq_lib.rebuild(
        model,
        weights={
            layer.name: [
                dfq_lib.quantize_weights(layer.get_weights()[0], bits),
                layer.get_weights()[1],
            ]
            for layer in model.layers
            if layer.weights
        },
    )


def _data(n=16, scale=1.0):
    return np.random.default_rng(2).uniform(0, scale, size=(n, 6, 6, 3)).astype(np.float32)


def test_equalization_scales_golden():
    s = dfq_lib.equalization_scales(np.array([9.0, 1.0, 2.0, 0.0]), np.array([1.0, 9.0, 2.0, 3.0]))
    np.testing.assert_allclose(s, [3.0, 1 / 3, 1.0, 1.0], rtol=1e-6)


def test_equalize_pair_equalizes_ranges_and_keeps_product():
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(3, 3, 2, 4)) * np.array([0.1, 1, 10, 100])
    w2 = rng.normal(size=(1, 1, 4, 3))
    new_w1, _, new_w2, _ = dfq_lib.equalize_pair(w1, np.zeros(4), "Conv2D", w2, "Conv2D")
    np.testing.assert_allclose(
        np.abs(new_w1).max(axis=(0, 1, 2)),
        np.abs(new_w2).max(axis=(0, 1, 3)),
        rtol=1e-5,
    )
    # The composed linear map (1x1 second layer) is unchanged.
    np.testing.assert_allclose(
        np.einsum("hwio,op->hwip", new_w1, new_w2[0, 0]),
        np.einsum("hwio,op->hwip", w1, w2[0, 0]),
        rtol=1e-4,
        atol=1e-4,
    )


def test_find_pairs_skips_add_and_output():
    x = keras.Input((4, 4, 2))
    a = L.Conv2D(2, 1, name="a")(x)
    b = L.Conv2D(2, 1, name="b")(L.ReLU(name="r")(a))
    c = L.Add(name="add")([x, b])
    d = L.Conv2D(2, 1, name="d")(c)
    pairs = dfq_lib.find_equalization_pairs(keras.Model(x, d))
    assert [(p[0], p[1]) for p in pairs] == [("a", "b")]


def test_cle_leaves_float_outputs_unchanged():
    model = _folded_model("relu", padding="same")
    x = _data()
    before = model.predict(x, verbose=0)
    new_model, pairs = dfq_lib.cross_layer_equalize(model)
    assert set(pairs) == {("conv", "dw"), ("dw", "pw"), ("pw", "logits")}
    # float32 round-off only: outputs are O(10), relative 1e-5 of that.
    np.testing.assert_allclose(new_model.predict(x, verbose=0), before, rtol=1e-4, atol=1e-4)
    # The per-channel ranges of the pw kernel's outputs and the Dense rows now agree.
    pw = np.abs(new_model.get_layer("pw").get_weights()[0]).max(axis=(0, 1, 2))
    dense = np.abs(new_model.get_layer("logits").get_weights()[0]).max(axis=1)
    np.testing.assert_allclose(pw, dense, rtol=1e-3)
    # The input model is untouched.
    np.testing.assert_array_equal(model.predict(x, verbose=0), before)


def test_cle_negative_control_uncompensated_scaling_changes_outputs():
    model = _folded_model("relu")
    x = _data()
    new_model, _ = dfq_lib.cross_layer_equalize(model)
    # Undo the compensation in the second layer of one pair: outputs must change.
    broken = dfq_lib.rebuild(new_model, weights={"pw": model.get_layer("pw").get_weights()})
    diff = np.abs(broken.predict(x, verbose=0) - model.predict(x, verbose=0)).max()
    assert diff > 1e-2


def test_cle_relu6_is_replaced_or_skipped():
    model = _folded_model("relu6")
    x = _data(scale=5.0)
    before = model.predict(x, verbose=0)
    kept, pairs = dfq_lib.cross_layer_equalize(model, replace_relu6=False)
    assert pairs == []  # every pair is joined by a ReLU6
    np.testing.assert_allclose(kept.predict(x, verbose=0), before, rtol=1e-4, atol=1e-4)
    replaced, pairs = dfq_lib.cross_layer_equalize(model, replace_relu6=True)
    assert len(pairs) == 3
    assert replaced.get_layer("dw_relu").max_value is None
    # ReLU6 clipped values beyond 6 in this model, so replacing it changes the function.
    assert np.abs(replaced.predict(x, verbose=0) - before).max() > 1e-2


def test_high_bias_absorption_exact_when_preactivation_stays_above_c():
    x_in = keras.Input((4, 4, 2))
    y = L.Conv2D(3, 1, name="a")(x_in)
    y = L.ReLU(name="r")(y)
    y = L.Conv2D(2, 1, name="b")(y)
    model = keras.Model(x_in, y)
    model.get_layer("a").set_weights(
        [np.full((1, 1, 2, 3), 0.1, np.float32), np.array([5.0, 0.0, -1.0], np.float32)]
    )
    x = np.random.default_rng(0).uniform(0, 1, size=(8, 4, 4, 2)).astype(np.float32)
    new_model, absorbed = dfq_lib.absorb_high_biases(model, x)
    assert absorbed == {"a": 1}  # only channel 0 has mean - 3 std > 0
    assert new_model.get_layer("a").get_weights()[1][0] < 5.0
    np.testing.assert_allclose(
        new_model.predict(x, verbose=0),
        model.predict(x, verbose=0),
        rtol=1e-5,
        atol=1e-5,
    )
    # Negative control: moving the bias without compensating changes the output.
    broken = dfq_lib.rebuild(new_model, weights={"b": model.get_layer("b").get_weights()})
    assert np.abs(broken.predict(x, verbose=0) - model.predict(x, verbose=0)).max() > 1e-2


@pytest.mark.parametrize("consumer", ["conv3x3", "depthwise3x3"])
def test_high_bias_absorption_through_a_3x3_consumer(consumer):
    # Every tap of a k x k consumer sees the shift c, so its bias must grow by the sum
    # over all k x k taps; 'valid' padding keeps the result exact everywhere.
    rng = np.random.default_rng(3)
    x_in = keras.Input((6, 6, 2))
    y = L.Conv2D(3, 1, name="a")(x_in)
    y = L.ReLU(name="r")(y)
    if consumer == "conv3x3":
        y = L.Conv2D(4, 3, padding="valid", name="b")(y)
    else:
        y = L.DepthwiseConv2D(3, padding="valid", name="b")(y)
    model = keras.Model(x_in, y)
    model.get_layer("a").set_weights(
        [np.full((1, 1, 2, 3), 0.1, np.float32), np.array([5.0, 4.0, -1.0], np.float32)]
    )
    b = model.get_layer("b")
    # Random taps of both signs: the centre tap alone (or any subset) sums differently.
    b.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in b.get_weights()])
    x = rng.uniform(0, 1, size=(8, 6, 6, 2)).astype(np.float32)
    new_model, absorbed = dfq_lib.absorb_high_biases(model, x)
    assert absorbed == {"a": 2}
    np.testing.assert_allclose(
        new_model.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-4
    )


def test_bias_correction_matches_float_means_of_the_quantized_model():
    model = _folded_model("relu")
    x = _data(32)
    names = ["conv", "dw", "pw", "logits"]
    corrected, changes = dfq_lib.correct_biases(model, x, weight_bits=3)
    assert set(changes) == set(names)

    def means(m):
        outs = keras.Model(m.inputs, [m.get_layer(n).output for n in names]).predict(x, verbose=0)
        return [o.reshape(-1, o.shape[-1]).mean(axis=0) for o in outs]

    reference = means(model)
    before = means(_weights_quantized(model, 3))
    after = means(_weights_quantized(corrected, 3))
    for name, r, b, a in zip(names, reference, before, after):
        scale = np.abs(r).max()
        # Negative control: 3-bit weights visibly shift the channel means...
        if name != "logits":
            assert np.abs(b - r).max() > 1e-2 * scale, name
        # ...and after correction they match the float means up to float32 round-off.
        np.testing.assert_allclose(a, r, atol=1e-4 * max(scale, 1.0), err_msg=name)


def test_quantize_weights_has_at_most_2n_levels():
    w = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    assert len(np.unique(dfq_lib.quantize_weights(w, 3))) <= 8


def test_dfq_rejects_unfolded_model():
    x = keras.Input((4, 4, 2))
    y = L.BatchNormalization(name="bn")(L.Conv2D(2, 1, name="c")(x))
    with pytest.raises(ValueError, match="'bn'"):
        dfq_lib.dfq(keras.Model(x, y), np.zeros((1, 4, 4, 2), np.float32), 4)


def _unbalanced_model():
    """A balanced ReLU net, then rescaled per channel by 100x: same function, bad ranges."""
    rng = np.random.default_rng(3)
    x = keras.Input((6, 6, 3))
    y = L.Conv2D(8, 1, name="a")(x)
    y = L.ReLU(name="r")(y)
    y = L.Conv2D(4, 1, name="b")(y)
    model = keras.Model(x, y)
    s = 10.0 ** rng.uniform(-1, 1, size=8).astype(np.float32)
    a_k = rng.normal(size=(1, 1, 3, 8)).astype(np.float32)
    a_b = rng.normal(size=8).astype(np.float32) * 0.1
    b_k = rng.normal(size=(1, 1, 8, 4)).astype(np.float32)
    model.get_layer("a").set_weights([a_k * s, a_b * s])
    model.get_layer("b").set_weights([b_k / s[:, None], np.zeros(4, np.float32)])
    return model


def test_dfq_makes_4bit_weights_match_the_float_model_better():
    model = _unbalanced_model()
    x = _data(32)
    out, report = dfq_lib.dfq(model, x, weight_bits=4)
    assert report.equalized_pairs == [("a", "b")]
    ref = model.predict(x, verbose=0)

    def error(m):
        return np.abs(_weights_quantized(m, 4).predict(x, verbose=0) - ref).mean()

    # The point of DFQ: with ranges spread over 100x, per-tensor 4-bit weights round
    # most channels to zero; after equalization they lose much less.
    assert error(out) < 0.5 * error(model)
