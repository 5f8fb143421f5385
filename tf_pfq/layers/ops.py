"""Op layers (`TFOpLambda`, `SlicingOpLambda`) that functional code creates.

`x + 3.0`, `tf.nn.relu6(x)` or `x * (1 / 6)` on a Keras tensor become op layers
whose other operands are stored in the call's keyword arguments. For channel
pruning an op matters only when it maps each channel through one scalar function
of that channel alone; MobileNetV3's hard-sigmoid `relu6(x + 3) / 6` and
hard-swish `x * hard_sigmoid(x)` are built from such ops (and a Multiply layer).
Any other op is unknown to pruning, which then keeps the channels that reach it.

For quantization and export an op matters when integer inference has an int8 op
computing it with one rounding onto its output grid: `+`, `-`, `*` with a Python
number or a second tensor, `/` by a number, and `tf.nn.relu` / `tf.nn.relu6`; or
with no rounding at all: `tf.maximum` / `tf.minimum` with a number, which keep
their input's grid (the number is stored on it).
`replace_op_layers` (which `tf_pfq.apply` runs first) rewrites each such op layer
into an `ElementwiseOp` layer of the same name: a serializable Keras layer stating
the op and its constant, which tfmot can wrap (its wrapper loses the operands an
op layer keeps in its call's keyword arguments) and which `tf_pfq.layers.table`
gives an entry per op. Other op layers stay as they are, and are refused by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import tensorflow as tf

from tf_pfq.compat import keras
from tf_pfq.graph import rewrite

__all__ = ["ElementwiseOp", "elementwise_op", "op_name", "replace_op_layers"]

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


def op_name(layer) -> str | None:
    """The TF function an op layer calls (e.g. 'math.multiply'), or None for other layers.

    Example:
      >>> import tensorflow as tf
      >>> x = keras.Input((2, 2, 3))
      >>> model = keras.Model(x, tf.nn.relu6(x))
      >>> op_name(model.layers[-1]), op_name(model.layers[0])
      ('nn.relu6', None)
    """
    # The op layers of functional code (TFOpLambda, SlicingOpLambda) are the layers
    # that carry the TF symbol they call; asked by that attribute rather than through
    # the layer table, which imports this module.
    if not isinstance(getattr(layer, "symbol", None), str):
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


# The ops `ElementwiseOp` computes, by the TF function an op layer calls.
_MODELLED = {
    "__operators__.add": "add",
    "math.add": "add",
    "math.subtract": "subtract",
    "math.multiply": "multiply",
    "math.truediv": "divide",
    "math.divide": "divide",
    "nn.relu": "relu",
    "nn.relu6": "relu6",
    "math.maximum": "maximum",
    "math.minimum": "minimum",
}
KINDS = ("add", "subtract", "multiply", "divide", "relu", "relu6", "maximum", "minimum")
# Kinds that take a number only: TFLite's int8 MAXIMUM / MINIMUM of two tensors need
# both on one grid, which nothing in tf_pfq's QAT arranges.
_SCALAR_ONLY = ("divide", "maximum", "minimum")


@keras.utils.register_keras_serializable(package="tf_pfq")
class ElementwiseOp(keras.layers.Layer):
    """`x <kind> scalar`, `x <kind> y` of two tensors, or relu / relu6 of `x`.

    The layer `replace_op_layers` puts where functional code wrote `x + 3.0`,
    `x * y`, `tf.maximum(x, 0.5)` or `tf.nn.relu6(x)`. With `scalar` it takes one
    tensor; without, the binary kinds take a list `[x, y]`.

    Args:
      kind: one of "add", "subtract", "multiply", "divide", "relu", "relu6",
        "maximum", "minimum".
      scalar: the number operand of a binary kind, or None for two tensors
        ("divide", "maximum" and "minimum" need one).

    Example:
      >>> layer = ElementwiseOp("divide", 6.0)
      >>> float(layer(tf.constant([3.0]))[0])
      0.5
      >>> ElementwiseOp.from_config(layer.get_config()).get_config()["scalar"]
      6.0
    """

    def __init__(self, kind: str, scalar: float | None = None, **kwargs):
        super().__init__(**kwargs)
        if kind not in KINDS:
            raise ValueError(f"`kind` must be one of {KINDS}. Received: kind={kind!r}")
        if kind in ("relu", "relu6") and scalar is not None:
            raise ValueError(f"`scalar` must be None for kind={kind!r}. Received: {scalar!r}")
        if kind == "divide" and (scalar is None or float(scalar) == 0.0):
            raise ValueError(
                f"kind='divide' needs a non-zero `scalar` (TFLite has no int8 DIV of two "
                f"tensors). Received: scalar={scalar!r}"
            )
        if kind in _SCALAR_ONLY and scalar is None:
            raise ValueError(f"kind={kind!r} needs a number `scalar`. Received: None")
        self.kind = kind
        self.scalar = None if scalar is None else float(scalar)

    @property
    def tensors(self) -> int:
        """How many tensors the op reads."""
        return 2 if self.scalar is None and self.kind not in ("relu", "relu6") else 1

    def apply_op(self, x, y=None):
        """The op on `x` and `y`, in float; `y` defaults to `scalar` for one tensor (the
        QAT wrapper passes the number as the integer file stores it)."""
        other = self.scalar if y is None else y
        if self.kind == "relu":
            return tf.nn.relu(x)
        if self.kind == "relu6":
            return tf.nn.relu6(x)
        if self.kind == "add":
            return x + other
        if self.kind == "subtract":
            return x - other
        if self.kind == "multiply":
            return x * other
        if self.kind == "maximum":
            return tf.maximum(x, other)
        if self.kind == "minimum":
            return tf.minimum(x, other)
        return x / other

    def call(self, inputs):
        if self.tensors == 2:
            x, y = inputs
            return self.apply_op(x, y)
        return self.apply_op(inputs)

    def compute_output_shape(self, input_shape):
        if self.tensors == 2:
            return tf.broadcast_static_shape(
                tf.TensorShape(input_shape[0]), tf.TensorShape(input_shape[1])
            )
        return tf.TensorShape(input_shape)

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "scalar": self.scalar}


# HDF5 model configs name a wrapped layer by its bare class name, while
# `register_keras_serializable` files it as "tf_pfq>ElementwiseOp"; registering the
# bare name too lets a saved QAT (or stripped) model with op layers load.
keras.utils.get_custom_objects().setdefault("ElementwiseOp", ElementwiseOp)


def _modelled(layer_config: dict, names: set) -> tuple[str, float | None, list] | None:
    """(kind, scalar, inbound records) of a TFOpLambda config `ElementwiseOp` computes."""
    # Only op layers of functional code name a TF function in their config (a
    # Lambda's is code, a SlicingOpLambda's slicing is no modelled op).
    kind = _MODELLED.get(str(layer_config["config"].get("function")))
    if len(layer_config["inbound_nodes"]) != 1:
        return None
    node = layer_config["inbound_nodes"][0]
    if kind is None or not node or not isinstance(node[0], str) or node[0] not in names:
        return None  # e.g. `3.0 - x`: the first operand is a constant
    record = [node[0], node[1], node[2], {}]
    kwargs = {k: v for k, v in (node[3] if len(node) > 3 else {}).items() if k != "name"}
    if kind in ("relu", "relu6"):
        return (kind, None, [record]) if not kwargs else None
    if set(kwargs) != {"y"}:
        return None
    y = kwargs["y"]
    if _is_scalar(y):
        if kind == "divide" and float(y) == 0.0:
            return None
        return kind, float(y), [record]
    is_ref = isinstance(y, list) and len(y) == 3 and isinstance(y[0], str) and y[0] in names
    if is_ref and kind not in _SCALAR_ONLY:
        return kind, None, [record, [y[0], y[1], y[2], {}]]
    return None


def replace_op_layers(model):
    """`model` with each op layer `ElementwiseOp` computes replaced by one, same name.

    `x + 3.0`, `x - c`, `x * c`, `x / c`, `tf.maximum(x, c)`, `tf.minimum(x, c)`
    (c a Python number), `x + y`, `x - y`, `x * y` (two tensors), `tf.nn.relu(x)`
    and `tf.nn.relu6(x)` become
    `ElementwiseOp` layers; other layers (other op layers included) are kept. A
    model without such op layers is returned as is.

    Args:
      model: a Functional tf_keras model; not modified.

    Returns:
      A Functional model computing the same function.

    Example:
      >>> x = keras.Input((2, 2, 3))
      >>> model = keras.Model(x, tf.nn.relu6(x + 3.0) * (1 / 6))
      >>> [type(layer).__name__ for layer in replace_op_layers(model).layers[1:]]
      ['ElementwiseOp', 'ElementwiseOp', 'ElementwiseOp']
    """
    config = model.get_config()
    names = {c["name"] for c in config["layers"]}
    replace = {}
    for layer_config in config["layers"]:
        found = _modelled(layer_config, names)
        if found is None:
            continue
        kind, scalar, records = found
        name = layer_config["name"]
        replace[name] = [
            {
                "class_name": keras.utils.get_registered_name(ElementwiseOp),
                "config": {
                    "name": name,
                    "trainable": True,
                    "dtype": layer_config["config"].get("dtype", "float32"),
                    "kind": kind,
                    "scalar": scalar,
                },
                "inbound_nodes": [records],
            }
        ]
    return rewrite(model, replace=replace) if replace else model
