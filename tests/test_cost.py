"""Parameter and MAC counts, checked against hand-computed formulas and Keras."""

from __future__ import annotations

import pytest

from tf_pfq import cost
from tf_pfq.compat import keras

L = keras.layers


def _model():
    inputs = keras.Input((16, 16, 3))
    x = L.Conv2D(8, 3, strides=2, padding="same", name="conv")(inputs)  # 8x8x8
    x = L.BatchNormalization(name="bn")(x)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, padding="valid", name="dw")(x)  # 6x6x16
    x = L.Conv2D(4, 1, groups=4, use_bias=False, name="grouped")(x)  # 6x6x4
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(10, name="fc")(x))


def test_layer_costs_match_formulas():
    costs = cost.layer_costs(_model())
    assert costs["conv"] == cost.LayerCost(3 * 3 * 3 * 8 + 8, 8 * 8 * 3 * 3 * 3 * 8)
    assert costs["bn"] == cost.LayerCost(4 * 8, 0)
    assert costs["dw"] == cost.LayerCost(3 * 3 * 8 * 2 + 16, 6 * 6 * 3 * 3 * 8 * 2)
    assert costs["grouped"] == cost.LayerCost(16 // 4 * 4, 6 * 6 * (16 // 4) * 4)
    assert costs["fc"] == cost.LayerCost(4 * 10 + 10, 4 * 10)


def test_totals_agree_with_keras_and_layer_costs():
    model = _model()
    assert cost.count_params(model) == model.count_params()
    assert cost.count_macs(model) == sum(c.macs for c in cost.layer_costs(model).values())


def test_dense_on_sequences_counts_every_position():
    inputs = keras.Input((5, 3))
    model = keras.Model(inputs, L.Dense(2, name="fc")(inputs))
    assert cost.count_macs(model) == 5 * 3 * 2


def test_shared_layers_count_each_call_and_nested_models_are_flattened():
    shared = L.Dense(4, name="shared")
    inputs = keras.Input((3,))
    inner = keras.Sequential([keras.Input((4,)), L.Dense(2, name="inner_fc")], name="inner")
    x = L.Add()([shared(inputs), shared(inputs)])
    model = keras.Model(inputs, inner(x))
    costs = cost.layer_costs(model)
    assert costs["shared"].macs == 2 * 3 * 4
    assert costs["inner/inner_fc"] == cost.LayerCost(4 * 2 + 2, 4 * 2)
    assert cost.count_params(model) == model.count_params()


def test_unknown_spatial_size_names_the_layer():
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, L.Conv2D(2, 3, name="conv")(inputs))
    with pytest.raises(ValueError, match="'conv'"):
        cost.count_macs(model)


def test_calls_by_another_model_do_not_count():
    # tfmot's wrappers call the layers of the model they quantize: those calls belong
    # to the other model and must not double its MACs.
    model = _model()
    before = cost.count_macs(model)
    other = keras.Input((16, 16, 3))
    keras.Model(other, model.get_layer("conv")(other))
    assert len(model.get_layer("conv").inbound_nodes) == 2
    assert cost.count_macs(model) == before
