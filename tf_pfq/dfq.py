"""Data-free quantization (Nagel et al., ICCV 2019), the paper's Table 3 baseline.

Three rewrites of a BN-folded float model, each preparing it for per-tensor weight
quantization:

* cross-layer equalization (CLE, Nagel eq. 5-9): for two layers joined by a
  positively homogeneous activation (`relu(s x) = s relu(x)` for `s > 0`), divide
  output channel `i` of the first by `s_i` and multiply input channel `i` of the
  second by `s_i`, with `s_i = sqrt(r1_i / r2_i)` so both channel ranges become
  `sqrt(r1_i r2_i)`. The float function is unchanged.
* high-bias absorption (Nagel §4.2.1): move `c_i = max(0, mu_i - 3 sigma_i)` of the
  first layer's pre-activation into the second layer's bias (`relu(x - c) + c =
  relu(x)` whenever `x >= c`). Nagel reads `mu`, `sigma` from BN's beta and gamma;
  on a folded model we measure them on calibration data instead.
* bias correction (Nagel §4.2): subtract the expected output error of weight
  quantization, `E[(Q(W) - W) x]`, from each layer's bias. We use the *empirical*
  variant on calibration data (Nagel's appendix), with float-model inputs, because
  the folded model no longer has the BN statistics the analytic variant needs.

ReLU6 is not positively homogeneous; like Nagel (§5, "we replace ReLU6 by ReLU")
the layers between equalized pairs become plain ReLUs, which changes the float
function where activations exceeded 6, and the fine-tuning that follows (paper §4.2)
adapts to it. No maintained Keras library implements DFQ (tfmot, qkeras and larq do
not; AIMET and Qualcomm's reference are PyTorch), so it is written here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import tensorflow as tf

from tf_pfq.canonical import canonicalize
from tf_pfq.compat import keras
from tf_pfq.graph import LayerGraph, rebuild
from tf_pfq.layers.table import Family, Kernel, by_name, family_named

__all__ = [
    "DfqReport",
    "absorb_high_biases",
    "correct_biases",
    "cross_layer_equalize",
    "dfq",
    "equalization_scales",
    "equalize_pair",
    "find_equalization_pairs",
    "quantize_weights",
]


# The layers CLE rescales: a kernel whose output channels are its last axis
# (Conv2DTranspose, whose kernel is (kh, kw, out, in), is not rescaled).
_WEIGHTED = frozenset([Family.CONV, Family.DEPTHWISE_CONV, Family.DENSE])
# What may sit between the two layers of a pair ending in a Dense layer (no Flatten;
# of the dropout family only Dropout gets between a pair: its entry alone has `cle`).
_BEFORE_DENSE = frozenset(
    [
        Family.GLOBAL_POOL_AVERAGE,
        Family.GLOBAL_POOL_MAX,
        Family.RELU,
        Family.ACTIVATION,
        Family.DROPOUT,
    ]
)


def _is_weighted(class_name: str) -> bool:
    """A layer CLE can rescale (`_WEIGHTED`).

    Matched on the exact class name (a subclass may compute something else).
    """
    return family_named(class_name) in _WEIGHTED


def _passes_scales(class_name: str) -> bool:
    """A per-channel positive scale passes through the layer unchanged (f(s x) = s f(x))."""
    entry = by_name(class_name)
    return entry is not None and entry.cle


def equalization_scales(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """Nagel et al. eq. 9: `s_i = sqrt(r1_i / r2_i)`, 1 where a range is 0.

    Args:
      r1: per-channel ranges of the first layer's output channels.
      r2: per-channel ranges of the second layer's matching input channels.

    Returns:
      The scales `s` (float32) that make `r1 / s == r2 * s`.

    Example:
      >>> equalization_scales(np.array([4.0, 1.0, 0.0]), np.array([1.0, 4.0, 2.0])).tolist()
      [2.0, 0.5, 1.0]
    """
    r1 = np.asarray(r1, np.float64)
    r2 = np.asarray(r2, np.float64)
    ok = (r1 > 0) & (r2 > 0)
    s = np.ones_like(r1)
    s[ok] = np.sqrt(r1[ok] / r2[ok])
    return s.astype(np.float32)


def _layout(kind: str) -> Kernel:
    if not _is_weighted(kind):
        raise ValueError(
            f"DFQ rescales Conv2D, DepthwiseConv2D and Dense kernels; received kind={kind!r}."
        )
    kernel = by_name(kind).kernel  # type: ignore[union-attr]
    assert kernel is not None
    return kernel


def _output_axis_view(kernel: np.ndarray, kind: str) -> np.ndarray:
    """The kernel with output channels on the last axis, flattened to (-1, out)."""
    if _layout(kind).depthwise:  # output channel c * mult + m is kernel[..., c, m]
        return kernel.reshape(-1, kernel.shape[-2] * kernel.shape[-1])
    return kernel.reshape(-1, kernel.shape[-1])


def _input_channel_ranges(kernel: np.ndarray, kind: str) -> np.ndarray:
    in_axis = kernel.ndim + _layout(kind).in_axis
    return np.abs(kernel).max(axis=tuple(a for a in range(kernel.ndim) if a != in_axis))


def _along_input_axis(s: np.ndarray, kernel: np.ndarray, kind: str) -> np.ndarray:
    shape = [1] * kernel.ndim
    shape[_layout(kind).in_axis] = -1
    return s.reshape(shape)


def _scale_input_channels(kernel: np.ndarray, kind: str, s: np.ndarray) -> np.ndarray:
    return kernel * _along_input_axis(s, kernel, kind)


def equalize_pair(w1, b1, kind1: str, w2, kind2: str):
    """Equalizes one pair: layer 1's output channels with layer 2's input channels.

    Args:
      w1: kernel of the first layer (Conv2D HWIO, DepthwiseConv2D HWC1, Dense IO).
      b1: its bias (output channels).
      kind1: "Conv2D", "DepthwiseConv2D" (multiplier 1) or "Dense".
      w2: kernel of the second layer, whose input channels match w1's outputs.
      kind2: its class name.

    Returns:
      (w1 / s, b1 / s, w2 * s, s) with `s` from `equalization_scales` on the
      per-channel absolute maxima.

    Example:
      >>> w1 = np.array([[4.0, 1.0]]); w2 = np.array([[1.0], [4.0]])
      >>> a, b, c, s = equalize_pair(w1, np.zeros(2), "Dense", w2, "Dense")
      >>> a.tolist(), c.ravel().tolist()
      ([[2.0, 2.0]], [2.0, 2.0])
    """
    w1 = np.asarray(w1, np.float32)
    w2 = np.asarray(w2, np.float32)
    r1 = np.abs(_output_axis_view(w1, kind1)).max(axis=0)
    r2 = _input_channel_ranges(w2, kind2)
    if r1.shape != r2.shape:
        raise ValueError(
            f"Channel mismatch: first layer has {r1.shape[0]} output channels, second has "
            f"{r2.shape[0]} input channels."
        )
    s = equalization_scales(r1, r2)
    if _layout(kind1).depthwise:  # multiplier 1: output channel c is input channel c
        new_w1 = w1 / _along_input_axis(s, w1, kind1)
    else:
        new_w1 = w1 / s
    return (
        new_w1,
        np.asarray(b1, np.float32) / s,
        _scale_input_channels(w2, kind2, s),
        s,
    )


def _is_relu_like(graph: LayerGraph, name: str, replace_relu6: bool) -> tuple[bool, bool]:
    """(positively homogeneous, needs ReLU6 -> ReLU) for a layer between a pair."""
    cls = graph.class_name(name)
    config = graph.layer_config(name)["config"]
    family = family_named(cls)
    if family is Family.RELU:
        plain = (
            config.get("max_value") is None
            and not config.get("negative_slope")
            and not config.get("threshold")
        )
        if plain:
            return True, False
        if config.get("max_value") is not None and not config.get("negative_slope"):
            return replace_relu6, replace_relu6
        return False, False
    if family is Family.ACTIVATION:
        if config["activation"] in ("relu", "linear"):
            return True, False
        if config["activation"] == "relu6":
            return replace_relu6, replace_relu6
        return False, False
    return _passes_scales(cls), False


def find_equalization_pairs(model, replace_relu6: bool = True):
    """Pairs (first, second, [layers between]) that CLE can rescale exactly.

    The first layer's output must reach exactly one weighted layer through a chain of
    single-consumer, positively homogeneous layers (ReLU, pooling, dropout); a layer
    feeding an Add, a model output or several consumers is left alone.

    Raises:
      ValueError: the model still contains BatchNormalization (fold it first).
    """
    model = canonicalize(model)
    graph = LayerGraph(model)
    for name in graph.order:
        if family_named(graph.class_name(name)) is Family.BATCHNORM:
            raise ValueError(
                f"DFQ works on a BN-folded model; layer {name!r} is BatchNormalization. "
                "Call `tf_pfq.fold_batchnorm` first."
            )
    pairs = []
    for name in graph.order:
        family = family_named(graph.class_name(name))
        if family not in (Family.CONV, Family.DEPTHWISE_CONV) or graph.is_shared(name):
            continue
        if (
            family is Family.DEPTHWISE_CONV
            and graph.layer_config(name)["config"].get("depth_multiplier", 1) != 1
        ):
            continue
        between, current, ok = [], name, True
        while True:
            consumers = graph.consumers_of(current)
            if len(consumers) != 1 or graph.is_output(current):
                ok = False
                break
            nxt = consumers[0]
            if _is_weighted(graph.class_name(nxt)):
                break
            homogeneous, _ = _is_relu_like(graph, nxt, replace_relu6)
            if not homogeneous or graph.is_shared(nxt):
                ok = False
                break
            between.append(nxt)
            current = nxt
        if not ok or graph.is_shared(nxt):
            continue
        if family_named(graph.class_name(nxt)) is Family.DENSE and any(
            family_named(graph.class_name(b)) not in _BEFORE_DENSE for b in between
        ):
            continue
        pairs.append((name, nxt, between))
    return pairs


def _weights_with_bias(layer) -> list[np.ndarray]:
    values = layer.get_weights()
    if not layer.use_bias:
        raise ValueError(
            f"Layer {layer.name!r} has no bias; DFQ needs the biases of a BN-folded model "
            "(`tf_pfq.fold_batchnorm` gives every folded layer one)."
        )
    return values


def cross_layer_equalize(
    model, iterations: int = 20, replace_relu6: bool = True, tolerance: float = 1e-4
):
    """Nagel et al. §4.1 cross-layer equalization on every pair, iterated to a fixpoint.

    Args:
      model: a BN-folded Functional/Sequential tf_keras model (not modified).
      iterations: maximum sweeps over all pairs (each sweep equalizes in turn; a
        layer in two pairs needs several sweeps, Nagel §4.1).
      replace_relu6: turn ReLU6 between a pair into ReLU (Nagel §5); with False such
        pairs are skipped.
      tolerance: stop when no scale differs from 1 by more than this.

    Returns:
      (new model, list of equalized (first, second) layer names).

    Example:
      >>> x = keras.Input((4, 4, 2))
      >>> y = keras.layers.Conv2D(3, 1, name="a")(x)
      >>> y = keras.layers.ReLU(name="r")(y)
      >>> y = keras.layers.Conv2D(2, 1, name="b")(y)
      >>> _, pairs = cross_layer_equalize(keras.Model(x, y))
      >>> pairs
      [('a', 'b')]
    """
    model = canonicalize(model)
    pairs = find_equalization_pairs(model, replace_relu6)
    weights = {}
    for first, second, _ in pairs:
        for name in (first, second):
            if name not in weights:
                weights[name] = [np.array(v) for v in _weights_with_bias(model.get_layer(name))]
    graph = LayerGraph(model)
    for _ in range(iterations):
        largest = 0.0
        for first, second, _ in pairs:
            w1, b1 = weights[first][0], weights[first][1]
            w2 = weights[second][0]
            new_w1, new_b1, new_w2, s = equalize_pair(
                w1, b1, graph.class_name(first), w2, graph.class_name(second)
            )
            weights[first][0], weights[first][1] = new_w1, new_b1
            weights[second][0] = new_w2
            largest = max(largest, float(np.max(np.abs(s - 1.0))) if s.size else 0.0)
        if largest < tolerance:
            break
    configs = _relu6_replacements(graph, pairs, replace_relu6)
    new_model = rebuild(model, layer_configs=configs, weights=weights)
    return new_model, [(a, b) for a, b, _ in pairs]


def _relu6_replacements(graph: LayerGraph, pairs, replace_relu6: bool):
    configs = {}
    for _, _, between in pairs:
        for name in between:
            _, needs = _is_relu_like(graph, name, replace_relu6)
            if needs:
                config = dict(graph.layer_config(name)["config"])
                if family_named(graph.class_name(name)) is Family.RELU:
                    config["max_value"] = None
                else:
                    config["activation"] = "relu"
                configs[name] = config
    return configs


def _layer_outputs(model, names: list[str], data) -> dict[str, np.ndarray]:
    probe = keras.Model(model.inputs, [model.get_layer(n).output for n in names])
    outputs = probe.predict(data, verbose=0)
    if len(names) == 1:
        outputs = [outputs]
    return dict(zip(names, outputs))


def _kernel_sum(kernel: np.ndarray, kind: str, c: np.ndarray) -> np.ndarray:
    """Output change of a layer when a constant `c` per input channel is added (eq. 14)."""
    if _layout(kind).depthwise:
        return (kernel.sum(axis=(0, 1)) * c[:, None]).reshape(-1)
    # Sum over the taps, then over the input channels (Dense has a single tap).
    return c @ kernel.reshape(-1, *kernel.shape[-2:]).sum(axis=0)


def absorb_high_biases(model, calibration_data, num_std: float = 3.0):
    """Nagel et al. §4.2.1 high-bias absorption on the CLE pairs.

    For each pair joined only by ReLUs, `c_i = max(0, mean_i - num_std * std_i)` of the
    first layer's pre-activation output over `calibration_data` is subtracted from its
    bias and `W2 @ c` added to the second layer's bias. Exact wherever the
    pre-activation stays above `c_i` and, for a 'same' k x k second layer, away from
    the zero-padded border (as for PfQ's approximate absorption).

    Args:
      model: a BN-folded model whose activations between pairs are plain ReLU
        (run `cross_layer_equalize` first).
      calibration_data: images (array or batched dataset of images) for the statistics.
      num_std: Nagel's 3 (covers 99.865 % of a Gaussian pre-activation).

    Returns:
      (new model, {first layer name: number of channels with c > 0}).
    """
    model = canonicalize(model)
    graph = LayerGraph(model)
    pairs = [
        (a, b, between)
        for a, b, between in find_equalization_pairs(model, replace_relu6=False)
        if between
        and all(_is_plain_relu(graph, n) for n in between)
        and family_named(graph.class_name(b)) is not Family.DENSE
    ]
    if not pairs:
        return rebuild(model), {}
    outputs = _layer_outputs(model, [a for a, _, _ in pairs], calibration_data)
    weights: dict[str, list[np.ndarray]] = {}
    absorbed: dict[str, int] = {}
    for first, second, _ in pairs:
        out = outputs[first].reshape(-1, outputs[first].shape[-1]).astype(np.float64)
        c = np.maximum(0.0, out.mean(axis=0) - num_std * out.std(axis=0)).astype(np.float32)
        w1 = weights.get(first) or [np.array(v) for v in _weights_with_bias(graph.layer(first))]
        w2 = weights.get(second) or [np.array(v) for v in _weights_with_bias(graph.layer(second))]
        w1[1] = w1[1] - c
        w2[1] = w2[1] + _kernel_sum(w2[0], graph.class_name(second), c)
        weights[first], weights[second] = w1, w2
        absorbed[first] = int(np.count_nonzero(c))
    return rebuild(model, weights=weights), absorbed


def _is_plain_relu(graph: LayerGraph, name: str) -> bool:
    homogeneous, needs = _is_relu_like(graph, name, False)
    family = family_named(graph.class_name(name))
    return (
        homogeneous
        and not needs
        and family in (Family.RELU, Family.ACTIVATION)
        and (family is Family.RELU or graph.layer_config(name)["config"]["activation"] == "relu")
    )


def quantize_weights(kernel: np.ndarray, num_bits: int) -> np.ndarray:
    """Per-tensor min/max fake quantization (paper eq. 20, 2^n levels, TF's nudging).

    Example:
      >>> quantize_weights(np.array([-1.0, 0.1, 0.6, 2.0]), 2).tolist()
      [-1.0, 0.0, 1.0, 2.0]
    """
    kernel = np.asarray(kernel, np.float32)
    lo = min(float(kernel.min()), 0.0)
    hi = max(float(kernel.max()), 0.0)
    return tf.quantization.fake_quant_with_min_max_vars(
        tf.constant(kernel), lo, hi, num_bits=num_bits
    ).numpy()


def correct_biases(model, calibration_data, weight_bits: int, layers: Iterable[str] | None = None):
    """Nagel et al. §4.2 empirical bias correction for `weight_bits` weights.

    Layer by layer in topological order, the bias absorbs the mean output error
    `E[y_q] - E[y]` per output channel, where `y` is the float model's output of that
    layer and `y_q` the output of the same layer in the model with *all* weights
    quantized and the upstream biases already corrected. This is Nagel's empirical
    variant (their appendix); the analytic one needs the BN statistics a folded
    model no longer has. On the calibration data the quantized model's per-channel
    output means then equal the float model's at every corrected layer.

    Args:
      model: a model whose Conv2D/DepthwiseConv2D/Dense layers have biases.
      calibration_data: images (array or batched dataset of images).
      weight_bits: the bit width the weights will be quantized to (per tensor).
      layers: names to correct (default: every weighted layer with a bias).

    Returns:
      (new float model, {layer name: max |bias change|}).
    """
    model = canonicalize(model)
    graph = LayerGraph(model)
    weighted = [
        n
        for n in graph.order
        if _is_weighted(graph.class_name(n)) and graph.layer(n).use_bias and not graph.is_shared(n)
    ]
    layers = weighted if layers is None else [n for n in graph.order if n in set(layers)]
    if not layers:
        return rebuild(model), {}
    float_means = {
        name: out.reshape(-1, out.shape[-1]).mean(axis=0)
        for name, out in _layer_outputs(model, layers, calibration_data).items()
    }
    quantized = rebuild(
        model,
        weights={
            n: [
                quantize_weights(graph.layer(n).get_weights()[0], weight_bits),
                graph.layer(n).get_weights()[1],
            ]
            for n in weighted
        },
    )
    weights, changes = {}, {}
    for name in layers:
        probe = keras.Model(quantized.inputs, quantized.get_layer(name).output)
        out = probe.predict(calibration_data, verbose=0)
        shift = out.reshape(-1, out.shape[-1]).mean(axis=0) - float_means[name]
        layer = quantized.get_layer(name)
        q_kernel, bias = layer.get_weights()
        layer.set_weights([q_kernel, bias - shift])
        weights[name] = [graph.layer(name).get_weights()[0], bias - shift]
        changes[name] = float(np.max(np.abs(shift))) if shift.size else 0.0
    return rebuild(model, weights=weights), changes


@dataclasses.dataclass
class DfqReport:
    """What `dfq` did: equalized pairs, channels with absorbed bias, bias corrections."""

    equalized_pairs: list[tuple[str, str]]
    absorbed_channels: dict[str, int]
    bias_corrections: dict[str, float]

    def to_dict(self):
        return dataclasses.asdict(self)


def dfq(
    model,
    calibration_data,
    weight_bits: int = 8,
    *,
    equalize: bool = True,
    absorb_bias: bool = True,
    correct_bias: bool = True,
    replace_relu6: bool = True,
    iterations: int = 20,
):
    """Nagel et al. 2019 data-free quantization preprocessing of a BN-folded model.

    Runs cross-layer equalization, high-bias absorption and (empirical) bias
    correction for `weight_bits`-bit per-tensor weights, in that order (Nagel §5).

    Args:
      model: a BN-folded tf_keras model (see `tf_pfq.fold_batchnorm`); not modified.
      calibration_data: images for the absorption and correction statistics.
      weight_bits: target weight bit width for bias correction.
      equalize: run cross-layer equalization.
      absorb_bias: run high-bias absorption.
      correct_bias: run bias correction.
      replace_relu6: let CLE turn ReLU6 into ReLU between pairs.
      iterations: CLE sweeps.

    Returns:
      (new float model, DfqReport).

    Raises:
      ValueError: the model has BatchNormalization layers or weighted layers without bias.

    Example:
      >>> x = keras.Input((4, 4, 2))
      >>> y = keras.layers.Conv2D(3, 1, name="a")(x)
      >>> y = keras.layers.ReLU(name="r")(y)
      >>> y = keras.layers.Conv2D(2, 1, name="b")(y)
      >>> _, report = dfq(keras.Model(x, y), np.ones((2, 4, 4, 2), np.float32), 4)
      >>> report.equalized_pairs
      [('a', 'b')]
    """
    pairs: list[tuple[str, str]] = []
    absorbed: dict[str, int] = {}
    corrections: dict[str, float] = {}
    out = model = canonicalize(model)
    if equalize:
        out, pairs = cross_layer_equalize(out, iterations, replace_relu6)
    else:
        find_equalization_pairs(out)  # validates: no BN left
    if absorb_bias:
        out, absorbed = absorb_high_biases(out, calibration_data)
    if correct_bias:
        out, corrections = correct_biases(out, calibration_data, weight_bits)
    if out is model:
        out = rebuild(model)
    return out, DfqReport(pairs, absorbed, corrections)
