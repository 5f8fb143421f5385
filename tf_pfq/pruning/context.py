"""What every stage of the pruning pass shares: the model, the options, the plan's terms.

Planning, absorbing and rewriting all read the same things (the layer graph, each
layer's table entry and weights, the BN parameters, the quantized output ranges of
stage A) and all speak of the same objects: a removed channel with its constant
(`Entry`), a kept channel that carries other constants past zero padding
(`Carrier`), and the plan that collects them (`Plan`). Keeping those here lets the
stages live in modules of their own without importing each other.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from tf_pfq.compat import keras
from tf_pfq.graph import LayerGraph, call_kwargs
from tf_pfq.layers import op_name
from tf_pfq.layers.table import Absorb, LayerEntry, entry_for
from tf_pfq.ranges import ActivationRange
from tf_pfq.report import CARRIER_REASON

__all__ = [
    "Carrier",
    "Entry",
    "Plan",
    "PruneContext",
    "is_grouped",
    "is_last_axis",
    "is_linear",
    "union",
    "value_of",
]


@dataclasses.dataclass(frozen=True)
class Entry:
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
class Carrier:
    """A kept dead channel that carries other constants past zero padding.

    `channel` of the carrier's tensor holds `value` wherever those constants hold
    theirs (same pattern), so a consumer reads `a_c` as `a_c / value` times it.
    """

    channel: int
    value: float
    sources: frozenset
    reason: str = CARRIER_REASON


@dataclasses.dataclass
class Plan:
    """One planning round: what each layer loses, what it absorbs, and what failed.

    Attributes:
      removed: {layer: {output channel: Entry}}.
      requesters: {(layer, channel): layers that no longer read it} (dead code).
      deltas: {conv / Dense: per-output-channel constant to add (eq. 14)}.
      merges: {consumer: [(removed input channel, carrier input channel, a_c / a_k)]}.
      border: layers whose zero padding the approximate mode leaves inexact.
      failures: [(sources, reason)]: dead channels that must be kept, and why.
    """

    removed: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(dict))
    requesters: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(set))
    deltas: dict = dataclasses.field(default_factory=dict)
    # {consumer: [(removed input channel, carrier input channel, a_c / a_carrier)]}
    merges: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    border: set = dataclasses.field(default_factory=set)
    failures: list = dataclasses.field(default_factory=list)

    def fail(self, sources, reason: str) -> None:
        self.failures.append((frozenset(sources), reason))

    def put(self, layer: str, channel: int, entry: Entry) -> None:
        old = self.removed[layer].get(channel)
        if old is not None:
            # Two paths reach the same channel: the first constant wins (sources are
            # seeded first, so a dead BN keeps its beta); None never hides a constant.
            first = old if old.value is not None else entry
            entry = dataclasses.replace(
                first, sources=old.sources | entry.sources, exact=old.exact and entry.exact
            )
        self.removed[layer][channel] = entry


def is_last_axis(axis, rank: int) -> bool:
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    return len(axes) == 1 and axes[0] % rank == rank - 1


def _channels_last(layer) -> bool:
    return getattr(layer, "data_format", "channels_last") == "channels_last"


def is_linear(layer) -> bool:
    return keras.activations.serialize(layer.activation) == "linear"


def is_grouped(layer, entry: LayerEntry) -> bool:
    return entry.absorb is Absorb.KERNEL_SUM and getattr(layer, "groups", 1) != 1


def union(*consts) -> frozenset:
    """The sources of every entry of the {channel: Entry} maps `consts`."""
    return frozenset().union(*(e.sources for const in consts for e in const.values()))


def value_of(entry: Entry) -> float:
    """The constant of an entry that has one (dead-code entries have None)."""
    assert entry.value is not None
    return entry.value


class PruneContext:
    """The model being pruned, read once, and the options of one `prune` call.

    The carriers are chosen once and kept across re-plans (`padding.carry`), so they
    live here rather than in a `Plan`.
    """

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
        # {(tensor, pattern): Carrier}: chosen once, kept across re-plans.
        self.carriers: dict[tuple[str, tuple[str, ...]], Carrier] = {}
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

    def describe_op(self, name: str) -> str:
        op = op_name(self.graph.layer(name))
        return f"op {op!r} in {name!r}" if op else self.describe(name)

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

    # -- writing the plan ----------------------------------------------------------

    def emit(
        self,
        plan: Plan,
        name: str,
        channel: int,
        value: float | None,
        sources,
        exact,
        pattern: tuple[str, ...] = (),
        binary: bool = True,
    ) -> None:
        """Records output `channel` of layer `name` as removed, holding `value`."""
        if value is None:
            # Unused channel (dead code): nothing to quantize or absorb downstream.
            plan.put(name, channel, Entry(None, frozenset(sources), bool(exact)))
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
        entry = Entry(float(value), frozenset(sources), bool(exact), tuple(pattern), binary)
        plan.put(name, channel, entry)

    def emit_entry(
        self,
        plan: Plan,
        name: str,
        channel: int,
        value,
        entry: Entry,
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

    def emit_all(self, plan: Plan, name: str, const, values, exact=None) -> None:
        """`emit_entry` for each channel of `const`, in order, with its value of `values`."""
        for k, c in enumerate(sorted(const)):
            ok = const[c].exact and (exact is None or exact[k])
            self.emit_entry(plan, name, c, values[k], const[c], exact=ok)
