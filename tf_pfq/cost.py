"""Parameter and multiply-accumulate (MAC) counts of a tf_keras model, per sample.

Keras counts parameters (`count_params`) but not MACs; TF's profiler counts FLOPs of a
traced graph, which mixes in BN, activations and pooling. PfQ's savings are in the
convolution and dense layers, so MACs are counted for those only, from each layer's
kernel and output shape at the model's input shape:

* Conv2D: `H_out * W_out * kh * kw * (C_in / groups) * C_out`
* Conv2DTranspose: counted like Conv2D over its output positions (with stride s each
  output position sees about 1/s^2 of the taps, so this is an upper bound)
* DepthwiseConv2D: `H_out * W_out * kh * kw * C_in * depth_multiplier`
* Dense: `prod(leading dims) * C_in * units`
* SeparableConv2D: `H_out * W_out * (kh * kw * C_in * depth_multiplier + C_in *
  depth_multiplier * C_out)` (its depthwise and pointwise halves)

The formulas are the `macs` functions of `tf_pfq.layers.table`; this module sums
them over the calls of every layer.
"""

from __future__ import annotations

import dataclasses

from tf_pfq.compat import keras
from tf_pfq.layers.table import entry_for

__all__ = ["LayerCost", "count_macs", "count_params", "layer_costs"]


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """Parameters (all weights, trainable or not) and per-sample MACs of one layer."""

    params: int
    macs: int


def _output_shapes(layer, model) -> list[tuple]:
    # A shared layer has one output shape per call; each call costs MACs. Only the
    # calls inside `model` count: a layer also called by another model (tfmot's
    # wrappers call the layers of the model they wrap) keeps those nodes too.
    nodes = getattr(layer, "inbound_nodes", None) or []
    if len(nodes) <= 1:
        return [tuple(layer.output_shape)]
    own = getattr(model, "_network_nodes", None)
    calls = [i for i in range(len(nodes)) if own is None or f"{layer.name}_ib-{i}" in own]
    return [tuple(layer.get_output_shape_at(i)) for i in calls]


def _macs(layer, model) -> int:
    count = entry_for(layer).macs
    if count is None:
        return 0
    total = 0
    for shape in _output_shapes(layer, model):
        if any(d is None for d in shape[1:-1]):
            raise ValueError(
                f"Layer {layer.name!r} has an unknown output shape {shape}: MACs need a "
                "model built for a fixed input size."
            )
        total += count(layer, shape)
    return total


def layer_costs(model) -> dict[str, LayerCost]:
    """Parameters and MACs of every layer of `model` (nested models flattened), by name.

    Args:
      model: a built tf_keras model with a fixed input shape.

    Returns:
      {layer name: LayerCost}; layers without kernels have 0 MACs. Layers of a
      nested model are listed under "outer/inner".

    Raises:
      ValueError: a convolution or Dense output shape is not fully known.

    Example:
      >>> inputs = keras.Input((8, 8, 3))
      >>> outputs = keras.layers.Conv2D(4, 3, padding="same", name="c")(inputs)
      >>> layer_costs(keras.Model(inputs, outputs))["c"]
      LayerCost(params=112, macs=6912)
    """
    costs = {}
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            for name, cost in layer_costs(layer).items():
                costs[f"{layer.name}/{name}"] = cost
            continue
        costs[layer.name] = LayerCost(int(layer.count_params()), _macs(layer, model))
    return costs


def count_params(model) -> int:
    """All weights of `model` (trainable and not, BN statistics included).

    Args:
      model: a built tf_keras model.

    Returns:
      The number of scalar weights.

    Example:
      >>> inputs = keras.Input((4,))
      >>> count_params(keras.Model(inputs, keras.layers.Dense(2)(inputs)))
      10
    """
    return int(sum(c.params for c in layer_costs(model).values()))


def count_macs(model) -> int:
    """Per-sample multiply-accumulates of the convolution and Dense layers (see module doc).

    Args:
      model: a built tf_keras model with a fixed input shape.

    Returns:
      The MAC count for one input sample.

    Raises:
      ValueError: an output shape is not fully known.

    Example:
      >>> inputs = keras.Input((8, 8, 3))
      >>> x = keras.layers.DepthwiseConv2D(3, padding="same")(inputs)
      >>> count_macs(keras.Model(inputs, keras.layers.Dense(5)(x)))
      2688
    """
    return int(sum(c.macs for c in layer_costs(model).values()))
