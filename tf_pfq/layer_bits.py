"""Per-layer bit widths (mixed precision): what `layer_bits` means and when it is refused.

`tf_pfq.apply(..., layer_bits={"conv1": (8, 8), "logits": (None, 8)})` overrides the
global `activation_bits` / `weight_bits` for the named layers. The tuple is
`(activation bits, weight bits)`; None keeps what the global rule gives that tensor.

* Weight bits set the grid of the layer's kernel (and of its bias, whose grid is
  `s_in * s_w`). They apply in stage W (when `weight_bits` is given); stage A
  quantizes no weights and ignores them. A layer without a kernel is refused.
* Activation bits set the grid of the layer's output. Where integer inference fuses
  the layer into the activation after it (a Conv2D followed by its ReLU), that
  activation carries the output and takes the bits, unless it has its own entry.
  Where the output reaches only a Concatenate, the concat's range carries it (the
  widest bits of its inputs). An override that no quantizer would honour exactly (a
  tensor the rule leaves in float, an output TFLite fixes to 8 bits, a concat input
  narrower than its concat, a fused pair given two widths) is refused with the
  reason: a model quantized otherwise than asked is never returned.

The names are those of the canonical model (`tf_pfq.canonicalize`): a
SeparableConv2D `sep` is `sep_depthwise` and `sep`, a fused softmax of `fc` is
`fc_softmax`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from tf_pfq.layers.table import Quant, entry_for
from tf_pfq.quant_math import check_bits

__all__ = ["check_layer_bits", "activation_bits_of", "weight_bits_of", "check_honoured"]

LayerBits = Mapping[str, tuple[int | None, int | None]]


def check_layer_bits(graph, layer_bits) -> dict[str, tuple[int | None, int | None]]:
    """`layer_bits` validated against `graph` (a `LayerGraph` of the canonical model).

    Raises:
      ValueError: not a mapping of name -> (bits or None, bits or None), an unknown
        layer name, bits outside 2..8, or weight bits for a layer without a kernel
        (each message names the layer).

    Example:
      >>> from tf_pfq.compat import keras
      >>> from tf_pfq.graph import LayerGraph
      >>> x = keras.Input((4, 4, 1), name="x")
      >>> m = keras.Model(x, keras.layers.Conv2D(2, 1, name="c")(x))
      >>> check_layer_bits(LayerGraph(m), {"c": [8, None]})
      {'c': (8, None)}
      >>> check_layer_bits(LayerGraph(m), {"x": (None, 4)})
      Traceback (most recent call last):
      ...
      ValueError: layer_bits['x'] sets weight bits, but layer 'x' (InputLayer) has no kernel.
    """
    if layer_bits is None:
        return {}
    if not isinstance(layer_bits, Mapping):
        raise ValueError(
            "`layer_bits` must map layer names to (activation_bits, weight_bits). "
            f"Received: layer_bits={layer_bits!r}"
        )
    unknown = sorted(str(name) for name in layer_bits if name not in graph.order)
    if unknown:
        raise ValueError(
            f"layer_bits names layers the model does not have: {unknown}. Its layers "
            f"(canonical names, see tf_pfq.canonicalize): {graph.order[:12]}"
            f"{' ...' if len(graph.order) > 12 else ''}"
        )
    checked = {}
    for name, bits in layer_bits.items():
        if not isinstance(bits, (tuple, list)) or len(bits) != 2:
            raise ValueError(
                f"layer_bits[{name!r}] must be (activation_bits, weight_bits), each an "
                f"int in 2..8 or None. Received: {bits!r}"
            )
        act, weight = (
            None if b is None else check_bits(b, f"layer_bits[{name!r}][{i}]")
            for i, b in enumerate(bits)
        )
        layer = graph.layer(name)
        if weight is not None and entry_for(layer).quant is not Quant.WEIGHTS:
            raise ValueError(
                f"layer_bits[{name!r}] sets weight bits, but layer {name!r} "
                f"({type(layer).__name__}) has no kernel."
            )
        checked[name] = (act, weight)
    return checked


def _fused_after(graph, name: str, fuses: Callable[[Any], bool]) -> list[str]:
    """The layers integer inference fuses `name` with, nearest first: a lone consumer
    that is a BatchNormalization (stage A) or fuses into its producer, and so on."""
    chain: list[str] = []
    while True:
        consumers = graph.consumers_of(name)
        if len(consumers) != 1:
            return chain
        layer = graph.layer(consumers[0])
        if entry_for(layer).quant is not Quant.NORMALIZATION and not fuses(layer):
            return chain
        name = consumers[0]
        chain.append(name)


def activation_bits_of(graph, activation_bits: int, layer_bits, fuses) -> Callable[[str], int]:
    """name -> the activation bits of that layer's output quantizer, were it to get one.

    A fused activation (`fuses(layer)`) with no entry of its own takes its
    producer's entry.
    """
    own = {name: bits[0] for name, bits in layer_bits.items() if bits[0] is not None}
    inherited = {}
    for name, bits in own.items():
        for carrier in _fused_after(graph, name, fuses):
            if carrier in own:
                break
            inherited[carrier] = bits
    merged = {**inherited, **own}

    def bits_of(name: str) -> int:
        return merged.get(name, activation_bits)

    return bits_of


def weight_bits_of(weight_bits: int | None, layer_bits) -> Callable[[str], int | None]:
    """name -> the weight bits of that layer's kernel (None in stage A)."""

    def bits_of(name: str) -> int | None:
        if weight_bits is None:
            return None
        override = layer_bits.get(name, (None, None))[1]
        return weight_bits if override is None else override

    return bits_of


def check_honoured(graph, layer_bits, selected: dict[str, int], shared: dict[str, str], fuses):
    """Raises ValueError where an activation entry is not what the plan quantizes.

    Args:
      graph: the canonical model's `LayerGraph`.
      layer_bits: the checked entries.
      selected: {layer: bits of its output quantizer} as planned.
      shared: {concat source: the concat whose range it uses}.
      fuses: whether integer inference fuses a layer into its producer.
    """
    for name, (bits, _) in layer_bits.items():
        if bits is None:
            continue
        carrier = name if name in selected else shared.get(name)
        if carrier is None:
            held = [c for c in _fused_after(graph, name, fuses) if c in selected]
            carrier = held[0] if held else None
        if carrier is None:
            raise ValueError(
                f"layer_bits[{name!r}] sets activation bits, but no quantizer holds "
                f"{name!r}'s output (the rule leaves it in float, or on its input's "
                "grid); give None for its activation bits."
            )
        if selected[carrier] != bits:
            raise ValueError(
                f"layer_bits[{name!r}] asks for {bits}-bit activations, but its output "
                f"is held by {carrier!r}'s {selected[carrier]}-bit quantizer (a "
                "Concatenate takes its widest input, TFLite fixes softmax / sigmoid / "
                "tanh outputs to 8 bits, a fused pair has one grid); give both the "
                "same bits or None."
            )
