"""What a workflow run did, step by step: `StepResult` and `WorkflowSummary`.

The summary is what `run_workflow` returns and records in its state file: the test
accuracy after each step, what each PfQ removed and how it absorbed the constants,
parameters and MACs, and the float model's numbers to compare with.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["StepResult", "WorkflowSummary"]


@dataclasses.dataclass
class StepResult:
    """What one step did and the model it left (accuracy as a fraction)."""

    name: str
    kind: str
    accuracy: float | None = None
    val_accuracy: float | None = None
    params: int | None = None
    macs: int | None = None
    channels_removed: int | None = None
    dead_pruned: int | None = None
    dead_kept: int | None = None
    epochs: int | None = None
    stopped_early: str = ""
    seconds: float = 0.0
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class WorkflowSummary:
    """Accuracy after each step, channels pruned by each PfQ, params and MACs.

    Attributes:
      method: the workflow's name ("pfq" for Algorithm 1).
      activation_bits: activation bit width of the last training stage.
      weight_bits: weight bit width of the last training stage.
      float_accuracy: test accuracy of the input float model (None without test data).
      float_params: parameters of the input model.
      float_macs: per-sample MACs of the input model.
      steps: one `StepResult` per step, in order.

    Example:
      >>> s = WorkflowSummary("pfq", 4, 4, 0.99, 1000, 2_000_000,
      ...     [StepResult("pfq_1", "prune", 0.99, params=800, macs=1_500_000,
      ...                 channels_removed=12, details={"params_removed": 200})])
      >>> s.channels_removed, s.params_pruned_fraction, s.macs_reduction
      (12, 0.2, 0.25)
    """

    method: str
    activation_bits: int | None
    weight_bits: int | None
    float_accuracy: float | None
    float_params: int
    float_macs: int | None
    steps: list[StepResult] = dataclasses.field(default_factory=list)

    @property
    def accuracy(self) -> float | None:
        """Test accuracy of the final quantized model."""
        return self.steps[-1].accuracy if self.steps else self.float_accuracy

    @property
    def params(self) -> int:
        last = self.steps[-1].params if self.steps else None
        return self.float_params if last is None else last

    @property
    def macs(self) -> int | None:
        return self.steps[-1].macs if self.steps else self.float_macs

    @property
    def channels_removed(self) -> int:
        """Conv/Dense output channels removed by all PfQ steps together."""
        return sum(s.channels_removed or 0 for s in self.steps)

    @property
    def params_pruned_fraction(self) -> float:
        """Share of the input model's weights that PfQ removed (the paper's "pruned by x %").

        Only the prune steps count: BN folding also removes BN's four vectors, but
        that is not pruning.
        """
        removed = sum(s.details.get("params_removed", 0) for s in self.steps)
        return removed / self.float_params if self.float_params else 0.0

    @property
    def macs_reduction(self) -> float | None:
        """1 - final MACs / input MACs."""
        if not self.float_macs or self.macs is None:
            return None
        return 1.0 - self.macs / self.float_macs

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(
            accuracy=self.accuracy,
            params=self.params,
            macs=self.macs,
            channels_removed=self.channels_removed,
            params_pruned_fraction=self.params_pruned_fraction,
            macs_reduction=self.macs_reduction,
        )
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> WorkflowSummary:
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in fields}
        kwargs["steps"] = [StepResult(**s) for s in values.get("steps", [])]
        return cls(**kwargs)

    def prune_lines(self) -> list[str]:
        """One line per PfQ step: the absorption it used and the output change it caused.

        The change is max |pruned - input| over the outputs on the run's calibration
        images, as the prune report measured it; a user who only exports sees it here.

        Example:
          >>> s = WorkflowSummary("pfq", 4, 4, None, 10, None, [StepResult("pfq_1",
          ...     "prune", details={"exact": False, "max_output_change": 0.57})])
          >>> s.prune_lines()
          ['pfq_1: absorption approximate (exact in the interior only), max |output change| 0.57']
        """
        lines = []
        for step in self.steps:
            if step.kind != "prune":
                continue
            details = step.details
            absorption = details.get("absorption") or (
                "exact" if details.get("exact", True) else "approximate"
            )
            if not details.get("exact", True):
                absorption += " (exact in the interior only)"
            change = details.get("max_output_change")
            measured = "not measured" if change is None else f"{change:.3g}"
            lines.append(f"{step.name}: absorption {absorption}, max |output change| {measured}")
        return lines

    def to_markdown(self) -> str:
        """The per-step table (accuracy in %, MACs in millions), then how each PfQ step
        absorbed the removed constants and how far it moved the outputs."""
        rows = [
            (
                "| step | kind | test acc. % | val acc. % | epochs | removed channels | params "
                "| MACs (M) |"
            ),
            "|---|---|---|---|---|---|---|---|",
            (
                f"| float | input | {_pct(self.float_accuracy)} | | | | {self.float_params} | "
                f"{_mmacs(self.float_macs)} |"
            ),
        ]
        for s in self.steps:
            rows.append(
                f"| {s.name} | {s.kind} | {_pct(s.accuracy)} | {_pct(s.val_accuracy)} | "
                f"{'' if s.epochs is None else s.epochs} | "
                f"{'' if s.channels_removed is None else s.channels_removed} | {s.params} | "
                f"{_mmacs(s.macs)} |"
            )
        notes = self.prune_lines()
        if notes:
            rows += ["", *(f"- {line}" for line in notes)]
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.to_markdown()


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _mmacs(value) -> str:
    return "" if value is None else f"{value / 1e6:.3f}"
