"""What layers mean to the passes: op layers from functional code, SeparableConv2D."""

from tf_pfq.layers.ops import elementwise_op, op_name
from tf_pfq.layers.separable import split_separable

__all__ = ["elementwise_op", "op_name", "split_separable"]
