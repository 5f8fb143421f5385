"""The canonical form: made once by `tf_pfq.canonicalize`, never again by the passes."""

from __future__ import annotations

import ast
from pathlib import Path

import keras as keras3
import numpy as np
import pytest

import tf_pfq
from tf_pfq.compat import keras
from tf_pfq.graph import LayerGraph

L = keras.layers
PACKAGE = Path(__file__).resolve().parents[1] / "tf_pfq"
# The steps of the canonical form; only tf_pfq/canonical.py may call them.
STEPS = frozenset(["prepare_model", "split_separable", "replace_op_layers", "split_activations"])


def _messy_model():
    """Nested, Sequential outside, a SeparableConv2D, an op layer and a fused swish."""
    x = keras.Input((8, 8, 3), name="x")
    y = L.SeparableConv2D(4, 3, padding="same", name="sep")(x)
    y = L.Conv2D(4, 1, activation="swish", name="pw")(y * 0.5)
    inner = keras.Model(x, y, name="inner")
    return keras.Sequential(
        [keras.Input((8, 8, 3)), inner, L.GlobalAveragePooling2D(name="pool")], name="outer"
    )


def test_canonical_form_computes_the_same_function_and_is_a_fixed_point():
    model = _messy_model()
    weights = [w.copy() for w in model.get_weights()]
    canonical = tf_pfq.canonicalize(model)
    kinds = [type(layer).__name__ for layer in canonical.layers]
    assert kinds == [
        "InputLayer", "DepthwiseConv2D", "Conv2D", "ElementwiseOp", "Conv2D", "Activation",
        "GlobalAveragePooling2D",
    ]  # fmt: skip
    assert canonical.get_layer("pw").get_config()["activation"] == "linear"
    data = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(canonical(data), model(data), atol=1e-5)
    assert tf_pfq.canonicalize(canonical) is canonical  # nothing left to do
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), weights))


def test_keras3_model_is_rebuilt_once():
    inputs = keras3.Input((6, 6, 2))
    outputs = keras3.layers.Conv2D(3, 3, name="conv")(inputs)
    canonical = tf_pfq.canonicalize(keras3.Model(inputs, outputs))
    assert isinstance(canonical, keras.Model)
    assert type(canonical.get_layer("conv")).__module__.startswith("tf_keras")


def test_layer_graph_refuses_what_it_would_have_had_to_convert():
    with pytest.raises(TypeError, match=r"nested sub-models \['inner'\].*canonicalize"):
        LayerGraph(_messy_model())
    inputs = keras3.Input((4,))
    with pytest.raises(TypeError, match="Keras 3"):
        LayerGraph(keras3.Model(inputs, keras3.layers.Dense(2)(inputs)))


@pytest.mark.parametrize(
    "entry",
    [
        lambda m: tf_pfq.prune(m),
        lambda m: tf_pfq.fold_batchnorm(m),
        lambda m: tf_pfq.apply(m, activation_bits=4),
        lambda m: tf_pfq.dfq.find_equalization_pairs(m),
    ],
    ids=["prune", "fold_batchnorm", "apply", "dfq"],
)
def test_public_functions_take_the_messy_model(entry):
    # Each canonicalizes at its entry; none of them would run on LayerGraph otherwise.
    assert entry(_messy_model()) is not None


def _calls(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in STEPS:
                found.append((node.lineno, name))
    return found


def test_only_canonical_py_canonicalizes():
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line} calls {name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "canonical.py"
        for line, name in _calls(path)
    ]
    assert not offenders, offenders


def test_the_rule_sees_a_call(tmp_path):
    # Negative control for the source check above.
    path = tmp_path / "pass.py"
    path.write_text("from tf_pfq.layers import split_separable\nm = split_separable(m)\n")
    assert _calls(path) == [(2, "split_separable")]
