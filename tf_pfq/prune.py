"""PfQ: filter pre-pruning of dead BatchNormalization channels (paper §3.1-3.2).

A BN channel whose moving variance is below the threshold of eq. 17 (by default
`DEFAULT_THRESHOLD`, 1e-5, or the layer's epsilon where that is smaller) outputs the
constant `beta_c`, and after the activation `a_c = act(beta_c)`. PfQ removes the
channel from its producer and absorbs `a_c` into every layer that reads it, so the
pruned model computes the same function with fewer filters. No maintained library
does this (tfmot's pruning zeroes weights by magnitude and keeps the shapes), so the
graph walk is written here; the arithmetic is in `tf_pfq.pfq_math`, and what each
layer class does to channels in `tf_pfq.layers.table`.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from tf_pfq import cost, pfq_math
from tf_pfq.compat import keras
from tf_pfq.graph import LayerGraph, call_kwargs, rebuild
from tf_pfq.layers import op_name, split_separable
from tf_pfq.layers.table import Absorb, Channels, LayerEntry, entry_for
from tf_pfq.ranges import ACTIVATION_RANGES_ATTR, ActivationRange, activation_ranges_of
from tf_pfq.report import CARRIER_REASON, LayerReport, PruneReport, abbreviate
from tf_pfq.validation import check_data

__all__ = ["DEFAULT_THRESHOLD", "prune"]

# The variance under which a BN channel is dead unless `threshold` says otherwise:
# the paper's eq. 17 with its framework's (NNabla's) BN epsilon. A default that
# changes the float model has to earn it by a better accuracy after fine-tuning; on
# Fashion-MNIST MobileNets (benchmarks/results/accuracy_fashion_mnist.md) each Keras
# layer's own epsilon (1e-3) removed 4x more weights but changed the logits by up to
# 3.8 and has not shown that gain, while 1e-5 changed them by float round-off.
DEFAULT_THRESHOLD = 1e-5

# What each layer class does to channels (producer, pass-through, merge, ...) and how
# a constant input channel crosses it is `tf_pfq.layers.table`'s `channels` and
# `absorb`; this module walks the graph with them.
_PASSES_BACK = frozenset([Absorb.BATCHNORM, Absorb.ZERO_PADDING, Absorb.IDENTITY])


PADDING_MODES = ("exact", "keep", "approximate")


@dataclasses.dataclass(frozen=True)
class _Entry:
    """A channel removed from a layer's output: its constant (None: unused, dead code).

    `pattern` is () while the channel holds `value` at every position. After zero
    padding it holds `value * S`, S a map (1 on the image, 0 on the padding, then
    what later spatial layers make of it) shared by every channel that crossed the
    same layers; `pattern` names those layers, and `binary` says S is still 0 / 1.
    """

    value: float | None
    sources: frozenset
    exact: bool = True
    pattern: tuple[str, ...] = ()
    binary: bool = True


@dataclasses.dataclass(frozen=True)
class _Carrier:
    """A kept dead channel that carries other constants past zero padding.

    `channel` of the carrier's tensor holds `value` wherever those constants hold
    theirs (same pattern), so a consumer reads `a_c` as `a_c / value` times it.
    """

    channel: int
    value: float
    sources: frozenset
    reason: str = CARRIER_REASON


@dataclasses.dataclass
class _Plan:
    removed: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(dict))
    requesters: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(set))
    deltas: dict = dataclasses.field(default_factory=dict)
    # {consumer: [(removed input channel, carrier input channel, a_c / a_carrier)]}
    merges: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    border: set = dataclasses.field(default_factory=set)
    failures: list = dataclasses.field(default_factory=list)

    def fail(self, sources, reason: str) -> None:
        self.failures.append((frozenset(sources), reason))

    def put(self, layer: str, channel: int, entry: _Entry) -> None:
        old = self.removed[layer].get(channel)
        if old is not None:
            # Two paths reach the same channel: the first constant wins (sources are
            # seeded first, so a dead BN keeps its beta); None never hides a constant.
            first = old if old.value is not None else entry
            entry = dataclasses.replace(
                first, sources=old.sources | entry.sources, exact=old.exact and entry.exact
            )
        self.removed[layer][channel] = entry


def _is_last_axis(axis, rank: int) -> bool:
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    return len(axes) == 1 and axes[0] % rank == rank - 1


def _channels_last(layer) -> bool:
    return getattr(layer, "data_format", "channels_last") == "channels_last"


def _is_linear(layer) -> bool:
    return keras.activations.serialize(layer.activation) == "linear"


def _apply(fn, values: np.ndarray) -> np.ndarray:
    out = fn(tf.constant(np.asarray(values, np.float32)[None, :]))
    return np.asarray(out, np.float64)[0]


class _Pruner:
    """Plans which channels go and how their constants are absorbed, then rebuilds."""

    def __init__(
        self,
        model,
        threshold,
        ranges: Mapping[str, ActivationRange],
        padding: str = "exact",
        absorb: bool = True,
    ):
        self.absorb_constants = absorb
        self.graph = LayerGraph(model)
        self.ranges = dict(ranges)
        self.threshold = threshold
        self.padding = padding
        # {(tensor, pattern): _Carrier}: chosen once, kept across re-plans.
        self.carriers: dict[tuple[str, tuple[str, ...]], _Carrier] = {}
        self._weights: dict[str, list[np.ndarray]] = {}

    # -- reading the model -------------------------------------------------------

    def weights(self, name: str) -> list[np.ndarray]:
        if name not in self._weights:
            self._weights[name] = self.graph.layer(name).get_weights()
        return self._weights[name]

    def bn_params(self, name: str) -> dict[str, Any]:
        layer = self.graph.layer(name)
        weights = list(self.weights(name))
        channels = weights[-1].shape[0]
        gamma = weights.pop(0) if layer.scale else np.ones(channels, np.float32)
        beta = weights.pop(0) if layer.center else np.zeros(channels, np.float32)
        mean, variance = weights
        return {
            "gamma": gamma,
            "beta": beta,
            "mean": mean,
            "variance": variance,
            "eps": layer.epsilon,
        }

    def single_input(self, name: str) -> str | None:
        inputs = self.graph.inputs_of(name)
        return inputs[0] if len(inputs) == 1 else None

    def channels(self, name: str) -> int:
        return int(self.graph.layer(name).output_shape[-1])

    def describe(self, name: str) -> str:
        return f"{self.graph.class_name(name)} {name!r}"

    def entry(self, name: str) -> LayerEntry:
        return entry_for(self.graph.layer(name))

    def unsupported(self, name: str) -> str | None:
        """Why constants cannot cross layer `name` (None when they can)."""
        graph = self.graph
        if graph.is_nested_model(name):
            return f"nested model {name!r} (not flattened)"
        if graph.is_shared(name):
            return f"shared layer {name!r} (called {graph.num_calls(name)} times)"
        if not _channels_last(graph.layer(name)):
            return f"{self.describe(name)} is channels_first"
        return None

    def dead_candidates(self) -> dict[str, np.ndarray]:
        candidates = {}
        for name in self.graph.order:
            layer = self.graph.layer(name)
            if self.entry(name).absorb is not Absorb.BATCHNORM:
                continue
            params = self.bn_params(name)
            if self.threshold is None:
                limit = min(params["eps"], DEFAULT_THRESHOLD)
            elif callable(self.threshold):
                limit = self.threshold(layer)
                if not np.isfinite(limit) or limit < 0:
                    raise ValueError(
                        f"`threshold` returned {limit!r} for layer {name!r}; it must be a "
                        "finite float >= 0."
                    )
            else:
                limit = self.threshold
            candidates[name] = pfq_math.dead_channels(params["variance"], float(limit))
        return candidates

    # -- planning ----------------------------------------------------------------

    def emit(
        self,
        plan: _Plan,
        name: str,
        channel: int,
        value: float | None,
        sources,
        exact,
        pattern: tuple[str, ...] = (),
        binary: bool = True,
    ) -> None:
        if value is None:
            # Unused channel (dead code): nothing to quantize or absorb downstream.
            plan.put(name, channel, _Entry(None, frozenset(sources), bool(exact)))
            return
        if name in self.ranges:
            # Stage A quantized this output: the channel is the quantized constant
            # (paper §3.2, last lines). Q(a S) = Q(a) S needs S in {0, 1} and Q(0) = 0.
            if pattern and not (binary and self.ranges[name].quantize(np.float32(0)) == 0):
                plan.fail(sources, f"zero padding before the quantized output {name!r}")
                return
            value = float(self.ranges[name].quantize(np.float32(value)))
        if value == 0:
            pattern, binary = (), True  # 0 * S is 0 everywhere
        entry = _Entry(float(value), frozenset(sources), bool(exact), tuple(pattern), binary)
        plan.put(name, channel, entry)

    def emit_entry(
        self,
        plan: _Plan,
        name: str,
        channel: int,
        value,
        entry: _Entry,
        *,
        exact: bool | None = None,
        pattern: tuple[str, ...] | None = None,
        binary: bool | None = None,
    ) -> None:
        """`emit` with `entry`'s sources, exactness and pattern unless given."""
        self.emit(
            plan,
            name,
            channel,
            value,
            entry.sources,
            entry.exact if exact is None else exact,
            entry.pattern if pattern is None else pattern,
            entry.binary if binary is None else binary,
        )

    def plan(self, accepted) -> _Plan:
        plan = _Plan()
        for bn, channel in sorted(accepted):
            # absorb=False: the removed channel is taken as 0, so nothing is compensated
            # (the paper's "PfQ w/o bias correction").
            beta = self.bn_params(bn)["beta"][channel] if self.absorb_constants else 0.0
            self.emit(plan, bn, channel, beta, {(bn, channel)}, True)
        for bn, channel in sorted(accepted):
            reason = self.unsupported(bn)
            layer = self.graph.layer(bn)
            if reason or not _is_last_axis(layer.axis, len(layer.input_shape)):
                plan.fail({(bn, channel)}, reason or f"BN {bn!r} does not normalize axis -1")
                continue
            self.request(plan, self.single_input(bn), channel, bn, {(bn, channel)})
        for name in self.graph.order:
            self.forward(plan, name)
        for name, removed in plan.removed.items():
            if removed and len(removed) >= self.channels(name):
                # Keras layers need at least one channel: keep the last one.
                last = removed[max(removed)]
                plan.fail(last.sources, f"it is the last channel of {self.describe(name)}")
        for output in self.graph.outputs:
            for entry in plan.removed.get(output.layer, {}).values():
                plan.fail(entry.sources, f"the channel reaches model output {output.layer!r}")
        return plan

    def request(self, plan: _Plan, name: str | None, channel: int, by: str, sources) -> None:
        """Removes output `channel` of layer `name`, no longer read by layer `by`.

        The backward dead-code clean-up: exact, no compensation, and it continues
        through layers whose output channel c only depends on their input channel c.
        """
        if name is None:
            plan.fail(sources, f"{self.describe(by)} has several inputs")
            return
        plan.requesters[(name, channel)].add(by)
        if channel in plan.removed[name]:
            plan.put(name, channel, _Entry(None, frozenset(sources)))
            return
        plan.put(name, channel, _Entry(None, frozenset(sources)))
        layer = self.graph.layer(name)
        entry = self.entry(name)
        reason = self.unsupported(name)
        if reason:
            plan.fail(sources, f"its producer is a {reason}")
        elif entry.channels is Channels.DEPTHWISE:
            if layer.depth_multiplier != 1:
                plan.fail(sources, f"{self.describe(name)} has depth_multiplier > 1")
            else:
                self.request(plan, self.single_input(name), channel, name, sources)
        elif entry.channels is Channels.PRODUCER:
            # One filter (kernel[..., o], or kernel[:, :, o, :] when transposed) can go.
            if _is_grouped(layer, entry):
                plan.fail(sources, f"{self.describe(name)} is a grouped convolution")
        elif entry.channels is Channels.PASS_THROUGH and (
            entry.absorb in _PASSES_BACK or self.elementwise(name)
        ):
            self.request(plan, self.single_input(name), channel, name, sources)
        elif entry.channels is Channels.MERGE:
            # Output channel c reads channel c of every input (hard-swish, residual):
            # it goes when each input can drop c; a broadcast input cannot.
            shapes = layer.input_shape
            if any(shape[-1] != layer.output_shape[-1] for shape in shapes):
                plan.fail(sources, f"{self.describe(name)} broadcasts an input")
                return
            for inbound in self.graph.inputs_of(name):
                self.request(plan, inbound, channel, name, sources)
        elif entry.channels is Channels.CONCAT and _is_last_axis(layer.axis, 4):
            offset = 0
            for inbound, shape in zip(self.graph.inputs_of(name), layer.input_shape):
                if channel < offset + shape[-1]:
                    self.request(plan, inbound, channel - offset, name, sources)
                    return
                offset += shape[-1]
        else:
            plan.fail(sources, f"its producer {self.describe_op(name)} cannot drop channels")

    def elementwise(self, name: str) -> bool:
        return self.elementwise_fn(name) is not None

    def elementwise_fn(self, name: str) -> Callable | None:
        """The per-channel function layer `name` computes, or None when it is not one."""
        entry = self.entry(name)
        if entry.absorb is not Absorb.FUNCTION or entry.elementwise is None:
            return None
        if len(self.graph.inputs_of(name)) != 1:
            return None
        return entry.elementwise(self.graph.layer(name), call_kwargs(self.graph.layer_config(name)))

    def describe_op(self, name: str) -> str:
        op = op_name(self.graph.layer(name))
        return f"op {op!r} in {name!r}" if op else self.describe(name)

    def forward(self, plan: _Plan, name: str) -> None:
        """Carries constant channels across layer `name`, or absorbs them into it."""
        inputs = self.graph.inputs_of(name)
        entries = [plan.removed.get(inbound, {}) for inbound in inputs]
        if not any(entries):
            return
        for inbound, removed in zip(inputs, entries):
            for channel, entry in removed.items():
                if entry.value is None and name not in plan.requesters[(inbound, channel)]:
                    plan.fail(
                        entry.sources,
                        f"{self.describe(name)} still reads channel {channel} of {inbound!r}",
                    )
        const = [{c: e for c, e in removed.items() if e.value is not None} for removed in entries]
        if not any(const):
            return
        all_sources = frozenset().union(*(e.sources for r in const for e in r.values()))
        reason = self.unsupported(name)
        if reason:
            plan.fail(all_sources, f"the constant reaches a {reason}")
            return
        absorb = self.entry(name).absorb
        if absorb is Absorb.CONCAT:
            self.concatenate(plan, name, const)
        elif absorb is Absorb.SUM:
            self.add(plan, name, const)
        elif absorb is Absorb.PRODUCT:
            self.add(plan, name, const, product=True)
        elif len(const) != 1:
            plan.fail(
                all_sources,
                f"the constant reaches {self.describe_op(name)}, not supported",
            )
        else:
            self.single(plan, name, const[0])

    def single(self, plan: _Plan, name: str, const: dict[int, _Entry]) -> None:
        layer = self.graph.layer(name)
        entry = self.entry(name)
        absorb = entry.absorb
        if absorb is Absorb.DEPTHWISE:
            self.depthwise(plan, name, const)
        elif absorb is Absorb.TRANSPOSED_KERNEL_SUM:
            self.absorb_transpose(plan, name, const)
        elif absorb is Absorb.KERNEL_SUM:
            if _is_grouped(layer, entry):
                plan.fail(_union(const), f"{self.describe(name)} is a grouped convolution")
                return
            self.absorb(plan, name, const, _has_border(layer))
        elif absorb is Absorb.BATCHNORM:
            if not _is_last_axis(layer.axis, len(layer.input_shape)):
                plan.fail(_union(const), f"BN {name!r} does not normalize the last axis")
                return
            self.batchnorm(plan, name, const)
        elif self.elementwise(name):
            self.function(plan, name, const)
        elif absorb is Absorb.IDENTITY:
            self.identity(plan, name, const)
        elif absorb is Absorb.ZERO_PADDING:
            self.zero_padding(plan, name, const)
        elif absorb is Absorb.FLATTEN or (
            absorb is Absorb.RESHAPE and len(layer.target_shape) == 1
        ):
            # Each row would need its own share of S: only uniform constants.
            const = self.refuse_border(plan, name, const)
            shape = layer.input_shape[1:]
            for c in sorted(const):
                for row in pfq_math.flatten_indices(shape, c):
                    e = const[c]
                    self.emit(plan, name, int(row), e.value, e.sources, e.exact)
        elif absorb is Absorb.RESHAPE and layer.target_shape[-1] == layer.input_shape[-1]:
            for c, e in const.items():  # moves positions alike in every channel
                pattern = (*e.pattern, name) if e.pattern else ()
                self.emit_entry(plan, name, c, e.value, e, pattern=pattern)
        else:
            plan.fail(
                _union(const),
                f"the constant reaches {self.describe_op(name)}, not supported",
            )

    def batchnorm(self, plan: _Plan, name: str, const: dict[int, _Entry]) -> None:
        # gamma (a S - mu) / s + beta is no multiple of S: only uniform constants cross.
        const = self.refuse_border(plan, name, const)
        channels = sorted(const)
        p = self.bn_params(name)
        out = pfq_math.batchnorm_inference(
            [const[c].value for c in channels], p["gamma"][channels], p["beta"][channels],
            p["mean"][channels], p["variance"][channels], p["eps"],
        )  # fmt: skip
        self.emit_all(plan, name, const, out)

    def max_pools_hide_padding(self, name: str) -> bool:
        """Whether only max poolings read ZeroPadding2D `name`, each window on a real position."""
        consumers = self.graph.consumers_of(name)
        if not consumers or self.graph.is_output(name):
            return False
        (top, bottom), (left, right) = self.graph.layer(name).padding
        height, width = self.graph.layer(name).input_shape[1:3]
        for consumer in consumers:
            pool = self.graph.layer(consumer)
            if type(pool) is not keras.layers.MaxPooling2D or self.unsupported(consumer):
                return False
            for size, before, after, k, s in (
                (height, top, bottom, pool.pool_size[0], pool.strides[0]),
                (width, left, right, pool.pool_size[1], pool.strides[1]),
            ):
                if size is None or not pfq_math.windows_hold_real(
                    size, before, after, k, s, pool.padding
                ):
                    return False
        return True

    def emit_all(self, plan, name, const, values, exact=None) -> None:
        for k, c in enumerate(sorted(const)):
            ok = const[c].exact and (exact is None or exact[k])
            self.emit_entry(plan, name, c, values[k], const[c], exact=ok)

    def refuse_border(self, plan: _Plan, name: str, const: dict[int, _Entry]) -> dict:
        """Keeps the channels of `const` whose zero-padded border layer `name` would
        not leave a multiple of one shared map; returns the others."""
        bad = {c: e for c, e in const.items() if e.pattern}
        if bad:
            layers = sorted({layer.split(":")[0] for e in bad.values() for layer in e.pattern})
            plan.fail(
                _union(bad),
                f"zero padding in {', '.join(repr(n) for n in layers)} before "
                f"{self.describe_op(name)}, which does not keep the border a multiple",
            )
        return {c: e for c, e in const.items() if c not in bad}

    def function(self, plan: _Plan, name: str, const: dict[int, _Entry]) -> None:
        """An elementwise f: `f(a S) = f(a) S` when S is 0 / 1 and `f(0) = 0`."""
        fn = self.elementwise_fn(name)
        if any(e.pattern for e in const.values()):
            zero = float(_apply(fn, np.zeros(1))[0])
            bad = {c: e for c, e in const.items() if e.pattern and not (e.binary and zero == 0)}
            self.refuse_border(plan, name, bad)
            const = {c: e for c, e in const.items() if c not in bad}
        channels = sorted(const)
        values = _apply(fn, np.array([const[c].value for c in channels]))
        self.emit_all(plan, name, const, values)

    def identity(self, plan: _Plan, name: str, const: dict[int, _Entry]) -> None:
        """Dropout, pooling, cropping: a constant stays; a border S becomes S' alike."""
        layer = self.graph.layer(name)
        spatial = not isinstance(layer, _POINTWISE_IDENTITIES)
        for c in sorted(const):
            e = const[c]
            pattern, binary = e.pattern, e.binary
            if pattern and spatial:
                if isinstance(layer, _MAX_POOLS):
                    # max over a window of a S is a max(S) for a > 0, a min(S) for a < 0.
                    pattern += (f"{name}:{'max' if _value(e) > 0 else 'min'}",)
                else:
                    pattern += (name,)  # cropping and averaging: linear, alike per channel
                    binary = binary and isinstance(layer, keras.layers.Cropping2D)
            self.emit_entry(plan, name, c, e.value, e, pattern=pattern, binary=binary)

    def zero_padding(self, plan: _Plan, name: str, const: dict[int, _Entry]) -> None:
        """ZeroPadding2D: 0 on the border, not the constant.

        Exact wherever `a_c == 0`, or where only max poolings read the padding, each
        window on a real position, and `a_c > 0` (max(a_c, 0) = a_c, ResNet's stem).
        Otherwise the exact mode carries `a_c S` on to a consumer that merges it into
        a carrier; the other modes treat the border as an error of the interior fit.
        """
        hidden = self.max_pools_hide_padding(name)
        for c in sorted(const):
            e = const[c]
            if e.value == 0 or (hidden and _value(e) > 0 and not e.pattern):
                self.emit_entry(plan, name, c, e.value, e)
            elif self.padding == "exact":
                self.emit_entry(plan, name, c, e.value, e, pattern=(*e.pattern, name))
            else:
                self.inexact(plan, name, e.sources)
                self.emit_entry(plan, name, c, e.value, e, exact=False)

    def inexact(self, plan: _Plan, name: str, sources) -> None:
        """Notes a border effect at layer `name` (padding="approximate") or keeps the
        channel (padding="keep")."""
        if self.padding == "keep":
            plan.fail(sources, f"zero padding in {self.describe(name)} (padding='keep')")
        else:
            plan.border.add(name)

    def absorb(self, plan: _Plan, name: str, const: dict[int, _Entry], border: bool) -> None:
        kernel = self.weights(name)[0]
        taps = _real_taps(self.graph.layer(name)) if border else None
        if taps is not None:
            kernel, border = kernel[taps], False
        if self.padding == "exact":
            # The bias is exact for a uniform constant away from padding; the rest
            # goes into a carrier, exact at the border too.
            carried = {c: e for c, e in const.items() if e.value != 0 and (border or e.pattern)}
            self.carry(plan, name, carried)
            const = {c: e for c, e in const.items() if c not in carried}
        channels = sorted(const)
        values = np.array([const[c].value for c in channels])
        delta = pfq_math.input_constant_delta(kernel, channels, values)
        plan.deltas[name] = plan.deltas.get(name, 0.0) + delta
        if border:
            for c in channels:
                if const[c].value != 0:
                    self.inexact(plan, name, const[c].sources)

    def absorb_transpose(self, plan: _Plan, name: str, const: dict[int, _Entry]) -> None:
        """Conv2DTranspose: output o gains `a_c * sum_{u,v} W[u, v, o, c]` where all taps land.

        With stride 1 that is the interior (the border sees fewer taps, as with zero
        padding). With a larger stride each output position sees its own subset of
        taps, so a non-zero constant gives a periodic pattern, not one value per
        channel. Both are linear in the input, alike for every channel, so the exact
        mode merges such constants into a carrier; the other modes keep a channel
        under a stride > 1 and take the interior for stride 1.
        """
        layer = self.graph.layer(name)
        live = {c: e for c, e in const.items() if e.value != 0}
        spread = any(k > 1 for k in layer.kernel_size) or any(s > 1 for s in layer.strides)
        if self.padding == "exact":
            carried = {c: e for c, e in live.items() if spread or e.pattern}
            self.carry(plan, name, carried)
            const = {c: e for c, e in const.items() if c not in carried}
            live = {c: e for c, e in live.items() if c not in carried}
        elif live and any(s > 1 for s in layer.strides):
            plan.fail(_union(live), f"{self.describe(name)} has stride > 1 (periodic taps)")
            return
        kernel = np.swapaxes(self.weights(name)[0], -1, -2)  # (kh, kw, in, out)
        channels = sorted(const)
        values = np.array([const[c].value for c in channels])
        delta = pfq_math.input_constant_delta(kernel, channels, values)
        plan.deltas[name] = plan.deltas.get(name, 0.0) + delta
        if any(k > 1 for k in layer.kernel_size):
            for c in live:
                self.inexact(plan, name, live[c].sources)

    def depthwise(self, plan: _Plan, name: str, const: dict[int, _Entry]) -> None:
        """DepthwiseConv2D: input channel c feeds only outputs c * m + j, constant too.

        With zero padding (its own or before it) those outputs differ at the border,
        each by its own kernel, and no later layer can take that back: the exact mode
        keeps such a channel.
        """
        layer = self.graph.layer(name)
        kernel = self.weights(name)[0]
        bias = self.weights(name)[1] if layer.use_bias else None
        m = layer.depth_multiplier
        border = _has_border(layer)
        taps = _real_taps(layer) if border else None
        if taps is not None:
            kernel, border = kernel[taps], False
        if self.padding == "exact":
            bad = {c: e for c, e in const.items() if e.value != 0 and (border or e.pattern)}
            for e in bad.values():
                plan.fail(
                    e.sources,
                    f"zero padding in {self.describe(name)}: a depthwise conv keeps "
                    "each channel apart, so no carrier can take its border",
                )
            const = {c: e for c, e in const.items() if c not in bad}
        for c in sorted(const):
            entry = const[c]
            outs = _apply(
                layer.activation,
                pfq_math.depthwise_constant(kernel, bias, c, float(entry.value or 0.0)),
            )
            exact = entry.exact and not (border and entry.value != 0)
            if border and entry.value != 0:
                self.inexact(plan, name, entry.sources)
            for j in range(m):
                self.emit(plan, name, c * m + j, outs[j], entry.sources, exact)

    def carry(self, plan: _Plan, name: str, carried: dict[int, _Entry]) -> None:
        """Merges constants that meet zero padding into one carrier channel per pattern.

        Zero padding is linear, and so is the consumer: channel c reaching it as
        `a_c S` contributes exactly what `a_c / a_k` times a channel k holding `a_k S`
        (the same S) contributes. So one kept channel k per (tensor, S) carries all
        of them: its kernel slice becomes `W_k + sum_c (a_c / a_k) W_c`. The first
        time a group is met its carrier is picked and kept, and the plan is made
        again with it live; from then on the group merges into it.
        """
        inbound = self.single_input(name)
        assert inbound is not None  # convolutions and Dense have one input
        groups: dict = collections.defaultdict(dict)
        for c, e in carried.items():
            groups[e.pattern][c] = e
        for pattern, group in groups.items():
            key = (inbound, pattern)
            carrier = self.carriers.get(key)
            if carrier is None:
                carrier = self.pick_carrier(group)
                if carrier is None:
                    plan.fail(
                        _union(group),
                        f"zero padding in {self.describe(name)}: no channel can carry the "
                        "constant (a carrier needs a BN with gamma)",
                    )
                    continue
                reason = (
                    f"{CARRIER_REASON}: holds the removed constants that meet zero padding "
                    f"in {self.describe(name)}"
                )
                self.carriers[key] = dataclasses.replace(carrier, reason=reason)
                plan.fail(carrier.sources, reason)
                continue
            if carrier.channel in plan.removed.get(inbound, {}):
                plan.fail(_union(group), f"the carrier of {self.describe(name)} was removed")
                continue
            for c, e in group.items():
                plan.merges[name].append((c, carrier.channel, e.value / carrier.value))

    def pick_carrier(self, group: dict[int, _Entry]) -> _Carrier | None:
        """The channel of `group` with the largest |a|, so every ratio a_c / a_k is <= 1.

        A carrier must hold its constant exactly: its source BNs get gamma = 0 (their
        output is then beta in inference and training mode alike).
        """
        order = sorted(group, key=lambda c: (-abs(_value(group[c])), c))
        for c in order:
            e = group[c]
            if all(self.graph.layer(bn).scale for bn, _ in e.sources):
                return _Carrier(c, _value(e), e.sources)
        return None

    def concatenate(self, plan: _Plan, name: str, const) -> None:
        layer = self.graph.layer(name)
        if not _is_last_axis(layer.axis, len(layer.output_shape)):
            plan.fail(_union(*const), f"{self.describe(name)} does not join the last axis")
            return
        offset = 0
        for removed, shape in zip(const, layer.input_shape):
            for c, e in removed.items():
                self.emit_entry(plan, name, offset + c, e.value, e)
            offset += shape[-1]

    def add(self, plan: _Plan, name: str, const, product: bool = False) -> None:
        """Add (or Multiply): a channel stays constant when it is constant on every input.

        With zero-padded inputs `a S + b S = (a + b) S`, and a product has at most
        one factor with a border; anything else is no multiple of one map.
        """
        if any(not r for r in const):
            common: set = set()
        else:
            common = set.intersection(*(set(r) for r in const))
        for removed in const:
            for c, e in removed.items():
                if c not in common:
                    plan.fail(
                        e.sources,
                        f"{self.describe(name)} has a live channel on another branch",
                    )
        for c in sorted(common):
            entries = [r[c] for r in const]
            values = [e.value for e in entries]
            value = float(np.prod(values)) if product else sum(values)
            sources = frozenset().union(*(e.sources for e in entries))
            shaped = _combined_pattern(entries, product)
            if shaped is None:
                plan.fail(sources, f"zero padding on some inputs of {self.describe(name)} only")
                continue
            exact = all(e.exact for e in entries)
            self.emit(plan, name, c, value, sources, exact, *shaped)

    # -- rewriting ---------------------------------------------------------------

    def bn_after(self, name: str) -> str | None:
        """The BN that alone reads layer `name` (moving-mean shift target), if any."""
        consumers = self.graph.consumers_of(name)
        if len(consumers) != 1 or self.graph.is_output(name):
            return None
        bn = consumers[0]
        layer = self.graph.layer(bn)
        if (
            self.entry(bn).absorb is Absorb.BATCHNORM
            and not self.graph.is_shared(bn)
            and _is_last_axis(layer.axis, len(layer.input_shape))
            and _is_linear(self.graph.layer(name))
        ):
            return bn
        return None

    def rewrite(self, plan: _Plan):
        edits = _Edits()
        gammas, filters = self.carrier_edits()
        for name in self.graph.order:
            entry = self.entry(name)
            out_removed = set(plan.removed.get(name, {}))
            inbound = self.single_input(name)
            in_removed = set(plan.removed.get(inbound, {})) if inbound else set()
            zero = filters.get(name, set())
            if entry.channels is Channels.DEPTHWISE:
                self.rewrite_depthwise(edits, name, in_removed, out_removed, zero)
                if name in plan.border:
                    edits.notes[name].append(
                        "'same' padding: removed outputs were constant in the interior"
                    )
            elif entry.channels is Channels.PRODUCER:
                self.rewrite_producer(plan, edits, name, in_removed, out_removed, zero)
            elif entry.absorb is Absorb.BATCHNORM:
                self.rewrite_batchnorm(edits, name, out_removed, gammas.get(name, set()))
            elif entry.absorb is Absorb.RESHAPE and out_removed:
                config = self.graph.layer(name).get_config()
                target = list(config["target_shape"])
                target[-1] -= len(out_removed)
                config["target_shape"] = tuple(target)
                edits.configs[name] = config
        model = rebuild(self.graph.model, layer_configs=edits.configs, weights=edits.weights)
        return model, edits.notes

    def carrier_edits(self) -> tuple[dict, dict]:
        """({BN: channels whose gamma becomes 0}, {producer: filters that become 0}).

        gamma = 0 makes a carrier's BN output exactly beta in inference and in
        training mode, whatever reaches it; zeroing the filter that feeds it (when
        the BN alone reads that producer) keeps its folded weights at 0, so a
        carrier widens no weight range in stage A or after folding.
        """
        gammas: dict = collections.defaultdict(set)
        filters: dict = collections.defaultdict(set)
        for carrier in self.carriers.values():
            for bn, channel in carrier.sources:
                gammas[bn].add(channel)
                producer = self.single_input(bn)
                if producer is not None and self.feeds_only(producer, bn):
                    filters[producer].add(channel)
        return gammas, filters

    def feeds_only(self, producer: str, bn: str) -> bool:
        entry = self.entry(producer)
        return (
            set(self.graph.consumers_of(producer)) == {bn}
            and not self.graph.is_output(producer)
            and entry.channels in (Channels.PRODUCER, Channels.DEPTHWISE)
            and not _is_grouped(self.graph.layer(producer), entry)
            and self.unsupported(producer) is None
        )

    def rewrite_depthwise(self, edits, name: str, in_removed, out_removed, zero) -> None:
        if not (in_removed or out_removed or zero):
            return
        layer = self.graph.layer(name)
        w = [np.copy(v) for v in self.weights(name)]
        m = layer.depth_multiplier
        for channel in sorted(zero):
            w[0][:, :, channel // m, channel % m] = 0.0
        if zero:
            edits.notes[name].append(f"filters {abbreviate(zero)} zeroed: they fed carriers")
        keep_in = pfq_math.keep_indices(w[0].shape[2], in_removed)
        w[0] = w[0][:, :, keep_in, :]
        if layer.use_bias:
            w[1] = w[1][pfq_math.keep_indices(w[1].shape[0], out_removed)]
        edits.weights[name] = w

    def rewrite_producer(self, plan, edits, name: str, in_removed, out_removed, zero) -> None:
        layer, entry = self.graph.layer(name), self.entry(name)
        delta = plan.deltas.get(name, np.zeros(0))
        has_delta = bool(np.any(delta != 0))
        merges = plan.merges.get(name, [])
        if not (in_removed or out_removed or has_delta or merges or zero):
            return
        config = layer.get_config()
        w = list(self.weights(name))
        kernel = w[0]
        bias = w[1].astype(np.float64) if layer.use_bias else None
        if has_delta:
            bias = self.absorb_delta(edits, name, config, bias, delta)
        if name in plan.border:
            edits.notes[name].append("'same' padding: exact in the interior only")
        layout = entry.kernel
        assert layout is not None  # producers have a kernel
        if merges:
            kernel = pfq_math.merge_into_carriers(kernel, layout.in_axis, merges)
            edits.notes[name].extend(_merge_notes(merges))
        if zero:
            kernel = np.copy(kernel)
            index: list[Any] = [slice(None)] * kernel.ndim
            index[layout.out_axis] = sorted(zero)
            kernel[tuple(index)] = 0.0
            edits.notes[name].append(f"filters {abbreviate(zero)} zeroed: they fed carriers")
        # Axes -1 / -2 are (out, in) or, for Conv2DTranspose, (in, out).
        keep_in = pfq_math.keep_indices(kernel.shape[layout.in_axis], in_removed)
        keep_out = pfq_math.keep_indices(kernel.shape[layout.out_axis], out_removed)
        w = [np.take(np.take(kernel, keep_in, layout.in_axis), keep_out, layout.out_axis)]
        if bias is not None:
            w.append(bias[keep_out].astype(np.float32))
        config["filters" if "filters" in config else "units"] = len(keep_out)
        edits.configs[name], edits.weights[name] = config, w

    def absorb_delta(self, edits, name: str, config, bias, delta):
        """Puts `delta` into the bias, else the next BN's moving mean, else a new bias."""
        layer = self.graph.layer(name)
        bn = None if layer.use_bias else self.bn_after(name)
        if bias is not None:
            edits.notes[name].append("bias += removed constants (eq. 14)")
            return bias + delta
        if bn is not None:
            edits.mean_shift[bn] = delta
            edits.notes[name].append(f"removed constants moved into {bn!r} moving mean")
            edits.notes[bn].append(f"moving_mean -= constants removed before {name!r}")
            return None
        config["use_bias"] = True
        edits.notes[name].append("bias enabled to hold removed constants (eq. 14)")
        return delta

    def rewrite_batchnorm(self, edits, name: str, out_removed, carriers) -> None:
        if not (out_removed or name in edits.mean_shift or carriers):
            return
        w = [np.copy(v) for v in self.weights(name)]
        if name in edits.mean_shift:
            w[-2] = pfq_math.shift_moving_mean(w[-2], edits.mean_shift[name]).astype(np.float32)
        if carriers:
            w[0][sorted(carriers)] = 0.0  # gamma: a carrier's BN has a scale
            edits.notes[name].append(
                f"gamma[{abbreviate(carriers)}] = 0: constant carriers, output beta exactly"
            )
        keep = pfq_math.keep_indices(w[-1].shape[0], out_removed)
        edits.weights[name] = [v[keep] for v in w]


@dataclasses.dataclass
class _Edits:
    """What `rewrite` changes: layer configs, weights, report notes, BN mean shifts."""

    configs: dict = dataclasses.field(default_factory=dict)
    weights: dict = dataclasses.field(default_factory=dict)
    notes: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    mean_shift: dict = dataclasses.field(default_factory=dict)


def _merge_notes(merges) -> list[str]:
    by_carrier: dict = collections.defaultdict(list)
    for channel, carrier, _ in merges:
        by_carrier[carrier].append(channel)
    return [
        f"input {k} carries the constants of inputs {abbreviate(cs)} past zero padding (exact)"
        for k, cs in sorted(by_carrier.items())
    ]


def _value(entry: _Entry) -> float:
    """The constant of an entry that has one (dead-code entries have None)."""
    assert entry.value is not None
    return entry.value


def _combined_pattern(entries, product: bool):
    """(pattern, binary) of a sum or product of constant channels; None when no one
    shared map S describes it (`a S + b` is not a multiple of S)."""
    if product and any(e.value == 0 for e in entries):
        return (), True
    shaped = [e for e in entries if e.pattern]
    if not shaped:
        return (), True
    if product:
        # (a S)(b S) is a b S^2: a multiple of S only for a 0 / 1 map; keep it simple.
        return (shaped[0].pattern, shaped[0].binary) if len(shaped) == 1 else None
    nonzero = [e for e in entries if e.value != 0]
    if len(shaped) == len(nonzero) and len({e.pattern for e in shaped}) == 1:
        return shaped[0].pattern, all(e.binary for e in shaped)
    return None


_POINTWISE_IDENTITIES = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout2D,
    keras.layers.GaussianDropout,
    keras.layers.GaussianNoise,
    keras.layers.AlphaDropout,
)
_MAX_POOLS = (
    keras.layers.MaxPooling1D,
    keras.layers.MaxPooling2D,
    keras.layers.GlobalMaxPooling1D,
    keras.layers.GlobalMaxPooling2D,
)


def _has_border(layer) -> bool:
    # Dense has no padding: no border.
    kernel_size = getattr(layer, "kernel_size", ())
    return getattr(layer, "padding", "valid") == "same" and any(k > 1 for k in kernel_size)


def _real_taps(layer) -> tuple[slice, slice] | None:
    """The kernel taps every output of a 'same' conv reads on real positions, if one set.

    Along an axis of input size 1 every output window has the image in the same tap,
    `(k - 1) // 2` (TF pads the smaller half before), so a constant channel adds the
    same `a_c * sum of those taps` everywhere: exact, no border effect. That is the
    common case of deep layers on small images (ResNet50 and DenseNet121 at 32x32
    end on 1x1 maps). Along a longer axis the windows see different taps: None.
    """
    if any(d != 1 for d in getattr(layer, "dilation_rate", (1, 1))):
        return None
    taps = []
    for size, k in zip(layer.input_shape[1:3], layer.kernel_size):
        if k == 1:
            taps.append(slice(None))
        elif size == 1:
            taps.append(slice((k - 1) // 2, (k - 1) // 2 + 1))
        else:
            return None
    return taps[0], taps[1]


def _is_grouped(layer, entry: LayerEntry) -> bool:
    return entry.absorb is Absorb.KERNEL_SUM and getattr(layer, "groups", 1) != 1


def _union(*consts) -> frozenset:
    return frozenset().union(*(e.sources for const in consts for e in const.values()))


def _batches(data):
    if isinstance(data, tf.data.Dataset):
        for batch in data:
            yield batch[0] if isinstance(batch, (tuple, list)) else batch
    else:
        yield data


def _max_output_change(model, pruned, data) -> float:
    worst = 0.0
    for x in _batches(data):
        before = tf.nest.flatten(model(x, training=False))
        after = tf.nest.flatten(pruned(x, training=False))
        for a, b in zip(before, after):
            worst = max(worst, float(np.max(np.abs(np.asarray(a) - np.asarray(b)))))
    return worst


def _check_threshold(threshold) -> None:
    if threshold is None or callable(threshold):
        return
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)):
        raise TypeError(
            "`threshold` must be None, a float or a callable(layer) -> float. Received: "
            f"threshold={threshold!r} of type {type(threshold).__name__}"
        )
    if not np.isfinite(threshold) or threshold < 0:
        raise ValueError(
            f"`threshold` must be a finite float >= 0. Received: threshold={threshold}"
        )


def _check_channel_multiple(channel_multiple) -> None:
    if channel_multiple is None:
        return
    if isinstance(channel_multiple, bool) or not isinstance(channel_multiple, (int, np.integer)):
        raise TypeError(
            "`channel_multiple` must be None or an integer >= 1. Received: "
            f"channel_multiple={channel_multiple!r} of type {type(channel_multiple).__name__}"
        )
    if channel_multiple < 1:
        raise ValueError(
            f"`channel_multiple` must be >= 1. Received: channel_multiple={channel_multiple}"
        )


def _padding_mode(padding, exact_only: bool | None) -> str:
    """The padding mode, from `padding` and the deprecated `exact_only`."""
    if not isinstance(padding, str):
        raise TypeError(
            f"`padding` must be one of {PADDING_MODES}. Received: padding={padding!r} of "
            f"type {type(padding).__name__}"
        )
    if padding not in PADDING_MODES:
        raise ValueError(f"`padding` must be one of {PADDING_MODES}. Received: {padding!r}")
    if exact_only is None:
        return padding
    warnings.warn(
        "`exact_only` is deprecated: prune is exact by default now (padding='exact'); "
        "exact_only=True is padding='keep', padding='approximate' is the former default.",
        DeprecationWarning,
        stacklevel=3,
    )
    if not exact_only:
        return padding
    if padding == "approximate":
        raise ValueError("`exact_only=True` contradicts padding='approximate'.")
    return "keep"


def _alignment_keeps(pruner: _Pruner, plan: _Plan, accepted, multiple: int) -> dict:
    """{source: reason} of dead channels to keep so that channel counts are multiples.

    For each Conv2D, Conv2DTranspose, Dense and DepthwiseConv2D that loses channels in
    `plan` and whose remaining count `n` is not a multiple of `multiple`, the
    highest-indexed removed channels are put back until `ceil(n / multiple) *
    multiple` remain (when the layer had that many). A channel is put back by keeping
    every source that removes it, which puts it back wherever those sources reach:
    layers whose channels are tied (a pointwise conv and the depthwise conv it feeds,
    the producers of one Add) lose the same channels and are aligned together, and
    the inputs of a Concatenate are aligned one by one, so their sum is aligned too.
    Keeping a source can make others fail (an Add then meets a live channel), and an
    entry may list only some of the sources that remove its channel (a backward
    request stops at a channel already removed), so `prune` plans again and calls
    this until nothing is left to put back; the next round sees the channel's other
    sources and picks it again. Counts land on the multiple, or past it when channels
    come back in larger steps (a depth multiplier above 1, an Add cascade), in which
    case the next multiple is aimed at.
    """
    keeps: dict = {}
    for name in pruner.graph.order:
        layer = pruner.graph.layer(name)
        removed = plan.removed.get(name, {})
        if not removed or entry_for(layer).channels not in (Channels.PRODUCER, Channels.DEPTHWISE):
            continue
        before = pruner.channels(name)
        after = before - len(removed)
        target = -(-after // multiple) * multiple
        if after % multiple == 0 or target > before:
            continue
        # No layer name: tied layers give the same text, so the report groups them.
        reason = (
            f"channel alignment: {target} of {before} channels stay, a multiple of "
            f"channel_multiple={multiple}"
        )
        # A channel comes back once every source that removes it is kept; a tied
        # layer aligned before may already have brought some back.
        back = {c for c, e in removed.items() if e.sources & accepted <= keeps.keys()}
        missing = max(0, target - after - len(back))
        for channel in sorted(set(removed) - back, reverse=True)[:missing]:
            for source in removed[channel].sources & accepted:
                keeps.setdefault(source, reason)
    return keeps


def _costs(model):
    costs = cost.layer_costs(model)
    try:
        macs = cost.count_macs(model)
    except ValueError:
        macs = None
    return costs, macs


def prune(
    model,
    *,
    threshold: float | Callable[[Any], float] | None = None,
    calibration_data=None,
    activation_ranges: Mapping[str, ActivationRange] | None = None,
    padding: str = "exact",
    exact_only: bool | None = None,
    absorb: bool = True,
    channel_multiple: int | None = None,
):
    """Removes dead BN channels and absorbs their constant output (PfQ, paper §3.2).

    A BN channel c is dead when its moving variance `V_c < threshold` (paper eq. 17).
    The paper's threshold is its framework's BN epsilon, 1e-5; the default is that value,
    or the layer's own `epsilon` where that is smaller. Read with Keras' epsilon of 1e-3
    instead, eq. 17 also removes channels that still vary (output std up to
    `0.7 |gamma|`): on a Fashion-MNIST MobileNet it changed the float model's logits by
    up to 3.8 and cost 0.3 points before fine-tuning, where 1e-5 changed them by float
    round-off; `threshold=lambda layer: layer.epsilon` asks for that reading.

    A dead channel's output is the constant `beta_c`, and `a_c = act(beta_c)` after
    the elementwise layers that follow (the quantized value when the layer output has
    an `ActivationRange`). PfQ removes the channel from its producer (Conv2D filter,
    DepthwiseConv2D channel, Dense unit) and the BN, and:

    * Conv2D / Dense consumers absorb `delta_o = a_c * sum_{u,v} W[u, v, c, o]`
      (paper eq. 14; after Flatten, channel c is several Dense rows, all summed): into
      the bias when there is one; else, when a BN alone reads the consumer, into that
      BN's moving mean (`mu_o -= delta_o`). The paper's eq. 18 adds
      `gamma_o / sqrt(V_o + eps) * delta_o` to `beta_o`, which is exact at inference
      only; the mean shift is exact in training mode too (the batch mean moves by
      `delta_o` as well) and stays right as the moving mean updates while
      fine-tuning. Otherwise the consumer gets a bias (`use_bias=True`) holding
      `delta`: exact, one value per output channel.
    * DepthwiseConv2D consumers: channel c only feeds its own outputs, which become
      constant too; they are removed and their constants carried on (through the
      following BN in inference form, activation, ...) to the next consumer.
    * Backward dead code: a channel that no layer reads any more (the input of a
      removed depthwise channel) is removed from its producer and BN too.
    * Activations, Dropout, pooling, Flatten, channels-last Reshape, Concatenate
      (with offsets) and Add (when every branch has the same constant channel) pass
      constants on.
    * A dead channel is kept, with the reason in the report, when its constant would
      reach an Add with a live channel on another branch, a model output, a shared or
      unknown layer, or a nested model.

    Zero padding ('same' k x k convolutions, ZeroPadding2D) puts 0, not `a_c`, at the
    border, so there a bias cannot stand in for the channel: the output near the
    border is `a_c` times the sum of the taps that land on the image, which changes
    from position to position. `padding` chooses what to do:

    * "exact" (default): padding and convolution are linear and treat every channel
      alike, so `a_c` contributes exactly what `a_c / a_k` times another constant
      channel `a_k` would, border included. For each tensor whose constants meet
      zero padding PfQ keeps ONE of them, the carrier (largest |a_k|, so every
      ratio is at most 1), and gives it the others' weights: the consumer's kernel
      slice for k becomes `W_k + sum_c (a_c / a_k) W_c` and channels c go. The
      carrier's BN gets gamma = 0 and its producer a zero filter, so it outputs
      `beta` exactly in inference and training mode and its folded weights are 0
      (no quantization range widens). It is an ordinary channel, so stage A, BN
      folding and the export treat it like any other. Constants that cross
      ZeroPadding2D first are followed as `a_c S`, S the padded map shared by
      every channel on that path, through pooling, cropping, dropout and
      activations with `f(0) = 0`, to the conv or Dense that merges them. A
      depthwise conv keeps channels apart, so no carrier can stand in there: a
      dead channel whose constant meets its padding is kept (the report says so).
      The price against "approximate": one kept channel per such tensor, the
      depthwise-bound channels, and a carrier weight up to the sum of the merged
      ones (quantized with the other weights, where the bias is int32).
    * "keep": dead channels whose constant meets zero padding are kept as they are
      (the former `exact_only=True`): exact too, fewer channels removed.
    * "approximate": the paper's "as far as possible": the bias absorbs the
      interior value, the border is off by what the padding hides. `report.exact`
      is then False and `calibration_data` measures the effect.

    1x1 and Dense consumers, 'valid' padding and `a_c == 0` need none of this, and
    neither do two cases where the padding cannot show: a ZeroPadding2D read only
    by max poolings whose windows all hold a real position, with `a_c > 0`
    (ResNet's stem: `max(a_c, 0) = a_c`), and a 'same' convolution along an axis of
    size 1 (every window reads the image through one tap).

    Args:
      model: a tf_keras Sequential or Functional model; it is not modified.
      threshold: None for `min(DEFAULT_THRESHOLD, layer.epsilon)` per BN layer, a
        float >= 0, or a callable(layer) -> float giving each BN layer's threshold.
      calibration_data: optional inputs (array, or a tf.data.Dataset of inputs or
        (inputs, labels) batches) on which to measure max |output change|.
      activation_ranges: {layer name: ActivationRange} of quantized layer outputs;
        defaults to the ranges `tf_pfq.strip` attached to `model`. They are attached
        to the pruned model as well.
      padding: "exact" (default), "keep" or "approximate": how constants that meet
        zero padding are absorbed (above). The report's `absorption` says which.
      exact_only: deprecated; True is `padding="keep"`, False the default.
      absorb: False removes the dead channels without absorbing their constant into
        the next layer (the paper's "PfQ w/o bias correction" ablation): the model
        changes by what the channels contributed.
      channel_multiple: keep a few dead channels (reason "channel alignment" in the
        report) so that every Conv2D, Dense and DepthwiseConv2D that loses channels
        is left with a multiple of this many, when it has enough: CPU kernels
        (XNNPACK) work on blocks of 8 or 16 channels, so 15 channels cost as much as
        16, and 17 almost as much as 24. Kept channels are simply not removed, so
        the result stays exact. Layers whose channels are tied (a pointwise conv and
        the depthwise conv it feeds, the branches of an Add) are aligned together.
        None (default) removes every dead channel it can.

    Returns:
      (pruned_model, report): a new Functional model with the same layer names, and a
      `PruneReport`.

    Raises:
      TypeError: `model` is not a tf_keras Sequential or Functional model (a
        subclassed model's class is named), or `threshold` or `channel_multiple`
        has the wrong type.
      ValueError: `threshold` (or what the callable returns) is negative,
        `channel_multiple` is below 1, `padding` is not one of the three modes (or
        contradicts `exact_only`), or `calibration_data` is empty or holds NaN/Inf
        (the first bad example is named).

    Example:
      >>> inputs = keras.Input((4, 4, 2))
      >>> x = keras.layers.Conv2D(3, 1, use_bias=False, name="conv")(inputs)
      >>> x = keras.layers.BatchNormalization(name="bn")(x)
      >>> x = keras.layers.ReLU(name="relu")(x)
      >>> model = keras.Model(inputs, keras.layers.Dense(2, name="fc")(x))
      >>> _ = model.get_layer("bn").moving_variance.assign([1.0, 0.0, 1.0])
      >>> pruned, report = prune(model)
      >>> pruned.get_layer("conv").filters, report.num_pruned
      (2, 1)
    """
    _check_threshold(threshold)
    _check_channel_multiple(channel_multiple)
    padding = _padding_mode(padding, exact_only)
    if calibration_data is not None:
        check_data(calibration_data, "calibration_data")
    ranges = activation_ranges or activation_ranges_of(model)
    model = split_separable(model)  # the passes know its two halves
    pruner = _Pruner(model, threshold, ranges, padding, absorb)
    candidates = pruner.dead_candidates()
    accepted = {(bn, int(c)) for bn, chans in candidates.items() for c in chans}
    kept: dict = {}
    while True:
        plan = pruner.plan(accepted)
        if not plan.failures:
            if channel_multiple is None:
                break
            aligned = _alignment_keeps(pruner, plan, accepted, channel_multiple)
            if not aligned:
                break
            kept.update(aligned)
            accepted -= set(aligned)
            continue
        for sources, reason in plan.failures:
            for source in sources & accepted:
                kept[source] = reason
            accepted -= sources
    for carrier in pruner.carriers.values():
        # Another reason to keep it may have come first; what it does now is carry.
        kept.update(dict.fromkeys(carrier.sources, carrier.reason))
    pruned, notes = pruner.rewrite(plan)
    if pruner.ranges:
        setattr(pruned, ACTIVATION_RANGES_ATTR, dict(pruner.ranges))
    report = _report(pruner, pruned, plan, candidates, kept, notes)
    if calibration_data is not None:
        report.max_output_change = _max_output_change(pruner.graph.model, pruned, calibration_data)
    return pruned, report


def _report(pruner: _Pruner, pruned, plan: _Plan, candidates, kept, notes) -> PruneReport:
    before, macs_before = _costs(pruner.graph.model)
    after, macs_after = _costs(pruned)
    rows = []
    # Carriers are set to their constant too: their residual counts like a removal's.
    carried = {source for carrier in pruner.carriers.values() for source in carrier.sources}
    for name in pruner.graph.order:
        layer = pruner.graph.layer(name)
        entry = pruner.entry(name)
        if entry.absorb is not Absorb.BATCHNORM and entry.channels not in (
            Channels.PRODUCER,
            Channels.DEPTHWISE,
        ):
            continue
        removed = sorted(plan.removed.get(name, {}))
        residual = 0.0
        pruned_dead = [
            c
            for c in candidates.get(name, [])
            if (name, int(c)) not in kept or (name, int(c)) in carried
        ]
        if pruned_dead:
            p = pruner.bn_params(name)
            stds = pfq_math.residual_std(
                p["gamma"][pruned_dead], p["variance"][pruned_dead], p["eps"]
            )
            residual = float(stds.max())
        rows.append(
            LayerReport(
                name=name,
                class_name=type(layer).__name__,
                channels_before=pruner.channels(name),
                channels_after=int(pruned.get_layer(name).output_shape[-1]),
                removed=removed,
                dead=[int(c) for c in candidates.get(name, [])],
                kept={c: why for (bn, c), why in sorted(kept.items()) if bn == name},
                notes=notes.get(name, []),
                residual_std=residual,
                params_before=before[name].params,
                params_after=after[name].params,
                macs_before=before[name].macs,
                macs_after=after[name].macs,
            )
        )
    exact = all(e.exact for r in plan.removed.values() for e in r.values()) and not plan.border
    return PruneReport(
        model_name=pruner.graph.model.name,
        layers=rows,
        params_before=sum(c.params for c in before.values()),
        params_after=sum(c.params for c in after.values()),
        macs_before=macs_before,
        macs_after=macs_after,
        exact=exact,
        absorption=pruner.padding if pruner.absorb_constants else "none",
    )
