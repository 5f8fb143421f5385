"""The one place where tf_pfq selects its Keras.

tfmot's quantization wrappers only work with Keras 2 (`tf_keras`); mixing them with
`tf.keras` objects from Keras 3 (TensorFlow >= 2.16) is the root of tfmot's most
reported bug (tensorflow/model-optimization #1140). Every tf_pfq module imports
`keras` from here, so the choice does not depend on `TF_USE_LEGACY_KERAS` in the
user's shell.
"""

import tf_keras as keras

__all__ = ["keras", "check_model"]


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
    qualname = f"{cls.__module__}.{cls.__qualname__}"
    if not isinstance(model, keras.Model):
        if cls.__module__.startswith("keras"):
            raise TypeError(
                f"`{argument}` must be a tf_keras (Keras 2) model; received a Keras 3 "
                f"object of class {qualname}. Build it with `import tf_keras as keras` "
                "or `tf_pfq.compat.keras`."
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
