"""The paper's comparisons, selectable by name through one API (paper Tables 1-3).

* "pfq": Algorithm 1 (PfQ, stage A, PfQ, fold BN, stage W).
* "original": the same staged workflow without PfQ (Table 1's "original").
* "pfq_once": PfQ, fold BN, then activations and weights quantized together for
  `e_A + e_W` epochs (Table 2's "fine-tune once (w/ PfQ)").
* "qat_once": fold BN, then activations and weights quantized together for
  `e_A + e_W` epochs, no PfQ: the control that differs from "pfq_once" only in
  PfQ, and from "dfq" only in DFQ.
* "dfq": fold BN, Nagel et al. 2019 DFQ (`tf_pfq.dfq`), then activations and weights
  quantized together for `e_A + e_W` epochs (Table 3's "DFQ (w/ fine-tune)") with
  the paper's settings for DFQ: plain SGD (no momentum) and weight decay 1e-4, at
  the stage's learning rate.
* "pfq_no_bias_correction": Algorithm 1 with PfQ removing the dead channels without
  absorbing their constants (Table 1's "PfQ w/o bias correction").
* "tfmot": tfmot's own n-bit QAT (`DefaultNBitQuantizeScheme`, BN handled by tfmot's
  transforms) for `e_A + e_W` epochs, the existing-library reference, as shipped.
  It differs from tf_pfq in more than the quantizer (`tf_pfq.backends`): input and
  logits at n bits, ranges starting at [-6, 6] with a 0.999 moving average, BN
  never folded.
* "tfmot_matched": the same with 8-bit input, float logits and ranges from the
  first batch, the closest tfmot's API comes to tf_pfq's choices (BN stays
  unfolded: the n-bit scheme cannot fold it).

All methods get the same number of training epochs, as in the paper.
"""

from __future__ import annotations

from dataclasses import replace

from tf_pfq.training import TrainConfig
from tf_pfq.workflow import (
    DFQ,
    FoldBatchNorm,
    Prune,
    Step,
    Train,
    algorithm1_steps,
    mixed_precision,
    run_steps,
)

__all__ = ["DFQ_MOMENTUM", "DFQ_WEIGHT_DECAY", "METHODS", "method_steps", "run_method"]

METHODS = (
    "pfq",
    "original",
    "pfq_once",
    "qat_once",
    "dfq",
    "tfmot",
    "tfmot_matched",
    "pfq_no_bias_correction",
)
# The paper's fine-tuning after DFQ (§4.3.1): SGD without momentum, weight decay 1e-4.
DFQ_MOMENTUM, DFQ_WEIGHT_DECAY = 0.0, 1e-4


def method_steps(
    method: str,
    stage_a: TrainConfig,
    stage_w: TrainConfig,
    activation_bits: int = 4,
    weight_bits: int = 4,
    combined: TrainConfig | None = None,
    layer_bits=None,
) -> list[Step]:
    """The workflow steps of a method.

    Args:
      method: one of `METHODS`.
      stage_a: stage A hyperparameters (activations only).
      stage_w: stage W hyperparameters (activations and weights).
      activation_bits: activation bit width.
      weight_bits: weight bit width.
      combined: hyperparameters of the single stage of the one-stage methods;
        default: `stage_w`'s with `stage_a.epochs + stage_w.epochs` epochs (the
        paper's equal-epoch comparison, eq. 19's lambda over all of them), and for
        "dfq" also `DFQ_MOMENTUM` and `DFQ_WEIGHT_DECAY`.
      layer_bits: per-layer bit widths for every training step (`tf_pfq.apply`'s
        mixed precision); tf_pfq's quantizer only.

    Returns:
      A list of `tf_pfq.workflow.Step` objects.

    Raises:
      ValueError: unknown method.

    Example:
      >>> [s.name for s in method_steps("dfq", TrainConfig(epochs=2), TrainConfig(epochs=3))]
      ['fold', 'dfq', 'stage_aw']
      >>> stage = method_steps("dfq", TrainConfig(epochs=2), TrainConfig(epochs=3))[-1]
      >>> stage.config.epochs, stage.config.momentum
      (5, 0.0)
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}. Received: method={method!r}")
    if combined is None:
        combined = replace(stage_w, epochs=stage_a.epochs + stage_w.epochs, period=None)
        if method == "dfq":
            combined = replace(combined, momentum=DFQ_MOMENTUM, weight_decay=DFQ_WEIGHT_DECAY)
    mixed = mixed_precision(layer_bits)
    if mixed and method.startswith("tfmot"):
        raise ValueError(
            f"Method {method!r} uses tfmot's scheme, which has one bit width for every "
            "layer; `layer_bits` needs tf_pfq's quantizer (a method not starting with "
            "'tfmot')."
        )
    aw = Train("stage_aw", activation_bits, weight_bits, combined, **mixed)
    if method == "pfq":
        return algorithm1_steps(stage_a, stage_w, activation_bits, weight_bits, layer_bits)
    if method == "pfq_no_bias_correction":
        # PfQ removes the dead channels but leaves their constant act(beta) out of the
        # next layer's bias: the ablation that shows what the absorption is worth.
        return [
            Prune("pfq_1", absorb=False),
            Train("stage_a", activation_bits, None, stage_a, **mixed),
            Prune("pfq_2", absorb=False),
            FoldBatchNorm("fold"),
            Train("stage_w", activation_bits, weight_bits, stage_w, **mixed),
        ]
    if method == "original":
        return [
            Train("stage_a", activation_bits, None, stage_a, **mixed),
            FoldBatchNorm("fold"),
            Train("stage_w", activation_bits, weight_bits, stage_w, **mixed),
        ]
    if method == "pfq_once":
        return [Prune("pfq_1"), FoldBatchNorm("fold"), aw]
    if method == "qat_once":
        return [FoldBatchNorm("fold"), aw]
    if method == "dfq":
        return [FoldBatchNorm("fold"), DFQ("dfq", weight_bits=weight_bits), aw]
    return [Train("stage_aw", activation_bits, weight_bits, combined, quantizer=method)]


def run_method(
    method: str,
    model,
    train_data,
    *,
    activation_bits: int = 4,
    weight_bits: int = 4,
    stage_a: TrainConfig | None = None,
    stage_w: TrainConfig | None = None,
    combined: TrainConfig | None = None,
    layer_bits=None,
    **kwargs,
):
    """Runs one of `METHODS` on a pretrained float model (see `method_steps`).

    Args:
      method: one of `METHODS`.
      model: pretrained float tf_keras model (not modified).
      train_data: batched (image, label) training dataset.
      activation_bits: activation bit width.
      weight_bits: weight bit width.
      stage_a: stage A hyperparameters (default: `TrainConfig(epochs=1)`).
      stage_w: stage W hyperparameters (default: `TrainConfig(epochs=1)`).
      combined: the single stage of the one-stage methods (see `method_steps`).
      layer_bits: per-layer bit widths, {layer: (activation_bits, weight_bits)}
        (`tf_pfq.apply`'s mixed precision).
      **kwargs: as for `tf_pfq.workflow.run_steps` (test/validation data,
        `output_dir`, `strategy`, callbacks, ...).

    Returns:
      (quantized QAT model, `tf_pfq.workflow.WorkflowSummary`).

    Raises:
      ValueError: unknown method.

    Example:
      >>> run_method("qat", None, None)
      Traceback (most recent call last):
      ...
      ValueError: `method` must be one of (...). Received: method='qat'
    """
    steps = method_steps(
        method,
        stage_a or TrainConfig(epochs=1),
        stage_w or TrainConfig(epochs=1),
        activation_bits,
        weight_bits,
        combined,
        layer_bits,
    )
    kwargs.setdefault("method", method)
    return run_steps(model, train_data, steps, **kwargs)
