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
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

from tf_pfq.compat import keras
from tf_pfq.graph import LayerGraph, rebuild
from tf_pfq.layers import split_separable
from tf_pfq.layers.table import Absorb, Kernel, entry_for

__all__ = ["fold_batchnorm", "fold_weights", "FoldReport", "WeightRange"]


def _kernel(layer) -> Kernel | None:
    """The kernel layout of a layer BN can fold into (any layer with a kernel)."""
    return entry_for(layer).kernel


def _is_batchnorm(layer) -> bool:
    return entry_for(layer).absorb is Absorb.BATCHNORM


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

    Example:
      >>> report = FoldReport({"bn": "conv"}, {}, {"conv": WeightRange(-1.0, 2.0, True)})
      >>> report.weight_ranges["conv"].dynamic_range
      3.0
    """

    folded: dict[str, str]
    unfolded: dict[str, str]
    weight_ranges: dict[str, WeightRange]
    affine: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"Folded {len(self.folded)} BatchNormalization layer(s)."]
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


def _as_affine(model, names: list[str]):
    """`model` with the BNs `names` written as 1x1 DepthwiseConv2D layers of the same name.

    In inference mode BN channel c is `x * s_c + (beta_c - mu_c * s_c)` with
    `s_c = gamma_c / sqrt(V_c + eps)`: a depthwise 1x1 kernel `s` and bias.
    """
    graph = LayerGraph(model)
    config = copy.deepcopy(graph.config)
    weights = {}
    for entry in config["layers"]:
        if entry["name"] not in names:
            continue
        bn = graph.layer(entry["name"])
        channels = bn.moving_mean.shape[0]
        gamma = np.ones(channels) if bn.gamma is None else bn.gamma.numpy()
        beta = np.zeros(channels) if bn.beta is None else bn.beta.numpy()
        kernel, bias = fold_weights(
            np.ones((1, 1, channels, 1)), None, gamma, beta,
            bn.moving_mean.numpy(), bn.moving_variance.numpy(), bn.epsilon, depthwise=True,
        )  # fmt: skip
        entry["class_name"] = "DepthwiseConv2D"
        entry["config"] = {
            "name": entry["name"],
            "trainable": bn.trainable,
            "dtype": bn.dtype,
            "kernel_size": (1, 1),
            "use_bias": True,
        }
        entry.pop("build_config", None)
        weights[entry["name"]] = [kernel, bias]
    new_model = keras.Model.from_config(config)
    for layer in new_model.layers:
        values = weights.get(layer.name) or graph.layer(layer.name).get_weights()
        layer.set_weights([np.array(v) for v in values])
    return new_model


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
    Other BNs stay and are listed in `report.unfolded`. In inference mode the result
    computes the same function up to float round-off.

    Args:
      model: a Functional or Sequential tf_keras model; not modified.
      per_channel_affine: rewrite the BNs that cannot be folded as described; False
        keeps them as BatchNormalization layers.

    Returns:
      (folded model, FoldReport). The folded model keeps all other layer names.

    Raises:
      TypeError: not a tf_keras Functional or Sequential model.

    Example:
      >>> from tf_pfq import models
      >>> m = models.mobilenet_v1(input_shape=(8, 8, 3), widths=(4, 8), strides=(1, 2))
      >>> folded, report = fold_batchnorm(m)
      >>> sorted(report.folded.items())[:2], report.unfolded
      ([('conv1_bn', 'conv1'), ('conv_dw_1_bn', 'conv_dw_1')], {})
    """
    graph = LayerGraph(split_separable(model))  # its halves fold like any conv
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
            transpose=layout.out_axis == -2,  # (kh, kw, out, in)
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
            result = _as_affine(result, list(affine))
    producers = set(folded.values())
    ranges = {}
    for layer in result.layers:
        layout = _kernel(layer)
        if layout is not None:
            kernel = getattr(layer, layout.attr).numpy()
            ranges[layer.name] = WeightRange(
                float(kernel.min()), float(kernel.max()), layer.name in producers
            )
    return result, FoldReport(folded, unfolded, ranges, affine)
