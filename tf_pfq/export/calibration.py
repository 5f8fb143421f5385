"""Calibration: int8 ranges for the tensors the QAT model leaves in float.

Add outputs with `add_bits=None`, logits and an input without a quantizer have no
trained grid, yet every tensor of an integer file needs one. Their ranges come from
running the QAT arithmetic (`tf_pfq.export.policies.Calibrate`) over
`representative_data` and taking each tensor's min/max; without data the lowering
falls back to guaranteed interval bounds (no saturation, coarser step).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tf_pfq.export.lowering import _Builder
from tf_pfq.export.plan import ExportPlan
from tf_pfq.export.policies import Calibrate
from tf_pfq.validation import check_finite

__all__ = ["calibrate"]


def calibrate(plan: ExportPlan, representative_data, batch_size: int = 64) -> dict:
    """Min/max of every float (unquantized) tensor of the plan's graph over data.

    Args:
      plan: the `ExportPlan`.
      representative_data: float inputs (N, H, W, C) as an array, or a
        `tf.data.Dataset` of input batches or (inputs, labels) batches.
      batch_size: evaluation batch size.

    Returns:
      {layer name: (lo, hi)} for the input (when it has no quantizer) and every layer
      output QAT leaves in float.

    Raises:
      ValueError: the data does not have the model's per-example input shape, or
        holds NaN/Inf (the first bad example is named).
    """
    policy = Calibrate()
    builder = _Builder(plan, policy, clamp_signed=True)
    if isinstance(representative_data, tf.data.Dataset):
        batches = [
            np.asarray(b[0] if isinstance(b, (tuple, list)) else b, np.float32)
            for b in representative_data.as_numpy_iterator()
        ]
        data = np.concatenate(batches) if batches else np.zeros((0,), np.float32)
    else:
        data = np.asarray(representative_data, np.float32)
    expected = tuple(plan.model.inputs[0].shape)[1:]
    if data.ndim != len(expected) + 1 or tuple(data.shape[1:]) != expected or not len(data):
        raise ValueError(
            f"`representative_data` must be a non-empty batch of inputs of shape "
            f"(N, {', '.join(str(d) for d in expected)}). Received: shape {data.shape}"
        )
    check_finite(data, "representative_data")  # a NaN would become a NaN int8 scale
    for start in range(0, len(data), batch_size):
        builder(tf.constant(data[start : start + batch_size]))
    return policy.seen
