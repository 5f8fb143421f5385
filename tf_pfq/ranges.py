"""Learned activation ranges, carried from a stripped QAT model to a second PfQ.

When stage A has quantized activations, a dead channel's constant output is the
quantized `Q(act(beta))`, not the float `act(beta)` (paper §3.2, last lines).
`tf_pfq.strip` stores one `ActivationRange` per quantized layer output on the
float model it returns (attribute `ACTIVATION_RANGES_ATTR`); `tf_pfq.prune` reads
them from there or from its `activation_ranges` argument.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

__all__ = ["ActivationRange", "ACTIVATION_RANGES_ATTR", "activation_ranges_of"]

ACTIVATION_RANGES_ATTR = "pfq_activation_ranges"


@dataclasses.dataclass(frozen=True)
class ActivationRange:
    """The quantization range of one layer's output: `Q(x)` with 2^num_bits levels.

    Example:
      >>> r = ActivationRange(0.0, 6.0, num_bits=2)
      >>> r.quantize([0.9, 1.1, 7.0]).tolist()
      [0.0, 2.0, 6.0]
    """

    min: float
    max: float
    num_bits: int

    def quantize(self, x) -> np.ndarray:
        """Applies TensorFlow's fake-quant op (paper eq. 20, 2^n levels) to `x`."""
        values = tf.quantization.fake_quant_with_min_max_vars(
            tf.constant(np.asarray(x, np.float32)),
            tf.constant(self.min, tf.float32),
            tf.constant(self.max, tf.float32),
            num_bits=self.num_bits,
        )
        return values.numpy()


def activation_ranges_of(model) -> dict[str, ActivationRange]:
    """The ranges `tf_pfq.strip` attached to `model`, by layer name ({} if none).

    Args:
      model: a tf_keras model, usually returned by `tf_pfq.strip`.

    Returns:
      A new dict {layer name: ActivationRange}; empty for a model with none attached.

    Example:
      >>> from tf_pfq.compat import keras
      >>> activation_ranges_of(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))
      {}
    """
    return dict(getattr(model, ACTIVATION_RANGES_ATTR, None) or {})
