"""Folding BatchNormalization into the preceding kernel and bias (paper eq. 5-6).

In inference mode BN channel c computes `gamma_c * (y - mu_c) / sqrt(V_c + eps) +
beta_c`; after a linear layer `y = W x + b` this is again linear, with

    W'[..., c] = W[..., c] * gamma_c / sqrt(V_c + eps)                (eq. 5)
    b'_c       = (b_c - mu_c) * gamma_c / sqrt(V_c + eps) + beta_c    (eq. 6)

Stage W of the paper quantizes the folded weights (§3.3). tfmot folds BN inside its
own 8-bit wrappers only, not into a plain model, so the rewrite is done here on the
model config (`tf_pfq.graph.rebuild`); the arithmetic is the pure function
`fold_weights`. Per-layer dynamic ranges of the folded kernels (paper Figure 2) are
returned as data.

Preprocessing layers (Rescaling, Normalization) are canonicalized here too, before
the BNs, because they are the same kind of thing: a per-channel affine
`y_c = a_c x_c + b_c` that stage W must not leave in float. A run of them is composed
into one affine, which then goes the first of two ways that is exact:

* folded into the next Conv2D / DepthwiseConv2D / Dense (its input channels scaled
  by `a`, `b` pushed through the kernel into the bias). The model input's grid then
  absorbs the affine: the int8 input quantizes `x` and the conv's kernel holds `a`.
  With zero padding in between (a ZeroPadding2D, or the conv's own 'same' padding)
  only a scale folds: padded zeros in y are zeros in x only when `b = 0`
  (`Rescaling(1/255)`, but not `Normalization` or `Rescaling(1/127.5, offset=-1)`);
* otherwise written as a 1x1 DepthwiseConv2D with bias and the last layer's name,
  the route of a BN that follows no linear layer (EfficientNet: Rescaling,
  Normalization, then ZeroPadding2D before the stem conv).

`FoldReport.preprocessing` says which happened to each layer.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

from tf_pfq.canonical import canonicalize
from tf_pfq.compat import keras
from tf_pfq.graph import LayerGraph, model_from_config, rebuild
from tf_pfq.layers.table import Family, Kernel, entry_for, family_of

__all__ = ["fold_batchnorm", "fold_weights", "FoldReport", "WeightRange", "preprocessing_affine"]


def _kernel(layer) -> Kernel | None:
    """The kernel layout of a layer BN can fold into (any layer with a kernel)."""
    return entry_for(layer).kernel


def _is_batchnorm(layer) -> bool:
    return family_of(layer) is Family.BATCHNORM


def fold_weights(
    kernel, bias, gamma, beta, mean, variance, epsilon: float, depthwise=False, transpose=False
):
    """Folds BN statistics into a kernel and bias (paper eq. 5-6), in float64.

    Args:
      kernel: Conv2D (kh, kw, cin, cout), Dense (cin, cout) or, with `depthwise`,
        DepthwiseConv2D (kh, kw, cin, mult) kernel; output channel c * mult + m.
      bias: the layer's bias (cout,), or None for a layer without bias.
      gamma: BN scale (cout,), or None when the BN has `scale=False`.
      beta: BN offset (cout,), or None when the BN has `center=False`.
      mean: BN moving mean (cout,).
      variance: BN moving variance (cout,).
      epsilon: the BN layer's epsilon.
      depthwise: `kernel` has the depthwise layout.
      transpose: `kernel` is a Conv2DTranspose kernel (kh, kw, cout, cin): the
        output channels are axis 2, not the last axis.

    Returns:
      (kernel, bias) float32 arrays; the kernel keeps its shape.

    Example:
      >>> k, b = fold_weights(np.ones((1, 2)), None, [2.0, 1.0], [0.5, 0.0],
      ...                     [1.0, 0.0], [4.0, 1.0], epsilon=0.0)
      >>> k.tolist(), b.tolist()
      ([[1.0, 1.0]], [-0.5, 0.0])
    """
    kernel = np.asarray(kernel, np.float64)
    mean = np.asarray(mean, np.float64)
    channels = mean.shape[0]
    gamma = np.ones(channels) if gamma is None else np.asarray(gamma, np.float64)
    beta = np.zeros(channels) if beta is None else np.asarray(beta, np.float64)
    bias = np.zeros(channels) if bias is None else np.asarray(bias, np.float64)
    scale = gamma / np.sqrt(np.asarray(variance, np.float64) + epsilon)
    if depthwise:
        # Output channel c * mult + m sits at kernel[..., c, m].
        folded = kernel * scale.reshape(kernel.shape[2], kernel.shape[3])
    elif transpose:
        folded = kernel * scale[:, None]
    else:
        folded = kernel * scale
    return folded.astype(np.float32), ((bias - mean) * scale + beta).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class WeightRange:
    """Min and max of one layer's kernel; `dynamic_range` is max - min (paper Fig. 2)."""

    min: float
    max: float
    folded: bool

    @property
    def dynamic_range(self) -> float:
        return self.max - self.min


@dataclasses.dataclass(frozen=True)
class FoldReport:
    """What `fold_batchnorm` did.

    Attributes:
      folded: {BN name: name of the layer it was folded into}.
      unfolded: {BN name: why it stays in the model}.
      affine: {BN name: why it could not be folded} for the BNs rewritten as a
        per-channel affine (a 1x1 DepthwiseConv2D with bias, same name), which is
        exact and quantizes like any depthwise conv.
      weight_ranges: {layer name: WeightRange} for every Conv2D, DepthwiseConv2D and
        Dense of the folded model, in layer order (the data of paper Figure 2).
      preprocessing: {Rescaling / Normalization name: what became of it}: folded
        into a conv (named), merged into the next preprocessing layer, or rewritten
        as a 1x1 DepthwiseConv2D (per-channel affine) and why it could not fold.

    Example:
      >>> report = FoldReport({"bn": "conv"}, {}, {"conv": WeightRange(-1.0, 2.0, True)})
      >>> report.weight_ranges["conv"].dynamic_range
      3.0
    """

    folded: dict[str, str]
    unfolded: dict[str, str]
    weight_ranges: dict[str, WeightRange]
    affine: dict[str, str] = dataclasses.field(default_factory=dict)
    preprocessing: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"Folded {len(self.folded)} BatchNormalization layer(s)."]
        lines += [f"  {name}: {what}" for name, what in self.preprocessing.items()]
        lines += [
            f"  {bn}: 1x1 DepthwiseConv2D (per-channel affine), not folded: {reason}"
            for bn, reason in self.affine.items()
        ]
        lines += [f"  kept {bn}: {reason}" for bn, reason in self.unfolded.items()]
        lines += [
            f"  {name}: range {r.dynamic_range:.4g}{' (folded)' if r.folded else ''}"
            for name, r in self.weight_ranges.items()
        ]
        return "\n".join(lines)


def _why_not(graph: LayerGraph, bn: str) -> str | None:
    layer = graph.layer(bn)
    producers = graph.inputs_of(bn)
    if graph.is_shared(bn):
        return "the BatchNormalization layer is shared"
    if len(producers) != 1 or producers[0] in graph.input_names:
        return "it does not follow a Conv2D, DepthwiseConv2D or Dense layer"
    producer = graph.layer(producers[0])
    if _kernel(producer) is None:
        return f"it follows {type(producer).__name__} {producers[0]!r}"
    if getattr(producer.activation, "__name__", "") != "linear":
        return f"{producers[0]!r} has a fused activation before the BN"
    if graph.is_shared(producers[0]) or graph.consumers_of(producers[0]) != [bn]:
        return f"{producers[0]!r} is shared or has other consumers"
    rank = len(producer.output_shape)
    axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    if [a % rank for a in axis] != [rank - 1]:
        return f"it normalizes axis {layer.axis}, not the channel (last) axis"
    if getattr(producer, "data_format", "channels_last") != "channels_last":
        return f"{producers[0]!r} is channels_first"
    return None


def _bn_affine(bn) -> tuple[np.ndarray, np.ndarray]:
    """BN channel c in inference mode as `x * s_c + o_c` (`s_c = gamma_c / sqrt(V_c + eps)`)."""
    channels = bn.moving_mean.shape[0]
    gamma = np.ones(channels) if bn.gamma is None else bn.gamma.numpy()
    beta = np.zeros(channels) if bn.beta is None else bn.beta.numpy()
    kernel, bias = fold_weights(
        np.ones((1, 1, channels, 1)), None, gamma, beta,
        bn.moving_mean.numpy(), bn.moving_variance.numpy(), bn.epsilon, depthwise=True,
    )  # fmt: skip
    return kernel.reshape(-1), bias


def _as_affine(model, affines: dict[str, tuple[np.ndarray, np.ndarray]]):
    """`model` with the layers `affines` ({name: (scale, offset)}) written as 1x1
    DepthwiseConv2D layers of the same name: channel c is `x * scale_c + offset_c`.

    The affine trains only where the layer it replaces had trainable weights (a BN's
    gamma and beta): a Rescaling or Normalization is fixed preprocessing, and
    training its affine on raw pixels (gradients scaled by values up to 255) can
    drive it non-finite in one step."""
    graph = LayerGraph(model)
    config = copy.deepcopy(graph.config)
    weights = {}
    for entry in config["layers"]:
        if entry["name"] not in affines:
            continue
        layer = graph.layer(entry["name"])
        scale, offset = affines[entry["name"]]
        entry["class_name"] = "DepthwiseConv2D"
        entry["config"] = {
            "name": entry["name"],
            "trainable": bool(layer.trainable and layer.trainable_weights),
            "dtype": layer.dtype,
            "kernel_size": (1, 1),
            "use_bias": True,
        }
        entry.pop("build_config", None)
        entry.pop("module", None)
        entry.pop("registered_name", None)
        weights[entry["name"]] = [
            np.asarray(scale, np.float32).reshape(1, 1, -1, 1),
            np.asarray(offset, np.float32),
        ]
    new_model = model_from_config(config, model)
    for layer in new_model.layers:
        values = weights.get(layer.name) or graph.layer(layer.name).get_weights()
        layer.set_weights([np.array(v) for v in values])
    return new_model


# The per-channel affine preprocessing layers `fold_batchnorm` canonicalizes.
_PREPROCESSING = frozenset([Family.RESCALING, Family.NORMALIZATION])
# The layers an affine before them folds into: a kernel whose output channels are
# its last axis (not Conv2DTranspose's (kh, kw, out, in)).
_AFFINE_TARGETS = frozenset([Family.CONV, Family.DEPTHWISE_CONV, Family.DENSE])


def _is_preprocessing(layer) -> bool:
    return family_of(layer) in _PREPROCESSING


def preprocessing_affine(layer) -> tuple[np.ndarray, np.ndarray]:
    """A Rescaling or Normalization layer as a per-channel affine `y_c = a_c x_c + b_c`.

    Rescaling is `x * scale + offset` (scalars, or one value per channel);
    Normalization is `(x - mean) / max(sqrt(variance), eps)`, or with `invert=True`
    `mean + x * max(sqrt(variance), eps)`, with eps Keras' `backend.epsilon()` as in
    its `call`.

    Args:
      layer: a built Rescaling or Normalization layer.

    Returns:
      (a, b): float64 arrays of one value per input channel (last axis).

    Raises:
      ValueError: a Normalization over another axis than the channel (last) axis, or
        a Rescaling scale / offset that is not one value or one per channel; the
        message names the layer.

    Example:
      >>> layer = keras.layers.Rescaling(1 / 127.5, offset=-1.0)
      >>> _ = layer(keras.Input((2, 2, 3)))
      >>> a, b = preprocessing_affine(layer)
      >>> a.round(6).tolist(), b.tolist()
      ([0.007843, 0.007843, 0.007843], [-1.0, -1.0, -1.0])
    """
    shape = layer.input_shape
    rank = len(shape)
    channels = shape[-1]
    kind = type(layer).__name__
    if family_of(layer) is Family.NORMALIZATION:
        axes = tuple(a % rank for a in layer.axis)
        if axes != (rank - 1,):
            raise ValueError(
                f"Layer {layer.name!r} (Normalization) normalizes axis={layer.axis}; "
                "tf_pfq folds a Normalization over the channel axis only (axis=-1)."
            )
        mean = np.asarray(layer.mean, np.float64).reshape(-1)
        std = np.maximum(
            np.sqrt(np.asarray(layer.variance, np.float64).reshape(-1)),
            keras.backend.epsilon(),
        )
        if mean.shape != (channels,):
            raise ValueError(
                f"Layer {layer.name!r} (Normalization) has {mean.size} means for "
                f"{channels} channels."
            )
        return (std, mean) if layer.invert else (1.0 / std, -mean / std)
    values = []
    for argument in ("scale", "offset"):
        value = np.asarray(getattr(layer, argument), np.float64).reshape(-1)
        if value.size not in (1, channels):
            raise ValueError(
                f"Layer {layer.name!r} ({kind}): `{argument}` has {value.size} values; "
                f"tf_pfq folds one value or one per channel ({channels})."
            )
        values.append(np.broadcast_to(value, (channels,)).copy())
    return values[0], values[1]


def _fold_into(target, scale: np.ndarray, offset: np.ndarray):
    """Kernel and bias of `target` (Conv2D, DepthwiseConv2D or Dense) reading `a x + b`.

    Input channel c of the kernel is scaled by `a_c`; `b_c` times the kernel's input
    channel c, summed over the window (and for a depthwise kernel kept per output
    channel c * m + j), goes into the bias: exact without padding.
    """
    layout = _kernel(target)
    assert layout is not None
    kernel = getattr(target, layout.attr).numpy().astype(np.float64)
    bias = target.bias.numpy().astype(np.float64) if target.use_bias else None
    if layout.depthwise:  # (kh, kw, in, mult), output c * mult + j
        shift = (kernel.sum(axis=(0, 1)) * offset[:, None]).reshape(-1)
        kernel = kernel * scale[:, None]
    else:  # (..., in, out)
        shift = np.tensordot(offset, kernel.sum(axis=tuple(range(kernel.ndim - 2))), 1)
        kernel = kernel * scale[:, None]
    bias = shift if bias is None else bias + shift
    return kernel.astype(np.float32), bias.astype(np.float32)


def _preprocessing_runs(graph: LayerGraph) -> list[list[str]]:
    """Maximal chains of preprocessing layers, each feeding only the next one."""
    runs: list[list[str]] = []
    taken: set[str] = set()
    for name in graph.order:
        if name in taken or not _is_preprocessing(graph.layer(name)):
            continue
        run = [name]
        while True:
            consumers = graph.consumers_of(run[-1])
            if graph.is_output(run[-1]) or len(consumers) != 1:
                break
            nxt = consumers[0]
            if not _is_preprocessing(graph.layer(nxt)) or graph.is_shared(nxt):
                break
            run.append(nxt)
        taken.update(run)
        runs.append(run)
    return runs


def _fold_target(graph: LayerGraph, last: str, offset: np.ndarray):
    """(layer the affine after `last` folds into, None) or (None, why it cannot)."""
    current, padded = last, []
    while True:
        consumers = graph.consumers_of(current)
        if graph.is_output(current) or len(consumers) != 1:
            return None, f"{current!r} has {len(consumers)} consumers or is a model output"
        nxt = consumers[0]
        entry = entry_for(graph.layer(nxt))
        if entry.family is Family.PADDING and not graph.is_shared(nxt):
            padded.append(nxt)
            current = nxt
            continue
        break
    target = graph.layer(nxt)
    kernel = entry.kernel
    if kernel is None or entry.family not in _AFFINE_TARGETS:
        return None, f"it feeds {type(target).__name__} {nxt!r}, not a conv or dense layer"
    if graph.is_shared(nxt) or len(graph.inputs_of(nxt)) != 1:
        return None, f"{nxt!r} is shared"
    if getattr(target, "groups", 1) != 1:
        return None, f"{nxt!r} is a grouped convolution"
    if getattr(target, "data_format", "channels_last") != "channels_last":
        return None, f"{nxt!r} is channels_first"
    if np.any(offset != 0):
        pads = [repr(p) for p in padded]
        if getattr(target, "padding", "valid") != "valid":
            pads.append(f"{nxt!r}'s own padding={target.padding!r}")
        if pads:
            return None, (
                f"zero padding ({', '.join(pads)}) lies between it and {nxt!r}, and its "
                "offset is not 0: padded zeros of its output are not zeros of its input"
            )
    return nxt, None


def _fold_preprocessing(graph: LayerGraph, per_channel_affine: bool = True):
    """(model, {layer: what happened}): every preprocessing run folded or an affine."""
    report: dict[str, str] = {}
    remove: list[str] = []
    layer_configs: dict[str, dict] = {}
    weights: dict[str, list[np.ndarray]] = {}
    affines: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for run in _preprocessing_runs(graph):
        scale, offset = np.ones(1), np.zeros(1)
        for name in run:
            layer = graph.layer(name)
            if graph.is_shared(name):
                raise ValueError(
                    f"Layer {name!r} ({type(layer).__name__}) is called "
                    f"{graph.num_calls(name)} times; tf_pfq.fold_batchnorm folds a "
                    "preprocessing layer called once."
                )
            a, b = preprocessing_affine(layer)
            scale, offset = a * scale, a * offset + b
        last = run[-1]
        target, why = _fold_target(graph, last, offset)
        if target is None and not per_channel_affine:
            report.update(dict.fromkeys(run, f"kept: {why}"))
            continue
        for name in run[:-1]:
            report[name] = f"merged into {last!r} (one affine)"
        remove += run[:-1]
        per_tensor = bool(np.all(scale == scale[0]) and np.all(offset == offset[0]))
        what = f"{'per-tensor' if per_tensor else 'per-channel'} affine"
        if target is not None:
            layer_configs[target] = {**graph.layer(target).get_config(), "use_bias": True}
            weights[target] = list(_fold_into(graph.layer(target), scale, offset))
            remove.append(last)
            source = (
                "the model input's grid absorbs it"
                if all(p in graph.input_names for p in graph.inputs_of(run[0]))
                else "exact"
            )
            report[last] = f"folded into {target!r} ({what}; {source})"
        elif len(graph.layer(last).output_shape) == 4:
            affines[last] = (scale, offset)
            report[last] = f"1x1 DepthwiseConv2D ({what}), not folded: {why}"
        else:
            raise ValueError(
                f"Layer {last!r} ({type(graph.layer(last)).__name__}) cannot be folded "
                f"({why}) and is not on 4-D (image) tensors, so it cannot be written as "
                "a 1x1 DepthwiseConv2D either."
            )
    if not remove and not affines:
        return graph.model, report
    model = rebuild(graph.model, remove=remove, layer_configs=layer_configs, weights=weights)
    if affines:
        model = _as_affine(model, affines)
    return model, report


def _is_channel_axis(axis, rank: int) -> bool:
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    return [a % rank for a in axes] == [rank - 1]


def fold_batchnorm(model, *, per_channel_affine: bool = True):
    """Folds every BN that directly follows a Conv2D, DepthwiseConv2D or Dense (eq. 5-6).

    The producing layer gets a bias (`use_bias=True`) holding the folded offset;
    the BN is removed. A BN elsewhere (after an Add, a pooling, a concat, a fused
    activation, the input, a layer with several consumers) is rewritten, on 4-D
    inputs, as a per-channel affine: a 1x1 DepthwiseConv2D with bias and the BN's
    name, so that it can be quantized (`report.affine` says why it was not folded).
    Other BNs stay and are listed in `report.unfolded`. Preprocessing layers
    (Rescaling, Normalization) are first folded into the next conv where exact, else
    rewritten as such a per-channel affine (module docstring; `report.preprocessing`
    says which). In inference mode the result computes the same function up to
    float round-off.

    Args:
      model: a Functional or Sequential tf_keras model; not modified.
      per_channel_affine: rewrite the BNs and preprocessing layers that cannot be
        folded as described; False keeps them as they are.

    Returns:
      (folded model, FoldReport). The folded model keeps all other layer names.

    Raises:
      TypeError: not a tf_keras Functional or Sequential model.
      ValueError: a Normalization over another axis than the last, a Rescaling with
        neither one scale nor one per channel, or a shared preprocessing layer (the
        message names the layer).

    Example:
      >>> from tf_pfq import models
      >>> m = models.mobilenet_v1(input_shape=(8, 8, 3), widths=(4, 8), strides=(1, 2))
      >>> folded, report = fold_batchnorm(m)
      >>> sorted(report.folded.items())[:2], report.unfolded
      ([('conv1_bn', 'conv1'), ('conv_dw_1_bn', 'conv_dw_1')], {})
    """
    graph = LayerGraph(canonicalize(model))  # SeparableConv2D halves fold like any conv
    graph, preprocessing = _preprocessing_graph(graph, per_channel_affine)
    folded: dict[str, str] = {}
    unfolded: dict[str, str] = {}
    layer_configs = {}
    weights = {}
    for name in graph.order:
        if not _is_batchnorm(graph.layer(name)):
            continue
        reason = _why_not(graph, name)
        if reason is not None:
            unfolded[name] = reason
            continue
        bn = graph.layer(name)
        producer_name = graph.inputs_of(name)[0]
        producer = graph.layer(producer_name)
        layout = _kernel(producer)
        assert layout is not None  # checked by _why_not
        kernel = getattr(producer, layout.attr)
        kernel, bias = fold_weights(
            kernel.numpy(),
            producer.bias.numpy() if producer.use_bias else None,
            None if bn.gamma is None else bn.gamma.numpy(),
            None if bn.beta is None else bn.beta.numpy(),
            bn.moving_mean.numpy(),
            bn.moving_variance.numpy(),
            bn.epsilon,
            layout.depthwise,
            transpose=family_of(producer) is Family.TRANSPOSED_CONV,  # (kh, kw, out, in)
        )
        config = producer.get_config()
        config["use_bias"] = True
        layer_configs[producer_name] = config
        weights[producer_name] = [kernel, bias]
        folded[name] = producer_name
    result = rebuild(graph.model, remove=list(folded), layer_configs=layer_configs, weights=weights)
    affine = {}
    if per_channel_affine:
        for name in list(unfolded):
            layer = graph.layer(name)
            rank = len(layer.input_shape)
            if rank == 4 and _is_channel_axis(layer.axis, rank) and not graph.is_shared(name):
                affine[name] = unfolded.pop(name)
        if affine:
            result = _as_affine(result, {n: _bn_affine(graph.layer(n)) for n in affine})
    producers = set(folded.values())
    ranges = {}
    for layer in result.layers:
        layout = _kernel(layer)
        if layout is not None:
            kernel = getattr(layer, layout.attr).numpy()
            ranges[layer.name] = WeightRange(
                float(kernel.min()), float(kernel.max()), layer.name in producers
            )
    return result, FoldReport(folded, unfolded, ranges, affine, preprocessing)


def _preprocessing_graph(graph: LayerGraph, per_channel_affine: bool):
    model, report = _fold_preprocessing(graph, per_channel_affine)
    return (graph if model is graph.model else LayerGraph(model)), report
