"""Mixed precision: per-layer bit widths through apply, the workflow, export and INT4."""

from __future__ import annotations

import numpy as np
import pytest

import tf_pfq
from tf_pfq import data, models, testing
from tf_pfq.baselines import method_steps
from tf_pfq.export import litert
from tf_pfq.export.summary import inspect
from tf_pfq.training import TrainConfig
from tf_pfq.workflow import parse_layer_bits

MIXED = {"conv1": (8, 8), "conv_pw_1": (None, 2), "logits": (None, 8)}


def _float_model(seed=0):
    testing_model = models.mobilenet_v1(input_shape=(16, 16, 3), widths=(8, 16), strides=(1, 2))
    model, _ = testing.with_dead_channels(testing_model, num_layers=2, seed=seed)
    return model


def _bits(qat) -> dict[str, tuple]:
    found = {}
    for layer in qat.layers:
        config = getattr(layer, "quantize_config", None)
        if config is None:
            continue
        out, weight = config.output_quantizer, config.weight_quantizer
        found[layer.layer.name] = (out and out.num_bits, weight and weight.num_bits)
    return found


def test_each_layer_gets_its_own_widths():
    folded, _ = tf_pfq.fold_batchnorm(_float_model())
    bits = _bits(tf_pfq.apply(folded, activation_bits=4, weight_bits=4, layer_bits=MIXED))
    assert bits["conv1"] == (None, 8)  # its output is its ReLU's ...
    assert bits["conv1_relu"] == (8, None)  # ... which takes conv1's activation bits
    assert bits["conv_dw_1"] == (None, 4) and bits["conv_dw_1_relu"] == (4, None)
    assert bits["conv_pw_1"] == (None, 2) and bits["conv_pw_1_relu"] == (4, None)
    assert bits["logits"] == (None, 8)
    # Stage A quantizes no weights: the weight entries wait for stage W.
    stage_a = _bits(tf_pfq.apply(_float_model(), activation_bits=3, layer_bits=MIXED))
    assert stage_a["conv1_relu"] == (8, None) and stage_a["conv_dw_1_relu"] == (3, None)
    assert all(w is None for _, w in stage_a.values())


@pytest.mark.parametrize(
    ("layer_bits", "message"),
    [
        ({"conv9": (8, 8)}, r"does not have: \['conv9'\]"),
        ({"conv1": (9, 8)}, r"layer_bits\['conv1'\]\[0\]"),
        ({"conv1": (8, 1)}, r"layer_bits\['conv1'\]\[1\]"),
        ({"conv1": 8}, r"layer_bits\['conv1'\] must be \(activation_bits, weight_bits\)"),
        ({"pool": (None, 4)}, r"layer 'pool' \(GlobalAveragePooling2D\) has no kernel"),
        ({"logits": (4, None)}, r"no quantizer holds 'logits'"),
        ({"conv1": (8, None), "conv1_relu": (4, None)}, r"held by 'conv1_relu'"),
        ([("conv1", (8, 8))], "must map layer names"),
    ],
)
def test_bad_entries_are_refused_by_name(layer_bits, message):
    folded, _ = tf_pfq.fold_batchnorm(_float_model())
    with pytest.raises(ValueError, match=message):
        tf_pfq.apply(folded, activation_bits=4, weight_bits=4, layer_bits=layer_bits)


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["int8", "int4"])
def test_export_keeps_each_grid_and_stays_exact(storage):
    folded, _ = tf_pfq.fold_batchnorm(_float_model(1))
    layer_bits = {**MIXED, "conv_dw_1": (None, 3)}
    qat = tf_pfq.apply(
        folded, activation_bits=4, weight_bits=4, layer_bits=layer_bits, weight_scheme="symmetric"
    )
    images = np.random.default_rng(1).uniform(0, 1, (48, 16, 16, 3)).astype(np.float32)
    qat(images[:32], training=True)
    tflite = tf_pfq.export.to_tflite(qat, representative_data=images[:32], weight_storage=storage)
    summary = inspect(tflite)
    by_layer = {name.split("/")[0]: bits for name, bits in summary.weight_bits().items()}
    # An 8-bit layer uses more than 16 levels (its few weights cannot fill 256).
    assert by_layer["conv1"] > 4 and by_layer["logits"] > 4
    assert by_layer["conv_dw_1"] <= 3 and by_layer["conv_pw_1"] <= 2
    stored = {name.split("/")[0]: dtype for name, dtype in summary.weight_storage().items()}
    if storage == "int4":
        # The narrow layers packed, the 8-bit ones int8; the grids are those of the
        # int8 file, so the builtin kernels compute the very same outputs.
        assert stored["conv_dw_1"] == stored["conv_pw_1"] == "int4"
        assert stored["conv1"] == stored["logits"] == "int8"
        plain = tf_pfq.export.to_tflite(qat, representative_data=images[:32])
        for backend in ("builtin", "reference"):
            y4 = litert.predict(litert.make_interpreter(tflite, backend=backend), images)
            y8 = litert.predict(litert.make_interpreter(plain, backend=backend), images)
            np.testing.assert_array_equal(y4, y8)
        return
    measured = testing.measure_export(qat, tflite, images[32:])
    assert measured["p99_steps"] <= 0.5 and measured["max_steps"] <= 0.5, measured


def test_saved_model_keeps_the_widths(tmp_path):
    folded, _ = tf_pfq.fold_batchnorm(_float_model())
    qat = tf_pfq.apply(folded, activation_bits=4, weight_bits=4, layer_bits=MIXED)
    path = str(tmp_path / "qat.h5")
    tf_pfq.save(qat, path)
    assert _bits(tf_pfq.load(path)) == _bits(qat)


def test_command_line_items():
    assert parse_layer_bits(["conv1:8:8", "logits:-:8", "pw::2"]) == {
        "conv1": (8, 8),
        "logits": (None, 8),
        "pw": (None, 2),
    }
    with pytest.raises(ValueError, match="'conv1:8' must be name:activation_bits:weight_bits"):
        parse_layer_bits(["conv1:8"])
    with pytest.raises(ValueError, match="'conv1:x:8'"):
        parse_layer_bits(["conv1:x:8"])


def test_tfmot_methods_refuse_layer_bits():
    config = TrainConfig(epochs=1)
    with pytest.raises(ValueError, match="one bit width for every layer"):
        method_steps("tfmot", config, config, layer_bits=MIXED)
    uniform = method_steps("pfq", config, config)
    mixed = method_steps("pfq", config, config, layer_bits=MIXED)
    # A uniform run's settings (its resume fingerprint) do not mention layer_bits.
    assert "layer_bits" not in uniform[-1].arguments()
    assert mixed[-1].arguments()["layer_bits"] == MIXED


@pytest.mark.slow
def test_workflow_prunes_and_keeps_each_layers_bits():
    splits = data.load_digits(image_size=16, num_train=64)
    train = data.to_dataset(splits["train"], 32)
    model = _float_model(2)
    qat, summary = tf_pfq.run_workflow(model, train, layer_bits=MIXED, verbose=0)
    assert summary.channels_removed > 0  # PfQ ran and removed channels
    bits = _bits(qat)
    assert bits["conv1"] == (None, 8) and bits["conv1_relu"] == (8, None)
    assert bits["conv_pw_1"] == (None, 2) and bits["logits"] == (None, 8)
