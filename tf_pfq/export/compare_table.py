"""The result of `compare_layers`: one row per layer, and the table, verdict and plot made of them.

Kept apart from the measuring (`tf_pfq.export.compare`) and from the mapping of
layers to tensors (`tf_pfq.export.compare_map`): a `LayerComparison` is a plain
value that can be built, printed and drawn without a model or a file (see the
example of `LayerComparison`).

Every difference is in steps of the tensor's own int8 grid: 0 is agreement, half a
step the file's rounding of a value QAT keeps in float, one step a value that
rounded the other way near a tie, several steps a different computation.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

__all__ = ["LayerComparison", "LayerDiff"]

# The Keras side is float32: a value k steps from zero comes with about k * 6e-8
# steps of error, so "1 step apart" reads 1.00001. Differences within this of the
# threshold count as at the threshold.
NOISE_STEPS = 1e-3


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
      saturated: the share of Keras values beyond the range of the file's tensor,
        which the file saturates at its end (the two statistics compare the file
        with the Keras values clipped to that range). Non-zero only where QAT keeps
        the values in float (logits, Add outputs without `add_bits`) and the file's
        8-bit range was calibrated on data that did not reach them.
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
    saturated: float | None = None
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
            if row.saturated:
                note = f"{note}; {100 * row.saturated:.2g} % saturated".lstrip("; ")
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
