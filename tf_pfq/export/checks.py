"""Refusals: what makes `to_tflite` raise rather than return a file that is not the QAT model.

A file that runs but computes something else than the QAT model is worse than no
file: it is found (if at all) only by measuring it. So the export checks, naming
the layer each time:

* before conversion, the QAT model and its plan: NaN/Inf weights or ranges
  (`check_finite_model`; their NaN scales make the converter fail deep inside, or
  crash the process) and steps TFLite cannot store (`check_plan_scales`);
* after conversion, the file: ops the converter quietly left in float
  (`check_integer`), and scale ratios XNNPACK's int8 kernels refuse or leave to a
  kernel that rounds otherwise (`check_xnnpack_limits`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tf_pfq.compat import check_model
from tf_pfq.export.plan import ExportPlan
from tf_pfq.export.summary import inspect
from tf_pfq.nonfinite import describe as describe_nonfinite
from tf_pfq.nonfinite import nonfinite_variables

__all__ = ["check_finite_model", "check_integer", "check_plan_scales", "check_xnnpack_limits"]


def check_finite_model(qat_model) -> None:
    """Raises when a weight or an activation range of the QAT model is NaN or infinite.

    Such a model has no integer form, and its NaN scales make the TFLite converter
    fail deep inside (or crash the process), so it is refused before conversion.

    Raises:
      ValueError: naming the first layer whose range and whose weights are not finite.
    """
    check_model(qat_model, "qat_model")
    found = nonfinite_variables(qat_model)
    if found:
        raise ValueError(
            f"`qat_model` ({qat_model.name}) is not finite: {describe_nonfinite(found)}. "
            "Its training diverged (tf_pfq.training.fit stops at the first such step); "
            "fine-tune again from the last good weights with a lower learning rate."
        )


# TFLite stores scales as float32 and its converter refuses those outside the normal
# float32 range; an int32 bias step below it is an underflowed product s_in * s_w.
_SMALLEST_SCALE = float(np.finfo(np.float32).tiny)


def check_plan_scales(plan: ExportPlan) -> None:
    """Raises when a grid of the plan has a step TFLite cannot store (0, NaN, Inf, denormal).

    Raises:
      ValueError: naming the layer, the tensor (output, kernel or bias) and the step.
    """
    steps: list[tuple[str, str, Any]] = [
        ("input", plan.model.layers[0].name, plan.input and plan.input.scale)
    ]
    for name, quant in plan.layers.items():
        steps.append(("output", name, quant.output and quant.output.scale))
        steps.append(("kernel", name, quant.kernel and quant.kernel.scale))
        steps.append(("bias", name, quant.bias_scale))
    for tensor, name, step in steps:
        if step is None:
            continue
        scale = np.asarray(step, np.float64)
        bad = ~np.isfinite(scale) | (scale < _SMALLEST_SCALE) | (scale > np.finfo(np.float32).max)
        if np.any(bad):
            raise ValueError(
                f"Layer {name!r}: its {tensor} step {float(scale.reshape(-1)[np.argmax(bad)])!r} "
                "is outside what TFLite can store (a positive normal float32); the QAT "
                "model's range or weights there are degenerate."
            )


# The scale ratios XNNPACK's int8 kernels accept (`xnn_create_*_qs8`): a weighted op's
# requantization scale s_in * s_w / s_out below 2^8; MUL's s_a * s_b / s_out and each
# ADD input's s_in / s_out in [2^-16, 2^8) and [2^-10, 2^8).
_WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")
_RATIO_LIMITS = {"weighted": (0.0, 2.0**8), "MUL": (2.0**-16, 2.0**8), "ADD": (2.0**-10, 2.0**8)}


def _scale_ratios(op) -> tuple[str, np.ndarray] | None:
    inputs = [t for t in op.inputs if t is not None and t.scales]
    if not op.outputs or not op.outputs[0].scales:
        return None
    out = np.float32(op.outputs[0].scales[0])
    if op.op in _WEIGHTED_OPS and len(inputs) >= 2:
        # TRANSPOSE_CONV's inputs are (output shape, weights, data): the shape has no scale.
        w, x = inputs[:2] if op.op == "TRANSPOSE_CONV" else inputs[1::-1]
        return "weighted", np.float32(x.scales[0]) * np.asarray(w.scales, np.float32) / out
    if op.op == "MUL" and len(inputs) == 2:
        product = np.float32(inputs[0].scales[0]) * np.float32(inputs[1].scales[0])
        return "MUL", np.asarray([product / out])
    if op.op in ("ADD", "SUB"):
        return "ADD", np.asarray([np.float32(t.scales[0]) / out for t in inputs])
    return None


def layers_of_tensor(tensor_name: str) -> list[str]:
    """The Keras layers a converter tensor name holds, in the order it names them.

    The converter joins the names of the ops it fused with ";" (an activation may
    come before the conv it follows), and some parts are empty:
    "relu/Relu;conv/add;;pad/Pad" -> ["relu", "conv", "pad"].
    """
    parts = [part.split("/", 1)[0] for part in tensor_name.split(";")]
    return list(dict.fromkeys(part for part in parts if part)) or [tensor_name]


def check_xnnpack_limits(tflite: bytes) -> None:
    """Raises when an op's scales are outside what XNNPACK's int8 kernel accepts.

    XNNPACK (LiteRT's default CPU path) refuses such a conv (the interpreter then
    fails to prepare) or leaves such an ADD or MUL to TFLite's builtin kernel, which
    rounds otherwise than the QAT model (which rounds as XNNPACK does). It happens
    when a range is far from the values it holds: a fine-tuning that moved the
    weights faster than the moving-average ranges followed.

    Raises:
      ValueError: naming the op, the layers in its tensor's name, the ratio and the
        limits.
    """
    for op in inspect(tflite).ops:
        found = _scale_ratios(op)
        if found is None:
            continue
        kind, ratios = found
        lo, hi = _RATIO_LIMITS[kind]
        bad = (ratios < lo) | (ratios >= hi) | ~np.isfinite(ratios)
        if np.any(bad):
            ratio = float(ratios[np.argmax(bad)])
            names = layers_of_tensor(op.outputs[0].name)
            layers = ("Layers " if len(names) > 1 else "Layer ") + ", ".join(map(repr, names))
            raise ValueError(
                f"{layers} ({op.op}, tensor {op.outputs[0].name!r}): its scale "
                f"ratio {ratio:.3g} is outside [{lo:g}, {hi:g}), which XNNPACK's int8 "
                f"{op.op} needs (it would refuse the file or leave the op to a kernel that "
                "rounds otherwise). The output range there is far from the values the "
                "layer computes; fine-tune until the ranges follow the weights."
            )


def check_integer(tflite: bytes) -> None:
    """Raises unless every compute op of the file is integer.

    The TFLite converter quietly keeps an op in float (between a DEQUANTIZE and a
    QUANTIZE) when it cannot quantize it, for instance where a fake-quant op it
    needs was folded away. Such a file runs, but it is not the QAT model, does not
    run on integer-only hardware, and is not what `to_tflite` promises, so it is
    never returned. Only the QUANTIZE of a float model input and the DEQUANTIZE of
    a float model output (`io_dtype="float32"`) may touch float tensors.

    Raises:
      ValueError: naming each float op and its output tensor (whose name holds
        the Keras layer's).
    """
    summary = inspect(tflite)
    bad = []
    for op in summary.ops:
        if summary.is_io_conversion(op):
            continue
        tensors = [t for t in (*op.inputs, *op.outputs) if t is not None]
        if any(t.dtype.startswith("float") for t in tensors):
            bad.append(f"op {op.index} {op.op} -> {op.outputs[0].name!r}")
    if bad:
        raise ValueError(
            "The TFLite converter left these ops in float, so the file would not be "
            "the integer QAT model: "
            + "; ".join(bad[:8])
            + (" ..." if len(bad) > 8 else "")
            + ". Please report the model; the layer names are in the tensor names."
        )
