"""Op layers (`TFOpLambda`, `SlicingOpLambda`) that functional code creates.

`x + 3.0`, `tf.nn.relu6(x)` or `x * (1 / 6)` on a Keras tensor become op layers
whose other operands are stored in the call's keyword arguments. For channel
pruning an op matters only when it maps each channel through one scalar function
of that channel alone; MobileNetV3's hard-sigmoid `relu6(x + 3) / 6` and
hard-swish `x * hard_sigmoid(x)` are built from such ops (and a Multiply layer).
Any other op is unknown to the passes, which then keep the channels that reach it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from tf_pfq.compat import keras  # noqa: F401 - the doctests' namespace

__all__ = ["elementwise_op", "op_name"]

# Functions of one tensor applied channel by channel; binary ones only with a
# Python scalar as the other operand (checked below).
_UNARY = frozenset(
    [
        "nn.relu",
        "nn.relu6",
        "nn.elu",
        "nn.selu",
        "nn.silu",
        "nn.swish",
        "nn.gelu",
        "nn.leaky_relu",
        "nn.sigmoid",
        "math.sigmoid",
        "math.tanh",
        "nn.tanh",
        "math.negative",
        "math.abs",
        "math.exp",
        "math.softplus",
        "nn.softplus",
        "math.square",
    ]
)
_BINARY = frozenset(
    [
        "__operators__.add",
        "math.add",
        "math.subtract",
        "math.multiply",
        "math.truediv",
        "math.divide",
        "math.maximum",
        "math.minimum",
    ]
)
_OP_LAYERS = ("TFOpLambda", "SlicingOpLambda")


def op_name(layer) -> str | None:
    """The TF function an op layer calls (e.g. 'math.multiply'), or None for other layers.

    Example:
      >>> import tensorflow as tf
      >>> x = keras.Input((2, 2, 3))
      >>> model = keras.Model(x, tf.nn.relu6(x))
      >>> op_name(model.layers[-1]), op_name(model.layers[0])
      ('nn.relu6', None)
    """
    if type(layer).__name__ not in _OP_LAYERS:
        return None
    return str(layer.get_config().get("function"))


def _is_scalar(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def elementwise_op(layer, kwargs: Mapping[str, Any]) -> Callable | None:
    """A function `f(t)` equal to the op layer's call, when it acts channel by channel.

    Args:
      layer: any layer; only op layers can return a function.
      kwargs: the keyword arguments of the layer's call, as the model config stores
        them (`tf_pfq.graph.call_kwargs`).

    Returns:
      `f` such that the layer's output channel c is `f` of its input channel c, or
      None when the op is not such a function (several tensors, a tensor-valued or
      per-channel operand, slicing, reshaping...).

    Example:
      >>> import tensorflow as tf
      >>> x = keras.Input((2, 2, 3))
      >>> model = keras.Model(x, x + 3.0)
      >>> f = elementwise_op(model.layers[-1], {"y": 3.0, "name": None})
      >>> float(f(tf.constant(1.0)))
      4.0
      >>> elementwise_op(model.layers[-1], {"y": [1.0, 2.0, 3.0]}) is None
      True
    """
    name = op_name(layer)
    if name is None:
        return None
    operands = {k: v for k, v in kwargs.items() if k != "name"}
    if name in _UNARY and not operands:
        return lambda t: layer.function(t)
    if name in _BINARY and set(operands) == {"y"} and _is_scalar(operands["y"]):
        y = float(operands["y"])
        return lambda t: layer.function(t, y=y)
    return None
