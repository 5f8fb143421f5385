"""Inlining nested Functional/Sequential sub-models into one functional graph.

Transfer learning usually wraps a backbone as one layer of an outer model. The
passes of tf_pfq read the layer graph of one model, so a backbone seen as a
single layer would hide its BatchNormalization channels. `flatten` replays every
layer call of the outer model; a call of a sub-model replays the sub-model's own
calls on the same tensors instead. Each leaf layer is cloned (config and weights)
so the input model and its layers are left untouched.
"""

from __future__ import annotations

import tensorflow as tf

from tf_pfq.compat import keras

__all__ = ["flatten", "nested_models"]


def _is_graph_model(layer) -> bool:
    return isinstance(layer, keras.Model)


def nested_models(model) -> list[str]:
    """Names of the sub-models used as layers of `model` (first level only)."""
    return [layer.name for layer in model.layers if _is_graph_model(layer)]


class _Flattener:
    def __init__(self, model):
        # Names of the outer model's own layers keep priority over inner ones.
        self.used = {layer.name for layer in model.layers if not _is_graph_model(layer)}
        self.clones: dict[int, keras.layers.Layer] = {}
        self.pending: list[tuple[keras.layers.Layer, keras.layers.Layer]] = []

    def _name(self, layer, prefix: str) -> str:
        name = layer.name
        if prefix and name in self.used:
            name = f"{prefix}_{layer.name}"
        base, i = name, 1
        while prefix and name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name

    def clone(self, layer, prefix: str):
        # One clone per original layer: a layer shared in the input stays shared.
        if id(layer) not in self.clones:
            if prefix:
                config = layer.get_config()
                config["name"] = self._name(layer, prefix)
            else:
                config = layer.get_config()
            new = type(layer).from_config(config)
            self.clones[id(layer)] = new
            self.pending.append((layer, new))
        return self.clones[id(layer)]

    def replay(self, model, inputs, prefix: str):
        if not isinstance(model, keras.Sequential) and model.inputs is None:
            raise TypeError(
                f"Nested model {model.name!r} is a subclassed model of class "
                f"{type(model).__module__}.{type(model).__qualname__}, whose layer "
                "graph cannot be read. Rebuild it with the Functional API."
            )
        if model.inputs is None:
            raise ValueError(f"Nested model {model.name!r} is not built.")
        tensors = {id(t): new for t, new in zip(model.inputs, tf.nest.flatten(inputs))}

        def lookup(value):
            if hasattr(value, "_keras_history"):
                return tensors[id(value)]
            return value

        depths = sorted(model._nodes_by_depth, reverse=True)  # inputs have the top depth
        for depth in depths:
            for node in model._nodes_by_depth[depth]:
                layer = node.layer
                if node.is_input:  # an InputLayer's node: its tensor is `inputs`
                    continue
                args = tf.nest.map_structure(lookup, node.call_args)
                kwargs = tf.nest.map_structure(lookup, node.call_kwargs)
                if _is_graph_model(layer):
                    inner_inputs = args[0] if len(args) == 1 else args
                    outputs = self.replay(layer, inner_inputs, layer.name)
                else:
                    outputs = self.clone(layer, prefix)(*args, **kwargs)
                for old, new in zip(tf.nest.flatten(node.outputs), tf.nest.flatten(outputs)):
                    tensors[id(old)] = new
        return tf.nest.map_structure(lambda t: tensors[id(t)], model._nested_outputs)


def flatten(model):
    """Returns `model` with every nested Functional/Sequential sub-model inlined.

    Layer names are kept; a layer of a sub-model whose name is already taken is
    renamed `<sub-model name>_<layer name>`. Weights are copied, so the result
    computes exactly what `model` computes. A model with no sub-model is returned
    as it is. The input model is not modified.

    Args:
      model: a built tf_keras Functional or Sequential model.

    Returns:
      A Functional model without nested models (or `model` itself).

    Raises:
      TypeError: a nested model is subclassed.

    Example:
      >>> inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")])
      >>> x = keras.Input((4,), name="x")
      >>> flat = flatten(keras.Model(x, keras.layers.ReLU(name="relu")(inner(x))))
      >>> [layer.name for layer in flat.layers]
      ['x', 'fc', 'relu']
    """
    if not nested_models(model):
        return model
    flattener = _Flattener(model)
    inputs = [
        keras.Input(
            batch_shape=t.shape,
            dtype=t.dtype,
            name=t.node.layer.name if hasattr(t, "node") else None,
        )
        for t in model.inputs
    ]
    nested_inputs = tf.nest.pack_sequence_as(model._nested_inputs, inputs)
    outputs = flattener.replay(model, nested_inputs, prefix="")
    flat = keras.Model(nested_inputs, outputs, name=model.name)
    for old, new in flattener.pending:
        new.set_weights(old.get_weights())
    return flat
