"""Which tensor of a `.tflite` file holds which layer's output, read from the tensor names.

The exporter builds its TensorFlow graph with each layer's ops under the layer's
name scope (`tf_pfq.export.lowering.layer_scope`), and the TFLite converter names
every tensor after the ops it came from, joining the names with ";" where it fused
several ops into one. So the tensor that holds a layer's output is the last one (in
execution order) that names the layer, and no name has to be guessed:

* a layer whose op the converter fused into a later layer's (a Conv2D followed by
  its ReLU becomes one CONV_2D with a fused RELU) has no tensor of its own: it maps
  to the fused op's output and is measured against the later layer's output
  (`LayerDiff.fused_into`), the only value the file has for it;
* a layer no tensor names (Dropout, an identity at inference; an op the converter
  folded away) is listed as unmapped, with the reason.

Kept apart from the measuring (`tf_pfq.export.compare`): the mapping reads only the
QAT model's graph and the file's tensor names, never runs either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from tf_pfq.export.compare_table import LayerDiff
from tf_pfq.export.lowering import layer_scope
from tf_pfq.export.summary import TensorInfo
from tf_pfq.graph import LayerGraph
from tf_pfq.layers.table import Family, exact_family, family_of


@dataclasses.dataclass(frozen=True)
class _Layer:
    name: str  # the name before tf_pfq.apply
    layer: Any  # the plain Keras layer (unwrapped)
    output_layer: Any  # the QAT layer whose output is this layer's (the input: its quantizer)
    shape: tuple  # per-example output shape (None for unknown dimensions)
    inputs: tuple[str, ...]  # the layers feeding it

    @property
    def class_name(self) -> str:
        return type(self.layer).__name__

    @property
    def quantized_input(self) -> bool:
        """An input layer whose values the QAT model quantizes first."""
        return family_of(self.layer) is Family.INPUT and self.output_layer is not self.layer


def _qat_layers(qat_model) -> list[_Layer]:
    """The QAT model's layers in graph order, under the names the exporter uses.

    Input quantizers get no row of their own: the input's row stands for the
    quantized input, which is what the file's input tensor holds.
    """
    from tf_pfq.quantize import _WRAPPERS, _is_input_quantizer, _original_name

    graph = LayerGraph(qat_model)
    quantizers = {
        graph.inputs_of(name)[0]: graph.layer(name)
        for name in graph.order
        if _is_input_quantizer(graph.layer(name))
    }

    def original(name: str) -> str:
        layer = graph.layer(name)
        if _is_input_quantizer(layer):
            return original(graph.inputs_of(name)[0])
        return _original_name(layer)

    layers = []
    for name in graph.order:
        layer = graph.layer(name)
        if _is_input_quantizer(layer):
            continue
        output_layer = quantizers.get(name, layer)
        layers.append(
            _Layer(
                name=original(name),
                layer=layer.layer if isinstance(layer, _WRAPPERS) else layer,
                output_layer=output_layer,
                shape=tuple(output_layer.output.shape)[1:],
                inputs=tuple(original(n) for n in graph.inputs_of(name)),
            )
        )
    return layers


def _scopes(tensor_name: str) -> set[str]:
    """The layer scopes a tensor name holds ("b/Relu;a/Conv2D" -> {"a/", "b/"})."""
    return {part.split("/", 1)[0] + "/" for part in tensor_name.split(";") if "/" in part}


def _value_tensors(summary) -> list[TensorInfo]:
    """The file's non-constant tensors in the order they are computed."""
    return [tensor for tensor, _ in _produced(summary)]


def _produced(summary) -> list[tuple[TensorInfo, bool]]:
    """(tensor, whether it requantizes an integer tensor) for each non-constant tensor.

    The converter adds a QUANTIZE where a consumer wants a tensor on another grid
    (a Concatenate input that other layers read too) and names it after the
    producer's op ("add" -> "add1"); it holds the consumer's grid, not the layer's.
    """
    produced = {t.index: (t, False) for t in summary.inputs}
    for op in summary.ops:
        requantizes = op.op == "QUANTIZE" and all(
            t is not None and t.dtype in ("int8", "uint8") for t in op.inputs
        )
        for t in op.outputs:
            produced.setdefault(t.index, (t, requantizes))
    return [(t, requantizes) for t, requantizes in produced.values() if not t.is_constant]


def _same_size(layer_shape: tuple, tensor_shape: tuple) -> bool:
    if any(d is None for d in layer_shape):  # dynamic: checked by size when it runs
        return True
    return int(np.prod(layer_shape, dtype=np.int64)) == int(
        np.prod(tensor_shape[1:], dtype=np.int64)
    )


class _Mapping:
    """Which tensor of the file holds which layer's output, read from the tensor names."""

    def __init__(self, layers: Sequence[_Layer], summary):
        self.layers = {layer.name: layer for layer in layers}
        self.position = {layer.name: k for k, layer in enumerate(layers)}
        self.by_scope: dict[str, list[str]] = {}
        for layer in layers:
            self.by_scope.setdefault(layer_scope(layer.name), []).append(layer.name)
        self.last: dict[str, TensorInfo] = {}  # layer -> the last tensor naming it
        self.merged: dict[str, str] = {}  # layer -> the twin the converter kept instead
        self.configs: dict[str, dict] = {}
        for tensor, requantizes in _produced(summary):
            for name in self.named_in(tensor):
                if not (requantizes and name in self.last):
                    self.last[name] = tensor
        if not self.last:
            raise ValueError(
                "No tensor of the .tflite file is named after a layer of `qat_model`: the "
                "file was not written by tf_pfq.export.to_tflite from this model (or by a "
                "tf_pfq older than the layer-named export). Export the model again."
            )

    def named_in(self, tensor: TensorInfo) -> list[str]:
        return [n for scope in _scopes(tensor.name) for n in self.by_scope.get(scope, ())]

    def ends_at(self, name: str, tensor: TensorInfo) -> bool:
        return name in self.last and self.last[name].index == tensor.index

    def row(self, layer: _Layer) -> LayerDiff:
        """The layer's unmeasured `LayerDiff`: its tensor, or why it has none.

        Called in graph order (a layer's inputs first: twins are found through them).
        """

        def unmapped(reason: str) -> LayerDiff:
            return LayerDiff(layer.name, layer.class_name, reason=reason)

        shared = [n for n in self.by_scope[layer_scope(layer.name)] if n != layer.name]
        if shared:
            return unmapped(f"its name and {shared[0]!r}'s give the same TensorFlow scope")
        tensor = self.last.get(layer.name)
        if tensor is None:
            return unmapped(self.why_no_tensor(layer))
        if tensor.dtype not in ("int8", "uint8") or not tensor.scales:
            return unmapped(f"its tensor {tensor.name!r} is {tensor.dtype}, not quantized")
        # The tensor is the last one of every layer in `holders`: the latest of them
        # (of the right size) is the layer whose output it holds, the earlier ones
        # were fused into its op. A later layer that goes on past this tensor
        # (`partial`) took part of its own work into the op: the tensor is none of them.
        later = sorted(
            (n for n in self.named_in(tensor) if self.position[n] >= self.position[layer.name]),
            key=self.position.__getitem__,
        )
        holders = [n for n in later if self.ends_at(n, tensor)]
        partial = [n for n in later if not self.ends_at(n, tensor)]
        holder = next(
            (n for n in reversed(holders) if _same_size(self.layers[n].shape, tensor.shape)),
            None,
        )
        if holder is None or any(self.position[n] > self.position[holder] for n in partial):
            if partial:
                return unmapped(
                    f"the converter fused its op into the op of {partial[-1]!r} (tensor "
                    f"{tensor.name!r}): the file has no tensor with its own output"
                )
            return unmapped(
                f"its tensor {tensor.name!r} has shape {list(tensor.shape)}, the layer "
                f"outputs {list(layer.shape)}"
            )
        return LayerDiff(
            layer.name,
            layer.class_name,
            tensor=tensor.name,
            tensor_index=tensor.index,
            scale=float(tensor.scales[0]),
            fused_into=holder if holder != layer.name else None,
        )

    def why_no_tensor(self, layer: _Layer) -> str:
        """Why no tensor of the file names `layer`, as precisely as the graph tells."""
        if _is_identity(layer):
            return "identity at inference: the file has no op for it"
        # The converter merges ops that compute the same thing from the same tensors
        # (NASNet's twin ReLUs and poolings), keeping one name.
        twin = self.twin(layer)
        if twin is not None:
            self.merged[layer.name] = twin
            return (
                f"the converter merged it with {twin!r}, the same op on the same input: "
                "see that row"
            )
        if len(layer.inputs) == 1 and self.layers[layer.inputs[0]].shape == layer.shape:
            return (
                "the converter removed its op as a no-op: its output is "
                f"{layer.inputs[0]!r}'s tensor (e.g. a ReLU of values already >= 0)"
            )
        return "no tensor of the file is named after it (the converter folded its op away)"

    def twin(self, layer: _Layer) -> str | None:
        """An earlier layer of the same class and config on the same inputs, if any."""
        inputs = self.sources(layer)
        for other in self.layers.values():
            if self.position[other.name] >= self.position[layer.name]:
                return None
            if (
                type(other.layer) is type(layer.layer)
                and self.sources(other) == inputs
                and self.config(other) == self.config(layer)
            ):
                return self.merged.get(other.name, other.name)
        return None

    def config(self, layer: _Layer) -> dict:
        if layer.name not in self.configs:
            config = layer.layer.get_config()
            self.configs[layer.name] = {k: v for k, v in config.items() if k != "name"}
        return self.configs[layer.name]

    def sources(self, layer: _Layer) -> tuple[str, ...]:
        return tuple(self.merged.get(n, n) for n in layer.inputs)


def _is_identity(layer: _Layer) -> bool:
    """The identity at inference (dropout, a linear Activation): the file has no op for it.

    Matched on the exact class (a subclass may compute something at inference).
    """
    family = exact_family(layer.layer)
    if family is Family.DROPOUT:
        return True
    return family is Family.ACTIVATION and layer.layer.get_config()["activation"] == "linear"
