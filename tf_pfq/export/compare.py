"""Layer by layer: where does a `.tflite` file part from its Keras QAT model?

`compare_layers` runs the QAT model (Keras, inference mode) and the integer file
(LiteRT, XNNPACK by default) on the same images and measures, for every layer, how
far the file's tensor is from the layer's output, in steps of that tensor's own
int8 grid. Reading the layers in graph order, the first one whose difference is more
than rounding is where the export (or the runtime) computes something else; the
layers before it are cleared.

How layers find their tensors: from the names the exporter gives each layer's ops
(`tf_pfq.export.compare_map`), so no name has to be guessed; a layer the converter
fused into a later one is measured against that layer's output, and a layer with no
tensor of its own is listed as unmapped, with the reason. The rows, table and plot
are `tf_pfq.export.compare_table`; this module runs both sides and measures.

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

import numpy as np
import tensorflow as tf
from ai_edge_litert.tools import flatbuffer_utils

from tf_pfq.compat import keras
from tf_pfq.export import litert
from tf_pfq.export.compare_map import _Mapping, _qat_layers
from tf_pfq.export.compare_map import _value_tensors as _value_tensors
from tf_pfq.export.compare_table import NOISE_STEPS as NOISE_STEPS
from tf_pfq.export.compare_table import LayerComparison, LayerDiff
from tf_pfq.export.plan import plan_from_qat
from tf_pfq.export.summary import inspect, read_model

# The names above imported "as" themselves are re-exported: they were defined here
# before the mapping and the table had modules of their own, and tests read them here.

__all__ = ["LayerComparison", "LayerDiff", "compare_layers"]

STATISTICS = ("max", "p99")
# Images per Keras call: the per-layer outputs of a batch are held at once.
_BATCH = 16


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
    """{(tensor index, layer): steps of |TFLite - Keras| over every value}, the same
    with where the file saturates, and the image count.

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
    saturated: dict[tuple[int, str], list[np.ndarray]] = {pair: [] for pair in pairs}
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
                diff, beyond = litert.steps_apart(got, details[index], want[k])
                steps[(index, name)].append(diff)
                saturated[(index, name)].append(beyond)
        count += len(images)
    if not count:
        raise ValueError("`data` holds no images.")
    return (
        {pair: np.concatenate(s) for pair, s in steps.items()},
        {pair: np.concatenate(s) for pair, s in saturated.items()},
        count,
    )


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
    the names the exporter gives each layer's ops; see `tf_pfq.export.compare_map`) and
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

    Three choices keep the comparison about the file's arithmetic: it is fed the QAT
    model's own quantized input (the same integers; how a caller rounds float images
    is not the file's business); a tensor the export puts on a later layer's grid
    (the inputs of a Concatenate) is compared with the QAT output on that grid; and
    a Keras value beyond the range of its file tensor, which the file saturates
    (logits beyond the range calibrated on `representative_data`), is counted in
    `LayerDiff.saturated` and compared after clipping to that range.

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
    steps, beyond, count = _measure(rows, layers, qat_model, interpreter, data, max_examples)
    measured = []
    for row in rows:
        if row.mapped:
            key = (row.tensor_index, row.fused_into or row.layer)
            values, saturated = steps[key], beyond[key]
            row = dataclasses.replace(
                row,
                p99_steps=float(np.percentile(values, 99)),
                max_steps=float(values.max()),
                saturated=float(saturated.mean()),
            )
        measured.append(row)
    return LayerComparison(tuple(measured), float(threshold), statistic, count, backend)
