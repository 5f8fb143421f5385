"""What `tf_pfq.prune` did: per-layer channels, compensations and kept channels, totals."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from tf_pfq.layers.table import Family, family_named

__all__ = ["CARRIER_REASON", "LayerReport", "PruneReport"]

# A kept dead channel that holds other removed constants starts its reason with this.
CARRIER_REASON = "constant carrier"


@dataclasses.dataclass
class LayerReport:
    """One layer with output channels (Conv2D, DepthwiseConv2D, Dense, BatchNormalization).

    Attributes:
      name: layer name (the same in the pruned model).
      class_name: Keras class name.
      channels_before: output channels in the input model.
      channels_after: output channels in the pruned model.
      removed: original indices of the removed output channels.
      dead: original indices of the channels the rule flagged as dead (BN layers).
      kept: {original channel index: reason} for dead channels left in place.
      notes: compensations applied to this layer (bias update, moving-mean shift,
        border effect of zero padding, ...).
      residual_std: BN layers: the largest `|gamma| sqrt(V / (V + eps))` of the removed
        dead channels, how much their output can still vary (0 for a true constant).
      params_before: the layer's weights in the input model.
      params_after: the layer's weights in the pruned model.
      macs_before: per-sample MACs in the input model.
      macs_after: per-sample MACs in the pruned model.
    """

    name: str
    class_name: str
    channels_before: int
    channels_after: int
    removed: list[int] = dataclasses.field(default_factory=list)
    dead: list[int] = dataclasses.field(default_factory=list)
    kept: dict[int, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    residual_std: float = 0.0
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.removed or self.kept or self.notes or self.dead)


def abbreviate(channels, limit: int = 6) -> str:
    """Channel indices as ranges, at most `limit` of them, then how many more.

    Example:
      >>> abbreviate([0, 1, 2, 5, 7, 8])
      '0-2, 5, 7-8'
      >>> abbreviate(range(0, 40, 2), limit=3)
      '0, 2, 4, ... (+17 more)'
    """
    runs: list[list[int]] = []
    for c in sorted({int(c) for c in channels}):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    text = [f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:limit]]
    rest = sum(b - a + 1 for a, b in runs[limit:])
    if rest:
        text.append(f"... (+{rest} more)")
    return ", ".join(text)


def _is_batchnorm(row: LayerReport) -> bool:
    # By the row's exact class name, as the rows record it.
    return family_named(row.class_name) is Family.BATCHNORM


def _ratio(after: int | None, before: int | None) -> str:
    if not before or after is None:
        return ""
    return f" ({100.0 * (before - after) / before:.1f}% less)"


@dataclasses.dataclass
class PruneReport:
    """The result of one PfQ pass (paper §3.2).

    Attributes:
      model_name: name of the pruned model.
      layers: one `LayerReport` per Conv2D, DepthwiseConv2D, Dense and BN layer, in
        topological order.
      params_before: all weights of the input model.
      params_after: all weights of the pruned model.
      macs_before: per-sample MACs of the input model (None if its input shape is not
        fixed).
      macs_after: the same for the pruned model.
      exact: True when every compensation is exact; False when a constant crosses
        zero padding (a k x k 'same' consumer, ZeroPadding2D) under
        `padding="approximate"`, where it holds in the interior only.
      max_output_change: max |pruned(x) - model(x)| over the model outputs on the
        `calibration_data` (None without it).
      absorption: how constants meeting zero padding were absorbed: "exact" (into
        constant carriers), "keep" (those channels kept), "approximate" (interior
        only), or "none" (`absorb=False`: constants dropped, not compensated).

    Example:
      >>> row = LayerReport("bn", "BatchNormalization", 8, 6, removed=[1, 4], dead=[1, 4])
      >>> report = PruneReport("net", [row], 100, 80, macs_before=1000, macs_after=700)
      >>> report.num_pruned, report.to_dict()["macs_after"]
      (2, 700)
    """

    model_name: str
    layers: list[LayerReport]
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    exact: bool = True
    max_output_change: float | None = None
    absorption: str = "exact"

    def layer(self, name: str) -> LayerReport:
        """The row of layer `name`.

        Raises:
          KeyError: no Conv2D, DepthwiseConv2D, Dense or BN layer has that name.
        """
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"No layer named {name!r} in the report of {self.model_name!r}.")

    @property
    def bn_layers(self) -> list[LayerReport]:
        return [r for r in self.layers if _is_batchnorm(r)]

    @property
    def num_dead(self) -> int:
        """BN channels the rule (eq. 17 or `threshold`) flagged as dead."""
        return sum(len(r.dead) for r in self.bn_layers)

    @property
    def num_pruned(self) -> int:
        """Dead BN channels removed (constant absorbed downstream)."""
        return sum(len(set(r.dead) - set(r.kept)) for r in self.bn_layers)

    @property
    def num_kept(self) -> int:
        """Dead BN channels kept in place, each with a reason in its `LayerReport.kept`."""
        return sum(len(r.kept) for r in self.bn_layers)

    @property
    def num_carriers(self) -> int:
        """Dead BN channels kept as constant carriers (they hold others' constants)."""
        return sum(
            why.startswith(CARRIER_REASON) for r in self.bn_layers for why in r.kept.values()
        )

    @property
    def absorption_text(self) -> str:
        """One line: which absorption was used and whether it is exact."""
        if self.absorption == "none":
            return "none (absorb=False): removed constants dropped, not compensated"
        if self.absorption == "approximate" and not self.exact:
            return "approximate: exact in the interior only (zero-padding border effect)"
        if self.absorption == "approximate":
            return "approximate, exact here (no constant met zero padding)"
        if self.absorption == "keep":
            return "exact (dead channels that meet zero padding kept)"
        if not self.exact:
            return "exact mode, but a constant met zero padding (see the notes)"
        carriers = self.num_carriers
        return "exact" + (
            f" ({carriers} constant carrier{'s' if carriers != 1 else ''} past zero padding)"
            if carriers
            else ""
        )

    @property
    def max_residual_std(self) -> float:
        """The largest output std a removed dead BN channel can have (data-free bound)."""
        return max((r.residual_std for r in self.bn_layers), default=0.0)

    @property
    def bn_channels_before(self) -> int:
        return sum(r.channels_before for r in self.bn_layers)

    @property
    def bn_channels_after(self) -> int:
        """BN channels left: dead ones removed plus those removed as dead code."""
        return sum(r.channels_after for r in self.bn_layers)

    @property
    def channels_before(self) -> int:
        """Output channels of all Conv2D, DepthwiseConv2D and Dense layers."""
        return sum(r.channels_before for r in self.layers if not _is_batchnorm(r))

    @property
    def channels_after(self) -> int:
        return sum(r.channels_after for r in self.layers if not _is_batchnorm(r))

    @property
    def num_removed(self) -> int:
        """Removed output channels of Conv2D, DepthwiseConv2D and Dense layers."""
        return self.channels_before - self.channels_after

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: totals, then the per-layer rows."""
        return {
            "model_name": self.model_name,
            "dead_bn_channels": self.num_dead,
            "pruned_bn_channels": self.num_pruned,
            "kept_bn_channels": self.num_kept,
            "bn_channels_before": self.bn_channels_before,
            "bn_channels_after": self.bn_channels_after,
            "channels_before": self.channels_before,
            "channels_after": self.channels_after,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "exact": self.exact,
            "absorption": self.absorption,
            "constant_carriers": self.num_carriers,
            "max_residual_std": self.max_residual_std,
            "max_output_change": self.max_output_change,
            "layers": [
                {
                    **dataclasses.asdict(r),
                    "kept": {str(k): v for k, v in r.kept.items()},
                }
                for r in self.layers
            ],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        lines = [f"PfQ report for {self.model_name!r}"]
        lines.append(
            f"  dead BN channels: {self.num_dead}, pruned {self.num_pruned}, kept {self.num_kept}"
        )
        lines.append(
            f"  BN channels: {self.bn_channels_before} -> {self.bn_channels_after}"
            f"{_ratio(self.bn_channels_after, self.bn_channels_before)}"
        )
        lines.append(
            f"  conv/dense channels: {self.channels_before} -> {self.channels_after}"
            f"{_ratio(self.channels_after, self.channels_before)}"
        )
        lines.append(
            f"  params: {self.params_before:,} -> {self.params_after:,}"
            f"{_ratio(self.params_after, self.params_before)}"
        )
        if self.macs_before is not None and self.macs_after is not None:
            lines.append(
                f"  MACs: {self.macs_before:,} -> {self.macs_after:,}"
                f"{_ratio(self.macs_after, self.macs_before)}"
            )
        lines.append(f"  absorption: {self.absorption_text}")
        if self.num_pruned:
            lines.append(
                "  removed BN outputs vary by at most std "
                f"{self.max_residual_std:.3g} (|gamma| sqrt(V / (V + eps)))"
            )
        if self.max_output_change is not None:
            lines.append(f"  max |output change| on calibration data: {self.max_output_change:.3g}")
        changed = [r for r in self.layers if r.changed]
        if changed:
            width = max(len(r.name) for r in changed)
            lines.append(f"  {'layer':<{width}}  channels   removed  notes")
            for r in changed:
                lines.append(
                    f"  {r.name:<{width}}  {r.channels_before:>4} -> {r.channels_after:<4}"
                    f" {len(r.removed):>5}  {'; '.join(r.notes)}".rstrip()
                )
                by_reason: dict[str, list[int]] = {}
                for channel, why in sorted(r.kept.items()):
                    by_reason.setdefault(why, []).append(channel)
                for why, channels in by_reason.items():
                    lines.append(
                        f"  {'':<{width}}    kept {len(channels)} [{abbreviate(channels)}]: {why}"
                    )
        return "\n".join(lines)
