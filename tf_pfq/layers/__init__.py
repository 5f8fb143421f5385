"""What layers mean to the passes.

`tf_pfq.layers.table` has one entry per supported layer class, read by every pass;
`ops` tells which op layers from functional code act channel by channel and
rewrites those integer inference computes into `ElementwiseOp` layers; `separable`
splits SeparableConv2D into the two layers the passes know; `activations` moves
fused activations integer inference does not fuse into layers of their own.
"""

from tf_pfq.layers.activations import split_activations
from tf_pfq.layers.ops import ElementwiseOp, elementwise_op, op_name, replace_op_layers
from tf_pfq.layers.separable import split_separable

__all__ = [
    "ElementwiseOp",
    "elementwise_op",
    "op_name",
    "replace_op_layers",
    "split_activations",
    "split_separable",
]
