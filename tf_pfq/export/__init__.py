"""Integer TFLite export of tf_pfq QAT models, offline inspection, and LiteRT helpers.

* `to_tflite` / `save`: a stage-W QAT model -> full-integer int8 `.tflite` bytes
  whose weights and activations keep the n-bit grid (see `tf_pfq.export.convert`).
* `inspect`: ops, dtypes, scales/zero points, levels, size and MACs of a `.tflite`.
* `edgetpu_compatibility`: a static check against the Edge TPU compiler's documented
  requirements (the compiler itself cannot be installed here).
* `compare_layers`: runs the QAT model and the file side by side and reports, layer
  by layer, how many output steps apart they are and where they first part.
* `litert`: run a `.tflite` on XNNPACK, TFLite's builtin or reference kernels, or a
  user-supplied GPU / Edge TPU delegate library (never a silent CPU fallback).
"""

from tf_pfq.export import litert
from tf_pfq.export.compare import LayerComparison, LayerDiff, compare_layers
from tf_pfq.export.convert import ExportPlan, plan_from_qat, save, to_tflite
from tf_pfq.export.edgetpu import Problem, edgetpu_compatibility
from tf_pfq.export.summary import ModelSummary, activation_levels, inspect, weight_levels

__all__ = [
    "ExportPlan",
    "LayerComparison",
    "LayerDiff",
    "ModelSummary",
    "Problem",
    "activation_levels",
    "compare_layers",
    "edgetpu_compatibility",
    "inspect",
    "litert",
    "plan_from_qat",
    "save",
    "to_tflite",
    "weight_levels",
]
