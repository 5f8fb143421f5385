"""Which layers a low-bit model is sensitive in, and a per-layer bit-width plan for a size budget.

`sensitivity` quantizes one layer at a time of a BN-folded float model, without
training, and measures the loss and accuracy change:

* weights: the layer's kernel on the n-bit grid `tf_pfq.apply` would train it on
  (the same `quantize_weight`, per tensor, the default scheme), every other weight
  and every activation left in float;
* activations: the layer's output quantizer at n bits with every other activation at
  8 bits (and weights in float), against the same model with all of them at 8 bits.
  Ranges come from one training-mode pass over the calibration images, as stage A
  starts. The rows are keyed by the layer that holds the quantizer, the name
  `layer_bits` takes (a conv's output is held by its ReLU).

`choose_bits` turns the weight rows into a `layer_bits` mapping for a budget on the
weight bytes (each kernel at n bits takes `params * n / 8` bytes), greedily: every
layer starts at the fewest bits measured, and the upgrade with the largest loss
reduction per added byte (to any wider width, not only the next) is taken while
the budget allows. Summing per-layer changes assumes they add up, which holds
roughly for small ones; the plan's result is measured after fine-tuning, not
predicted.

Such searches exist (HAWQ, Sony MCT's mixed-precision search); this one is written
here because it must speak `tf_pfq.apply`'s quantizers and `layer_bits` names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from absl import logging

from tf_pfq.canonical import canonicalize
from tf_pfq.compat import keras
from tf_pfq.layers.table import Quant, entry_for
from tf_pfq.quant_math import MIN_BITS, check_bits, quantize_weight

__all__ = ["SensitivityRow", "SensitivityReport", "BitPlan", "sensitivity", "choose_bits"]


@dataclasses.dataclass(frozen=True)
class SensitivityRow:
    """One layer's tensor at `bits`: the change against the reference model."""

    layer: str
    tensor: str  # "weights" or "activations"
    bits: int
    loss_change: float
    accuracy_change: float


@dataclasses.dataclass
class SensitivityReport:
    """What `sensitivity` measured.

    Attributes:
      rows: one per (layer, tensor, bits).
      reference_loss, reference_accuracy: the float model's (weights) on `data`.
      activation_reference_loss, activation_reference_accuracy: with every
        activation at 8 bits (the activation rows' reference).
      kernel_params: {weighted layer: kernel parameters}, for the weight bytes.
      kernel_macs: {weighted layer: multiply-accumulates per image}, for bit-operations.
    """

    rows: list[SensitivityRow]
    reference_loss: float
    reference_accuracy: float
    activation_reference_loss: float | None
    activation_reference_accuracy: float | None
    kernel_params: dict[str, int]
    kernel_macs: dict[str, int] = dataclasses.field(default_factory=dict)

    def change(self, layer: str, tensor: str, bits: int) -> float:
        """The loss change of `layer`'s `tensor` at `bits` (KeyError if not measured)."""
        for row in self.rows:
            if (row.layer, row.tensor, row.bits) == (layer, tensor, bits):
                return row.loss_change
        raise KeyError((layer, tensor, bits))

    def to_markdown(self) -> str:
        """A table: one row per layer and tensor, one loss / accuracy column per bits."""
        bits = sorted({row.bits for row in self.rows})
        lines = [
            f"Reference: loss {self.reference_loss:.4f}, top-1 "
            f"{100 * self.reference_accuracy:.2f} % (float)"
            + (
                f"; activations at 8 bits: loss {self.activation_reference_loss:.4f}"
                if self.activation_reference_loss is not None
                else ""
            ),
            "",
            "| layer | tensor | params | "
            + " | ".join(f"{b} bits: Δloss / Δtop-1" for b in bits)
            + " |",
            "|---|---|---|" + "---|" * len(bits),
        ]
        keys = list(dict.fromkeys((row.layer, row.tensor) for row in self.rows))
        for layer, tensor in keys:
            cells = []
            for b in bits:
                row = next(
                    (r for r in self.rows if (r.layer, r.tensor, r.bits) == (layer, tensor, b)),
                    None,
                )
                cells.append(
                    "" if row is None
                    else f"{row.loss_change:+.4f} / {100 * row.accuracy_change:+.2f}"
                )  # fmt: skip
            params = self.kernel_params.get(layer, "") if tensor == "weights" else ""
            lines.append(f"| {layer} | {tensor} | {params} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def plot(self, path: str, title: str = "") -> None:
        """Loss change per layer (x) for each tensor and bit width, saved to `path`."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharey=False)
        for ax, tensor in zip(axes, ("weights", "activations")):
            rows = [r for r in self.rows if r.tensor == tensor]
            layers = list(dict.fromkeys(r.layer for r in rows))
            for b in sorted({r.bits for r in rows}):
                values = [
                    next((r.loss_change for r in rows if r.layer == n and r.bits == b), np.nan)
                    for n in layers
                ]
                ax.plot(range(len(layers)), values, marker="o", label=f"{b} bits")
            ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=6)
            ax.set_ylabel(f"Δloss ({tensor})")
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.legend(fontsize=7)
        fig.suptitle(title or "Per-layer quantization sensitivity (one layer at a time)")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


class BitPlan(dict):
    """A `layer_bits` mapping from `choose_bits`, with what it was chosen for.

    Attributes:
      budget_bytes: the weight-byte budget asked for.
      weight_bytes: the kernels' bytes under the plan.
      predicted_loss_change: the sum of the measured per-layer changes.
      bitops, bitops_budget: the plan's bit-operations per image (MACs x weight bits
        x activation bits) and the budget asked for (None: none asked).
    """

    budget_bytes: float
    weight_bytes: float
    predicted_loss_change: float
    bitops: float = 0.0
    bitops_budget: float | None = None

    def describe(self) -> str:
        widths = ", ".join(f"{name}: {bits[1]}" for name, bits in self.items())
        bitops = (
            f", {self.bitops:.3g} of {self.bitops_budget:.3g} budgeted bit-operations"
            if self.bitops_budget is not None
            else ""
        )
        return (
            f"weight bits {{{widths}}}: {self.weight_bytes:.0f} of {self.budget_bytes:.0f} "
            f"budgeted bytes{bitops}, predicted loss change {self.predicted_loss_change:+.4f}"
        )


def _arrays(data) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(data, tuple) and len(data) == 2:
        return np.asarray(data[0], np.float32), np.asarray(data[1])
    images, labels = [], []
    for x, y in data:
        images.append(np.asarray(x, np.float32))
        labels.append(np.asarray(y))
    if not images:
        raise ValueError("`data` holds no batches.")
    return np.concatenate(images), np.concatenate(labels)


def _measure(model, images, labels, loss_fn) -> tuple[float, float]:
    out = model.predict(images, batch_size=256, verbose=0)
    loss = float(loss_fn(labels, out).numpy())
    return loss, float(np.mean(np.argmax(out, -1) == labels.reshape(-1)))


def _weight_rows(model, images, labels, loss_fn, bits, reference) -> list[SensitivityRow]:
    rows = []
    for layer in model.layers:
        kernel = entry_for(layer).kernel
        if entry_for(layer).quant is not Quant.WEIGHTS or kernel is None:
            continue
        variable = getattr(layer, kernel.attr)
        original = variable.numpy()
        try:
            for b in bits:
                variable.assign(quantize_weight(original, b, depthwise=kernel.depthwise))
                loss, accuracy = _measure(model, images, labels, loss_fn)
                rows.append(
                    SensitivityRow(
                        layer.name, "weights", b, loss - reference[0], accuracy - reference[1]
                    )
                )
        finally:
            variable.assign(original)
        logging.info("sensitivity: weights of %s measured", layer.name)
    return rows


def _activation_rows(model, images, labels, loss_fn, bits, calibration):
    from tf_pfq.quantize import apply, quantized_tensors

    def quantized(layer_bits):
        qat = apply(model, activation_bits=8, layer_bits=layer_bits)
        qat(calibration, training=True)  # ranges from the calibration images
        return _measure(qat, images, labels, loss_fn)

    reference = quantized(None)
    rows = []
    # Only the tensors whose width follows `activation_bits`: the rules fix some at 8
    # (softmax / sigmoid / tanh outputs, logits feeding them, Add outputs at add_bits).
    follows = quantized_tensors(model, activation_bits=MIN_BITS)
    for name in [n for n, b in follows.items() if b == MIN_BITS]:
        for b in bits:
            loss, accuracy = quantized({name: (b, None)})
            rows.append(
                SensitivityRow(name, "activations", b, loss - reference[0], accuracy - reference[1])
            )
        logging.info("sensitivity: activations of %s measured", name)
    return rows, reference


def sensitivity(
    model,
    data,
    bits: Sequence[int] = (2, 3, 4),
    *,
    activations: bool = True,
    calibration_images: int = 256,
    loss=None,
):
    """Loss and accuracy change when one layer at a time is quantized (module docstring).

    Args:
      model: a float tf_keras or Keras 3 model; BatchNormalization is folded first
        (`tf_pfq.fold_batchnorm`) and the input is not modified.
      data: (images, labels) arrays, or a dataset of (image, label) batches, on
        which the changes are measured; its first `calibration_images` images also
        set the activation ranges.
      bits: the bit widths to try per layer (2..8). The weights are also measured
        at 8 bits, the top choice `choose_bits` can give.
      activations: also measure the activation quantizers (slower: one
        `tf_pfq.apply` per layer and bit width).
      calibration_images: images for the activation ranges.
      loss: a Keras loss of (labels, model output); default sparse categorical
        cross-entropy, from logits unless the model ends in a softmax.

    Returns:
      A `SensitivityReport` (`to_markdown`, `plot`).

    Raises:
      ValueError: a bit width outside 2..8, or empty `data`.

    Example:
      >>> x = keras.Input((4, 4, 1))
      >>> y = keras.layers.Dense(3, name="fc")(keras.layers.Flatten()(x))
      >>> images = np.random.default_rng(0).normal(size=(16, 4, 4, 1))
      >>> report = sensitivity(keras.Model(x, y), (images, np.arange(16) % 3), bits=(2,),
      ...                      activations=False)
      >>> [(r.layer, r.bits) for r in report.rows]
      [('fc', 2), ('fc', 8)]
    """
    from tf_pfq.fold import fold_batchnorm

    bits = tuple(check_bits(b, "bits") for b in bits)
    folded, _ = fold_batchnorm(canonicalize(model))
    images, labels = _arrays(data)
    if loss is None:
        last = getattr(folded.layers[-1], "activation", None)
        from_logits = last is not keras.activations.softmax
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
    reference = _measure(folded, images, labels, loss)
    weight_bits = tuple(sorted(set(bits) | {8}))
    rows = _weight_rows(folded, images, labels, loss, weight_bits, reference)
    act_reference: tuple[float | None, float | None] = (None, None)
    if activations:
        act_rows, act_reference = _activation_rows(
            folded, images, labels, loss, bits, images[:calibration_images]
        )
        rows += act_rows
    from tf_pfq.cost import layer_costs

    costs = layer_costs(folded)
    params, macs = {}, {}
    for layer in folded.layers:
        kernel = entry_for(layer).kernel
        if entry_for(layer).quant is Quant.WEIGHTS and kernel is not None:
            params[layer.name] = int(np.prod(getattr(layer, kernel.attr).shape))
            macs[layer.name] = costs[layer.name].macs if layer.name in costs else 0
    return SensitivityReport(rows, *reference, *act_reference, params, macs)


def choose_bits(
    report: SensitivityReport,
    budget: float,
    *,
    bitops_budget: float | None = None,
    activation_bits: int = 8,
) -> BitPlan:
    """Weight bits per layer that minimize the measured loss change within `budget` bytes.

    Args:
      report: from `sensitivity`.
      budget: the most bytes the kernels may take (each at n bits: params * n / 8);
        e.g. uniform 4 bits is `sum(report.kernel_params.values()) / 2`.
      bitops_budget: optionally also the most bit-operations per image, counted per
        weighted layer as MACs x weight bits x `activation_bits` (the compute cost
        bit-serial and low-bit accelerators scale with).
      activation_bits: the input width the bit-operations count with.

    Returns:
      A `BitPlan`: {layer: (None, weight bits)}, usable as `layer_bits`, with its
      bytes, budget and predicted change; `describe()` says what it chose.

    Raises:
      ValueError: a budget is below every layer at its fewest measured bits, or
        `bitops_budget` is given for a report without MACs.

    Example:
      >>> rows = [SensitivityRow("a", "weights", 2, 0.5, 0.0),
      ...         SensitivityRow("a", "weights", 8, 0.0, 0.0),
      ...         SensitivityRow("b", "weights", 2, 0.01, 0.0),
      ...         SensitivityRow("b", "weights", 8, 0.0, 0.0)]
      >>> report = SensitivityReport(rows, 1.0, 0.5, None, None, {"a": 80, "b": 80})
      >>> choose_bits(report, budget=100)
      {'a': (None, 8), 'b': (None, 2)}
    """
    options: dict[str, list[tuple[int, float]]] = {}
    for row in report.rows:
        if row.tensor == "weights":
            options.setdefault(row.layer, []).append((row.bits, row.loss_change))
    for name in options:
        options[name].sort()
    choice = dict.fromkeys(options, 0)

    if bitops_budget is not None and not report.kernel_macs:
        raise ValueError("bitops_budget needs a report with kernel_macs (from `sensitivity`).")

    def size(name: str, index: int) -> float:
        return report.kernel_params[name] * options[name][index][0] / 8

    def ops(name: str, index: int) -> float:
        macs = report.kernel_macs.get(name, 0)
        return macs * options[name][index][0] * activation_bits

    used = sum(size(name, 0) for name in options)
    spent = sum(ops(name, 0) for name in options)
    ops_limit = np.inf if bitops_budget is None else bitops_budget
    for asked, least, unit in ((budget, used, "bytes"), (ops_limit, spent, "bit-operations")):
        if least > asked:
            raise ValueError(
                f"The budget of {asked:g} {unit} is below {least:.0f} {unit}, every kernel "
                "at its fewest measured bits."
            )
    while True:
        best = None
        for name, index in choice.items():
            # Any wider option, not only the next: a layer whose loss only drops at
            # 8 bits (2, 3 and 4 all ruin it) must still be reachable.
            for wider in range(index + 1, len(options[name])):
                added = size(name, wider) - size(name, index)
                more_ops = ops(name, wider) - ops(name, index)
                if used + added > budget or spent + more_ops > ops_limit:
                    continue
                gain = options[name][index][1] - options[name][wider][1]
                if best is None or gain / added > best[0]:
                    best = (gain / added, name, wider, added, more_ops)
        if best is None or best[0] <= 0:
            break
        _, name, wider, added, more_ops = best
        choice[name] = wider
        used += added
        spent += more_ops
    plan = BitPlan({name: (None, options[name][i][0]) for name, i in choice.items()})
    plan.budget_bytes = float(budget)
    plan.weight_bytes = float(used)
    plan.bitops = float(spent)
    plan.bitops_budget = None if bitops_budget is None else float(bitops_budget)
    plan.predicted_loss_change = float(sum(options[n][i][1] for n, i in choice.items()))
    logging.info("choose_bits: %s", plan.describe())
    return plan
