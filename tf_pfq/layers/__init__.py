"""What layers mean to the passes.

`tf_pfq.layers.table` has one entry per supported layer class, read by every pass;
`ops` tells which op layers from functional code act channel by channel; `separable`
splits SeparableConv2D into the two layers the passes know.
"""

from tf_pfq.layers.ops import elementwise_op, op_name
from tf_pfq.layers.separable import split_separable

__all__ = ["elementwise_op", "op_name", "split_separable"]
