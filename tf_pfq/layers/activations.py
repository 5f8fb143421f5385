"""Fused activations that integer inference does not fuse, moved into layers of their own.

TFLite fuses ReLU and ReLU6 into a conv or dense op; softmax, sigmoid, tanh, swish
and the others are ops of their own whose input needs its own grid. Part of the
canonical form (`tf_pfq.canonical`): after `split_activations` every such
activation is an Activation layer that prune, quantization and export see.
"""

from __future__ import annotations

import copy

from tf_pfq.compat import keras  # noqa: F401  (the docstring examples use it)
from tf_pfq.graph import model_from_config
from tf_pfq.layers.table import FUSED_ACTIVATIONS, by_name

__all__ = ["split_activations"]


def split_activations(model):
    """`model` with each non-fusable fused activation moved into an Activation layer.

    Integer inference fuses ReLU and ReLU6 into a conv or dense op; softmax,
    sigmoid, tanh, swish, ... are ops of their own whose input needs a grid, so
    `Dense(10, activation="softmax", name="predictions")` (the head of the
    `tf_keras.applications` models) becomes a linear `predictions` followed by an
    `Activation("softmax", name="predictions_softmax")`. Other layers keep their
    names; the model is returned unchanged when there is nothing to split.

    Example:
      >>> x = keras.Input((4,), name="x")
      >>> m = keras.Model(x, keras.layers.Dense(3, activation="softmax", name="p")(x))
      >>> [layer.name for layer in split_activations(m).layers]
      ['x', 'p', 'p_softmax']
    """
    config = copy.deepcopy(model.get_config())
    layers, renames = [], {}
    for layer_config in config["layers"]:
        layers.append(layer_config)
        activation = layer_config["config"].get("activation")
        entry = by_name(layer_config["class_name"])
        if (
            entry is not None
            and entry.splits_activation
            and isinstance(activation, str)
            and activation not in FUSED_ACTIVATIONS
        ):
            layer_config["config"]["activation"] = "linear"
            name = layer_config["name"]
            new = f"{name}_{activation}"
            renames[name] = new
            layers.append(
                {
                    "class_name": "Activation",
                    "config": {
                        "name": new,
                        "trainable": True,
                        "dtype": layer_config["config"].get("dtype", "float32"),
                        "activation": activation,
                    },
                    "name": new,
                    "inbound_nodes": [[[name, 0, 0, {}]]],
                }
            )
    if not renames:
        return model
    for layer_config in layers:
        if layer_config["name"] in renames.values():
            continue
        layer_config["inbound_nodes"] = [
            [[renames.get(item[0], item[0]), *item[1:]] for item in node]
            for node in layer_config["inbound_nodes"]
        ]
    config["layers"] = layers
    config["output_layers"] = [
        [renames.get(item[0], item[0]), *item[1:]] for item in config["output_layers"]
    ]
    result = model_from_config(config, model)
    for layer in model.layers:
        if layer.weights:
            result.get_layer(layer.name).set_weights(layer.get_weights())
    return result
