"""Fused activations that integer inference does not fuse, moved into layers of their own.

TFLite fuses ReLU and ReLU6 into a conv or dense op; softmax, sigmoid, tanh, swish
and the others are ops of their own whose input needs its own grid. Part of the
canonical form (`tf_pfq.canonical`): after `split_activations` every such
activation is an Activation layer that prune, quantization and export see.
"""

from __future__ import annotations

import copy

from tf_pfq.compat import keras  # noqa: F401  (the docstring examples use it)
from tf_pfq.graph import rewrite
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
    replace = {}
    for layer_config in model.get_config()["layers"]:
        activation = layer_config["config"].get("activation")
        entry = by_name(layer_config["class_name"])
        if (
            entry is not None
            and entry.splits_activation
            and isinstance(activation, str)
            and activation not in FUSED_ACTIVATIONS
        ):
            name = layer_config["name"]
            linear = copy.deepcopy(layer_config)
            del linear["inbound_nodes"]
            linear["config"]["activation"] = "linear"
            split = {
                "class_name": "Activation",
                "config": {
                    "name": f"{name}_{activation}",
                    "trainable": True,
                    "dtype": layer_config["config"].get("dtype", "float32"),
                    "activation": activation,
                },
            }
            replace[name] = [linear, split]
    return rewrite(model, replace=replace) if replace else model
