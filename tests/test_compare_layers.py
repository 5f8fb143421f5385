"""tf_pfq.export.compare_layers: which TFLite tensor is which layer, and where they part.

One small functional model covers the mappings that matter: a convolution whose ReLU
the converter fuses into it, a ZeroPadding2D it folds into the next depthwise conv
(whose signed output ends in a MAXIMUM clamp), a residual Add, a Concatenate whose
inputs the export puts on the concat's grid, two identical max poolings (the converter
keeps one), Dropout (no op at all), mean pooling and the logits. Its export is exact;
errors are then planted on one side or the other.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.tools import flatbuffer_utils

import tf_pfq
from tf_pfq.compat import keras
from tf_pfq.export import compare, litert

L = keras.layers
SHAPE = (12, 12, 3)
# Float noise of the Keras side, in output steps; a rounding of the same value is 0.5.
NOISE = 1e-3


def _model():
    inputs = keras.Input(SHAPE, name="image")
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(6.0, name="stem_relu")(x)
    y = L.ZeroPadding2D(1, name="pad")(x)
    y = L.DepthwiseConv2D(3, use_bias=False, name="dw")(y)
    y = L.BatchNormalization(name="dw_bn")(y)  # signed: a MAXIMUM clamp
    y = L.Conv2D(8, 1, use_bias=False, name="project")(y)
    y = L.BatchNormalization(name="project_bn")(y)
    y = L.ReLU(6.0, name="project_relu")(y)
    x = L.Add(name="add")([x, y])
    a = L.Conv2D(4, 1, activation="relu", name="branch_a")(x)
    b = L.Conv2D(4, 3, padding="same", activation="relu", name="branch_b")(x)
    x = L.Concatenate(name="concat")([a, b])
    # Two identical poolings of one tensor: the converter keeps one op.
    p = L.MaxPooling2D(2, name="max_pool")(x)
    q = L.MaxPooling2D(2, name="max_pool_twin")(x)
    x = L.Add(name="pools")([p, q])
    x = L.Dropout(0.2, name="dropout")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, L.Dense(10, name="logits")(x))


def _with_statistics(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            c = layer.moving_variance.shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, c),
                    rng.normal(0, 0.3, c),
                    rng.normal(0, 0.1, c),
                    rng.uniform(0.5, 1.5, c),
                ]
            )
    return model


@pytest.fixture(scope="module")
def exported():
    keras.utils.set_random_seed(0)
    folded, _ = tf_pfq.fold_batchnorm(_with_statistics(_model()))
    qat = tf_pfq.apply(folded, activation_bits=4, weight_bits=4)
    images = np.random.default_rng(0).uniform(0, 1, (40, *SHAPE)).astype(np.float32)
    qat(images[:24], training=True)  # activation ranges
    tflite = tf_pfq.export.to_tflite(qat, representative_data=images[:24])
    return qat, tflite, images[24:]


@pytest.fixture(scope="module")
def exact(exported):
    qat, tflite, test = exported
    return tf_pfq.export.compare_layers(qat, tflite, test)


def test_exact_export_is_within_half_a_step(exact):
    assert exact.first_divergence is None, exact.to_markdown()
    assert len(exact.rows) == 17 and len(exact.mapped) == 14
    for row in exact.mapped:
        assert row.max_steps <= 0.5 + NOISE, row
        assert row.p99_steps <= row.max_steps
    # Tensors the QAT model quantizes on the file's grid agree exactly; the logits,
    # which QAT leaves in float, show the file's rounding: up to half a step.
    assert exact.row("stem_relu").max_steps <= NOISE
    assert exact.row("concat").max_steps <= NOISE
    assert 0.2 < exact.row("logits").max_steps <= 0.5 + NOISE
    assert exact.num_examples == 16 and exact.backend == "xnnpack"


def test_each_layer_maps_to_the_tensor_named_after_it(exact):
    for row in exact.mapped:
        assert f"{row.fused_into or row.layer}/" in row.tensor, row
        assert row.scale > 0
    # The ReLU is fused into its convolution: both rows read the CONV_2D output.
    stem, relu = exact.row("stem"), exact.row("stem_relu")
    assert stem.fused_into == "stem_relu" and relu.fused_into is None
    assert stem.tensor_index == relu.tensor_index
    assert stem.max_steps == relu.max_steps
    # The signed depthwise output ends in its MAXIMUM clamp, not the raw conv output.
    assert exact.row("dw").tensor == "dw/Maximum"
    assert exact.row("image").tensor.startswith("image/")


def test_unmapped_layers_say_why(exact):
    reasons = {row.layer: row.reason for row in exact.unmapped}
    assert set(reasons) == {"pad", "max_pool_twin", "dropout"}, reasons
    assert "identity at inference" in reasons["dropout"]
    assert "merged it with 'max_pool'" in reasons["max_pool_twin"]
    assert "fused its op into the op of 'dw'" in reasons["pad"]  # the PAD went into the conv
    assert all(row.p99_steps is None for row in exact.unmapped)


def _kernel_scaled(qat, layer_name, factor, tmp_path):
    """A copy of `qat` whose `layer_name` kernel is `factor` times larger."""
    copy = tf_pfq.load(tf_pfq.save(qat, tmp_path / "qat.h5"))
    (kernel,) = [w for w in copy.get_layer(f"quant_{layer_name}").weights if "/kernel" in w.name]
    kernel.assign(kernel * factor)
    return copy


@pytest.mark.parametrize("planted", ["project", "branch_b", "logits"])
def test_error_planted_in_the_qat_model_is_found_at_its_layer(exported, planted, tmp_path):
    qat, tflite, test = exported
    before = [w.copy() for w in qat.get_weights()]
    changed = _kernel_scaled(qat, planted, 1.5, tmp_path)
    table = tf_pfq.export.compare_layers(changed, tflite, test)
    first = table.first_divergence
    assert first is not None and first.layer == planted, table.to_markdown()
    assert first.max_steps > 2.0
    position = [r.layer for r in table.rows].index(planted)
    for row in table.rows[:position]:
        assert row.max_steps is None or row.max_steps <= 0.5 + NOISE, row
    for a, b in zip(before, qat.get_weights()):  # the exported model is untouched
        np.testing.assert_array_equal(a, b)


def _negate_weights(tflite: bytes, layer: str) -> bytes:
    """The file with the int8 weights of `layer`'s op negated."""
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite))
    subgraph = model.subgraphs[0]
    for op in subgraph.operators:
        name = subgraph.tensors[op.outputs[0]].name
        name = name.decode() if isinstance(name, bytes) else name
        if f"{layer}/" not in name or len(op.inputs) < 2:
            continue
        weight = subgraph.tensors[op.inputs[1]]
        buffer = model.buffers[weight.buffer]
        values = np.frombuffer(np.asarray(buffer.data, np.uint8).tobytes(), np.int8)
        buffer.data = np.clip(-values.astype(np.int32), -127, 127).astype(np.int8).view(np.uint8)
        return bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    raise AssertionError(f"no weighted op for {layer!r}")


def test_error_planted_in_the_file_is_found_at_its_layer(exported):
    qat, tflite, test = exported
    table = tf_pfq.export.compare_layers(qat, _negate_weights(tflite, "dw"), test)
    # The negated depthwise conv's output is off; the layers before it are not.
    first = table.first_divergence
    assert first is not None and first.layer == "dw", table.to_markdown()
    assert first.fused_into is None and first.tensor == "dw/Maximum"
    position = [r.layer for r in table.rows].index("dw")
    assert all(r.max_steps is None or r.max_steps <= 0.5 + NOISE for r in table.rows[:position])
    assert "**first divergence**" in table.to_markdown()


def test_threshold_and_statistic(exported):
    qat, tflite, test = exported
    strict = tf_pfq.export.compare_layers(qat, tflite, test, threshold=0.25)
    # The first layer beyond a quarter step is the first tensor QAT leaves in float.
    assert strict.first_divergence is not None
    assert strict.first_divergence.layer == "logits"
    by_p99 = tf_pfq.export.compare_layers(qat, tflite, test, threshold=0.25, statistic="p99")
    assert by_p99.statistic == "p99"
    first = by_p99.first_divergence
    assert first is None or first.p99_steps > 0.25


def test_inputs_as_path_bytes_array_or_dataset(exported, exact, tmp_path):
    qat, tflite, test = exported
    path = tf_pfq.export.save(tflite, tmp_path / "m.tflite")
    labels = np.arange(len(test)) % 10
    batched = tf.data.Dataset.from_tensor_slices((test, labels)).batch(5)
    unbatched = tf.data.Dataset.from_tensor_slices(test)
    for data, source in ((batched, path), (unbatched, tflite)):
        table = tf_pfq.export.compare_layers(qat, source, data)
        assert table.num_examples == len(test)
        assert [(r.layer, r.max_steps) for r in table.rows] == [
            (r.layer, r.max_steps) for r in exact.rows
        ]
    assert tf_pfq.export.compare_layers(qat, tflite, batched, max_examples=7).num_examples == 7


def test_table_and_plot(exact, tmp_path):
    text = exact.to_markdown()
    assert text.startswith("No divergence")
    assert "| stem_relu | ReLU |" in text and "fused into stem_relu" in text
    assert str(exact) == text
    path = exact.plot(tmp_path / "layers.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_compared_tensors_do_not_change_the_file_output(exported):
    # Marking every intermediate tensor as an output must not change how XNNPACK rounds.
    _, tflite, test = exported
    summary = tf_pfq.export.inspect(tflite)
    logits = summary.outputs[0].index
    marked = compare._with_outputs(tflite, [t.index for t in compare._value_tensors(summary)])
    plain = litert.predict(litert.make_interpreter(tflite), test)
    interpreter = litert.make_interpreter(marked)
    (inp,) = interpreter.get_input_details()
    outputs = interpreter.get_output_details()
    assert len(outputs) > 10
    detail = next(d for d in outputs if d["index"] == logits)
    for k, image in enumerate(test):
        interpreter.set_tensor(inp["index"], litert.quantize_input(image[None], inp))
        interpreter.invoke()
        got = litert.dequantize_output(interpreter.get_tensor(logits), detail)
        np.testing.assert_array_equal(got[0], plain[k])


def test_errors(exported):
    qat, tflite, test = exported
    with pytest.raises(ValueError, match="statistic"):
        tf_pfq.export.compare_layers(qat, tflite, test, statistic="mean")
    with pytest.raises(ValueError, match="images of shape"):
        tf_pfq.export.compare_layers(qat, tflite, test[:, :6])
    with pytest.raises(ValueError, match=r"not a \.tflite"):
        tf_pfq.export.compare_layers(qat, b"not a flatbuffer", test)
    # A file of another model names none of this model's layers.
    other = keras.Sequential([keras.Input((4,), name="x"), L.Dense(2, name="other_fc")])
    other_qat = tf_pfq.apply(other, activation_bits=8, weight_bits=8)
    other_file = tf_pfq.export.to_tflite(other_qat, input_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="named after a layer"):
        tf_pfq.export.compare_layers(qat, other_file, test)


def test_logits_beyond_the_calibrated_range_are_counted_as_saturated(exported):
    qat, _, test = exported
    # Calibrated on a quarter of the images' contrast, the file's logit range is too
    # narrow for the test images: the file saturates some logits at its ends.
    narrow = tf_pfq.export.to_tflite(qat, representative_data=0.5 + 0.25 * (test - 0.5))
    table = tf_pfq.export.compare_layers(qat, narrow, test)
    logits = table.row("logits")
    assert logits.saturated > 0.0
    assert "saturated" in table.to_markdown()
    # Where the values fit, the file rounds the float logits (half a step); the
    # saturated ones sit at the range's end, which the clipped comparison reads as 0.
    assert logits.max_steps <= 0.5 + NOISE, table.to_markdown()
    assert table.first_divergence is None, table.to_markdown()
    for row in table.mapped:
        if row.layer != "logits":
            assert row.saturated == 0.0, row
