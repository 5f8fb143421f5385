"""Tests for tf_pfq.backends: what a training stage quantizes with."""

import numpy as np
import pytest
import tensorflow as tf

from tf_pfq import backends, models
from tf_pfq.compat import keras
from tf_pfq.testing import with_live_batchnorm
from tf_pfq.training import TrainConfig
from tf_pfq.workflow import Train


def _images(n=16):
    return np.random.default_rng(0).uniform(0, 1, (n, 8, 8, 1)).astype(np.float32)


def _model():
    keras.utils.set_random_seed(0)
    model = models.mobilenet_v1((8, 8, 1), widths=(4, 8), strides=(1, 2))
    return with_live_batchnorm(model, _images(64))  # signals that survive inference mode


def _input_bits(qat) -> int:
    (bits,) = [
        layer.quantizer.num_bits
        for layer in qat.layers
        if isinstance(
            getattr(layer, "quantizer", None),
            backends.tfmot.quantization.keras.quantizers.AllValuesQuantizer,
        )
    ]
    return bits


def _output_range(qat, name):
    values = {
        v.name.split("/")[-1].split(":")[0]: float(v.numpy()) for v in qat.get_layer(name).weights
    }
    return values["output_min"], values["output_max"]


def test_tfmot_as_shipped_quantizes_input_and_logits_to_n_bits():
    qat = backends.backend("tfmot").quantize(_model(), 3, 3)
    assert _input_bits(qat) == 3
    logits = qat.get_layer("quant_logits")
    assert len(logits._output_quantizers) + len(backends._moving_average_quantizers(qat)) > 0
    # Its moving-average ranges start at [-6, 6] and prepare() leaves them there.
    backends.backend("tfmot").prepare(qat, [(_images(), None)])
    assert _output_range(qat, "quant_conv1_relu") == (-6.0, 6.0)


def test_tfmot_matched_has_8_bit_input_float_logits_and_first_batch_ranges():
    model, images = _model(), _images()
    backend = backends.backend("tfmot_matched")
    qat = backend.quantize(model, 3, 3)
    assert _input_bits(qat) == 8
    shipped = backends.backend("tfmot").quantize(model, 3, 3)
    found = backends._moving_average_quantizers(qat)
    assert len(found) == len(backends._moving_average_quantizers(shipped)) - 1  # no logits
    backend.prepare(qat, [(images, None)])
    # The logits are not rounded: many distinct values, not at most 2^3.
    assert len(np.unique(qat(images, training=False).numpy())) > 2**3
    relu = keras.Model(model.input, model.get_layer("conv1_relu").output)
    # The first range is the batch's own: [0, max] of the stem's ReLU6 output (the
    # 8-bit input rounding moves the maximum by well under one 3-bit step).
    lo, hi = _output_range(qat, "quant_conv1_relu")
    expected = float(relu(images).numpy().max())
    assert lo == 0.0 and hi == pytest.approx(expected, abs=0.1 * expected)
    # The quantizers are tfmot's own again afterwards (0.999 moving average).
    assert all(
        type(q) is backends.tfmot.quantization.keras.quantizers.MovingAverageQuantizer
        for q in found
    )


def test_tfmot_matched_saves_loads_and_trains_as_a_workflow_step(tmp_path):
    images = _images(32)
    train = tf.data.Dataset.from_tensor_slices((images, np.arange(32) % 10)).batch(16)
    step = Train(
        "stage_aw", 3, 3, TrainConfig(epochs=1, learning_rate=0.01), quantizer="tfmot_matched"
    )
    qat = step.quantize(_model())
    step.backend.prepare(qat, train)
    qat.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(train, verbose=0)
    path = str(tmp_path / "qat.h5")
    qat.save(path)
    with step.scope():
        loaded = keras.models.load_model(path, compile=False)
    np.testing.assert_allclose(loaded(images).numpy(), qat(images).numpy(), rtol=1e-5, atol=1e-5)
    assert not step.exportable and not step.backend.can_strip


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match=r"tfmot_matched.*Received: quantizer='qkeras'"):
        backends.backend("qkeras")
    with pytest.raises(ValueError, match="qkeras"):
        Train("t", 4, 4, TrainConfig(), quantizer="qkeras")


def test_a_train_step_takes_a_backend_object():
    step = Train("t", 4, 4, TrainConfig(), quantizer=backends.BACKENDS["tfmot_matched"])
    assert step.quantizer == "tfmot_matched" and step.run_settings()["quantizer"] == "tfmot_matched"
    assert step == Train("t", 4, 4, TrainConfig(), quantizer="tfmot_matched")
