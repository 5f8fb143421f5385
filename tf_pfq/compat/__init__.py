"""The one place where tf_pfq selects its Keras, and where other models are brought in.

tfmot's quantization wrappers only work with Keras 2 (`tf_keras`); mixing them with
`tf.keras` objects from Keras 3 (TensorFlow >= 2.16) is the root of tfmot's most
reported bug (tensorflow/model-optimization #1140). Every tf_pfq module imports
`keras` from here, so the choice does not depend on `TF_USE_LEGACY_KERAS` in the
user's shell.

Models built with Keras 3 (`import keras`, or `tf.keras` on TensorFlow >= 2.16)
are rebuilt as tf_keras models by `to_tf_keras`, nested sub-models are inlined by
`flatten`; `prepare_model` does both, as the first step of
`tf_pfq.canonical.canonicalize`, which every public entry point calls.
"""

import tf_keras as keras
from absl import logging

# Imported once here, before the functions below rebind the names `flatten`: the
# first import of a submodule sets the package attribute of the same name.
from tf_pfq.compat import flatten as _flatten_lib
from tf_pfq.compat import keras3 as _keras3

__all__ = ["keras", "check_model", "to_tf_keras", "flatten", "load_model", "prepare_model"]


def _qualname(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def check_model(model, argument="model"):
    """Raises a clear error unless `model` is a tf_keras Sequential or Functional model.

    Args:
      model: the object to check.
      argument: the argument name used in the error message.

    Raises:
      TypeError: `model` is not a tf_keras model, is a Keras 3 model, or is a
        subclassed model (whose graph cannot be read or rewritten).

    Example:
      >>> check_model(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))
      >>> check_model("not a model", argument="float_model")
      Traceback (most recent call last):
      ...
      TypeError: `float_model` must be a tf_keras Sequential or Functional model; ...
    """
    cls = type(model)
    qualname = _qualname(model)
    if not isinstance(model, keras.Model):
        if cls.__module__.startswith("keras"):
            raise TypeError(
                f"`{argument}` must be a tf_keras (Keras 2) model; received a Keras 3 "
                f"object of class {qualname}. Convert it with "
                "`tf_pfq.compat.to_tf_keras` (every tf_pfq entry point does this itself)."
            )
        raise TypeError(
            f"`{argument}` must be a tf_keras Sequential or Functional model; "
            f"received an object of class {qualname}."
        )
    # Functional and Sequential models know their symbolic inputs; a subclassed
    # model does not, even after it has been called.
    if not isinstance(model, keras.Sequential) and model.inputs is None:
        raise TypeError(
            f"`{argument}` must be a tf_keras Sequential or Functional model; received "
            f"a subclassed model of class {qualname}, whose layer graph cannot be "
            "rewritten. Rebuild it with the Functional API."
        )
    if not model.built or model.inputs is None:
        raise ValueError(
            f"`{argument}` ({model.name}) is not built; call it on an input or give "
            "it an input shape first."
        )


def prepare_model(model, argument="model"):
    """Returns `model` as one flat tf_keras Functional or Sequential model.

    A Keras 3 model is rebuilt with tf_keras (`to_tf_keras`) and nested
    Functional/Sequential sub-models are inlined (`flatten`); what was done is
    logged once. A flat tf_keras model is returned as it is. The input is never
    modified.

    Args:
      model: a tf_keras or Keras 3 Functional or Sequential model.
      argument: the argument name used in error messages.

    Returns:
      `model` itself when it is already a flat tf_keras model, else a new model
      computing the same function.

    Raises:
      TypeError: not a Functional/Sequential model (e.g. a subclassed model), or a
        layer that can't be translated (the message names it).

    Example:
      >>> inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")])
      >>> outer = keras.Sequential(
      ...     [keras.Input((4,), name="x"), inner, keras.layers.ReLU(name="relu")]
      ... )
      >>> [layer.name for layer in prepare_model(outer).layers]
      ['x', 'fc', 'relu']
    """
    if _keras3.is_keras3(model):
        _keras3.check_keras3_model(model, argument)
        model = _keras3.to_tf_keras(model)
        logging.info("tf_pfq: rebuilt Keras 3 model %r as a tf_keras model.", model.name)
    check_model(model, argument)
    nested = _flatten_lib.nested_models(model)
    if nested:
        model = _flatten_lib.flatten(model)
        logging.info(
            "tf_pfq: inlined the nested sub-models %s of model %r into one graph.",
            ", ".join(repr(n) for n in nested),
            model.name,
        )
    return model


def to_tf_keras(model):
    """Rebuilds a Keras 3 Functional or Sequential model as a tf_keras model.

    See `tf_pfq.compat.keras3.to_tf_keras`.

    Example:
      >>> import keras as keras3
      >>> k3 = keras3.Sequential([keras3.Input((4,)), keras3.layers.Dense(2, name="fc")])
      >>> type(to_tf_keras(k3).get_layer("fc")).__module__.startswith("tf_keras")
      True
    """
    return _keras3.to_tf_keras(model)


def flatten(model):
    """Inlines nested Functional/Sequential sub-models into one functional graph.

    See `tf_pfq.compat.flatten.flatten`.

    Example:
      >>> inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="fc")])
      >>> x = keras.Input((4,), name="x")
      >>> flat = flatten(keras.Model(x, inner(x)))
      >>> [layer.name for layer in flat.layers]
      ['x', 'fc']
    """
    return _flatten_lib.flatten(model)


def load_model(path, custom_objects=None):
    """Loads a `.keras`/`.h5` file (Keras 3 or tf_keras) or a SavedModel as a tf_keras model.

    See `tf_pfq.compat.keras3.load_model`.

    Example:
      >>> import os, tempfile
      >>> path = os.path.join(tempfile.mkdtemp(), "m.keras")
      >>> keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="fc")]).save(path)
      >>> load_model(path).get_layer("fc").units
      2
    """
    return _keras3.load_model(path, custom_objects)
