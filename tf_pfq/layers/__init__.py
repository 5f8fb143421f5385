"""What layers mean to the passes: op layers written by functional code."""

from tf_pfq.layers.ops import elementwise_op, op_name

__all__ = ["elementwise_op", "op_name"]
