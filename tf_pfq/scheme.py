"""tf_pfq's tfmot `QuantizeScheme`: a layout transform that only quantizes model inputs.

`quantize_apply` with tfmot's default 8-bit scheme runs layout transforms that
match Conv->BN->ReLU, Conv->ReLU, Dense->ReLU, ... and replace the annotated
configs of the matched layers with tfmot's own (a no-op config on the conv whose
output is fused, an 8-bit one elsewhere). With tf_pfq's per-layer configs that
silently left Conv->ReLU kernels unquantized (the layout transform cannot be
switched off through `quantize_model`: tensorflow/model-optimization#445; the
test `test_tfmot_default_scheme_drops_conv_relu_configs` pins the behavior).
tf_pfq decides every tensor itself
(`tf_pfq.quantize`), so its layout transform does one thing: insert tfmot's
`QuantizeLayer` with a `PfqActivationQuantizer` after each model input (integer
inference needs an integer input, and the first layer's bias grid needs its
scale). Its registry supports no layer: every layer tf_pfq quantizes carries an
explicit `PfqQuantizeConfig`, so `quantize_apply` never falls back to a default.
"""

from __future__ import annotations

from tensorflow_model_optimization.quantization.keras import (
    QuantizeLayoutTransform,
    QuantizeRegistry,
    QuantizeScheme,
    quantize_scope,
)
from tensorflow_model_optimization.quantization.keras.graph_transformations import (
    model_transformer,
    transforms,
)

from tf_pfq.compat import keras
from tf_pfq.quantizers import PfqActivationQuantizer

__all__ = ["PfqQuantizeScheme", "PfqLayoutTransform", "PfqQuantizeRegistry", "input_quantizer_name"]


def quantize_layer_class():
    """tfmot's `QuantizeLayer`, which tfmot registers in its scope but does not export."""
    with quantize_scope():
        return keras.utils.get_registered_object("QuantizeLayer")


def input_quantizer_name(input_name: str) -> str:
    """Name of the `QuantizeLayer` tf_pfq puts after the model input `input_name`."""
    return f"quant_{input_name}"


class _InputQuantize(transforms.Transform):
    """InputLayer => InputLayer -> QuantizeLayer(PfqActivationQuantizer(num_bits))."""

    def __init__(self, num_bits: int):
        self.num_bits = num_bits

    def pattern(self):
        return transforms.LayerPattern("InputLayer")

    def replacement(self, match_layer):
        input_name = match_layer.layer["config"]["name"]
        layer = quantize_layer_class()(
            PfqActivationQuantizer(self.num_bits), name=input_quantizer_name(input_name)
        )
        config = {
            "class_name": "QuantizeLayer",
            "config": layer.get_config(),
            "name": layer.name,
        }
        return transforms.LayerNode(config, input_layers=[match_layer])

    def custom_objects(self):
        return {
            "QuantizeLayer": quantize_layer_class(),
            "PfqActivationQuantizer": PfqActivationQuantizer,
        }


class PfqLayoutTransform(QuantizeLayoutTransform):
    """Adds an input quantizer; leaves every other layer and config untouched.

    Args:
      input_bits: bit width of the model-input quantizer; None for no input quantizer.
    """

    def __init__(self, input_bits: int | None = 8):
        self.input_bits = input_bits

    def apply(self, model, layer_quantize_map):
        if self.input_bits is None:
            return model, layer_quantize_map
        return model_transformer.ModelTransformer(
            model, [_InputQuantize(self.input_bits)], None, layer_quantize_map
        ).transform()


class PfqQuantizeRegistry(QuantizeRegistry):
    """A registry with no defaults: tf_pfq annotates every layer it quantizes."""

    def supports(self, layer) -> bool:
        return False

    def get_quantize_config(self, layer):
        raise ValueError(
            f"Layer {layer.name!r} ({type(layer).__name__}) has no tf_pfq QuantizeConfig; "
            "tf_pfq.apply annotates every layer it quantizes explicitly."
        )


class PfqQuantizeScheme(QuantizeScheme):
    """The scheme `tf_pfq.apply` passes to `tfmot.quantization.keras.quantize_apply`.

    Args:
      input_bits: bit width of the model-input quantizer; None for none.

    Example:
      >>> scheme = PfqQuantizeScheme(input_bits=8)
      >>> scheme.get_quantize_registry().supports(keras.layers.ReLU())
      False
    """

    def __init__(self, input_bits: int | None = 8):
        self.input_bits = input_bits

    def get_layout_transformer(self):
        return PfqLayoutTransform(self.input_bits)

    def get_quantize_registry(self):
        return PfqQuantizeRegistry()
