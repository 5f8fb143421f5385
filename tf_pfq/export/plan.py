"""The export plan: which n-bit grids each layer of a QAT model is exported with.

The integer export needs two things from a QAT model: its plain layers with the
trained float weights, and the grid of every quantizer. `plan_from_qat` reads both
into an `ExportPlan`, a plain value that everything after it works from (checks,
calibration, lowering), so a plan can be inspected or edited (tests, benchmarks)
without touching the QAT model.

Two export decisions are taken here, once for every consumer of the plan:

* a grid of zero width (a dead tensor trained to [0, 0]) gets the tiny positive
  step TFLite needs (`_usable`), the step the QAT model's integer arithmetic uses;
* a layer whose output only feeds a Concatenate gets the concat's grid, so the
  CONCATENATION needs no requantization.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from tf_pfq.graph import LayerGraph
from tf_pfq.layers.table import Family, family_of
from tf_pfq.quantize import concat_shared_ranges
from tf_pfq.quantize_configs import PfqQuantizeConfig
from tf_pfq.quantizers import EMPTY_RANGE_STEP, QuantParams, nudge

__all__ = ["ExportPlan", "LayerQuantization", "plan_from_qat"]


@dataclasses.dataclass(frozen=True)
class LayerQuantization:
    """The trained n-bit grids of one layer.

    Attributes:
      kernel: grid of the layer's kernel (per tensor, or per output channel), or None.
      output: grid of the layer's output activation, or None when QAT leaves the
        output in float (Add outputs, logits).
      bias_scale: the int32 bias grid `s_in * s_w` QAT trained the bias on, or None
        (then the export snaps the bias to its own input scale times `s_w`).
      kernel_values: the kernel on its n-bit grid exactly as the QAT forward pass
        computes it, or None (then it is fake-quantized on `kernel`). A weight on a
        rounding tie can round either way between the two computations, and one
        flipped weight of a deep 4-bit net changes its logits by many steps.
      bias_taps: the products per accumulator QAT clipped the bias for
        (`tf_pfq.quant_math.bias_range`), or None for the plain int32 range.
    """

    kernel: QuantParams | None = None
    output: QuantParams | None = None
    bias_scale: np.ndarray | None = None
    kernel_values: np.ndarray | None = dataclasses.field(default=None, compare=False)
    bias_taps: int | None = None


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """A float model plus the n-bit grids to export it with.

    Attributes:
      model: a Functional tf_keras model of plain layers with the trained (float)
        weights: the stripped QAT model.
      layers: `LayerQuantization` by layer name.
      input: grid of the model input, or None when QAT does not quantize it.
    """

    model: Any
    layers: Mapping[str, LayerQuantization]
    input: QuantParams | None = None


def _usable(grid: QuantParams | None) -> QuantParams | None:
    """A grid with a positive step: a dead (all-zero) tensor trained to [0, 0] gets a tiny one.

    TF's fake-quant maps everything to 0 on a zero-width range; TFLite needs a
    positive scale. `EMPTY_RANGE_STEP` keeps 0 exact, changes nothing measurable,
    and is the step the QAT model's integer arithmetic divides such a tensor by
    (`tf_pfq.quantizers.activation_step`), so the bias grids of its readers agree.
    """
    if grid is None:
        return None
    scale = np.asarray(grid.scale, np.float32)
    if np.all(np.isfinite(scale)) and np.all(scale > 0):
        return grid
    lo = np.minimum(np.asarray(grid.min, np.float32), 0.0)
    width = np.float32(EMPTY_RANGE_STEP * (grid.quant_max - grid.quant_min))
    hi = np.maximum(np.asarray(grid.max, np.float32), lo + width)
    return nudge(lo, hi, grid.num_bits, grid.narrow_range)


def _range_sources(qat_model, model) -> dict[str, str]:
    """{layer: the Concatenate whose range it uses}, as `tf_pfq.apply` recorded it.

    A QAT model saved before apply recorded the choice (a Concatenate config without
    `range_sources`) gets it re-derived from the graph by the same rule.
    """
    found: dict[str, str] = {}
    for wrapper in qat_model.layers:
        config = getattr(wrapper, "quantize_config", None)
        if not isinstance(config, PfqQuantizeConfig):
            continue
        if family_of(wrapper.layer) is Family.CONCAT and config.range_sources is None:
            return concat_shared_ranges(model, activation_bits=8)
        for source in config.range_sources or ():
            found[source] = wrapper.layer.name
    return found


def plan_from_qat(qat_model) -> ExportPlan:
    """Reads a `tf_pfq.apply` QAT model into an `ExportPlan`.

    Uses `tf_pfq.strip` (float layers with the trained weights) and
    `tf_pfq.quantize.quantization_params` (the nudged grids of every quantizer; its
    module docstring lists which tensor carries which quantizer).

    Args:
      qat_model: a stage-W model from `tf_pfq.apply(..., weight_bits=n)`.

    Returns:
      The `ExportPlan`.

    Raises:
      ValueError: the model quantizes no weights (a stage-A model).
    """
    from tf_pfq.quantize import quantization_params, strip

    params = quantization_params(qat_model)
    model = strip(qat_model)
    graph = LayerGraph(model)
    if not any(p.kernel is not None for p in params.values()):
        raise ValueError(
            f"`qat_model` ({qat_model.name}) quantizes activations only (stage A). The "
            "integer export needs n-bit weights: fold batch normalization with "
            "tf_pfq.fold_batchnorm, wrap with tf_pfq.apply(..., weight_bits=n) and "
            "fine-tune (stage W) first."
        )
    input_name = graph.input_names[0]
    input_params = params.get(input_name)
    layers = {
        name: LayerQuantization(
            kernel=_usable(p.kernel),
            output=_usable(p.output),
            bias_scale=p.bias_scale,
            kernel_values=p.kernel_values,
            bias_taps=p.bias_taps,
        )
        for name, p in params.items()
        if name != input_name
    }
    # The layers whose output only feeds a Concatenate use the concat's range: give
    # them its grid, so every concat input is already on it (no requantization).
    for source, concat in _range_sources(qat_model, model).items():
        grid = layers.get(concat, LayerQuantization()).output
        if grid is not None and layers.get(source, LayerQuantization()).output is None:
            layers[source] = dataclasses.replace(
                layers.get(source, LayerQuantization()), output=grid
            )
    return ExportPlan(
        model=model,
        layers=layers,
        input=_usable(input_params.output) if input_params is not None else None,
    )
