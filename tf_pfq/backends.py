"""What a training stage quantizes with: tf_pfq's quantizers or tfmot's n-bit scheme.

A `tf_pfq.workflow.Train` step names its backend ("pfq", "tfmot" or
"tfmot_matched"); the backend builds the QAT model, prepares it on the first
training batch, tells which custom objects load its checkpoints and whether it can
be stripped back to a float model for later steps.

* "pfq": `tf_pfq.apply` (the paper's quantizer; 8-bit model input, float logits,
  ranges set by the first training batch, BN folded before stage W).
* "tfmot": tfmot's `DefaultNBitQuantizeScheme` as shipped, the library users would
  reach for. It differs from "pfq" in more than the quantizer: the model input and
  the logits are quantized to n bits, activation ranges start at [-6, 6] and move
  by a 0.999 moving average, and BN is kept unfolded (its weights are quantized
  before BN's scale is applied, so the deployed folded kernel is not on the grid).
* "tfmot_matched": the same scheme made as close to "pfq" as its API allows: 8-bit
  input, float logits (the output layers' outputs are not quantized) and every
  activation range set from the first training batch. BN stays unfolded: tfmot's
  n-bit scheme has no folding transform.

Example:
  >>> sorted(BACKENDS)
  ['pfq', 'tfmot', 'tfmot_matched']
  >>> BACKENDS["tfmot"].can_strip
  False
"""

from __future__ import annotations

import dataclasses
from typing import Any

import tensorflow as tf
import tensorflow_model_optimization as tfmot

from tf_pfq.compat import keras

__all__ = ["BACKENDS", "Backend", "backend"]


@dataclasses.dataclass(frozen=True)
class Backend:
    """A way to quantize a model for a training stage.

    Attributes:
      name: the name a `Train` step records.
      can_strip: whether the trained QAT model can give back its float model, so
        that steps may follow the stage.
      takes_options: whether `tf_pfq.apply`'s further options apply.
      exports: whether `tf_pfq.export.to_tflite` converts its QAT models.
    """

    name: str
    can_strip: bool = True
    takes_options: bool = True
    exports: bool = True

    def quantize(self, model, activation_bits: int, weight_bits: int | None, **options):
        """The QAT model of float `model`."""
        from tf_pfq.quantize import apply

        return apply(model, activation_bits=activation_bits, weight_bits=weight_bits, **options)

    def prepare(self, qat, train_data) -> None:
        """Called once before training starts (tf_pfq's ranges need nothing)."""

    def scope(self):
        """The custom-object scope the QAT models of this backend load under."""
        from tf_pfq.quantize import quantize_scope

        return quantize_scope()


@dataclasses.dataclass(frozen=True)
class TfmotBackend(Backend):
    """tfmot's `DefaultNBitQuantizeScheme`, as shipped or matched to tf_pfq's choices."""

    can_strip: bool = False
    takes_options: bool = False
    exports: bool = False
    matched: bool = False

    def quantize(self, model, activation_bits: int, weight_bits: int | None, **options):
        from tensorflow_model_optimization.quantization.keras.experimental import (
            default_n_bit,
        )

        scheme = default_n_bit.DefaultNBitQuantizeScheme(
            num_bits_weight=weight_bits or 8, num_bits_activation=activation_bits
        )
        api = tfmot.quantization.keras
        if not self.matched:
            return api.quantize_apply(api.quantize_annotate_model(model), scheme=scheme)
        outputs = set(model.output_names)
        config = WeightsOnlyNBitConfig(weight_bits or 8)

        def annotate(layer):
            if layer.name in outputs and layer.weights:
                return api.quantize_annotate_layer(layer, quantize_config=config)
            return layer

        annotated = api.quantize_annotate_model(
            keras.models.clone_model(model, clone_function=annotate)
        )
        annotated.set_weights(model.get_weights())
        with api.quantize_scope({"WeightsOnlyNBitConfig": WeightsOnlyNBitConfig}):
            qat = api.quantize_apply(annotated, scheme=scheme)
            return _with_input_bits(qat, 8)

    def prepare(self, qat, train_data) -> None:
        if self.matched:
            images = next(iter(train_data))[0]
            ranges_from_batch(qat, images)

    def scope(self):
        return tfmot.quantization.keras.quantize_scope(
            {"WeightsOnlyNBitConfig": WeightsOnlyNBitConfig}
        )


class WeightsOnlyNBitConfig(tfmot.quantization.keras.QuantizeConfig):
    """Quantizes a layer's kernel as tfmot's n-bit scheme does; leaves its output float.

    tfmot's scheme quantizes every layer output, the logits included; the paper (and
    `tf_pfq.apply`) leaves the last layer's output in float. This is that choice in
    tfmot's own terms (its per-tensor, symmetric, narrow-range `LastValueQuantizer`).

    Example:
      >>> WeightsOnlyNBitConfig(4).get_output_quantizers(None)
      []
    """

    def __init__(self, num_bits_weight: int = 8):
        self.num_bits_weight = int(num_bits_weight)
        self.weight_quantizer = tfmot.quantization.keras.quantizers.LastValueQuantizer(
            num_bits=self.num_bits_weight, per_axis=False, symmetric=True, narrow_range=True
        )

    def get_weights_and_quantizers(self, layer):
        return [(layer.kernel, self.weight_quantizer)]

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        (layer.kernel,) = quantize_weights

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return []

    def get_config(self):
        return {"num_bits_weight": self.num_bits_weight}


def _with_input_bits(qat, bits: int):
    """`qat` with its model-input quantizers set to `bits` bits.

    The quantizer reads its bit width when the model is traced, and its range
    variables do not depend on it, so setting the attribute on the freshly built
    model is enough (and `get_config` then records it).
    """
    input_quantizer = tfmot.quantization.keras.quantizers.AllValuesQuantizer
    for layer in qat.layers:
        quantizer = getattr(layer, "quantizer", None)  # tfmot's QuantizeLayer has one
        if isinstance(quantizer, input_quantizer):
            quantizer.num_bits = bits
    return qat


def _moving_average_quantizers(qat) -> list[Any]:
    """Every tfmot `MovingAverageQuantizer` instance the layers of `qat` call."""
    moving_average = tfmot.quantization.keras.quantizers.MovingAverageQuantizer
    found: list[Any] = []

    def add(candidate):
        if isinstance(candidate, moving_average) and not any(candidate is q for q in found):
            found.append(candidate)

    for layer in qat.layers:
        add(getattr(layer, "quantizer", None))
        for q in getattr(layer, "_output_quantizers", None) or ():
            add(q)
        activation = getattr(getattr(layer, "layer", None), "activation", None)
        add(getattr(activation, "quantizer", None))
    return found


class _FirstBatch(tfmot.quantization.keras.quantizers.MovingAverageQuantizer):
    """A MovingAverageQuantizer whose training call takes the batch range as it is."""

    def __call__(self, inputs, training, weights, **kwargs):
        if training:
            weights["min_var"].assign(tf.minimum(tf.reduce_min(inputs), 0.0))
            weights["max_var"].assign(tf.maximum(tf.reduce_max(inputs), 0.0))
        return tf.quantization.fake_quant_with_min_max_vars(
            inputs, weights["min_var"], weights["max_var"], self.num_bits, self.narrow_range
        )


def ranges_from_batch(qat, images) -> int:
    """Sets every tfmot moving-average activation range of `qat` from one batch.

    tfmot's `MovingAverageQuantizer` starts at [-6, 6] and averages with a fixed
    decay of 0.999, so after a few hundred steps a range still remembers its start
    (a ReLU6 output's minimum is still near -5: about one bit lost at 3 bits).
    tf_pfq's quantizer takes its first training batch as the range instead; this
    does the same for tfmot's by running `images` once in training mode with the
    average's decay at 0, so the batch minimum and maximum replace the start.

    Returns:
      The number of ranges set.
    """
    found = _moving_average_quantizers(qat)
    originals = [type(q) for q in found]
    try:
        for q in found:
            q.__class__ = _FirstBatch
        qat(tf.convert_to_tensor(images), training=True)
    finally:
        for q, original in zip(found, originals):
            q.__class__ = original
    return len(found)


BACKENDS: dict[str, Backend] = {
    "pfq": Backend("pfq"),
    "tfmot": TfmotBackend("tfmot"),
    "tfmot_matched": TfmotBackend("tfmot_matched", matched=True),
}


def backend(name: str) -> Backend:
    """The backend called `name`.

    Raises:
      ValueError: unknown name.
    """
    if name not in BACKENDS:
        raise ValueError(
            f"`quantizer` must be one of {sorted(BACKENDS)}. Received: quantizer={name!r}"
        )
    return BACKENDS[name]
