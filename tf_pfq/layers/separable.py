"""SeparableConv2D as the DepthwiseConv2D and 1x1 Conv2D it computes.

`SeparableConv2D` runs a depthwise convolution (strides, padding, dilation, no
bias) and then a 1x1 pointwise convolution with the bias and activation; the
passes (pruning, BN folding, quantization, export) know those two layers, so the
model is rewritten into them first. The rewrite is exact: the same two
convolutions with the same weights, in the same order.
"""

from __future__ import annotations

import numpy as np  # noqa: F401  (the docstring examples use it)

from tf_pfq.compat import keras  # noqa: F401  (the docstring examples use it)
from tf_pfq.graph import LayerGraph, rewrite
from tf_pfq.layers.table import Family, family_of

__all__ = ["split_separable", "DEPTHWISE_SUFFIX"]

# The depthwise half is named after the original layer; the pointwise half keeps the
# original name, so layers reading the output (and ranges keyed by it) are unchanged.
DEPTHWISE_SUFFIX = "_depthwise"


def _halves(entry: dict) -> tuple[dict, dict]:
    config = entry["config"]
    name = entry["name"]
    if config.get("data_format", "channels_last") != "channels_last":
        raise ValueError(
            f"SeparableConv2D {name!r} is channels_first; only channels_last is supported."
        )
    dw_name = name + DEPTHWISE_SUFFIX
    depthwise = {
        "module": "keras.layers",
        "class_name": "DepthwiseConv2D",
        "registered_name": None,
        "name": dw_name,
        "config": {
            "name": dw_name,
            "trainable": config.get("trainable", True),
            "dtype": config.get("dtype", "float32"),
            "kernel_size": config["kernel_size"],
            "strides": config["strides"],
            "padding": config["padding"],
            "data_format": "channels_last",
            "dilation_rate": config["dilation_rate"],
            "depth_multiplier": config["depth_multiplier"],
            "activation": "linear",
            "use_bias": False,
            "depthwise_initializer": config.get("depthwise_initializer"),
            "depthwise_regularizer": config.get("depthwise_regularizer"),
            "depthwise_constraint": config.get("depthwise_constraint"),
        },
    }
    pointwise = {
        "module": "keras.layers",
        "class_name": "Conv2D",
        "registered_name": None,
        "name": name,
        "config": {
            "name": name,
            "trainable": config.get("trainable", True),
            "dtype": config.get("dtype", "float32"),
            "filters": config["filters"],
            "kernel_size": (1, 1),
            "strides": (1, 1),
            "padding": "valid",
            "data_format": "channels_last",
            "activation": config["activation"],
            "use_bias": config["use_bias"],
            "kernel_initializer": config.get("pointwise_initializer"),
            "bias_initializer": config.get("bias_initializer"),
            "kernel_regularizer": config.get("pointwise_regularizer"),
            "bias_regularizer": config.get("bias_regularizer"),
            "activity_regularizer": config.get("activity_regularizer"),
            "kernel_constraint": config.get("pointwise_constraint"),
            "bias_constraint": config.get("bias_constraint"),
        },
    }
    return depthwise, pointwise


def split_separable(model):
    """Returns `model` with every SeparableConv2D split into DepthwiseConv2D + 1x1 Conv2D.

    The 1x1 Conv2D keeps the layer's name, bias and activation; the depthwise half is
    named `<name>_depthwise`. A model without SeparableConv2D is returned as is.
    Call it before any other pass (prune and fold_batchnorm do).

    Args:
      model: a tf_keras Functional or Sequential model; not modified.

    Returns:
      A Functional model computing the same function (to float round-off).

    Raises:
      TypeError: not a tf_keras model.
      ValueError: a SeparableConv2D is channels_first.

    Example:
      >>> x = keras.Input((8, 8, 3))
      >>> model = keras.Model(x, keras.layers.SeparableConv2D(4, 3, name="sep")(x))
      >>> split = split_separable(model)
      >>> [type(layer).__name__ for layer in split.layers[1:]]
      ['DepthwiseConv2D', 'Conv2D']
      >>> data = np.ones((1, 8, 8, 3), np.float32)
      >>> bool(np.allclose(split(data), model(data), atol=1e-5))
      True
    """
    graph = LayerGraph(model)
    separable = [n for n in graph.order if family_of(graph.layer(n)) is Family.SEPARABLE_CONV]
    if not separable:
        return graph.model
    for entry in graph.config["layers"]:
        if entry["name"] + DEPTHWISE_SUFFIX in graph.order:
            raise ValueError(
                f"Cannot split SeparableConv2D {entry['name']!r}: a layer named "
                f"{entry['name'] + DEPTHWISE_SUFFIX!r} exists already."
            )
    replace, weights = {}, {}
    for entry in graph.config["layers"]:
        name = entry["name"]
        if name in separable:
            old = graph.layer(name)
            replace[name] = list(_halves(entry))
            weights[name + DEPTHWISE_SUFFIX] = [old.depthwise_kernel.numpy()]
            weights[name] = [old.pointwise_kernel.numpy()] + (
                [old.bias.numpy()] if old.use_bias else []
            )
    return rewrite(graph.model, replace=replace, weights=weights)
