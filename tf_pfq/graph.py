"""Reading and rewriting the layer graph of a Functional or Sequential tf_keras model.

Keras has no public API to delete a layer from a model or to change a layer's
width while keeping the rest; tfmot's own transforms work on the same serialized
config. Rewrites here go through `model.get_config()` and `Model.from_config`, so
the result is an ordinary Functional model with the same layer names, and the
input model is never touched.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from tf_pfq.compat import check_model, keras
from tf_pfq.compat.flatten import nested_models

__all__ = ["LayerGraph", "Inbound", "to_functional", "rewrite", "rebuild", "call_kwargs"]


@dataclasses.dataclass(frozen=True)
class Inbound:
    """One input tensor of a layer call: the producing layer and which of its outputs.

    Example:
      >>> Inbound("conv1_bn")
      Inbound(layer='conv1_bn', node_index=0, tensor_index=0)
    """

    layer: str
    node_index: int = 0
    tensor_index: int = 0


def to_functional(model, argument: str = "model"):
    """Returns flat tf_keras `model` as a Functional model (a Sequential one is re-wrapped).

    The passes take models in canonical form (`tf_pfq.canonical.canonicalize`, which
    the public functions call first); this only re-wraps a Sequential and refuses
    what canonicalizing would have changed, rather than doing it again.

    Raises:
      TypeError: not a tf_keras Sequential or Functional model (a Keras 3 one
        included), or one with nested sub-models.

    Example:
      >>> seq = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="fc")])
      >>> functional = to_functional(seq)
      >>> type(functional).__name__, functional.layers[-1] is seq.layers[-1]
      ('Functional', True)
    """
    check_model(model, argument)
    nested = nested_models(model)
    if nested:
        raise TypeError(
            f"`{argument}` ({model.name}) has nested sub-models {nested}; tf_pfq's passes "
            "take a flat model: call tf_pfq.canonical.canonicalize(model) first (the "
            "public functions do)."
        )
    if isinstance(model, keras.Sequential):
        return keras.Model(model.inputs, model.outputs, name=model.name)
    return model


def _is_ref(item) -> bool:
    """True for a serialized tensor reference `[layer name, node index, tensor index, ...]`."""
    return (
        isinstance(item, (list, tuple))
        and len(item) >= 3
        and isinstance(item[0], str)
        and isinstance(item[1], int)
        and isinstance(item[2], int)
    )


def _records(node) -> list:
    """The `[name, node, tensor, kwargs]` records of one serialized call.

    A layer called on a list of tensors writes a list of records; an op layer
    (`TFOpLambda`, `SlicingOpLambda`: `x + 3.0`, `x[..., :8]`) called on one tensor
    writes the single record itself, its kwargs holding the other operands.
    """
    if _is_ref(node):
        return [node]
    return list(node)


def _kwarg_refs(value) -> list[Inbound]:
    # Tensors passed as keyword arguments (`tf.math.multiply(x, y=t)`) are written as
    # references inside the kwargs; everything else there is a constant.
    if _is_ref(value) and len(value) == 3:
        return [Inbound(value[0], value[1], value[2])]
    if isinstance(value, dict):
        return [ref for v in value.values() for ref in _kwarg_refs(v)]
    if isinstance(value, (list, tuple)):
        return [ref for v in value for ref in _kwarg_refs(v)]
    return []


def _inbound_of(layer_config) -> list[list[Inbound]]:
    calls = []
    for node in layer_config["inbound_nodes"]:
        if isinstance(node, dict):
            raise ValueError(
                f"Layer {layer_config['name']!r}: the Keras 3 'args' form of inbound nodes "
                "is not supported; pass a tf_keras model."
            )
        inbounds = []
        for item in _records(node):
            inbounds.append(Inbound(item[0], item[1], item[2]))
            if len(item) > 3:
                inbounds += _kwarg_refs(item[3])
        calls.append(inbounds)
    return calls


def call_kwargs(layer_config) -> dict[str, Any]:
    """The keyword arguments of a layer's first call (op layers keep operands here).

    Example:
      >>> call_kwargs({"inbound_nodes": [["bn", 0, 0, {"y": 3.0, "name": None}]]})
      {'y': 3.0, 'name': None}
    """
    nodes = layer_config["inbound_nodes"]
    if not nodes:
        return {}
    records = _records(nodes[0])
    kwargs = records[0][3] if records and len(records[0]) > 3 else {}
    return dict(kwargs) if isinstance(kwargs, dict) else {}


class LayerGraph:
    """The call graph of a Functional model, read from its config.

    Attributes:
      model: the Functional model (Sequential models are converted).
      config: a deep copy of `model.get_config()`.
      order: layer names in topological order.

    Example:
      >>> x = keras.Input((8, 8, 3), name="image")
      >>> y = keras.layers.Conv2D(4, 3, name="conv")(x)
      >>> y = keras.layers.BatchNormalization(name="bn")(y)
      >>> graph = LayerGraph(keras.Model(x, keras.layers.ReLU(name="relu")(y)))
      >>> graph.order
      ['image', 'conv', 'bn', 'relu']
      >>> graph.inputs_of("bn"), graph.consumers_of("conv"), graph.class_name("bn")
      (['conv'], ['bn'], 'BatchNormalization')
    """

    def __init__(self, model):
        self.model = to_functional(model)
        self.config = copy.deepcopy(self.model.get_config())
        self._configs = {c["name"]: c for c in self.config["layers"]}
        self.order = [c["name"] for c in self.config["layers"]]
        self._calls = {name: _inbound_of(c) for name, c in self._configs.items()}
        self._consumers: dict[str, list[str]] = {name: [] for name in self.order}
        for name, calls in self._calls.items():
            for call in calls:
                for inbound in call:
                    if name not in self._consumers[inbound.layer]:
                        self._consumers[inbound.layer].append(name)
        self.outputs = [Inbound(*o[:3]) for o in self.config["output_layers"]]
        self.input_names = [i[0] for i in self.config["input_layers"]]

    def layer(self, name: str):
        # Model.get_layer walks every layer (and their sub-modules) on each call:
        # thousands of look-ups on MobileNetV2 took a minute, a dict takes nothing.
        if not hasattr(self, "_layers"):
            self._layers = {layer.name: layer for layer in self.model.layers}
        return self._layers[name] if name in self._layers else self.model.get_layer(name)

    def layer_config(self, name: str) -> dict[str, Any]:
        return self._configs[name]

    def class_name(self, name: str) -> str:
        return self._configs[name]["class_name"]

    def inputs_of(self, name: str) -> list[str]:
        """Names of the layers feeding the (single) call of layer `name`."""
        calls = self._calls[name]
        return [i.layer for i in calls[0]] if calls else []

    def consumers_of(self, name: str) -> list[str]:
        """Names of the layers that take an output of layer `name` as input."""
        return list(self._consumers[name])

    def num_calls(self, name: str) -> int:
        return len(self._calls[name])

    def is_shared(self, name: str) -> bool:
        """True when the layer is called more than once (its weights are shared)."""
        return self.num_calls(name) > 1

    def is_output(self, name: str) -> bool:
        return any(o.layer == name for o in self.outputs)

    def is_nested_model(self, name: str) -> bool:
        return isinstance(self.layer(name), keras.Model)


def _rename_refs(value, old: str, new: list):
    if _is_ref(value) and value[0] == old:
        return [new[0], new[1], new[2], *[_rename_refs(v, old, new) for v in value[3:]]]
    if isinstance(value, dict):
        return {k: _rename_refs(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_rename_refs(v, old, new) for v in value]
    return value


def _replace_inbound(config, old: str, new: list) -> None:
    for layer_config in config["layers"]:
        layer_config["inbound_nodes"] = _rename_refs(layer_config["inbound_nodes"], old, new)
    for key in ("output_layers",):
        for k, item in enumerate(config[key]):
            if item[0] == old:
                config[key][k] = [new[0], new[1], new[2]]


def own_layer_classes(model) -> dict[str, type]:
    """{class name: class} of `model`'s layers that are not Keras' own layer classes.

    Every pass rewrites a model by editing its config. A layer class that is not
    registered with Keras (ConvNeXt's LayerScale is a plain class inside
    `keras.applications`) cannot be found by name, and tf_keras then fails with
    "'str' object is not callable"; the source model holds the classes.
    """
    return {
        type(layer).__name__: type(layer)
        for layer in model.layers
        if getattr(keras.layers, type(layer).__name__, None) is not type(layer)
    }


def model_from_config(config: dict, source, custom_objects=None):
    """`keras.Model.from_config(config)` that also knows `source`'s own layer classes."""
    objects = own_layer_classes(source)
    objects.update(custom_objects or {})
    return keras.Model.from_config(config, custom_objects=objects)


def _rename_layer_refs(value, old: str, new: str):
    """`value` with every reference to layer `old` pointing at `new` (indices kept)."""
    if _is_ref(value) and value[0] == old:
        return [new, *[_rename_layer_refs(v, old, new) for v in value[1:]]]
    if isinstance(value, dict):
        return {k: _rename_layer_refs(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_rename_layer_refs(v, old, new) for v in value]
    return value


def _chain(old: dict, entries: Sequence[dict]) -> list[dict]:
    """The serialized layers replacing `old`: the first takes its calls, each next one
    the previous one's output, call by call."""
    chain, previous = [], None
    for entry in entries:
        entry = copy.deepcopy(dict(entry))
        entry["name"] = entry["config"]["name"]
        if "inbound_nodes" not in entry:
            calls = range(len(old["inbound_nodes"]))
            entry["inbound_nodes"] = (
                copy.deepcopy(old["inbound_nodes"])
                if previous is None
                else [[[previous, k, 0, {}]] for k in calls]
            )
        chain.append(entry)
        previous = entry["name"]
    return chain


def rewrite(
    model,
    *,
    replace: Mapping[str, Sequence[dict]] | None = None,
    remove: Iterable[str] = (),
    weights: Mapping[str, list[np.ndarray]] | None = None,
    custom_objects: Mapping[str, Any] | None = None,
):
    """A new Functional model with some layers replaced by chains or removed.

    The one primitive every pass edits a model's graph with (replace a layer, insert
    one after it, split it in two, unwrap a wrapper, delete a pass-through layer):
    the edits are made on `model.get_config()` and the model is rebuilt, so every
    other layer keeps its name, calls and weights, and `model` is not touched.

    Args:
      model: a Functional tf_keras model (not modified).
      replace: {layer name: [serialized layer, ...]}: the layer becomes this chain.
        An entry is a `{"class_name", "config"}` dict (named by `config["name"]`;
        "module", "registered_name" and "inbound_nodes" are optional). The first
        entry takes the old layer's calls unless it has its own "inbound_nodes";
        each next one takes the previous one's output, call by call. Every other
        reference to the old layer (consumers, model outputs) goes to the chain's
        last entry. One entry with the old name replaces the layer in place.
      remove: names of single-input, single-call layers to delete; their consumers
        read the removed layer's input.
      weights: new weight lists by layer name. A layer not named here copies the
        weights of the source layer of its name, if there is one with weights.
      custom_objects: passed to `Model.from_config` for custom layers.

    Returns:
      The new model, with `model`'s name.

    Raises:
      ValueError: a name is unknown, or a removed layer has several inputs or calls.

    Example:
      >>> x = keras.Input((3,), name="x")
      >>> model = keras.Model(x, keras.layers.Dense(2, name="fc")(x))
      >>> relu = {"class_name": "ReLU", "config": {"name": "fc_relu"}}
      >>> fc = {**model.get_layer("fc").get_config()}
      >>> longer = rewrite(model, replace={"fc": [{"class_name": "Dense", "config": fc}, relu]})
      >>> [layer.name for layer in longer.layers]
      ['x', 'fc', 'fc_relu']
      >>> [layer.name for layer in rewrite(longer, remove=["fc_relu"]).layers]
      ['x', 'fc']
    """
    config = copy.deepcopy(model.get_config())
    replace = dict(replace or {})
    by_name = {c["name"]: c for c in config["layers"]}
    for name in [*replace, *remove, *(weights or {})]:
        if name not in by_name and not any(
            e["config"]["name"] == name for chain in replace.values() for e in chain
        ):
            raise ValueError(f"Model {model.name!r} has no layer named {name!r}.")
    for name in remove:
        nodes = by_name[name]["inbound_nodes"]
        records = _records(nodes[0]) if len(nodes) == 1 else []
        if len(records) != 1:
            raise ValueError(
                f"Layer {name!r} cannot be removed: it must have exactly one input and "
                f"one call, it has {len(nodes)} call(s)."
            )
        _replace_inbound(config, name, list(records[0][:3]))
        config["layers"] = [c for c in config["layers"] if c["name"] != name]
    layers = []
    for layer_config in config["layers"]:
        name = layer_config["name"]
        if name not in replace:
            layers.append(layer_config)
            continue
        chain = _chain(layer_config, replace[name])
        last = chain[-1]["name"]
        if last != name:
            own = {entry["name"] for entry in chain}
            for other in config["layers"]:
                if other["name"] not in own:
                    other["inbound_nodes"] = _rename_layer_refs(other["inbound_nodes"], name, last)
            config["output_layers"] = _rename_layer_refs(config["output_layers"], name, last)
        layers += chain
    config["layers"] = layers
    new_model = model_from_config(config, model, custom_objects)
    weights = dict(weights or {})
    source = {layer.name: layer for layer in model.layers}
    for layer in new_model.layers:
        values = weights.get(layer.name)
        if values is None and layer.name in source and source[layer.name].weights:
            values = source[layer.name].get_weights()
        if values is not None:
            layer.set_weights([np.array(v) for v in values])
    return new_model


def rebuild(
    model,
    *,
    layer_configs: Mapping[str, dict[str, Any]] | None = None,
    weights: Mapping[str, list[np.ndarray]] | None = None,
    remove: Iterable[str] = (),
    custom_objects: Mapping[str, Any] | None = None,
):
    """`rewrite` for the common case: some layers get a new config, some are removed.

    Args:
      model: a Functional or Sequential tf_keras model (not modified).
      layer_configs: new `get_config()` dicts for some layers, by layer name.
      weights: new weight lists for some layers, by name; all other layers keep
        copies of their current weights.
      remove: names of single-input, single-call layers to delete; their consumers
        are wired to the removed layer's input.
      custom_objects: passed to `Model.from_config` for custom layers.

    Returns:
      A new model with the same name and layer names.

    Raises:
      ValueError: a name is unknown, or a removed layer has several inputs or calls.

    Example:
      >>> x = keras.Input((3,), name="x")
      >>> h = keras.layers.Dense(3, name="fc1")(x)
      >>> h = keras.layers.ReLU(name="relu")(h)
      >>> model = keras.Model(x, keras.layers.Dense(2, name="fc2")(h))
      >>> smaller = rebuild(model, remove=["relu"])
      >>> [layer.name for layer in smaller.layers]
      ['x', 'fc1', 'fc2']
      >>> kernel = smaller.get_layer("fc2").kernel.numpy()
      >>> bool(np.all(kernel == model.get_layer("fc2").kernel.numpy()))
      True
    """
    model = to_functional(model)
    serialized = {c["name"]: c for c in model.get_config()["layers"]}
    for name in layer_configs or {}:
        if name not in serialized:
            raise ValueError(f"Model {model.name!r} has no layer named {name!r}.")
    replace = {
        name: [{**{k: v for k, v in serialized[name].items() if k != "inbound_nodes"}, "config": c}]
        for name, c in (layer_configs or {}).items()
    }
    return rewrite(
        model, replace=replace, remove=remove, weights=weights, custom_objects=custom_objects
    )
