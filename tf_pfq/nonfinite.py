"""Stopping a fine-tuning the moment it turns a weight or a quantization range non-finite.

One NaN in a training step spreads to every weight upstream of it through the
gradient and to every range downstream of it through the next forward pass; a
stage that runs on turns the whole model into NaN, and the export then fails deep
inside the TFLite converter (NaN scales) or crashes it. Keras' `TerminateOnNaN`
watches the loss only, stops silently, and cannot say where it started.

`StopOnNonFinite` (which `tf_pfq.training.fit` adds to every fit) checks every
float variable of the model after each batch, in one compiled reduction, and
raises `NonFiniteError` naming the first layer, in graph order, whose range or
weights are no longer finite. The first range is the most telling: ranges are set
by the forward pass, so the first non-finite one is where the forward values broke
(e.g. a division by a zero step); when only weights broke, a gradient overflowed.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tf_pfq.compat import keras

__all__ = ["NonFiniteError", "StopOnNonFinite", "nonfinite_variables"]

# The variable names (last part) of tf_pfq's activation ranges (`PfqActivationQuantizer`).
_RANGE_SUFFIXES = ("_min", "_max")


class NonFiniteError(FloatingPointError):
    """A weight or a quantization range of the model is NaN or infinite."""


def _layer_name(layer) -> str:
    inner = getattr(layer, "layer", None)  # a QAT wrapper: the name the user gave
    return inner.name if isinstance(inner, keras.layers.Layer) else layer.name


def _short(variable) -> str:
    return variable.name.split(":")[0].split("/")[-1]


def _is_range(variable) -> bool:
    return _short(variable).endswith(_RANGE_SUFFIXES)


def nonfinite_variables(model) -> list[tuple[str, str, bool]]:
    """Every float variable of `model` holding a NaN or an infinity, in graph order.

    Args:
      model: a Keras model (float or QAT).

    Returns:
      [(layer name, variable name, whether it is an activation range)], the layers in
      the order of `model.layers`; QAT wrappers are named by the layer they wrap.

    Example:
      >>> m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="d")])
      >>> m.layers[0].bias.assign([np.nan])  # doctest: +ELLIPSIS
      <...>
      >>> nonfinite_variables(m)
      [('d', 'bias', False)]
    """
    found = []
    for layer in model.layers:
        for variable in layer.weights:
            if not variable.dtype.is_floating:
                continue
            if not np.all(np.isfinite(variable.numpy())):
                found.append((_layer_name(layer), _short(variable), _is_range(variable)))
    return found


def describe(found: list[tuple[str, str, bool]]) -> str:
    """A sentence naming where `nonfinite_variables` found NaN or Inf, and why it matters."""
    ranges = [(layer, name) for layer, name, is_range in found if is_range]
    weights = [(layer, name) for layer, name, is_range in found if not is_range]
    parts = []
    if ranges:
        layer, name = ranges[0]
        parts.append(
            f"the output range of layer {layer!r} ({name}) first, in graph order: the "
            "forward values broke there"
        )
    if weights:
        layer, name = weights[0]
        layers = sorted({w[0] for w in weights})
        parts.append(
            f"the weights of layer {layer!r} ({name}) first"
            + (f" and of {len(layers) - 1} more layers" if len(layers) > 1 else "")
            + (
                " (every range is finite: the update broke them, a gradient overflowed)"
                if not ranges
                else ""
            )
        )
    return "; ".join(parts)


class StopOnNonFinite(keras.callbacks.Callback):
    """Raises `NonFiniteError` after the first batch that leaves a variable NaN or Inf.

    The check is one compiled reduction over the model's float variables per batch;
    only when it fails are the variables read one by one to name the layer.

    Raises:
      NonFiniteError: naming the epoch, the batch, the first layer whose range broke
        and the first layer whose weights broke.
    """

    def __init__(self):
        super().__init__()
        self._check = None
        self._epoch = 0

    def _all_finite(self) -> bool:
        if self._check is None:
            variables = [v for v in self.model.weights if v.dtype.is_floating]

            @tf.function(autograph=False)
            def check():
                return tf.reduce_all(
                    tf.stack([tf.reduce_all(tf.math.is_finite(v)) for v in variables])
                )

            self._check = check
        return bool(self._check())

    def on_train_begin(self, logs=None):
        self._check = None  # the model may have been rebuilt between fits

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self._all_finite():
            return
        found = nonfinite_variables(self.model)
        self.model.stop_training = True
        raise NonFiniteError(
            f"Training made the model non-finite (NaN or Inf) in epoch {self._epoch + 1}, "
            f"batch {batch + 1}: {describe(found)}. Nothing after this step is usable; "
            "lower the learning rate, or check the inputs' scale and the BN statistics "
            "(an exploding float model overflows its gradients)."
        )
