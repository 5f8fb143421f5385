"""Packed INT4 weight storage: flatbuffer types and levels, identical outputs, errors."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import tf_pfq
from tf_pfq import models
from tf_pfq.export import int4, litert
from tf_pfq.export.summary import inspect, read_model

INPUT_SHAPE = (8, 8, 3)


def _qat(
    weight_bits: int,
    per_channel: bool = False,
    zero_point_8: bool = False,
    weight_scheme: str = "min_max",
):
    tf_pfq.compat.keras.utils.set_random_seed(0)
    model = models.mobilenet_v1(input_shape=INPUT_SHAPE, widths=(4, 8), strides=(1, 2))
    folded, _ = tf_pfq.fold_batchnorm(model)
    if zero_point_8:
        # Per-tensor kernels with min = -8/7 max: the 4-bit grid's zero point is 8,
        # so its integers are -8..7 and fit INT4.
        for layer in folded.layers:
            weights = layer.get_weights()
            if not weights or weights[0].ndim < 2:
                continue
            kernel = weights[0].copy()
            top = float(np.abs(kernel).max())
            kernel = np.clip(kernel, -top, top)
            kernel.reshape(-1)[0], kernel.reshape(-1)[1] = -8.0 / 7.0 * top, top
            layer.set_weights([kernel, *weights[1:]])
    qat = tf_pfq.apply(
        folded,
        activation_bits=4,
        weight_bits=weight_bits,
        per_channel_weights=per_channel,
        weight_scheme=weight_scheme,
    )
    images = np.random.RandomState(1).rand(16, *INPUT_SHAPE).astype(np.float32)
    qat(images, training=True)  # activation ranges
    return qat


def _weights(tflite: bytes):
    """(op name, tensor, raw bytes) of every conv / fully-connected weight, from the file."""
    model, _ = read_model(tflite)
    subgraph = model.subgraphs[0]
    names = {v: k for k, v in vars(int4.schema.BuiltinOperator).items() if not k.startswith("_")}
    out = []
    for op in subgraph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        name = names[max(int(code.builtinCode), int(code.deprecatedBuiltinCode))]
        if name in int4.INT4_OPS:
            tensor = subgraph.tensors[op.inputs[1]]
            out.append((name, tensor, np.asarray(model.buffers[tensor.buffer].data, np.uint8)))
    return out


def _images(n: int = 24) -> np.ndarray:
    return np.random.RandomState(0).rand(n, *INPUT_SHAPE).astype(np.float32)


@pytest.mark.parametrize(
    ("bits", "per_channel", "zero_point_8", "scheme"),
    [
        (3, False, False, "min_max"),
        (3, True, False, "min_max"),
        (2, True, False, "min_max"),
        (4, False, True, "min_max"),
        # Symmetric narrow-range grids fit INT4 at every width up to 4 bits, with no
        # condition on the weights: 2^n - 1 levels, integers -(2^(n-1) - 1)..2^(n-1) - 1.
        (4, False, False, "symmetric"),
        (4, True, False, "symmetric"),
        (3, True, False, "symmetric"),
    ],
)
def test_int4_storage_same_grid_and_outputs(bits, per_channel, zero_point_8, scheme):
    qat = _qat(bits, per_channel, zero_point_8, scheme)
    levels = 2**bits - (1 if scheme == "symmetric" else 0)
    packed = tf_pfq.export.to_tflite(qat, input_range=(0.0, 1.0), weight_storage="int4")
    plain = tf_pfq.export.to_tflite(qat, input_range=(0.0, 1.0))
    assert len(packed) < len(plain)

    weights4, weights8 = _weights(packed), _weights(plain)
    assert sorted({name for name, _, _ in weights4}) == sorted(int4.INT4_OPS)
    pairs = list(zip(weights4, weights8))
    # The global mean is a depthwise conv with one constant weight (127) that the
    # export made, not a trained kernel: it stays int8, as repack_int4 documents.
    means = [(w4, w8) for w4, w8 in pairs if set(w8[2].view(np.int8)) == {127}]
    assert len(means) == 1 and all(w4[1].type == int4.schema.TensorType.INT8 for w4, _ in means)
    for (name, t4, data4), (_, t8, data8) in (p for p in pairs if p not in means):
        assert t4.type == int4.schema.TensorType.INT4 and t8.type == int4.schema.TensorType.INT8
        count = int(np.prod(t4.shape))
        assert len(data4) == (count + 1) // 2  # two values per byte
        values = int4.unpack_int4(data4, count)
        np.testing.assert_array_equal(values, data8.view(np.int8))  # same integers
        np.testing.assert_array_equal(t4.quantization.scale, t8.quantization.scale)
        np.testing.assert_array_equal(t4.quantization.zeroPoint, 0)
        # At most 2^n levels per quantization slice (per channel: the quantized axis,
        # the first for CONV_2D / FULLY_CONNECTED, the last for DEPTHWISE_CONV_2D).
        if len(t4.quantization.scale) > 1:
            axis = int(t4.quantization.quantizedDimension)
            rows = np.moveaxis(values.reshape(t4.shape), axis, 0).reshape(t4.shape[axis], -1)
        else:
            rows = [values]
        assert max(np.unique(r).size for r in rows) <= levels, name
        if scheme == "symmetric":
            top = 2 ** (bits - 1) - 1
            assert values.min() >= -top and values.max() <= top, name

    summary = inspect(packed)
    # Every trained kernel is int4; the global mean's one-level constant stays int8.
    levels_of = summary.weight_levels()
    storage = summary.weight_storage()
    assert {s for n, s in storage.items() if levels_of[n] > 1} == {"int4"}
    assert {s for n, s in storage.items() if levels_of[n] == 1} <= {"int8"}
    assert max(summary.weight_levels().values()) <= levels
    assert "weight storage:" in str(summary) and "int4" in str(summary)

    images = _images()
    for backend in ("builtin", "reference"):
        y4 = litert.predict(litert.make_interpreter(packed, backend=backend), images)
        y8 = litert.predict(litert.make_interpreter(plain, backend=backend), images)
        np.testing.assert_array_equal(y4, y8)


def test_pack_layout_matches_the_converters_int4():
    # The stock converter writes INT4 for a 4-bit narrow-range symmetric fake-quant
    # weight; unpack_int4 must read its bytes back to the integers.
    w = np.random.RandomState(0).uniform(-1, 1, (3, 3, 5, 3)).astype(np.float32)  # odd count
    step = np.float32(1.0 / 7.0)

    @tf.function(input_signature=[tf.TensorSpec([1, 4, 4, 5])])
    def f(x):
        x = tf.quantization.fake_quant_with_min_max_vars(x, 0.0, 1.0)
        k = tf.quantization.fake_quant_with_min_max_vars(
            tf.constant(w), -7 * step, 7 * step, num_bits=4, narrow_range=True
        )
        y = tf.nn.conv2d(x, k, 1, "VALID")
        return tf.quantization.fake_quant_with_min_max_vars(y, -8.0, 8.0)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    ((_, tensor, data),) = _weights(converter.convert())
    assert tensor.type == int4.schema.TensorType.INT4
    expected = np.round(np.transpose(w, (3, 0, 1, 2)) / step).astype(np.int8).reshape(-1)
    np.testing.assert_array_equal(int4.unpack_int4(data, expected.size), expected)
    np.testing.assert_array_equal(int4.pack_int4(expected), data)


def test_pack_roundtrip_and_range_error():
    values = np.arange(-8, 8, dtype=np.int8).repeat(3)[:-1]  # odd count
    np.testing.assert_array_equal(int4.unpack_int4(int4.pack_int4(values), values.size), values)
    with pytest.raises(ValueError, match=r"-8\.\.7"):
        int4.pack_int4(np.array([8], np.int8))


def test_int4_errors_name_the_layers():
    qat = _qat(3)
    with pytest.raises(ValueError, match=r"weight_storage.*'int5'"):
        tf_pfq.export.to_tflite(qat, input_range=(0.0, 1.0), weight_storage="int5")
    wide = _qat(5)
    with pytest.raises(ValueError, match=r"weight_bits <= 4.*'conv1' \(5 bits\)"):
        tf_pfq.export.to_tflite(wide, input_range=(0.0, 1.0), weight_storage="int4")
    # tf_pfq's 4-bit grids are [min(w, 0), max(w, 0)]: with a zero point other than 8
    # the integers leave -8..7 and INT4 would change the model.
    four = _qat(4, per_channel=True)
    with pytest.raises(ValueError, match=r"zero point.*'\w+' \(integers"):
        tf_pfq.export.to_tflite(four, input_range=(0.0, 1.0), weight_storage="int4")
    with pytest.raises(ValueError, match=r"weight_scheme='symmetric'"):  # the way out
        tf_pfq.export.to_tflite(four, input_range=(0.0, 1.0), weight_storage="int4")
    # The file-level pass refuses the same weights on its own too.
    plain = tf_pfq.export.to_tflite(four, input_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="outside INT4's"):
        int4.repack_int4(plain)
    # The symmetric scheme does not make wider weights fit 4 bits.
    wide_symmetric = _qat(5, weight_scheme="symmetric")
    with pytest.raises(ValueError, match=r"weight_storage='int4' needs weight_bits <= 4"):
        tf_pfq.export.to_tflite(wide_symmetric, input_range=(0.0, 1.0), weight_storage="int4")
    with pytest.raises(ValueError, match=r"`weight_scheme`.*'signed'"):
        _qat(4, weight_scheme="signed")


def test_edgetpu_flags_int4():
    packed = tf_pfq.export.to_tflite(_qat(3), input_range=(0.0, 1.0), weight_storage="int4")
    problems = [p for p in tf_pfq.export.edgetpu_compatibility(packed) if p.rule == "integer"]
    flagged = {
        p.op for p in problems if "int4" in p.message and "weight_storage='int8'" in p.message
    }
    assert flagged == set(int4.INT4_OPS)


@pytest.mark.slow
def test_to_tflite_script_weight_storage(tmp_path):
    path = tmp_path / "qat.h5"
    _qat(3).save(path)
    out = tmp_path / "m.tflite"
    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [
            sys.executable,
            str(root / "export" / "to_tflite.py"),
            f"--model={path}",
            f"--output={out}",
            "--representative=none",
            "--input_range=0,1",
            "--weight_storage=int4",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(root), TF_CPP_MIN_LOG_LEVEL="2"),
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = inspect(out)
    levels_of = summary.weight_levels()
    trained = {s for n, s in summary.weight_storage().items() if levels_of[n] > 1}
    assert trained == {"int4"}
    assert "weight storage: 4 int4" in result.stdout
    assert "weight_storage='int8'" in result.stdout  # the Edge TPU check flags INT4
