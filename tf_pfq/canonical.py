"""The one form of a model that every tf_pfq pass works on, made once at the entry point.

Users bring Keras 3 models, nested backbones, Sequential stacks, SeparableConv2D,
`x + 3.0`-style op layers and layers with fused activations. The passes (prune,
fold, DFQ, apply, export) are written for one shape of graph only:

* a flat tf_keras Functional model (Keras 3 rebuilt with tf_keras, nested
  Functional/Sequential sub-models inlined, a Sequential re-wrapped);
* no SeparableConv2D: each is its DepthwiseConv2D half and its 1x1 Conv2D half,
  which prune and fold treat like any other convolution pair;
* the op layers tf_pfq models (`x + c`, `x * y`, `tf.nn.relu6`, ...) as
  `ElementwiseOp` layers, so that an op has one layer class and a table entry;
* an activation that integer inference does not fuse into its layer (softmax,
  sigmoid, swish, ... on a Conv2D or Dense) as an Activation layer of its own.

`canonicalize` does all four and is what the public functions call first; the
passes and `tf_pfq.graph.LayerGraph` then take the model as it is and refuse a
Keras 3 or nested one with a pointer here. Each step returns its input when there
is nothing to change, so canonicalizing a canonical model costs a few config reads
and returns the same object.
"""

from __future__ import annotations

from tf_pfq.compat import keras, prepare_model
from tf_pfq.layers import replace_op_layers, split_activations, split_separable

__all__ = ["canonicalize"]


def canonicalize(model, argument: str = "model"):
    """`model` in the form every tf_pfq pass takes (see the module docstring).

    Args:
      model: a tf_keras or Keras 3 Functional or Sequential model, possibly nested;
        never modified.
      argument: the argument name used in error messages.

    Returns:
      `model` itself when it is already canonical, else a new flat tf_keras
      Functional model computing the same function (to float round-off).

    Raises:
      TypeError: not a Functional/Sequential model, or a layer Keras 3 translation
        does not know (the message names it).
      ValueError: the model is not built, or a SeparableConv2D is channels_first.

    Example:
      >>> x = keras.Input((8, 8, 3), name="x")
      >>> y = keras.layers.SeparableConv2D(4, 3, activation="swish", name="sep")(x)
      >>> m = keras.Sequential([keras.Input((8, 8, 3)), keras.Model(x, y)])
      >>> c = canonicalize(m)
      >>> [type(layer).__name__ for layer in c.layers]
      ['InputLayer', 'DepthwiseConv2D', 'Conv2D', 'Activation']
      >>> canonicalize(c) is c
      True
    """
    model = prepare_model(model, argument)
    if isinstance(model, keras.Sequential):
        model = keras.Model(model.inputs, model.outputs, name=model.name)
    return split_activations(replace_op_layers(split_separable(model)))
