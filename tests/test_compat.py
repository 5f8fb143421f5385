"""tf_pfq.compat: Keras 3 models, nested models and model files in every entry point."""

from __future__ import annotations

import os

import keras as keras3
import numpy as np
import pytest
from test_prune_helpers import plant_dead

import tf_pfq
from tf_pfq import compat
from tf_pfq.compat import keras

L = keras.layers


def _random_bn(model, seed: int = 0) -> None:
    """Random BN statistics (Keras 3 or tf_keras, nested models included)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if hasattr(layer, "layers"):
            _random_bn(layer, seed + 1)
        elif type(layer).__name__ == "BatchNormalization":
            # gamma (when scale=True), beta (when center=True), mean, variance.
            low = {"gamma": 0.5, "moving_variance": 0.5}
            values = []
            for weight in layer.weights:
                kind = weight.name.split("/")[-1].split(":")[0]
                n = weight.shape[0]
                if kind in low:
                    values.append(rng.uniform(low[kind], 1.5, n))
                else:
                    values.append(rng.normal(0.0, 0.2 if kind == "beta" else 0.1, n))
            layer.set_weights([v.astype(np.float32) for v in values])


def _relative_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(a).max())


def _images(shape, n=2, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, *shape)).astype(np.float32)


def _leaf_names(model) -> list[str]:
    names = []
    for layer in model.layers:
        names += _leaf_names(layer) if hasattr(layer, "layers") else [layer.name]
    return names


APPLICATIONS = {
    "MobileNetV2": lambda: keras3.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None
    ),
    "MobileNetV3Small": lambda: keras3.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), alpha=0.75, weights=None
    ),
    "EfficientNetB0": lambda: keras3.applications.EfficientNetB0(
        input_shape=(32, 32, 3), weights=None
    ),
    "ResNet50": lambda: keras3.applications.ResNet50(input_shape=(32, 32, 3), weights=None),
}


@pytest.mark.parametrize(
    "name",
    [
        "MobileNetV2",
        "MobileNetV3Small",
        pytest.param("EfficientNetB0", marks=pytest.mark.slow),
        pytest.param("ResNet50", marks=pytest.mark.slow),
    ],
)
def test_keras3_applications_convert_exactly(name):
    model = APPLICATIONS[name]()
    _random_bn(model)
    # MobileNetV3 and EfficientNet rescale 0..255 inputs themselves; the others
    # take preprocessed inputs.
    scale = 255.0 if name in ("MobileNetV3Small", "EfficientNetB0") else 1.0
    x = _images((32, 32, 3)) * scale
    converted = compat.to_tf_keras(model)
    assert isinstance(converted, keras.Model)
    assert all(type(layer).__module__.startswith("tf_keras") for layer in converted.layers)
    # Every Keras 3 layer is there under its own name (op nodes are not layers).
    assert {layer.name for layer in model.layers} <= {layer.name for layer in converted.layers}
    diff = _relative_diff(model(x), converted(x))
    print(f"{name}: max relative difference {diff:.2e}")
    assert diff < 1e-5


def test_keras3_ops_and_activations_translate():
    x = keras3.Input((6,), name="x")
    y = keras3.layers.Dense(6, name="fc")(x)
    y = keras3.layers.Activation("hard_silu", name="hs")(y) + 3.0
    y = keras3.ops.relu(y) * 2 - keras3.layers.Dense(6, activation="silu", name="fc2")(x)
    y = keras3.layers.Dense(3, activation="hard_sigmoid", name="out")(y / 4.0)
    model = keras3.Model(x, y)
    converted = compat.to_tf_keras(model)
    data = np.random.default_rng(0).normal(0, 3, (16, 6)).astype(np.float32)
    assert _relative_diff(model(data), converted(data)) < 1e-5


def test_keras3_renamed_arguments_and_none_call_arguments():
    # LeakyReLU's `alpha` is `negative_slope` in Keras 3; Keras 3 records `mask=None`
    # on the BN after a Concatenate, which must not follow the BN when fold writes
    # it as a 1x1 depthwise conv.
    x = keras3.Input((6, 6, 3), name="x")
    a = keras3.layers.Conv2D(4, 3, padding="same", name="a")(x)
    b = keras3.layers.Conv2D(4, 1, name="b")(x)
    y = keras3.layers.Concatenate(name="cat")([a, b])
    y = keras3.layers.BatchNormalization(name="pre_bn")(y)
    y = keras3.layers.LeakyReLU(negative_slope=0.2, name="leaky")(y)
    model = keras3.Model(x, keras3.layers.Conv2D(2, 1, name="head")(y))
    _random_bn(model)
    converted = compat.to_tf_keras(model)
    assert converted.get_layer("leaky").get_config()["alpha"] == pytest.approx(0.2)
    data = _images((6, 6, 3), n=4)
    assert _relative_diff(model(data), converted(data)) < 1e-5
    folded, report = tf_pfq.fold_batchnorm(converted)
    assert "pre_bn" in report.affine
    assert type(folded.get_layer("pre_bn")).__name__ == "DepthwiseConv2D"
    assert _relative_diff(model(data), folded(data)) < 1e-5


def test_keras3_nested_sequential_is_converted_and_flattened():
    backbone = keras3.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None
    )
    model = keras3.Sequential(
        [
            keras3.Input((32, 32, 3)),
            backbone,
            keras3.layers.GlobalAveragePooling2D(name="pool"),
            keras3.layers.Dense(10, name="head"),
        ]
    )
    _random_bn(model)
    weights = [w.copy() for w in model.get_weights()]
    flat = compat.prepare_model(model)
    assert isinstance(flat, keras.Model)
    assert not any(isinstance(layer, keras.Model) for layer in flat.layers)
    # Names kept (nothing clashes here).
    assert [layer.name for layer in flat.layers[1:]] == _leaf_names(model)[1:]
    x = _images((32, 32, 3))
    assert _relative_diff(model(x), flat(x)) < 1e-5
    # The input model is untouched.
    assert len(model.layers) == 3
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))


def _dead_backbone():
    keras.utils.set_random_seed(0)
    backbone = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None
    )
    _random_bn(backbone)
    # relu6(-0.5) = 0: removal is exact, also across the depthwise zero padding.
    planted = {"block_1_expand_BN": (1, 4, 7), "block_2_expand_BN": (0, 2)}
    for bn_name, channels in planted.items():
        for channel in channels:
            plant_dead(backbone, bn_name, channel, beta=-0.5)
    return backbone, planted


def test_prune_removes_dead_channels_inside_a_nested_backbone():
    backbone, planted = _dead_backbone()
    image = keras.Input((32, 32, 3), name="image")
    y = L.GlobalAveragePooling2D(name="pool")(backbone(image))
    model = keras.Model(image, L.Dense(10, name="head")(y), name="wrapper")
    weights = [w.copy() for w in model.get_weights()]
    x = _images((32, 32, 3), n=4)
    pruned, report = tf_pfq.prune(model)
    print(f"planted {sum(map(len, planted.values()))}, pruned {report.num_pruned}")
    assert report.num_kept == 0, [r.kept for r in report.bn_layers if r.kept]
    assert report.num_dead == report.num_pruned == sum(len(c) for c in planted.values())
    for bn_name, channels in planted.items():
        assert sorted(report.layer(bn_name).dead) == list(channels)
        assert pruned.get_layer(bn_name).moving_variance.shape[0] == (
            backbone.get_layer(bn_name).moving_variance.shape[0] - len(channels)
        )
    assert _relative_diff(model(x), pruned(x)) < 1e-5
    assert len(model.layers) == 4  # the wrapper still nests its backbone
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))


def test_flatten_prefixes_only_clashing_names():
    inner_in = keras.Input((4,), name="inner_in")
    inner = keras.Model(inner_in, L.Dense(4, name="fc")(inner_in), name="block")
    x = keras.Input((4,), name="x")
    y = L.Dense(4, name="fc")(x)
    model = keras.Model(x, inner(inner(y)), name="outer")
    flat = compat.flatten(model)
    names = [layer.name for layer in flat.layers]
    assert names == ["x", "fc", "block_fc"]  # the shared block stays one shared layer
    data = _images((4,), n=3)
    np.testing.assert_array_equal(model(data), flat(data))


def test_load_model_reads_keras3_and_tf_keras_files(tmp_path):
    model = keras3.Sequential(
        [
            keras3.Input((8, 8, 3)),
            keras3.layers.Conv2D(4, 3, name="conv"),
            keras3.layers.BatchNormalization(name="bn"),
            keras3.layers.ReLU(name="relu"),
        ]
    )
    _random_bn(model)
    x = _images((8, 8, 3))
    for suffix in ("keras", "h5"):
        path = os.path.join(tmp_path, f"k3.{suffix}")
        model.save(path)
        loaded = compat.load_model(path)
        assert isinstance(loaded, keras.Model), suffix
        assert _relative_diff(model(x), loaded(x)) < 1e-5, suffix
    tf_model = compat.to_tf_keras(model)
    for suffix in ("keras", "h5"):
        path = os.path.join(tmp_path, f"tf.{suffix}")
        tf_model.save(path)
        assert _relative_diff(tf_model(x), compat.load_model(path)(x)) < 1e-5, suffix
    with pytest.raises(FileNotFoundError, match="no model file"):
        compat.load_model(os.path.join(tmp_path, "missing.keras"))


def test_lambda_layer_error_says_how_to_rewrite():
    x = keras3.Input((4,))
    model = keras3.Model(x, keras3.layers.Lambda(lambda t: t * 2, name="double")(x))
    with pytest.raises(TypeError, match=r"'double' is a Keras 3 Lambda layer.*standard layers"):
        tf_pfq.apply(model, activation_bits=8)


def test_untranslatable_operation_names_it():
    x = keras3.Input((4,))
    model = keras3.Model(x, keras3.ops.cumsum(x, axis=-1))
    with pytest.raises(TypeError, match=r"Operation 'cumsum'.*Cumsum"):
        compat.to_tf_keras(model)


def test_subclassed_models_keep_their_error():
    class Net(keras3.Model):
        def __init__(self):
            super().__init__()
            self.fc = keras3.layers.Dense(2)

        def call(self, x):
            return self.fc(x)

    k3 = Net()
    k3(np.zeros((1, 4), np.float32))
    with pytest.raises(TypeError, match="subclassed Keras 3 model"):
        tf_pfq.prune(k3)

    class TfNet(keras.Model):
        def __init__(self):
            super().__init__()
            self.fc = L.Dense(2)

        def call(self, x):
            return self.fc(x)

    sub = TfNet()
    sub(np.zeros((1, 4), np.float32))
    with pytest.raises(TypeError, match="subclassed model"):
        tf_pfq.apply(sub, activation_bits=8)
    x = keras.Input((4,))
    with pytest.raises(TypeError, match=r"Nested model .* subclassed"):
        compat.prepare_model(keras.Model(x, sub(x)))


def test_prepare_model_returns_flat_tf_keras_models_as_they_are():
    model = keras.Sequential([keras.Input((4,)), L.Dense(2)])
    assert compat.prepare_model(model) is model


def _plant_dead_keras3(model, conv: str, bn: str, channels) -> None:
    kernel = model.get_layer(conv).get_weights()
    for c in channels:
        kernel[0][..., c] = 0.0
    model.get_layer(conv).set_weights(kernel)
    gamma, beta, mean, var = model.get_layer(bn).get_weights()
    for c in channels:
        beta[c], mean[c], var[c] = -0.5, 0.0, 1e-6
    model.get_layer(bn).set_weights([gamma, beta, mean, var])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["MobileNetV2", "ResNet50"])
def test_keras3_backbone_through_the_whole_chain(name):
    # Pooled backbone + Dense head (no softmax): layers the integer export takes.
    if name == "MobileNetV2":
        backbone = keras3.applications.MobileNetV2(
            input_shape=(32, 32, 3), alpha=0.35, include_top=False, weights=None
        )
        dead = ("block_1_expand", "block_1_expand_BN")
    else:
        backbone = keras3.applications.ResNet50(
            input_shape=(32, 32, 3), include_top=False, weights=None
        )
        dead = ("conv2_block1_1_conv", "conv2_block1_1_bn")
    image = keras3.Input((32, 32, 3), name="image")
    y = keras3.layers.GlobalAveragePooling2D(name="pool")(backbone(image))
    model = keras3.Model(image, keras3.layers.Dense(10, name="head")(y))
    _random_bn(model)
    _plant_dead_keras3(backbone, *dead, channels=(0, 3))
    x = _images((32, 32, 3), n=16)
    pruned, report = tf_pfq.prune(model)
    assert report.num_pruned == 2
    assert _relative_diff(model(x), pruned(x)) < 1e-4
    qat = tf_pfq.apply(pruned, activation_bits=8)
    qat(x, training=True)
    folded, _ = tf_pfq.fold_batchnorm(tf_pfq.strip(qat))
    qat = tf_pfq.apply(folded, activation_bits=8, weight_bits=8)
    qat(x, training=True)
    tflite = tf_pfq.export.to_tflite(qat, representative_data=x)
    assert isinstance(tflite, bytes) and len(tflite) > 1000


def test_keras3_deep_shared_and_multi_output_nesting():
    a = keras3.Input((8,), name="a")
    inner = keras3.Model(a, keras3.layers.Dense(8, name="d")(a), name="inner")
    mid = keras3.Sequential([keras3.Input((8,)), inner, keras3.layers.ReLU(name="r")], name="mid")
    p, q = keras3.Input((8,), name="p"), keras3.Input((8,), name="q")
    add = keras3.layers.Add(name="d")([p, q])
    two = keras3.Model([p, q], [add, keras3.layers.Multiply(name="m")([p, q])], name="two")
    x = keras3.Input((8,), name="x")
    y1, y2 = two([mid(x), x])
    # `mid` is called again on an output of `two`, listed after it in the config.
    model = keras3.Model(x, keras3.layers.Concatenate(name="cat")([y1, y2, mid(y2)]))
    flat = compat.prepare_model(model)
    assert [layer.name for layer in flat.layers] == ["x", "d", "r", "m", "two_d", "cat"]
    data = _images((8,), n=3)
    np.testing.assert_allclose(model(data), flat(data), rtol=1e-6)
