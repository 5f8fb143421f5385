"""tf_pfq.export.inspect / weight_levels / activation_levels and the LiteRT helpers."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tf_pfq.export import litert
from tf_pfq.export.summary import activation_levels, inspect, weight_levels

H, W, CIN, COUT = 6, 6, 3, 5


def _kernel(levels_per_channel: int, per_channel: bool):
    """A conv kernel whose output channel o uses exactly `levels - o % 2` int levels."""
    rng = np.random.default_rng(0)
    k = np.zeros((3, 3, CIN, COUT), np.float32)
    for o in range(COUT):
        n = levels_per_channel - (o % 2 if per_channel else 0)
        values = np.arange(n) - n // 2
        flat = np.resize(values, 3 * 3 * CIN)
        k[..., o] = rng.permutation(flat).reshape(3, 3, CIN)
    return k


def _conv_model(per_channel: bool, levels: int = 7) -> bytes:
    k = _kernel(levels, per_channel)
    scale = 0.05

    @tf.function(input_signature=[tf.TensorSpec([1, H, W, CIN], tf.float32)], autograph=False)
    def fn(x):
        x = tf.quantization.fake_quant_with_min_max_vars(x, 0.0, 1.0)
        if per_channel:
            s = np.full(COUT, scale, np.float32) * (1 + np.arange(COUT, dtype=np.float32))
            w = tf.quantization.fake_quant_with_min_max_vars_per_channel(
                k * s, -127 * s, 127 * s, narrow_range=True
            )
        else:
            w = tf.quantization.fake_quant_with_min_max_vars(
                k * scale, -127 * scale, 127 * scale, narrow_range=True
            )
        y = tf.nn.relu(tf.nn.conv2d(x, w, 2, "SAME") + 0.01)
        y = tf.quantization.fake_quant_with_min_max_vars(y, 0.0, 4.0)
        return tf.reduce_mean(y, axis=[1, 2])

    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.inference_input_type = tf.int8
    return converter.convert()


@pytest.mark.parametrize("per_channel", [False, True])
def test_weight_levels_count_per_axis(per_channel):
    tflite = _conv_model(per_channel, levels=7)
    summary = inspect(tflite)
    (conv,) = [op for op in summary.ops if op.op == "CONV_2D"]
    weight = conv.inputs[1]
    assert weight.per_axis == per_channel
    # Per tensor: all channels together use 7 levels. Per channel: channels use 7
    # and 6 levels alternately, and the count is the maximum over channels.
    assert weight.levels == 7
    assert weight_levels(tflite)[weight.name] == 7
    if per_channel:
        assert len(set(weight.scales)) == COUT


def test_summary_fields_and_macs():
    tflite = _conv_model(False)
    summary = inspect(tflite)
    assert summary.size_bytes == len(tflite)
    assert summary.num_subgraphs == 1
    assert summary.inputs[0].dtype == "int8" and summary.inputs[0].shape == (1, H, W, CIN)
    (conv,) = [op for op in summary.ops if op.op == "CONV_2D"]
    assert conv.fused_activation == "RELU"
    assert conv.inputs[2].dtype == "int32"  # bias
    # Output 3x3 (stride 2, SAME), 5 channels, 3x3x3 taps each.
    assert conv.macs == 3 * 3 * COUT * 3 * 3 * CIN
    assert summary.macs == conv.macs
    text = str(summary)
    assert "CONV_2D" in text and "RELU" in text and f"{summary.size_bytes} bytes" in text


def test_activation_levels_on_data():
    tflite = _conv_model(False)
    data = np.random.default_rng(1).uniform(0, 1, (20, H, W, CIN)).astype(np.float32)
    levels = activation_levels(tflite, data)
    summary = inspect(tflite)
    (conv,) = [op for op in summary.ops if op.op == "CONV_2D"]
    assert 1 < levels[conv.outputs[0].name] <= 256
    assert levels[summary.inputs[0].name] > 100  # 20 * 108 uniform values on 256 levels
    with pytest.raises(ValueError, match="XNNPACK"):
        activation_levels(tflite, data, backend="xnnpack")


def test_reads_path(tmp_path):
    tflite = _conv_model(False)
    path = tmp_path / "m.tflite"
    path.write_bytes(tflite)
    assert inspect(path).op_counts() == inspect(tflite).op_counts()


@pytest.mark.parametrize(
    "content",
    [b"garbage", b"", b"\x1c\x00\x00\x00XXXX" + b"\x00" * 40],
    ids=["garbage", "empty", "other_identifier"],
)
def test_not_a_tflite_is_a_value_error(content):
    # Before the identifier check these raised struct.error / IndexError.
    with pytest.raises(ValueError, match=r"`model` is not a \.tflite flatbuffer"):
        inspect(content)


def test_truncated_tflite_is_a_value_error(tmp_path):
    tflite = _conv_model(False)
    path = tmp_path / "cut.tflite"
    path.write_bytes(tflite[: len(tflite) // 3])
    with pytest.raises(ValueError, match=r"cut\.tflite"):
        inspect(path)
    with pytest.raises(ValueError, match="`model`"):
        weight_levels(tflite[:100])


def test_not_bytes_or_path_is_a_type_error():
    with pytest.raises(TypeError, match=r"`model` must be \.tflite bytes or a path"):
        inspect(123)  # type: ignore[arg-type]


# --- LiteRT helpers ------------------------------------------------------------


def test_backends_agree_on_float_model():
    @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    def fn(x):
        return tf.nn.relu(x * 2.0 - 1.0)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    tflite = converter.convert()
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    expected = np.maximum(2 * x - 1, 0)
    for backend in ("xnnpack", "builtin", "reference"):
        np.testing.assert_allclose(
            litert.predict(litert.make_interpreter(tflite, backend=backend), x),
            expected,
            rtol=1e-6,
        )
    with pytest.raises(ValueError, match="per-example shape"):
        litert.predict(litert.make_interpreter(tflite), np.zeros((2, 3), np.float32))


def test_quantize_roundtrip():
    detail = {"dtype": np.uint8, "quantization": (0.1, 10)}
    x = np.array([-1.0, 0.0, 0.05, 14.0, 30.0])
    q = litert.quantize_input(x, detail)
    np.testing.assert_array_equal(q, [0, 10, 10, 150, 255])  # saturates at the ends
    np.testing.assert_allclose(litert.dequantize_output(q, detail), [-1.0, 0, 0, 14.0, 24.5])


@pytest.mark.parametrize("backend", ["gpu", "edgetpu"])
def test_missing_delegate_is_a_clear_error(backend):
    # No GPU delegate library nor Edge TPU runtime ships in the pip wheels.
    tflite = _conv_model(False)
    with pytest.raises(litert.DelegateUnavailableError, match="does not fall back"):
        litert.make_interpreter(tflite, backend=backend)
    with pytest.raises(litert.DelegateUnavailableError, match="no_such_lib"):
        litert.make_interpreter(tflite, backend=backend, delegate_library="/no_such_lib.so")


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        litert.make_interpreter(b"", backend="tpu")


def test_benchmark_stats():
    tflite = _conv_model(False)
    stats = litert.benchmark(litert.make_interpreter(tflite), num_runs=5, warmup=1)
    assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"]
    with pytest.raises(ValueError, match="num_runs"):
        litert.benchmark(litert.make_interpreter(tflite), num_runs=0)
