"""Layer by layer: where does a `.tflite` file part from its Keras QAT model?

`compare_layers` runs the QAT model (Keras, inference mode) and the integer file
(LiteRT, XNNPACK by default) on the same images and measures, for every layer, how
far the file's tensor is from the layer's output, in steps of that tensor's own
int8 grid. Reading the layers in graph order, the first one whose difference is more
than rounding is where the export (or the runtime) computes something else; the
layers before it are cleared.

How layers find their tensors: the exporter builds its TensorFlow graph with each
layer's ops under the layer's name scope (`tf_pfq.export.convert.layer_scope`), and
the TFLite converter names every tensor after the ops it came from, joining the
names with ";" where it fused several ops into one. So the tensor that holds a
layer's output is the last one (in execution order) that names the layer, and no
name has to be guessed:

* a layer whose op the converter fused into a later layer's (a Conv2D followed by
  its ReLU becomes one CONV_2D with a fused RELU) has no tensor of its own: it maps
  to the fused op's output and is measured against the later layer's output
  (`LayerDiff.fused_into`), the only value the file has for it;
* a layer no tensor names (Dropout, an identity at inference; an op the converter
  folded away) is listed as unmapped, with the reason.

The file is run with the compared tensors marked as model outputs, which every
runtime must write back, delegates included: a delegate such as XNNPACK computes a
whole partition itself, so what it leaves in the interpreter's intermediate tensors
(`experimental_preserve_all_tensors`) depends on the runtime's version. Outputs do
not change how an op rounds: the file's final output is bit for bit the same.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from ai_edge_litert.tools import flatbuffer_utils

from tf_pfq.compat import keras
from tf_pfq.export import litert
from tf_pfq.export.convert import layer_scope, plan_from_qat
from tf_pfq.export.summary import TensorInfo, inspect, read_model
from tf_pfq.graph import LayerGraph

__all__ = ["LayerComparison", "LayerDiff", "compare_layers"]

STATISTICS = ("max", "p99")
# The Keras side is float32: a value k steps from zero comes with about k * 6e-8
# steps of error, so "1 step apart" reads 1.00001. Differences within this of the
# threshold count as at the threshold.
NOISE_STEPS = 1e-3
# Layers that are the identity at inference: the file has no op for them.
_IDENTITIES = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "GaussianNoise", "AlphaDropout")
# Images per Keras call: the per-layer outputs of a batch are held at once.
_BATCH = 16


@dataclasses.dataclass(frozen=True)
class LayerDiff:
    """One layer of `compare_layers`: its TFLite tensor and how far apart the two are.

    Attributes:
      layer: the layer's name (the name before `tf_pfq.apply`; the input layer
        stands for the model input after its quantizer).
      class_name: the layer's Keras class.
      tensor: the name of the TFLite tensor holding its output, or None (unmapped).
      tensor_index: that tensor's index in the file's subgraph, or None.
      scale: the tensor's quantization scale, the unit of the two statistics.
      p99_steps: 99th percentile of |TFLite - Keras| over all values, in steps.
      max_steps: the largest |TFLite - Keras|, in steps.
      fused_into: the later layer whose output the tensor holds, when the converter
        fused this layer's op into that layer's (both rows show the same numbers).
      reason: why the layer is unmapped; None when it is mapped.
    """

    layer: str
    class_name: str
    tensor: str | None = None
    tensor_index: int | None = None
    scale: float | None = None
    p99_steps: float | None = None
    max_steps: float | None = None
    fused_into: str | None = None
    reason: str | None = None

    @property
    def mapped(self) -> bool:
        return self.tensor is not None

    def statistic(self, name: str) -> float | None:
        """`max_steps` for "max", `p99_steps` for "p99"."""
        return self.max_steps if name == "max" else self.p99_steps


@dataclasses.dataclass(frozen=True)
class LayerComparison:
    """The table `compare_layers` returns: one `LayerDiff` per layer, in graph order.

    Attributes:
      rows: every layer of the QAT model (input quantizers folded into the input's row).
      threshold: a layer parts when its `statistic` exceeds this many steps.
      statistic: "max" or "p99".
      num_examples: images compared.
      backend: the LiteRT backend that ran the file.

    Example:
      >>> table = LayerComparison(
      ...     rows=(LayerDiff("conv", "Conv2D", "conv/Conv2D", 0, 0.1, 0.2, 3.0),),
      ...     threshold=1.0, statistic="max", num_examples=4, backend="xnnpack")
      >>> table.first_divergence.layer, table.row("conv").scale
      ('conv', 0.1)
    """

    rows: tuple[LayerDiff, ...]
    threshold: float
    statistic: str
    num_examples: int
    backend: str

    @property
    def first_divergence(self) -> LayerDiff | None:
        """The first mapped row, in graph order, whose statistic exceeds the threshold.

        A difference within `NOISE_STEPS` of the threshold (float32 noise on the
        Keras side) does not exceed it: one value rounded the other way is 1 step.
        """
        for row in self.rows:
            value = row.statistic(self.statistic)
            if value is not None and value > self.threshold + NOISE_STEPS:
                return row
        return None

    @property
    def mapped(self) -> tuple[LayerDiff, ...]:
        return tuple(r for r in self.rows if r.mapped)

    @property
    def unmapped(self) -> tuple[LayerDiff, ...]:
        return tuple(r for r in self.rows if not r.mapped)

    def row(self, layer: str) -> LayerDiff:
        """The row of `layer`.

        Raises:
          KeyError: no such layer.
        """
        for row in self.rows:
            if row.layer == layer:
                return row
        raise KeyError(
            f"No layer {layer!r} in the comparison; layers: {[r.layer for r in self.rows]}"
        )

    def verdict(self) -> str:
        """One sentence: where the file first parts from the QAT model, or that it does not."""
        first = self.first_divergence
        measured = f"{self.num_examples} images, {self.backend}"
        if first is None:
            return (
                f"No divergence: every mapped layer is within {self.threshold:g} step(s) "
                f"({self.statistic}) of the QAT model ({measured})."
            )
        fused = f", fused into {first.fused_into}" if first.fused_into else ""
        return (
            f"First divergence at layer {first.layer!r} (tensor {first.tensor!r}{fused}): "
            f"{self.statistic} {first.statistic(self.statistic):.2f} steps > "
            f"{self.threshold:g} ({measured})."
        )

    def to_markdown(self) -> str:
        """The table as Markdown, the verdict first."""
        first = self.first_divergence
        lines = [
            self.verdict(),
            "",
            "| # | layer | class | TFLite tensor | scale | p99 steps | max steps | note |",
            "|---:|---|---|---|---:|---:|---:|---|",
        ]
        for k, row in enumerate(self.rows):
            note = row.reason or ""
            if row.fused_into:
                note = f"fused into {row.fused_into}"
            if first is not None and row.layer == first.layer:
                note = f"**first divergence** {note}".strip()
            lines.append(
                f"| {k} | {row.layer} | {row.class_name} | {_cell(row.tensor)} | "
                f"{_number(row.scale, '.4g')} | {_number(row.p99_steps, '.2f')} | "
                f"{_number(row.max_steps, '.2f')} | {_cell(note)} |"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def plot(self, path: str | os.PathLike, title: str = "") -> str:
        """Draws p99 and max steps per mapped layer, in graph order, to a PNG file.

        The dashed line is the threshold, the dotted one half a step (the rounding
        of a tensor QAT leaves in float); a red line marks the first divergence.
        The step axis is linear up to 1 and logarithmic above (symlog), so both
        half-step rounding and a 40-step error read off the same plot.

        Returns:
          `path` as a string.
        """
        from tf_pfq.plots import _pyplot

        plt = _pyplot()
        rows = self.mapped
        names = [r.layer for r in rows]
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows)), 4))
        x = np.arange(len(rows))
        ax.plot(x, [r.max_steps for r in rows], marker="o", label="max")
        ax.plot(x, [r.p99_steps for r in rows], marker="s", label="p99")
        ax.axhline(self.threshold, color="gray", linestyle="dashed", lw=0.8, label="threshold")
        first = self.first_divergence
        if first is not None:
            ax.axvline(names.index(first.layer), color="tab:red", lw=0.8, label="first divergence")
        ax.axhline(0.5, color="gray", linestyle="dotted", lw=0.8, label="half a step")
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.set_yscale("symlog", linthresh=1.0)
        top = max([self.threshold, *(r.max_steps or 0.0 for r in rows)])
        ticks = [t for t in (0, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if t <= 1.5 * top]
        ax.set_yticks(ticks)
        ax.set_yticklabels([f"{t:g}" for t in ticks])
        ax.set_ylabel("|TFLite - Keras QAT| in output steps")
        ax.set_title(title or f"Per-layer difference, {self.num_examples} images ({self.backend})")
        ax.legend()
        fig.tight_layout()
        path = os.fspath(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _cell(text: str | None) -> str:
    return "" if text is None else text.replace("|", "\\|")


def _number(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


# --- mapping layers to tensors ---------------------------------------------------------


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
        return (
            isinstance(self.layer, keras.layers.InputLayer) and self.output_layer is not self.layer
        )


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
    if layer.class_name in _IDENTITIES:
        return True
    return layer.class_name == "Activation" and layer.layer.get_config()["activation"] == "linear"


# --- running both ----------------------------------------------------------------------


def _with_outputs(tflite: bytes, indices: Sequence[int]) -> bytes:
    """The file with `indices` added to its subgraph outputs, so every runtime writes them."""
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite))
    subgraph = model.subgraphs[0]
    outputs = [int(i) for i in subgraph.outputs]
    outputs += [i for i in dict.fromkeys(indices) if i not in outputs]
    subgraph.outputs = np.asarray(outputs, np.int32)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _batches(data, input_shape: tuple, max_examples: int | None) -> Iterator[np.ndarray]:
    """`data` as float32 batches of at most `_BATCH` images, `max_examples` in all."""
    shape = tuple(int(d) for d in input_shape)
    if isinstance(data, tf.data.Dataset):
        source: Iterator[np.ndarray] = (
            np.asarray(e[0] if isinstance(e, (tuple, list)) else e)
            for e in data.as_numpy_iterator()
        )
    else:
        source = iter([np.asarray(data)])
    left = max_examples
    pending: list[np.ndarray] = []
    for chunk in source:
        if chunk.shape == shape:  # an unbatched dataset
            chunk = chunk[None]
        if chunk.ndim != len(shape) + 1 or tuple(chunk.shape[1:]) != shape:
            raise ValueError(
                f"`data` must hold images of shape {shape} (a batch (N, *shape), or a "
                f"tf.data.Dataset of images or (image, label)). Received: a batch of "
                f"shape {chunk.shape}"
            )
        if left is not None:
            chunk, left = chunk[:left], left - len(chunk[:left])
        pending.append(chunk.astype(np.float32))
        while sum(len(p) for p in pending) >= _BATCH:
            merged = np.concatenate(pending)
            yield merged[:_BATCH]
            pending = [merged[_BATCH:]]
        if left == 0:
            break
    rest = np.concatenate(pending) if pending else np.zeros((0, *shape), np.float32)
    if len(rest):
        yield rest


def _measure(rows, layers, qat_model, interpreter, data, max_examples):
    """{(tensor index, layer): steps of |TFLite - Keras| over every value}, and the image count.

    `layer` is the one whose output the tensor holds (a fused row's `fused_into`).
    The file is fed the QAT model's own quantized input where it has one: both
    then start from the same integers, whatever way a caller rounds float images.
    """
    info = {layer.name: layer for layer in layers}
    pairs = list(dict.fromkeys((r.tensor_index, r.fused_into or r.layer) for r in rows if r.mapped))
    grids = _borrowed_grids(qat_model)
    outputs = [info[name].output_layer.output for _, name in pairs]
    source = next((layer for layer in layers if layer.quantized_input), None)
    if source is not None:
        outputs.append(source.output_layer.output)
    keras_model = keras.Model(qat_model.inputs, outputs)
    (inp,) = interpreter.get_input_details()
    details = {d["index"]: d for d in interpreter.get_output_details()}
    steps: dict[tuple[int, str], list[np.ndarray]] = {pair: [] for pair in pairs}
    count = 0
    for images in _batches(data, tuple(inp["shape"][1:]), max_examples):
        expected = keras_model(images, training=False)
        expected = [np.asarray(e) for e in (expected if len(outputs) > 1 else [expected])]
        feed = expected[-1] if source is not None else images
        expected = [
            _on_grid(want, grids[name]) if name in grids else want
            for (_, name), want in zip(pairs, expected)
        ]
        for k in range(len(images)):
            interpreter.set_tensor(inp["index"], litert.quantize_input(feed[k][None], inp))
            interpreter.invoke()
            for (index, name), want in zip(pairs, expected):
                got = interpreter.get_tensor(index)
                steps[(index, name)].append(_steps(got, details[index], want[k]))
        count += len(images)
    if not count:
        raise ValueError("`data` holds no images.")
    return {pair: np.concatenate(s) for pair, s in steps.items()}, count


def _borrowed_grids(qat_model) -> dict:
    """{layer: grid} for outputs QAT leaves in float but the file puts on a grid.

    The export gives a layer whose output only feeds a Concatenate the concat's
    grid, so the CONCATENATION needs no requantization (`plan_from_qat`); QAT
    rounds (and clamps) those values only in the concat. Their file tensor is
    compared with the QAT output on that same grid: otherwise values the file
    clamps one layer before QAT does would read as steps of difference.
    """
    from tf_pfq.quantize import quantization_params

    own = quantization_params(qat_model)
    plan = plan_from_qat(qat_model)
    return {
        name: quant.output
        for name, quant in plan.layers.items()
        if quant.output is not None and (name not in own or own[name].output is None)
    }


def _on_grid(values: np.ndarray, grid) -> np.ndarray:
    """`values` fake-quantized on `grid`, as the QAT quantizer that owns it would."""
    lo, hi = float(np.ravel(grid.min)[0]), float(np.ravel(grid.max)[0])
    return tf.quantization.fake_quant_with_min_max_vars(
        values, lo, hi, num_bits=grid.num_bits, narrow_range=grid.narrow_range
    ).numpy()


def _steps(got: np.ndarray, detail: dict, want) -> np.ndarray:
    """|got - want| in steps of got's scale: `(q - zero point) - want / scale`."""
    scale, zero_point = detail["quantization"]
    want = np.asarray(want, np.float64).reshape(-1)
    q = got.astype(np.float64).reshape(-1) - zero_point
    if q.size != want.size:
        raise ValueError(
            f"Tensor {detail['name']!r} holds {q.size} values per image, the Keras layer "
            f"{want.size}."
        )
    return np.abs(q - want / scale).astype(np.float32)


def _read(tflite) -> bytes:
    read_model(tflite)  # ValueError naming the file when it is not a .tflite
    if isinstance(tflite, (bytes, bytearray, memoryview)):
        return bytes(tflite)
    with open(tflite, "rb") as f:
        return f.read()


def compare_layers(
    qat_model,
    tflite: bytes | str | os.PathLike,
    data,
    *,
    threshold: float = 1.0,
    statistic: str = "max",
    max_examples: int | None = None,
    backend: str = "xnnpack",
    num_threads: int | None = None,
    delegate_library: str | None = None,
) -> LayerComparison:
    """Measures, layer by layer, how far a `.tflite` file is from its Keras QAT model.

    Runs `qat_model` in inference mode and the file on LiteRT (`backend`) on the
    same images, maps every layer to the TFLite tensor that holds its output (from
    the names the exporter gives each layer's ops; see the module docstring) and
    reports, per layer, the 99th percentile and the maximum of |TFLite - Keras|
    over all values of all images, in steps of that tensor's own scale.

    Why steps of each tensor's own scale: the file stores each tensor as integers
    on its own grid, and every layer has a different range, so a difference means
    something only next to that grid's step. Measured in steps, 0 is agreement;
    half a step is the file's rounding of a value QAT keeps in float (Add outputs
    with `add_bits=None`, logits); one step is a value that rounded the other way
    near a tie; several steps are a different computation, whatever the layer's
    range. In absolute units a 0.01 difference would be nothing on logits of step
    0.1 and ten levels on a tensor of step 0.001, and the numbers would grow and
    shrink with each layer's range rather than with its error. The export promises
    one rounding per tensor, where QAT rounds, so on an exact file every mapped
    layer is within half a step, and the first one beyond is where the two part.

    Two choices keep the comparison about the file: it is fed the QAT model's own
    quantized input (the same integers; how a caller rounds float images is not
    the file's business), and a tensor the export puts on a later layer's grid
    (the inputs of a Concatenate) is compared with the QAT output on that grid.

    Args:
      qat_model: the stage-W QAT model (from `tf_pfq.apply`, or loaded under
        `tf_pfq.quantize_scope()`) that `tflite` was exported from; not modified.
      tflite: the file's bytes or path, as written by `tf_pfq.export.to_tflite`.
      data: float images, an array (N, H, W, C) or a `tf.data.Dataset` of images or
        (image, label), batched or not. Every value of every layer output is kept
        until the percentiles are taken: a few dozen images are plenty.
      threshold: a layer parts from the QAT model when its `statistic` exceeds this
        many steps.
      statistic: "max" or "p99", the statistic compared with `threshold`.
      max_examples: compare at most this many images (None: all of `data`).
      backend: LiteRT kernels, one of `tf_pfq.export.litert.BACKENDS`.
      num_threads: CPU threads for LiteRT (None: its default).
      delegate_library: the delegate library for backend "gpu" or "edgetpu".

    Returns:
      A `LayerComparison`: one `LayerDiff` per layer in graph order,
      `first_divergence`, `to_markdown()` and `plot(path)`.

    Raises:
      ValueError: `tflite` is not a .tflite file, no tensor of it is named after a
        layer of `qat_model` (another model, or a file written before tf_pfq named
        tensors by layer), `data` has the wrong shape or no image, or a bad
        `statistic` / `threshold`.

    Example:
      >>> import numpy as np
      >>> import tf_pfq
      >>> from tf_pfq import models
      >>> m = models.mobilenet_v1(input_shape=(8, 8, 3), widths=(4,), strides=(1,))
      >>> folded, _ = tf_pfq.fold_batchnorm(m)
      >>> qat = tf_pfq.apply(folded, activation_bits=4, weight_bits=4)
      >>> images = np.random.default_rng(0).uniform(0, 1, (4, 8, 8, 3)).astype("float32")
      >>> _ = qat(images, training=True)  # activation ranges
      >>> tflite = tf_pfq.export.to_tflite(qat, representative_data=images)
      >>> table = compare_layers(qat, tflite, images)
      >>> table.first_divergence is None, table.row("conv1").fused_into
      (True, 'conv1_relu')
      >>> all(r.max_steps <= 0.501 for r in table.mapped)  # half a step: rounding
      True
    """
    if statistic not in STATISTICS:
        raise ValueError(f"`statistic` must be one of {STATISTICS}. Received: {statistic!r}")
    if not threshold >= 0:
        raise ValueError(f"`threshold` must be >= 0 steps. Received: threshold={threshold}")
    content = _read(tflite)
    layers = _qat_layers(qat_model)
    mapping = _Mapping(layers, inspect(content))
    rows = [mapping.row(layer) for layer in layers]
    interpreter = litert.make_interpreter(
        _with_outputs(content, [r.tensor_index for r in rows if r.tensor_index is not None]),
        backend=backend,
        num_threads=num_threads,
        delegate_library=delegate_library,
    )
    steps, count = _measure(rows, layers, qat_model, interpreter, data, max_examples)
    measured = []
    for row in rows:
        if row.mapped:
            values = steps[(row.tensor_index, row.fused_into or row.layer)]
            row = dataclasses.replace(
                row,
                p99_steps=float(np.percentile(values, 99)),
                max_steps=float(values.max()),
            )
        measured.append(row)
    return LayerComparison(tuple(measured), float(threshold), statistic, count, backend)
