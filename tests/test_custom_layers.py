"""Models holding a layer class Keras has no registration for (ConvNeXt's LayerScale).

Every pass rewrites a model through its config; such a class must still be found
(it used to fail with tf_keras' "'str' object is not callable"), and each pass must
then either handle the layer or name it.
"""

from __future__ import annotations

import numpy as np
import pytest

import tf_pfq
from tf_pfq.compat import keras

L = keras.layers


class Scale(L.Layer):
    """A per-channel scale, defined like keras.applications' LayerScale: unregistered."""

    def build(self, input_shape):
        self.gamma = self.add_weight("gamma", shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.gamma


def _model():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same", name="conv")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU(name="relu")(x)
    x = Scale(name="scale")(x)
    x = L.Conv2D(4, 1, name="mix")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, L.Dense(3, name="logits")(x))


def test_unregistered_layer_class_survives_every_rewrite():
    keras.utils.set_random_seed(0)
    model = _model()
    model.get_layer("scale").gamma.assign(np.linspace(0.5, 2.0, 6).astype(np.float32))
    bn = model.get_layer("bn")
    variance = bn.moving_variance.numpy()
    variance[1] = bn.epsilon / 1000  # a dead channel feeding the unknown layer
    bn.moving_variance.assign(variance)
    x = np.random.default_rng(0).uniform(0, 1, (4, 8, 8, 3)).astype(np.float32)
    want = model.predict(x, verbose=0)

    pruned, report = tf_pfq.prune(model, calibration_data=x)
    assert isinstance(pruned.get_layer("scale"), Scale)
    assert pruned.get_layer("conv").filters == 6  # kept: the next layer is unknown
    assert "scale" in str(report) and "Scale" in str(report)
    np.testing.assert_allclose(pruned.predict(x, verbose=0), want, rtol=1e-5, atol=1e-5)

    folded, _ = tf_pfq.fold_batchnorm(model)
    assert isinstance(folded.get_layer("scale"), Scale)
    np.testing.assert_allclose(folded.predict(x, verbose=0), want, rtol=1e-4, atol=1e-4)

    qat = tf_pfq.apply(model, activation_bits=4)
    assert any(isinstance(getattr(layer, "layer", layer), Scale) for layer in qat.layers)
    with pytest.raises(ValueError, match=r"scale.*Scale"):
        tf_pfq.apply(folded, activation_bits=4, weight_bits=4)
