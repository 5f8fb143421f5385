"""What each grid-preserving layer computes in the export graph, by its family.

A `Lowering.PASS_THROUGH` layer (dropout, reshapes, max pooling, padding, cropping)
moves or selects values without computing new ones, so values on its input's grid
stay on it and the file needs no rounding. `tf_pfq.export.lowering` looks the
function up by the layer's `tf_pfq.layers.table.Family`; a new pass-through layer
adds one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from tf_pfq.layers.table import Family

__all__ = ["PASS_THROUGH"]


def _max_pool(v, config):
    return tf.nn.max_pool2d(v, config["pool_size"], config["strides"], config["padding"].upper())


def _zero_pad(v, config):
    (top, bottom), (left, right) = config["padding"]
    return tf.pad(v, [[0, 0], [top, bottom], [left, right], [0, 0]])


def _crop(v, config):
    (top, bottom), (left, right) = config["cropping"]
    return v[:, top : v.shape[1] - bottom, left : v.shape[2] - right, :]


# (input, layer config) -> output
PASS_THROUGH: dict[Family, Callable[[Any, dict], Any]] = {
    Family.INPUT: lambda v, config: v,
    Family.DROPOUT: lambda v, config: v,
    Family.FLATTEN: lambda v, config: tf.reshape(v, [v.shape[0], -1]),
    Family.RESHAPE: lambda v, config: tf.reshape(v, [v.shape[0], *config["target_shape"]]),
    Family.POOL_MAX: _max_pool,
    Family.GLOBAL_POOL_MAX: lambda v, config: tf.reduce_max(
        v, axis=[1, 2], keepdims=config.get("keepdims", False)
    ),
    Family.PADDING: _zero_pad,
    Family.CROPPING: _crop,
}
