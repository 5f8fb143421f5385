"""tf_pfq.apply / strip / quantize_scope / quantization_params (paper §3.3, §4.1)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_model_optimization as tfmot

import tf_pfq
from tf_pfq import models, quantize, ranges
from tf_pfq.compat import keras
from tf_pfq.quantize_configs import PfqQuantizeConfig
from tf_pfq.quantizers import PfqActivationQuantizer, PfqWeightQuantizer, quantize_weight
from tf_pfq.scheme import PfqQuantizeScheme

L = keras.layers
WEIGHTED = (L.Conv2D, L.DepthwiseConv2D, L.Dense)


def _v2():
    # Residual Adds in block_1 and block_2; block_3 has none.
    return models.mobilenet_v2(
        input_shape=(16, 16, 3), stem=8, blocks=((8, 1, 1), (8, 1, 4), (16, 2, 4)), last=32
    )


def _randomize_bn(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, c),
                    rng.normal(0, 0.3, c),
                    rng.normal(0, 0.3, c),
                    rng.uniform(0.5, 2.0, c),
                ]
            )
    return model


def _images(n=8, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, 16, 16, 3)).astype(np.float32)


def _wrappers(qat):
    return {
        layer.layer.name: layer
        for layer in qat.layers
        if isinstance(layer, tfmot.quantization.keras.QuantizeWrapper)
    }


def _output_quantized(qat):
    return {
        name for name, w in _wrappers(qat).items() if w.quantize_config.output_quantizer is not None
    }


def _weight_quantized(qat):
    return {
        name for name, w in _wrappers(qat).items() if w.quantize_config.weight_quantizer is not None
    }


def _one_step(model, x, y=None):
    model.compile(
        keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    y = np.zeros(len(x), np.int64) if y is None else y
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)


def test_stage_a_quantizes_activations_only():
    model = _v2()
    qat = tf_pfq.apply(model, activation_bits=4, add_bits=None)  # the paper's float Add
    names = [layer.name for layer in model.layers]
    expected = {n for n in names if n.endswith(("_relu", "_project_bn"))} | {"pool"}
    assert _output_quantized(qat) == expected
    assert not _weight_quantized(qat)
    # BN stays unfolded, as a trainable layer.
    assert sum(isinstance(layer, L.BatchNormalization) for layer in qat.layers) == sum(
        isinstance(layer, L.BatchNormalization) for layer in model.layers
    ) - len([n for n in expected if n.endswith("_bn")])
    # Paper §4.1: not the last layer, not the Add outputs.
    assert "logits" not in _wrappers(qat)
    assert not {"block_1_add", "block_2_add"} & set(_wrappers(qat))
    assert qat.get_layer("quant_image").quantizer.num_bits == 8
    for name in expected:
        quantizer = qat.get_layer(f"quant_{name}").quantize_config.output_quantizer
        assert quantizer.num_bits == 4
        assert quantizer.non_negative == name.endswith("_relu")  # BN outputs can be < 0


def test_default_quantizes_add_outputs_at_8_bits():
    # The deployable default: every Add output has a grid the integer file can hold.
    model = _v2()
    qat = tf_pfq.apply(model, activation_bits=4)
    adds = {layer.name for layer in model.layers if isinstance(layer, L.Add)}
    assert adds and adds <= _output_quantized(qat)
    for name in adds:
        assert _wrappers(qat)[name].quantize_config.output_quantizer.num_bits == 8


def test_add_feeding_a_relu_is_fused():
    x = keras.Input((4, 4, 2))
    y = L.Add(name="add")([L.Conv2D(2, 1, name="c")(x), x])
    y = L.ReLU(name="relu")(y)
    model = keras.Model(x, L.Conv2D(2, 1, name="out")(y))
    assert tf_pfq.quantize.quantized_tensors(model, activation_bits=4) == {"c": 4, "relu": 4}


def test_stage_w_quantizes_every_kernel_and_bias():
    folded, _ = tf_pfq.fold_batchnorm(_randomize_bn(_v2()))
    qat = tf_pfq.apply(folded, activation_bits=3, weight_bits=3, add_bits=8)
    kernels = {layer.name for layer in folded.layers if isinstance(layer, WEIGHTED)}
    assert _weight_quantized(qat) == kernels and len(kernels) == 11
    names = [layer.name for layer in folded.layers]
    expected = {n for n in names if n.endswith(("_relu", "_project", "_add"))} | {"pool"}
    assert _output_quantized(qat) == expected
    assert "logits" not in _output_quantized(qat)
    qat(_images(), training=False)  # eager call: wrappers now hold the kernels in use
    params = quantize.quantization_params(qat)
    for name in kernels:
        wrapper = _wrappers(qat)[name]
        config = wrapper.quantize_config
        attr = config.kernel_attr
        used = getattr(wrapper.layer, attr).numpy()
        variable = next(w for w in wrapper.weights if w.name.endswith(f"/{attr}:0"))
        assert len(np.unique(used)) <= 2**3, name
        np.testing.assert_array_equal(used, quantize_weight(variable, 3).numpy())
        assert np.abs(used - variable.numpy()).max() > 0, name  # not a silent no-op
        # The bias in use is an int32 multiple of s_in * s_w.
        assert config.bias_quantizer is not None, name
        steps = wrapper.layer.bias.numpy() / params[name].bias_scale
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
    assert params["conv1"].input_layer == "image"
    assert params["block_2_expand"].input_layer == "block_1_add"


def test_bias_stays_float_after_an_unquantized_add():
    folded, _ = tf_pfq.fold_batchnorm(_v2())
    qat = tf_pfq.apply(folded, activation_bits=4, weight_bits=4, add_bits=None)  # paper
    wrappers = _wrappers(qat)
    assert wrappers["block_2_expand"].quantize_config.bias_quantizer is None  # reads an Add
    assert wrappers["block_3_expand"].quantize_config.bias_quantizer is None
    assert wrappers["block_1_dw"].quantize_config.bias_quantizer is not None
    assert wrappers["logits"].quantize_config.bias_quantizer is not None  # via pool


@pytest.mark.parametrize("per_channel", [False, True])
def test_per_channel_weights_except_dense(per_channel):
    folded, _ = tf_pfq.fold_batchnorm(_v2())
    qat = tf_pfq.apply(folded, activation_bits=4, weight_bits=4, per_channel_weights=per_channel)
    wrappers = _wrappers(qat)
    assert wrappers["block_1_dw"].quantize_config.weight_quantizer == PfqWeightQuantizer(
        4, per_channel, depthwise=True
    )
    assert wrappers["conv1"].quantize_config.weight_quantizer.per_channel == per_channel
    assert not wrappers["logits"].quantize_config.weight_quantizer.per_channel
    y = qat(_images(), training=True)
    assert np.isfinite(y.numpy()).all()


def test_activation_outputs_lie_on_the_reported_grid():
    folded, _ = tf_pfq.fold_batchnorm(_randomize_bn(_v2()))
    qat = tf_pfq.apply(folded, activation_bits=3, weight_bits=3, add_bits=8)
    _one_step(qat, _images(16))
    params = quantize.quantization_params(qat)
    names = ["conv1_relu", "block_1_project", "block_1_add", "pool"]
    probe = keras.Model(qat.inputs, [qat.get_layer(f"quant_{n}").output for n in names])
    for name, values in zip(names, probe.predict(_images(16, seed=1), verbose=0)):
        grid = params[name].output
        steps = (values - grid.min) / grid.scale
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
        assert len(np.unique(values)) <= grid.num_levels
        assert grid.num_levels == (2**8 if name.endswith("_add") else 2**3)


def test_stage_w_rejects_unfolded_batchnorm():
    with pytest.raises(ValueError, match=r"conv1_bn.*tf_pfq.fold_batchnorm"):
        tf_pfq.apply(_v2(), activation_bits=4, weight_bits=4)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"activation_bits": 1}, "activation_bits"),
        ({"activation_bits": 4, "weight_bits": 9}, "weight_bits"),
        ({"activation_bits": 4, "add_bits": 16}, "add_bits"),
        ({"activation_bits": 4.5}, "activation_bits"),
        ({"activation_bits": 4, "weight_bits": 4, "weight_scheme": "sym"}, "weight_scheme"),
    ],
)
def test_bits_validation(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        tf_pfq.apply(_v2(), **kwargs)


def test_rejects_non_models():
    with pytest.raises(TypeError, match="tf_keras"):
        tf_pfq.apply(object(), activation_bits=4)
    with pytest.raises(ValueError, match="no quantized layer"):
        tf_pfq.strip(_v2())


def test_input_model_is_not_modified():
    model = _randomize_bn(_v2())
    config = model.get_config()
    weights = [w.copy() for w in model.get_weights()]
    nodes = {layer.name: len(layer.inbound_nodes) for layer in model.layers}
    qat = tf_pfq.apply(model, activation_bits=4)
    _one_step(qat, _images())
    assert model.get_config() == config
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)
    assert {layer.name: len(layer.inbound_nodes) for layer in model.layers} == nodes


def test_sequential_model():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            L.Conv2D(4, 3, activation="relu", name="conv"),
            L.Flatten(name="flat"),
            L.Dense(3, name="fc"),
        ]
    )
    qat = tf_pfq.apply(model, activation_bits=2, weight_bits=2)
    assert _output_quantized(qat) == {"conv"}  # fused ReLU: the activated output
    assert _weight_quantized(qat) == {"conv", "fc"}
    # fc's bias finds conv's quantizer through Flatten.
    assert _wrappers(qat)["fc"].quantize_config.bias_quantizer is not None
    qat(np.ones((2, 8, 8, 3), np.float32), training=False)
    params = quantize.quantization_params(qat)
    assert params["fc"].input_layer == "conv"


def test_tfmot_default_scheme_drops_conv_relu_configs():
    # The pitfall tf_pfq's scheme avoids: tfmot's 8-bit layout transform replaces an
    # annotated Conv->ReLU pair's configs, leaving the kernel unquantized.
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, name="conv")(inputs)
    x = L.ReLU(name="relu")(x)
    outputs = L.Dense(2, name="fc")(L.Flatten()(x))
    model = keras.Model(inputs, outputs)
    annotate = tfmot.quantization.keras.quantize_annotate_layer

    def clone(layer):
        if layer.name == "conv":
            return annotate(layer, PfqQuantizeConfig(weight_quantizer=PfqWeightQuantizer(4)))
        if layer.name == "relu":
            return annotate(layer, PfqQuantizeConfig(output_quantizer=PfqActivationQuantizer(4)))
        return layer

    def conv_config(scheme):
        with tf_pfq.quantize_scope():
            annotated = keras.models.clone_model(model, clone_function=clone)
            qat = tfmot.quantization.keras.quantize_apply(annotated, scheme)
        return qat.get_layer("quant_conv").quantize_config

    default = conv_config(tfmot.quantization.keras.default_8bit.Default8BitQuantizeScheme())
    ours = conv_config(PfqQuantizeScheme())
    assert not isinstance(default, PfqQuantizeConfig)
    assert default.get_weights_and_quantizers(model.get_layer("conv")) == []
    assert ours.weight_quantizer == PfqWeightQuantizer(4)


def test_strip_returns_the_float_model_and_ranges():
    model = _randomize_bn(_v2())
    qat = tf_pfq.apply(model, activation_bits=4)
    x = _images()
    untrained = tf_pfq.strip(qat)
    assert [layer.name for layer in untrained.layers] == [layer.name for layer in model.layers]
    np.testing.assert_allclose(
        untrained.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )
    _one_step(qat, x)
    stripped = tf_pfq.strip(qat)
    assert not any(
        isinstance(layer, tfmot.quantization.keras.QuantizeWrapper) for layer in stripped.layers
    )
    trained_bn = qat.get_layer("quant_block_1_project_bn").layer.get_weights()
    for a, b in zip(trained_bn, stripped.get_layer("block_1_project_bn").get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        qat.get_layer("conv1").get_weights()[0], stripped.get_layer("conv1").get_weights()[0]
    )
    found = ranges.activation_ranges_of(stripped)
    assert set(found) == _output_quantized(qat) | {"image"}
    quantizer = qat.get_layer("quant_conv1_relu").quantize_config.output_quantizer
    assert found["conv1_relu"] == ranges.ActivationRange(
        float(quantizer.min_var.numpy()), float(quantizer.max_var.numpy()), 4
    )
    assert found["conv1_relu"].min == 0.0 and found["conv1_relu"].max > 0.0  # after ReLU


def _dead_channel_model():
    inputs = keras.Input((6, 6, 3), name="image")
    x = L.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU(name="relu")(x)
    x = L.Conv2D(5, 1, name="pw")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inputs, L.Dense(2, name="fc")(x))
    bn = model.get_layer("bn")
    bn.moving_variance.assign([1.0, 0.0, 1.0, 1.0])  # channel 1 is dead (V < eps)
    bn.beta.assign([0.0, 1.3, 0.0, 0.0])  # its constant output: relu(1.3) = 1.3
    return model


def test_prune_after_strip_uses_the_quantized_constant():
    qat = tf_pfq.apply(_dead_channel_model(), activation_bits=2)
    quantizer = qat.get_layer("quant_relu").quantize_config.output_quantizer
    quantizer.min_var.assign(0.0)  # as if learned in stage A: 2-bit levels 0, 1, 2, 3
    quantizer.max_var.assign(3.0)
    stripped = tf_pfq.strip(qat)
    w = stripped.get_layer("pw").get_weights()
    column = w[0][:, :, 1, :].sum(axis=(0, 1))
    pruned, report = tf_pfq.prune(stripped)
    assert report.num_pruned == 1
    delta = pruned.get_layer("pw").get_weights()[1] - w[1]
    np.testing.assert_allclose(delta, 1.0 * column, atol=1e-6)  # Q(1.3) = 1.0
    # Negative control: without the ranges, PfQ absorbs the float act(beta) = 1.3.
    setattr(stripped, ranges.ACTIVATION_RANGES_ATTR, {})
    pruned_float, _ = tf_pfq.prune(stripped)
    delta_float = pruned_float.get_layer("pw").get_weights()[1] - w[1]
    np.testing.assert_allclose(delta_float, 1.3 * column, atol=1e-6)


@pytest.mark.parametrize("fmt", ["h5", "savedmodel"])
def test_save_and_load_round_trip(tmp_path, fmt):
    folded, _ = tf_pfq.fold_batchnorm(_randomize_bn(_v2()))
    qat = tf_pfq.apply(folded, activation_bits=4, weight_bits=4, per_channel_weights=True)
    _one_step(qat, _images(16))
    path = str(tmp_path / ("model.h5" if fmt == "h5" else "saved"))
    qat.save(path)
    with tf_pfq.quantize_scope():
        loaded = keras.models.load_model(path)
    x = _images(8, seed=3)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), qat.predict(x, verbose=0))
    assert _wrappers(loaded)["conv1"].quantize_config == _wrappers(qat)["conv1"].quantize_config
    assert ranges.activation_ranges_of(tf_pfq.strip(loaded)) == ranges.activation_ranges_of(
        tf_pfq.strip(qat)
    )


def test_symmetric_weight_scheme_reaches_every_kernel_bias_and_saved_model(tmp_path):
    folded, _ = tf_pfq.fold_batchnorm(_randomize_bn(_v2()))
    qat = tf_pfq.apply(
        folded,
        activation_bits=4,
        weight_bits=4,
        per_channel_weights=True,
        weight_scheme="symmetric",
    )
    _one_step(qat, _images(16))
    params = quantize.quantization_params(qat)
    wrappers = _weight_quantized(qat)
    assert len(wrappers) == 11
    for name in wrappers:
        config = _wrappers(qat)[name].quantize_config
        assert config.weight_quantizer.scheme == "symmetric", name
        assert config.bias_quantizer.weight_scheme == "symmetric", name
        grid = params[name].kernel
        assert grid.narrow_range and grid.num_levels == 15, name
        np.testing.assert_array_equal(grid.zero_point, 8)  # integers -7..7 in the file
        # The bias grid uses the symmetric s_w (a 15-level step, not a 16-level one).
        s_in = params[params[name].input_layer].output.scale
        np.testing.assert_allclose(params[name].bias_scale, s_in * grid.scale, rtol=1e-5)
    path = str(tmp_path / "model.h5")
    qat.save(path)
    with tf_pfq.quantize_scope():
        loaded = keras.models.load_model(path)
    x = _images(8, seed=3)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), qat.predict(x, verbose=0))
    for name in ("conv1", "block_1_dw", "logits"):
        assert _wrappers(loaded)[name].quantize_config == _wrappers(qat)[name].quantize_config
    # strip gives back the trained float kernels whatever the grid.
    stripped = tf_pfq.strip(qat)
    variable = next(w for w in _wrappers(qat)["conv1"].weights if w.name.endswith("/kernel:0"))
    np.testing.assert_array_equal(stripped.get_layer("conv1").get_weights()[0], variable.numpy())


def _compile(model, learning_rate):
    model.compile(
        keras.optimizers.SGD(learning_rate, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def _fine_tune_losses(qat, split, epochs=4):
    """Per-epoch training loss of a short fine-tuning run.

    The training-mode loss is used: with 16 steps per epoch, BN moving statistics
    and moving-average ranges lag behind the weights, which makes the
    inference-mode loss of such short runs too noisy to compare.
    """
    _compile(qat, 0.02)
    history = qat.fit(split.images, split.labels, batch_size=32, epochs=epochs, verbose=0)
    return history.history["loss"]


@pytest.mark.slow
def test_stage_a_and_stage_w_fine_tune_on_digits():
    # Training loss, seeds 0-2: stage A 0.79-0.83 -> 0.67-0.72, stage W 2.3-3.6 -> 1.4-1.9.
    keras.utils.set_random_seed(0)
    split = tf_pfq.data.load_digits(image_size=16, num_train=512)["train"]
    model = models.mobilenet_v1(input_shape=(16, 16, 3), widths=(16, 32), strides=(1, 2))
    _compile(model, 0.1)
    model.fit(split.images, split.labels, batch_size=32, epochs=10, verbose=0)
    stage_a = tf_pfq.apply(model, activation_bits=3)
    losses_a = _fine_tune_losses(stage_a, split)
    assert losses_a[-1] < 0.95 * losses_a[0], losses_a
    folded, _ = tf_pfq.fold_batchnorm(tf_pfq.strip(stage_a))
    stage_w = tf_pfq.apply(folded, activation_bits=3, weight_bits=3)
    losses_w = _fine_tune_losses(stage_w, split)
    assert losses_w[-1] < 0.8 * losses_w[0], losses_w


def test_without_input_quantizer_the_first_bias_stays_float():
    folded, _ = tf_pfq.fold_batchnorm(_v2())
    qat = tf_pfq.apply(folded, activation_bits=4, weight_bits=4, input_bits=None)
    assert "quant_image" not in [layer.name for layer in qat.layers]
    wrappers = _wrappers(qat)
    assert wrappers["conv1"].quantize_config.bias_quantizer is None
    assert wrappers["block_1_dw"].quantize_config.bias_quantizer is not None
    assert "image" not in quantize.quantization_params(qat)
