"""Integer export of the layers beyond plain chains: each exported file must reproduce
the Keras QAT model on XNNPACK (99th percentile of |logit difference| <= 2 int8 output
steps, maximum <= 4), with `tf_pfq.apply`'s default arguments.

Models are small with random weights and BN statistics; one training-mode pass sets
every moving-average range, which is all the export reads.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import tf_pfq
from tf_pfq.compat import keras
from tf_pfq.export import litert
from tf_pfq.export.summary import inspect

L = keras.layers
SHAPE = (12, 12, 3)


def _randomize_bn(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, gamma.shape),
                    rng.normal(0, 0.2, beta.shape),
                    rng.normal(0, 0.1, mean.shape),
                    rng.uniform(0.5, 1.5, var.shape),
                ]
            )
    return model


def _conv_bn(x, filters, kernel, name, scale=1.0, activation="relu"):
    x = L.Conv2D(filters, kernel, padding="same", name=name)(x)
    x = L.BatchNormalization(
        name=f"{name}_bn", gamma_initializer=keras.initializers.Constant(scale)
    )(x)
    return L.Activation(activation, name=f"{name}_act")(x) if activation else x


def fidelity(build, *, seed=0, **apply_kwargs):
    """(p99, max) |XNNPACK - Keras QAT| in output steps, top-1 agreement, the file.

    `build` makes the float model; it runs after seeding, so results do not depend
    on which tests ran before.
    """
    keras.utils.set_random_seed(seed)
    model = build()
    folded, _ = tf_pfq.fold_batchnorm(_randomize_bn(model, seed))
    bits = apply_kwargs.pop("bits", 4)
    qat = tf_pfq.apply(folded, activation_bits=bits, weight_bits=bits, **apply_kwargs)
    rng = np.random.default_rng(seed)
    data = rng.uniform(0, 1, (64, *model.input_shape[1:])).astype(np.float32)
    qat(data[:48], training=True)
    test = data[48:]
    keras_out = qat.predict(test, verbose=0)
    tflite = tf_pfq.export.to_tflite(qat, representative_data=data[:48])
    out = litert.predict(litert.make_interpreter(tflite), test)
    step = inspect(tflite).outputs[0].scales[0]
    err = np.abs(out - keras_out).reshape(-1) / step
    agreement = float(np.mean(out.argmax(-1) == keras_out.argmax(-1)))
    return float(np.percentile(err, 99)), float(err.max()), agreement, tflite


def _check(build, **kwargs):
    p99, worst, agreement, tflite = fidelity(build, **kwargs)
    print(
        f"{build.__name__}: p99 {p99:.2f} steps, max {worst:.2f} steps, agreement {agreement:.3f}"
    )
    assert p99 <= 2.0, p99
    assert worst <= 4.0, worst
    return tflite


def _head(x, classes=10, activation=None):
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return L.Dense(classes, activation=activation, name="logits")(x)


def concat_net():
    # Two branches whose scales differ by ~8x feed one Concatenate.
    inputs = keras.Input(SHAPE, name="image")
    a = _conv_bn(inputs, 6, 3, "a")
    b = _conv_bn(inputs, 4, 1, "b", scale=8.0)
    b = L.MaxPooling2D(1, name="b_pool")(b)
    x = L.Concatenate(name="concat")([a, b])
    x = _conv_bn(x, 8, 3, "mix")
    y = _conv_bn(inputs, 8, 1, "side", activation=None)  # signed branch
    x = L.Concatenate(name="concat2")([x, y])
    return keras.Model(inputs, _head(x), name="concat_net")


def residual_net():
    inputs = keras.Input(SHAPE, name="image")
    x = _conv_bn(inputs, 8, 3, "stem")
    for i in range(2):
        y = _conv_bn(x, 8, 3, f"r{i}a")
        y = _conv_bn(y, 8, 3, f"r{i}b", activation=None)
        x = L.Add(name=f"r{i}_add")([x, y])
        x = L.ReLU(name=f"r{i}_relu")(x)
    y = _conv_bn(x, 8, 1, "proj", activation=None)
    x = L.Add(name="linear_add")([x, y])  # an Add that feeds a conv directly
    return keras.Model(inputs, _head(x), name="residual_net")


def test_concatenate_inputs_share_one_range():
    model = concat_net()
    folded, _ = tf_pfq.fold_batchnorm(_randomize_bn(model))
    qat = tf_pfq.apply(folded, activation_bits=4, weight_bits=4)
    wrapped = {layer.layer.name for layer in qat.layers if hasattr(layer, "quantize_config")}
    outputs = {
        name
        for name in wrapped
        if qat.get_layer(f"quant_{name}").quantize_config.output_quantizer is not None
    }
    # The sources of a concat carry no range of their own; the concat does.
    assert {"concat", "concat2"} <= outputs
    assert not {"a_act", "b_act", "mix_act", "side"} & outputs
    # b_act reaches its concat through a max pooling; concat feeds a conv, not concat2.
    assert tf_pfq.quantize.concat_shared_ranges(folded, activation_bits=4) == {
        "a_act": "concat",
        "b_act": "concat",
        "mix_act": "concat2",
        "side": "concat2",
    }
    params = tf_pfq.export.plan_from_qat(qat).layers
    assert params["a_act"].output == params["b_act"].output == params["concat"].output
    # apply recorded the choice on each concat, and the export reads the record.
    config = qat.get_layer("quant_concat").quantize_config
    assert set(config.range_sources) == {"a_act", "b_act"}
    assert set(qat.get_layer("quant_concat2").quantize_config.range_sources) == {"mix_act", "side"}
    config.range_sources = ("a_act",)
    params = tf_pfq.export.plan_from_qat(qat).layers
    assert params["a_act"].output == params["concat"].output and "b_act" not in params
    # A model saved before the record (None) gets the same answer derived from the graph.
    for name in ("quant_concat", "quant_concat2"):
        qat.get_layer(name).quantize_config.range_sources = None
    params = tf_pfq.export.plan_from_qat(qat).layers
    assert params["a_act"].output == params["b_act"].output == params["concat"].output


def test_concatenate_export_is_exact():
    _check(concat_net)


@pytest.mark.parametrize("seed", range(5))
def test_residual_net_with_defaults_is_exact(seed):
    """Within half an output step on every seed.

    Rounding ties were the cause of the 3-8 step misses seen before: a range set from
    a batch maximum lies on the int32 accumulator lattice (s_in * s_w), which puts
    many conv and Add outputs exactly on a half step; TF's fake-quant and XNNPACK's
    fp32 requantization broke those ties by float noise, often in opposite
    directions. QAT ranges are now widened off that lattice (`OFF_LATTICE`), so both
    round every such value the same way.
    """
    _check(residual_net, seed=seed)


def softmax_net():
    inputs = keras.Input(SHAPE, name="image")
    x = _conv_bn(inputs, 8, 3, "stem")
    x = L.GlobalAveragePooling2D(name="pool")(x)
    # Large logits, so that the probabilities spread over many 1/256 steps.
    init = keras.initializers.RandomNormal(stddev=4.0)
    x = L.Dense(10, kernel_initializer=init, name="logits")(x)
    return keras.Model(inputs, L.Softmax(name="probs")(x), name="softmax_net")


def resnet50_head_net():
    # tf_keras.applications heads: Dense(classes, activation="softmax", name="predictions").
    inputs = keras.Input(SHAPE, name="image")
    x = _conv_bn(inputs, 8, 3, "stem")
    x = L.GlobalAveragePooling2D(name="avg_pool")(x)
    init = keras.initializers.RandomNormal(stddev=4.0)
    dense = L.Dense(10, activation="softmax", kernel_initializer=init, name="predictions")
    return keras.Model(inputs, dense(x), name="resnet50_head_net")


@pytest.mark.parametrize("build", [softmax_net, resnet50_head_net])
def test_output_softmax_exports_and_matches(build):
    tflite = _check(build)
    summary = inspect(tflite)
    assert "SOFTMAX" in summary.op_counts()
    np.testing.assert_allclose(summary.outputs[0].scales[0], 1.0 / 256.0)  # TFLite's grid


@pytest.mark.parametrize("act", ["sigmoid", "hard_sigmoid", "tanh", "swish"])
def test_inner_activations_export(act):
    _check(_inner_activation_net(act))


def _inner_activation_net(act):
    def build():
        inputs = keras.Input(SHAPE, name="image")
        x = _conv_bn(inputs, 8, 3, "stem", activation=act)
        x = _conv_bn(x, 8, 3, "mid")
        return keras.Model(inputs, _head(x), name="activation_net")

    build.__name__ = f"{getattr(act, '__name__', act)}_net"
    return build


@pytest.mark.parametrize(
    ("act", "seed"),
    [("swish", seed) for seed in range(5)] + [("silu", 0), (tf.nn.silu, 0)],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_swish_export_matches_on_every_seed(act, seed):
    """Within half an output step on seeds 0-4, whichever way swish is spelled.

    TFLite lowers swish as LOGISTIC then MUL and rounds the gate to LOGISTIC's 1/256
    grid in between; QAT rounds it there too (`swish_with_int8_gate`). Before, QAT
    used the exact gate and seed 0 missed by 6.3 output steps (p99 3.2); "silu" and
    `tf.nn.silu` are Keras' swish, so they are checked on that seed.
    """
    p99, worst, _, tflite = fidelity(_inner_activation_net(act), seed=seed)
    assert p99 <= 1.0 and worst <= 1.0, (p99, worst)
    assert {"LOGISTIC", "MUL"} <= set(inspect(tflite).op_counts())


def swish_pool_net():
    # Every swish output is positive (bias 3), so the pooled mean's trained range
    # starts at 0 although the tensor is signed: a RELU after MEAN, which cannot fuse it.
    inputs = keras.Input(SHAPE, name="image")
    bias = keras.initializers.Constant(3.0)
    x = L.Conv2D(8, 3, padding="same", bias_initializer=bias, name="stem")(inputs)
    x = L.Activation("swish", name="stem_act")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    x = L.Activation("swish", name="fc_act")(L.Dense(16, name="fc")(x))
    return keras.Model(inputs, L.Dense(10, name="logits")(x), name="swish_pool_net")


@pytest.mark.parametrize("seed", range(3))
def test_signed_mean_with_range_from_zero_matches(seed):
    """Within half an output step (16-30 steps when a RELU requantized MEAN's output)."""
    p99, worst, _, tflite = fidelity(swish_pool_net, seed=seed)
    assert p99 <= 1.0 and worst <= 1.0, (p99, worst)
    # The mean is a depthwise conv over every position, which rounds once (TFLite's
    # int8 MEAN rounds twice), and its ReLU (the range starts at zero) is fused.
    ops = set(inspect(tflite).op_counts())
    assert "DEPTHWISE_CONV_2D" in ops and not {"MEAN", "RELU"} & ops, ops


def test_swish_gate_is_rounded_in_qat_and_strip_gives_swish_back():
    keras.utils.set_random_seed(0)
    model = _inner_activation_net("swish")()
    folded, _ = tf_pfq.fold_batchnorm(model)
    qat = tf_pfq.apply(folded, activation_bits=4, weight_bits=4)
    wrapper = qat.get_layer("quant_stem_act")
    assert wrapper.quantize_config.swish_gate
    x = np.linspace(-6, 6, 97, dtype=np.float32)
    gate = np.round(256 / (1 + np.exp(-x.astype(np.float64)))).clip(0, 255) / 256
    np.testing.assert_allclose(wrapper.layer.activation(x).numpy(), x * gate, atol=1e-6)
    stripped = tf_pfq.strip(qat)
    assert stripped.get_layer("stem_act").get_config()["activation"] == "swish"
    np.testing.assert_allclose(
        stripped.get_layer("stem_act").activation(x).numpy(), x / (1 + np.exp(-x)), atol=1e-6
    )


def se_net():
    # Squeeze-excite: a sigmoid gate (TFLite's fixed 1/256 grid) scales the features.
    inputs = keras.Input(SHAPE, name="image")
    x = _conv_bn(inputs, 8, 3, "stem")
    s = L.GlobalAveragePooling2D(keepdims=True, name="squeeze")(x)
    s = L.Conv2D(4, 1, activation="relu", name="reduce")(s)
    s = L.Conv2D(8, 1, activation="sigmoid", name="expand")(s)
    x = L.Multiply(name="excite")([x, s])
    x = _conv_bn(x, 8, 3, "after")
    return keras.Model(inputs, _head(x), name="se_net")


def decoder_net():
    inputs = keras.Input(SHAPE, name="image")
    x = _conv_bn(inputs, 8, 3, "enc")
    x = L.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="down")(x)
    x = L.Conv2DTranspose(8, 3, strides=2, padding="same", activation="relu", name="up_t")(x)
    x = L.UpSampling2D(2, name="up_nearest")(x)
    x = _conv_bn(x, 8, 3, "dec1")
    x = L.UpSampling2D(2, interpolation="bilinear", name="up_bilinear")(x)
    x = L.ZeroPadding2D(1, name="pad")(x)
    x = L.Cropping2D(2, name="crop")(x)
    x = _conv_bn(x, 8, 3, "dec2")
    x = L.GlobalMaxPooling2D(name="gmax")(x)
    x = L.Reshape((1, 1, 8), name="reshape")(x)
    x = L.Conv2D(8, 1, activation="relu", name="head_conv")(x)
    x = L.Flatten(name="flat")(x)
    return keras.Model(inputs, L.Dense(10, name="logits")(x), name="decoder_net")


def test_squeeze_excite_exports_integer_ops():
    *_, tflite = fidelity(se_net)
    summary = inspect(tflite)
    assert {"MUL", "LOGISTIC"} <= set(summary.op_counts())
    assert {t.dtype for t in summary.tensors} <= {"int8", "int32"}


@pytest.mark.parametrize("seed", range(5))
def test_squeeze_excite_matches(seed):
    """Within half an output step on every seed.

    LOGISTIC, MUL and MEAN were exact; the misses (5-7 steps) came from exact rounding
    ties after them: the conv after the gate and the pooled mean had ranges on the
    accumulator lattice, and one flipped 4-bit pooled value is ~5 logit steps. See
    `test_residual_net_with_defaults_is_exact`.
    """
    _check(se_net, seed=seed)


def test_decoder_layers_export():
    *_, tflite = fidelity(decoder_net)
    ops = set(inspect(tflite).op_counts())
    assert {"TRANSPOSE_CONV", "RESIZE_NEAREST_NEIGHBOR", "DEPTHWISE_CONV_2D"} <= ops, ops
    assert "RESIZE_BILINEAR" not in ops  # see test_bilinear_upsampling_is_exact


def _transpose_net(activation, bias_initializer):
    def transpose_net():
        inputs = keras.Input(SHAPE, name="image")
        x = _conv_bn(inputs, 8, 3, "enc")
        x = L.Conv2DTranspose(
            8,
            3,
            strides=2,
            padding="same",
            activation=activation,
            bias_initializer=bias_initializer,
            name="up_t",
        )(x)
        return keras.Model(inputs, _head(_conv_bn(x, 8, 3, "dec")), name="transpose_net")

    return transpose_net


@pytest.mark.parametrize("activation", ["relu", "relu6", None])
@pytest.mark.parametrize("bias", ["zeros", "random_normal"])
def test_conv_transpose_with_fused_relu_is_integer_and_exact(activation, bias):
    # A zero bias used to be folded away by the converter, which then kept
    # TRANSPOSE_CONV in float behind DEQUANTIZE/QUANTIZE (5-8 output steps off).
    tflite = _check(_transpose_net(activation, bias), seed=1)
    summary = inspect(tflite)
    assert "TRANSPOSE_CONV" in summary.op_counts()
    assert {t.dtype for t in summary.tensors} <= {"int8", "int32"}


def test_a_file_with_a_float_op_is_refused():
    @tf.function(input_signature=[tf.TensorSpec([1, 4, 4, 2])])
    def f(x):
        x = tf.quantization.fake_quant_with_min_max_vars(x, 0.0, 1.0)
        x = tf.math.cumsum(x, axis=1)  # no integer kernel: the converter keeps it float
        return tf.quantization.fake_quant_with_min_max_vars(x, 0.0, 4.0)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    tflite = converter.convert()
    assert "CUMSUM" in inspect(tflite).op_counts()
    with pytest.raises(ValueError, match=r"left these ops in float.*CUMSUM"):
        tf_pfq.export.convert.check_integer(tflite)
    tf_pfq.export.convert.check_integer(_check(_transpose_net("relu", "zeros")))


@pytest.mark.parametrize("seed", range(3))
def test_decoder_layers_match(seed):
    # Bilinear upsampling used to be RESIZE_BILINEAR, whose int8 kernel keeps its
    # input's scale: the converter requantized dec1 straight onto the upsampling's
    # grid (one rounding where QAT has two), 6-21 output steps off.
    _check(decoder_net, seed=seed)


@pytest.mark.parametrize("size", [(2, 2), (3, 3), (4, 2), (1, 3)])
def test_bilinear_upsampling_is_exact(size):
    # The export computes bilinear upsampling as nearest copies and an integer-
    # weight depthwise conv; on float inputs that equals TensorFlow's resize.
    from tf_pfq.export.convert import _bilinear

    x = np.random.default_rng(0).uniform(-1, 1, (2, 5, 7, 3)).astype(np.float32)
    want = L.UpSampling2D(size, interpolation="bilinear")(x).numpy()
    np.testing.assert_allclose(_bilinear(tf.constant(x), *size).numpy(), want, atol=1e-6)

    def upsampling_net():
        inputs = keras.Input(SHAPE, name="image")
        x = _conv_bn(inputs, 8, 3, "enc")
        x = L.UpSampling2D(size, interpolation="bilinear", name="up")(x)
        return keras.Model(inputs, _head(_conv_bn(x, 8, 3, "dec")), name="upsampling_net")

    _check(upsampling_net)


def unet():
    # Encoder-decoder with skip connections: upsampled features concatenated with
    # the encoder's (one shared range), a transposed-conv upsampling with no bias.
    inputs = keras.Input(SHAPE, name="image")
    e1 = _conv_bn(inputs, 8, 3, "e1")
    e2 = _conv_bn(L.MaxPooling2D(2, name="down1")(e1), 16, 3, "e2")
    b = _conv_bn(L.MaxPooling2D(2, name="down2")(e2), 16, 3, "bottom")
    u = L.UpSampling2D(2, interpolation="bilinear", name="up2")(b)
    u = _conv_bn(L.Concatenate(name="cat2")([u, e2]), 16, 3, "d2")
    u = L.Conv2DTranspose(8, 2, strides=2, use_bias=False, activation="relu", name="up1")(u)
    u = _conv_bn(L.Concatenate(name="cat1")([u, e1]), 8, 3, "d1")
    out = L.Flatten(name="flat")(L.Conv2D(3, 1, name="seg")(u))
    return keras.Model(inputs, L.Dense(10, name="logits")(out), name="unet")


@pytest.mark.parametrize("seed", range(2))
def test_unet_matches(seed):
    _check(unet, seed=seed)


def grouped_net():
    # RegNet's grouped 3x3 convs: TFLite runs them as one CONV_2D.
    inputs = keras.Input(SHAPE, name="image")
    x = _conv_bn(inputs, 8, 3, "stem")
    x = L.Conv2D(8, 3, padding="same", groups=4, use_bias=False, name="grouped")(x)
    x = L.BatchNormalization(name="grouped_bn")(x)
    x = L.ReLU(name="grouped_relu")(x)
    return keras.Model(inputs, _head(_conv_bn(x, 8, 1, "mix")), name="grouped_net")


def test_grouped_conv_exports_exactly():
    tflite = _check(grouped_net)
    grouped = [
        op for op in inspect(tflite).ops if op.op == "CONV_2D" and op.inputs[1].shape[-1] == 2
    ]
    assert len(grouped) == 1  # its filter holds cin / groups = 2 input channels


def _op_layer_model():
    inputs = keras.Input(SHAPE, name="image")
    x = L.Conv2D(4, 3, name="conv")(inputs)
    x = tf.math.cumsum(x, axis=1)  # a TFOpLambda tf_pfq does not model
    return keras.Model(inputs, _head(x))


def test_op_layers_are_refused_by_name():
    model = _op_layer_model()
    op_layer = next(layer for layer in model.layers if type(layer).__name__ == "TFOpLambda")
    with pytest.raises(ValueError, match=rf"{op_layer.name}.*TFOpLambda.*cumsum"):
        tf_pfq.apply(model, activation_bits=4)


def test_stage_w_refuses_unfoldable_weights():
    inputs = keras.Input(SHAPE, name="image")
    x = L.BatchNormalization(name="input_bn")(inputs)  # follows no linear layer
    model = keras.Model(inputs, _head(L.Conv2D(4, 3, name="conv")(x)))
    with pytest.raises(ValueError, match=r"input_bn.*follows no"):
        tf_pfq.apply(model, activation_bits=4, weight_bits=4)
    inputs = keras.Input(SHAPE, name="image")
    x = L.ELU(name="elu")(L.Conv2D(4, 3, name="conv")(inputs))
    x = L.LayerNormalization(name="ln")(x)  # weights (gamma, beta) stage W cannot quantize
    with pytest.raises(ValueError, match=r"ln.*LayerNormalization.*float"):
        tf_pfq.apply(keras.Model(inputs, _head(x)), activation_bits=4, weight_bits=4)
