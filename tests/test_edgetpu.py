"""tf_pfq.export.edgetpu_compatibility on models made to break each documented rule.

Each broken model is either converted from a small TF function that breaks the rule
(float ops, dynamic batch, an op outside the allow-list, int16 activations, a 5-D
tensor) or a compliant int8 model whose flatbuffer is edited to break one constraint
(dilation, fused activation on pooling, per-axis activation, subgraph count) with
LiteRT's own flatbuffer utilities. A compliant model gives an empty list: the
negative control for every rule.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils

import tf_pfq
from tf_pfq.export import edgetpu_compatibility
from tf_pfq.export.edgetpu import SUPPORTED_OPS, Problem


def _fq(x, lo=-4.0, hi=4.0):
    return tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, num_bits=8)


def _w(shape, seed=0):
    w = np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)
    return tf.quantization.fake_quant_with_min_max_vars(
        tf.constant(w), -1.0, 1.0, num_bits=8, narrow_range=True
    )


def _convert(fn, shape=(1, 8, 8, 4), int8=True, io=tf.int8, int16=False):
    spec = tf.TensorSpec(shape, tf.float32)
    function = tf.function(fn, input_signature=[spec], autograph=False)
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [function.get_concrete_function()], function
    )
    if int16:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: (
            [np.random.default_rng(i).uniform(-1, 1, (1, *shape[1:])).astype(np.float32)]
            for i in range(4)
        )
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        ]
    elif int8:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.inference_input_type = io
        converter.inference_output_type = io
    return converter.convert()


def _good(x):
    x = _fq(x, 0.0, 1.0)
    y = _fq(tf.nn.relu6(tf.nn.conv2d(x, _w((3, 3, 4, 8)), 1, "SAME") + 0.1), 0.0, 6.0)
    y = _fq(tf.nn.relu6(tf.nn.depthwise_conv2d(y, _w((3, 3, 8, 1)), [1, 1, 1, 1], "SAME")), 0, 6)
    y = _fq(tf.reduce_mean(y, axis=[1, 2]), 0.0, 6.0)
    return _fq(tf.matmul(y, _w((8, 10))), -20.0, 20.0)


@pytest.fixture(scope="module")
def good():
    return _convert(_good)


def _edit(tflite: bytes, edit) -> bytes:
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite))
    edit(model)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _op_index(model, name: str) -> int:
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    for k, op in enumerate(model.subgraphs[0].operators):
        code = model.operatorCodes[op.opcodeIndex]
        if names[max(code.builtinCode, code.deprecatedBuiltinCode)] == name:
            return k
    raise AssertionError(f"no {name} op")


def _rules(problems: list[Problem]) -> set[str]:
    return {p.rule for p in problems}


def test_compliant_model_has_no_problems(good):
    assert edgetpu_compatibility(good) == []


def test_float_io_boundary_is_allowed():
    tflite = _convert(_good, io=tf.float32)
    assert edgetpu_compatibility(tflite) == []


_W_FLOAT = np.random.default_rng(0).uniform(-1, 1, (3, 3, 4, 8)).astype(np.float32)


def _float_fn(x):
    return tf.nn.relu(tf.nn.conv2d(x, _W_FLOAT, 1, "SAME"))


def test_float_model():
    problems = edgetpu_compatibility(_convert(_float_fn, int8=False))
    assert _rules(problems) == {"integer"}
    assert any("float32" in p.message for p in problems)


def test_dynamic_shape():
    tflite = _convert(_good, shape=(None, 8, 8, 4))
    problems = edgetpu_compatibility(tflite)
    assert "static_shape" in _rules(problems)
    assert any("fixed batch" in p.message for p in problems)


def test_unsupported_op():
    def fn(x):
        x = _fq(x, 0.0, 1.0)
        y = _fq(tf.nn.relu6(tf.nn.conv2d(x, _w((1, 1, 4, 8)), 1, "SAME")), 0.0, 6.0)
        return _fq(tf.nn.leaky_relu(y, 0.1), -1.0, 6.0)

    problems = edgetpu_compatibility(_convert(fn))
    assert [p.op for p in problems if p.rule == "supported_op"] == ["LEAKY_RELU"]
    assert "every op after it" in str(problems[0])
    assert "LEAKY_RELU" not in SUPPORTED_OPS


def test_int16_activations():
    problems = edgetpu_compatibility(_convert(_float_fn, int16=True))
    assert "integer" in _rules(problems)
    assert any("int16" in p.message for p in problems)


def test_rank_rule():
    def fn(x):
        x = _fq(x, 0.0, 1.0)
        y = tf.reshape(x, [2, 2, 4, 8, 2])  # size > 1 outside the 3 innermost dims
        return _fq(tf.nn.relu(y), 0.0, 1.0)

    problems = edgetpu_compatibility(_convert(fn, shape=(1, 8, 8, 4)))
    assert "rank" in _rules(problems)


def test_unequal_dilation(good):
    def edit(model):
        op = model.subgraphs[0].operators[_op_index(model, "CONV_2D")]
        op.builtinOptions.dilationHFactor = 2

    problems = edgetpu_compatibility(_edit(good, edit))
    assert [(p.rule, p.op) for p in problems] == [("op_constraint", "CONV_2D")]
    assert "dilation" in problems[0].message


def test_pooling_with_fused_activation():
    def fn(x):
        x = _fq(x, 0.0, 1.0)
        return _fq(tf.nn.avg_pool2d(x, 2, 2, "VALID"), 0.0, 1.0)

    tflite = _convert(fn)
    assert edgetpu_compatibility(tflite) == []

    def edit(model):
        op = model.subgraphs[0].operators[_op_index(model, "AVERAGE_POOL_2D")]
        op.builtinOptions.fusedActivationFunction = schema.ActivationFunctionType.RELU

    problems = edgetpu_compatibility(_edit(tflite, edit))
    assert [(p.rule, p.op) for p in problems] == [("op_constraint", "AVERAGE_POOL_2D")]


def test_per_axis_activation(good):
    def edit(model):
        subgraph = model.subgraphs[0]
        op = subgraph.operators[_op_index(model, "CONV_2D")]
        q = subgraph.tensors[op.outputs[0]].quantization
        q.scale = np.full(8, q.scale[0], np.float32)
        q.zeroPoint = np.full(8, q.zeroPoint[0], np.int64)
        q.quantizedDimension = 3

    problems = edgetpu_compatibility(_edit(good, edit))
    assert _rules(problems) == {"quantization"}


def test_mean_over_batch_and_odd_depth():
    def fn(x):
        x = _fq(x, 0.0, 1.0)
        return _fq(tf.reduce_mean(x, axis=[3]), 0.0, 1.0)

    problems = edgetpu_compatibility(_convert(fn, shape=(1, 4, 4, 6)))
    assert [p.rule for p in problems] == ["op_constraint"]
    assert "multiple of 4" in problems[0].message


def test_several_subgraphs(good):
    def edit(model):
        model.subgraphs.append(model.subgraphs[0])

    assert "subgraphs" in _rules(edgetpu_compatibility(_edit(good, edit)))


def test_tf_pfq_export_is_compatible():
    model = tf_pfq.models.mobilenet_v2(
        input_shape=(12, 12, 3), stem=8, blocks=((8, 1, 1), (8, 1, 2)), last=16
    )
    folded, _ = tf_pfq.fold_batchnorm(model)
    qat = tf_pfq.apply(folded, activation_bits=4, weight_bits=4, per_channel_weights=True)
    data = np.random.default_rng(0).uniform(0, 1, (8, 12, 12, 3)).astype(np.float32)
    qat(data, training=True)
    for io_dtype in ("int8", "uint8"):
        tflite = tf_pfq.export.to_tflite(qat, representative_data=data, io_dtype=io_dtype)
        assert edgetpu_compatibility(tflite) == []


@pytest.mark.parametrize("value", [np.nan, np.inf, 0.0], ids=["nan", "inf", "zero"])
@pytest.mark.parametrize("kind", ["activation", "weight"])
def test_invalid_scale_is_flagged(good, value, kind):
    def edit(model):
        subgraph = model.subgraphs[0]
        op = subgraph.operators[_op_index(model, "CONV_2D")]
        tensor = subgraph.tensors[op.outputs[0] if kind == "activation" else op.inputs[1]]
        tensor.quantization.scale = np.full_like(tensor.quantization.scale, value)

    problems = edgetpu_compatibility(_edit(good, edit))
    assert [(p.rule, p.op) for p in problems] == [("quantization", "CONV_2D")], problems
    assert "finite and positive" in problems[0].message


def test_not_a_tflite_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match=r"`model` is not a \.tflite"):
        edgetpu_compatibility(b"garbage")
    path = tmp_path / "model.tflite"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=str(path)):
        edgetpu_compatibility(path)
