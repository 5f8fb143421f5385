"""Rebuilding Keras 3 models as tf_keras models, and loading model files.

Keras 3 and tf_keras serialize models differently (InputLayer `batch_shape`, dtype
policies as dicts, `keras.src` module paths, new layer arguments, inbound nodes
as `__keras_tensor__` entries with args/kwargs), so neither `from_config` nor the
file formats carry over. `to_tf_keras` reads the Keras 3 functional config, builds
each layer with tf_keras from a translated config, calls it on the tf_keras
tensors of the same inbound nodes, and copies the weights layer by layer.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
import zipfile
from typing import Any

import tensorflow as tf

from tf_pfq.compat import keras

__all__ = ["is_keras3", "check_keras3_model", "to_tf_keras", "load_model"]

# Keras 3 activations that tf_keras lacks or computes differently (tf_keras's
# `hard_sigmoid` is 0.2 * x + 0.5): rebuilt from standard layers and TF ops.
_HARD_ACTIVATIONS = ("hard_silu", "hard_swish", "hard_sigmoid")
_RENAMED_ACTIVATIONS = {"silu": "swish"}

# Keras 3 operations (functional code such as `x + 3.0`) -> TF ops; tf_keras
# records a TF op called on its tensors as a serializable TFOpLambda layer.
_OPS = {
    "Add": tf.math.add,
    "Subtract": tf.math.subtract,
    "Multiply": tf.math.multiply,
    "Divide": tf.math.truediv,
    "TrueDivide": tf.math.truediv,
    "Maximum": tf.math.maximum,
    "Minimum": tf.math.minimum,
    "Negative": tf.math.negative,
    "Abs": tf.math.abs,
    "Square": tf.math.square,
    "Sqrt": tf.math.sqrt,
    "Exp": tf.math.exp,
    "Relu": tf.nn.relu,
    "Relu6": tf.nn.relu6,
    "Sigmoid": tf.math.sigmoid,
    "Tanh": tf.math.tanh,
    "Silu": tf.nn.silu,
}

# Arguments every tf_keras layer takes through `**kwargs`.
_BASE_KWARGS = {
    "name",
    "trainable",
    "dtype",
    "dynamic",
    "input_dim",
    "input_shape",
    "batch_input_shape",
    "batch_size",
    "weights",
    "activity_regularizer",
    "autocast",
}

_LAMBDA_HELP = (
    "Lambda layers hold Python code that cannot be read or rewritten. Replace it "
    "with standard layers (e.g. Rescaling, ReLU(max_value=6), Multiply, Add) or "
    "with Keras ops in functional code (`y = x * 0.5 + 1.0`), then pass the model again."
)


def _keras3_module():
    # Imported on first use: a tf_keras-only user does not pay for Keras 3.
    return importlib.import_module("keras")


def is_keras3(obj) -> bool:
    """True for objects of Keras 3 (`import keras`, or `tf.keras` on TF >= 2.16)."""
    if isinstance(obj, keras.layers.Layer):
        return False
    # A Keras 3 object exists only once Keras 3 was imported; user subclasses live
    # in the user's modules, so the base class is checked, not the module name.
    keras3 = sys.modules.get("keras")
    operation = getattr(keras3, "Operation", None)
    if isinstance(operation, type) and isinstance(obj, operation):
        return True
    module = type(obj).__module__
    return module == "keras" or module.startswith("keras.")


def _qualname(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def check_keras3_model(model, argument: str = "model") -> None:
    """Raises a clear error unless `model` is a built Keras 3 Functional/Sequential model."""
    keras3 = _keras3_module()

    if not isinstance(model, keras3.Model):
        raise TypeError(
            f"`{argument}` must be a Sequential or Functional model; received a Keras 3 "
            f"object of class {_qualname(model)}."
        )
    if type(model).__name__ not in ("Functional", "Sequential"):
        raise TypeError(
            f"`{argument}` must be a Sequential or Functional model; received a "
            f"subclassed Keras 3 model of class {_qualname(model)}, whose layer graph "
            "cannot be rewritten. Rebuild it with the Functional API."
        )
    if not model.built or not model.inputs:
        raise ValueError(
            f"`{argument}` ({model.name}) is not built; call it on an input or give "
            "it an input shape first."
        )


def _translate(value):
    """Keras 3 serialized objects -> the tf_keras form (no module paths, dtype names)."""
    if isinstance(value, list):
        return [_translate(v) for v in value]
    if not isinstance(value, dict):
        return value
    if (
        "class_name" in value
        and "config" in value
        and ("module" in value or "registered_name" in value)
    ):
        if value["class_name"] in ("DTypePolicy", "FloatDTypePolicy"):
            return value["config"]["name"]
        if value["class_name"] == "__tuple__":
            return tuple(_translate(value["config"]["value"]))
        return {"class_name": value["class_name"], "config": _translate(value["config"])}
    return {k: _translate(v) for k, v in value.items()}


def _accepted_args(cls) -> set[str]:
    names = set(_BASE_KWARGS) if issubclass(cls, keras.layers.Layer) else set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names.update(p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def _drop_new_args(config: dict[str, Any], cls, layer, what: str) -> None:
    accepted = _accepted_args(cls)
    for key in list(config):
        if key in accepted:
            continue
        # New Keras 3 arguments left at their neutral value mean no change.
        if config[key] in (None, False, 0, [], {}):
            del config[key]
            continue
        raise TypeError(
            f"Layer {layer.name!r} (Keras 3 class {_qualname(layer)}): {what} uses the "
            f"argument {key}={config[key]!r}, which tf_keras {cls.__name__} does not have."
        )


# Arguments Keras 3 renamed: {class name: {Keras 3 name: tf_keras name}}.
_RENAMED_ARGS = {"LeakyReLU": {"negative_slope": "alpha"}}


def _layer_config(layer, class_name: str, cls) -> dict[str, Any]:
    config = _translate(layer.get_config())
    for new_name, old_name in _RENAMED_ARGS.get(class_name, {}).items():
        if new_name in config and old_name not in config:
            config[old_name] = config.pop(new_name)
    if class_name == "InputLayer":
        config["batch_input_shape"] = config.pop("batch_shape", config.get("batch_input_shape"))
        config.pop("optional", None)
    _drop_new_args(config, cls, layer, "the layer")
    for key, value in config.items():
        # Initializers, regularizers and constraints gained arguments too.
        if isinstance(value, dict) and set(value) == {"class_name", "config"}:
            for module in (keras.initializers, keras.regularizers, keras.constraints):
                sub_cls = getattr(module, value["class_name"], None)
                if inspect.isclass(sub_cls):
                    _drop_new_args(value["config"], sub_cls, layer, f"`{key}`")
                    break
    return config


def _hard_activation(name: str, x, layer_name: str):
    """x * relu6(x + 3) / 6 (hard_silu), or relu6(x + 3) / 6 (hard_sigmoid)."""
    from tf_keras.src.layers.core.tf_op_layer import TFOpLambda

    shifted = TFOpLambda(tf.math.add, name=f"{layer_name}_add")(x, 3.0)
    relu6 = keras.layers.ReLU(6.0, name=f"{layer_name}_relu6")(shifted)
    if name == "hard_sigmoid":
        return TFOpLambda(tf.math.multiply, name=layer_name)(relu6, 1.0 / 6.0)
    sigmoid = TFOpLambda(tf.math.multiply, name=f"{layer_name}_scale")(relu6, 1.0 / 6.0)
    return keras.layers.Multiply(name=layer_name)([x, sigmoid])


def _tf_keras_class(k3_class):
    module, name = k3_class.__module__, k3_class.__name__
    if not module.startswith("keras."):
        return None
    if module.startswith("keras.src.applications."):
        # Layers an application defines for itself (e.g. ConvNeXt's LayerScale)
        # exist in the same tf_keras application module.
        try:
            app = importlib.import_module("tf_keras" + module[len("keras") :])
        except ImportError:
            return None
        cls = getattr(app, name, None)
        return cls if inspect.isclass(cls) else None
    cls = getattr(keras.layers, name, None)
    return cls if inspect.isclass(cls) else None


class _Builder:
    """Builds tf_keras layers for the Keras 3 layers of one model."""

    def __init__(self):
        self.pending: list[tuple[Any, Any]] = []  # (Keras 3 layer, tf_keras layer)

    def layer(self, layer):
        """A tf_keras layer for `layer`, or a function of tensors (activations)."""
        keras3 = _keras3_module()

        class_name = type(layer).__name__
        if isinstance(layer, keras3.Model):
            return to_tf_keras(layer)
        if class_name == "Lambda":
            raise TypeError(f"Layer {layer.name!r} is a Keras 3 Lambda layer. {_LAMBDA_HELP}")
        if type(layer).__module__.startswith("keras.src.ops"):
            return self._op(layer, class_name)
        cls = _tf_keras_class(type(layer))
        if cls is None:
            raise TypeError(
                f"Layer {layer.name!r} of class {_qualname(layer)} has no tf_keras "
                "equivalent that tf_pfq can translate. Rebuild the model with standard "
                "Keras layers, or build it with tf_keras directly."
            )
        config = _layer_config(layer, class_name, cls)
        activation = config.get("activation")
        if isinstance(activation, str):
            config["activation"] = _RENAMED_ACTIVATIONS.get(activation, activation)
            if activation in _HARD_ACTIVATIONS:
                if class_name == "Activation":
                    return lambda x: _hard_activation(activation, x, layer.name)
                config["activation"] = "linear"
                new = cls.from_config(config)
                self.pending.append((layer, new))
                return lambda x: _hard_activation(activation, new(x), f"{layer.name}_{activation}")
        new = cls.from_config(config)
        self.pending.append((layer, new))
        return new

    def _op(self, op, class_name: str):
        from tf_keras.src.layers.core.tf_op_layer import TFOpLambda

        config = op.get_config()
        if class_name in ("HardSilu", "HardSwish", "HardSigmoid") and set(config) == {"name"}:
            name = "hard_sigmoid" if class_name == "HardSigmoid" else "hard_silu"
            return lambda x: _hard_activation(name, x, op.name)
        if class_name not in _OPS or set(config) - {"name"}:
            raise TypeError(
                f"Operation {op.name!r} of Keras 3 class {_qualname(op)} has no tf_keras "
                f"equivalent that tf_pfq can translate (supported operations: "
                f"{', '.join(sorted(_OPS))}). Express it with standard layers."
            )
        return TFOpLambda(_OPS[class_name], name=op.name)

    def copy_weights(self):
        for old, new in self.pending:
            weights = old.get_weights()
            if len(weights) != len(new.weights) or any(
                tuple(w.shape) != tuple(v.shape) for w, v in zip(weights, new.weights)
            ):
                raise ValueError(
                    f"Layer {old.name!r} ({_qualname(old)}): its weights "
                    f"{[w.shape for w in weights]} do not match the tf_keras layer's "
                    f"{[tuple(v.shape) for v in new.weights]}."
                )
            new.set_weights(weights)


def _keras_input(tensor, name):
    return keras.Input(batch_shape=tuple(tensor.shape), dtype=tensor.dtype, name=name)


def _sequential(model):
    keras3 = _keras3_module()

    builder = _Builder()
    first = model._layers[0] if model._layers else None
    name = first.name if isinstance(first, keras3.layers.InputLayer) else None
    inputs = _keras_input(model.inputs[0], name)
    x = inputs
    for layer in model.layers:
        x = builder.layer(layer)(x)
    builder.copy_weights()
    if all(isinstance(layer, keras.layers.Layer) for layer in _layers_of(inputs, x)):
        return keras.Sequential(_layers_of(inputs, x), name=model.name)
    return keras.Model(inputs, x, name=model.name)


def _layers_of(inputs, outputs):
    return keras.Model(inputs, outputs).layers


def _functional(model):
    config = model.get_config()
    builder = _Builder()
    tensors: dict[tuple[str, int, int], Any] = {}
    # Operations (`x + 3.0`) are not in `model.layers`.
    by_name = {op.name: op for op in model.operations}

    def resolve(value):
        if isinstance(value, dict) and value.get("class_name") == "__keras_tensor__":
            layer_name, node, index = value["config"]["keras_history"]
            return tensors[(layer_name, node, index)]
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if isinstance(value, tuple):
            return tuple(resolve(v) for v in value)
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        return value

    calls = []
    for layer_config in config["layers"]:
        name = layer_config["name"]
        layer = by_name[name]
        if type(layer).__name__ == "InputLayer":
            tensors[(name, 0, 0)] = _keras_input(layer.output, name)
            continue
        new = builder.layer(layer)
        for node_index, node in enumerate(layer_config["inbound_nodes"]):
            calls.append((name, new, node_index, _translate_args(node)))

    def ready(value) -> bool:
        if isinstance(value, dict) and value.get("class_name") == "__keras_tensor__":
            return tuple(value["config"]["keras_history"]) in tensors
        if isinstance(value, (list, tuple)):
            return all(ready(v) for v in value)
        if isinstance(value, dict):
            return all(ready(v) for v in value.values())
        return True

    # A shared layer lists all its calls together, and a later one may read a
    # layer listed after it: run each call once its inputs exist.
    while calls:
        waiting = []
        for name, new, node_index, node in calls:
            if not ready(node):
                waiting.append((name, new, node_index, node))
                continue
            # Keras 3 records call arguments left at None (`mask=None` after a
            # Concatenate); tf_keras records none, and a rewrite that changes the
            # layer class (a BN written as a depthwise conv) could not pass them on.
            kwargs = {k: v for k, v in node.get("kwargs", {}).items() if v is not None}
            outputs = new(*resolve(node["args"]), **resolve(kwargs))
            for i, out in enumerate(tf.nest.flatten(outputs)):
                tensors[(name, node_index, i)] = out
        if len(waiting) == len(calls):
            raise ValueError(
                f"Model {model.name!r}: the calls of {waiting[0][0]!r} never get inputs."
            )
        calls = waiting
    builder.copy_weights()

    def endpoints(spec):
        if isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str):
            return tensors[tuple(spec)]
        if isinstance(spec, dict):
            return {k: endpoints(v) for k, v in spec.items()}
        return [endpoints(s) for s in spec]

    return keras.Model(
        endpoints(config["input_layers"]), endpoints(config["output_layers"]), name=model.name
    )


def _translate_args(value):
    # Tensors stay as `__keras_tensor__` dicts for `resolve`; tuples and other
    # serialized values are translated.
    if isinstance(value, dict) and value.get("class_name") == "__keras_tensor__":
        return value
    if isinstance(value, list):
        return [_translate_args(v) for v in value]
    if isinstance(value, dict):
        if value.get("class_name") == "__tuple__":
            return tuple(_translate_args(v) for v in value["config"]["value"])
        return {k: _translate_args(v) for k, v in value.items()}
    return value


def to_tf_keras(model):
    """Rebuilds a Keras 3 Functional or Sequential model as an equivalent tf_keras model.

    Layer names, the graph and the weights are kept; nested sub-models are
    converted too (and stay nested: see `tf_pfq.compat.flatten`). The input
    model is not modified. A tf_keras model is returned as it is.

    Args:
      model: a built Keras 3 Functional or Sequential model.

    Returns:
      A tf_keras model computing the same function.

    Raises:
      TypeError: a subclassed model, a Lambda layer, or a layer/operation with no
        tf_keras equivalent (the message names it and its class).

    Example:
      >>> import keras as keras3
      >>> x = keras3.Input((4,), name="x")
      >>> k3 = keras3.Model(x, keras3.layers.Dense(2, name="fc")(x) * 2.0)
      >>> [type(layer).__name__ for layer in to_tf_keras(k3).layers]
      ['InputLayer', 'Dense', 'TFOpLambda']
    """
    if isinstance(model, keras.Model):
        return model
    check_keras3_model(model)
    if type(model).__name__ == "Sequential":
        return _sequential(model)
    return _functional(model)


def _file_keras_version(path: str) -> str | None:
    if path.endswith(".keras") and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if "metadata.json" in archive.namelist():
                return json.loads(archive.read("metadata.json")).get("keras_version")
            return None
    if path.endswith((".h5", ".hdf5")):
        import h5py  # type: ignore[import-untyped]

        with h5py.File(path, "r") as f:
            version = f.attrs.get("keras_version")
            return version.decode() if isinstance(version, bytes) else version
    return None


def load_model(path, custom_objects=None):
    """Loads a model file as a tf_keras model.

    `.keras` and `.h5` files written by Keras 3 are loaded with Keras 3 and
    rebuilt (`to_tf_keras`); files written by tf_keras and SavedModel directories
    are loaded with tf_keras. The model is not compiled.

    Args:
      path: a `.keras` or `.h5` file, or a SavedModel directory.
      custom_objects: passed to the loader.

    Returns:
      A tf_keras model.

    Raises:
      FileNotFoundError: `path` does not exist.

    Example:
      >>> import os, tempfile
      >>> import keras as keras3
      >>> path = os.path.join(tempfile.mkdtemp(), "k3.keras")
      >>> keras3.Sequential([keras3.Input((4,)), keras3.layers.Dense(2, name="fc")]).save(path)
      >>> type(load_model(path).get_layer("fc")).__module__.startswith("tf_keras")
      True
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"`path`: no model file or directory at {path!r}.")
    version = _file_keras_version(path)
    if version is not None and str(version).startswith("3"):
        keras3 = _keras3_module()

        return to_tf_keras(
            keras3.saving.load_model(path, custom_objects=custom_objects, compile=False)
        )
    return keras.models.load_model(path, custom_objects=custom_objects, compile=False)
