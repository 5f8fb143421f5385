"""tf_pfq: filter pre-pruning (PfQ) and staged quantized fine-tuning for tf_keras.

Implements Nishikawa et al., "Filter Pre-Pruning for Improved Fine-tuning of
Quantized Deep Neural Networks", arXiv:2011.06751.
"""

# First, before TensorFlow loads: the project's scripts start quietly (see tf_pfq.cli).
from tf_pfq import cli  # noqa: F401  # isort: skip
from tf_pfq import (
    baselines,
    comparison,
    compat,
    data,
    dfq,
    export,
    graph,
    models,
    plots,
    recipes,
    training,
    workflow,
)
from tf_pfq.baselines import METHODS, run_method
from tf_pfq.canonical import canonicalize
from tf_pfq.cost import count_macs, count_params, layer_costs
from tf_pfq.fold import FoldReport, fold_batchnorm
from tf_pfq.mixed_precision import choose_bits, sensitivity
from tf_pfq.prune import prune
from tf_pfq.quantize import apply, quantization_params, quantize_scope, strip
from tf_pfq.quantizers import PfqActivationQuantizer, PfqBiasQuantizer, PfqWeightQuantizer
from tf_pfq.ranges import ActivationRange
from tf_pfq.report import PruneReport
from tf_pfq.saving import load, save
from tf_pfq.training import TrainConfig
from tf_pfq.version import __version__
from tf_pfq.workflow import WorkflowSummary, run_workflow

__all__ = [
    "METHODS",
    "TrainConfig",
    "WorkflowSummary",
    "baselines",
    "comparison",
    "dfq",
    "plots",
    "recipes",
    "run_method",
    "run_workflow",
    "training",
    "workflow",
    "ActivationRange",
    "FoldReport",
    "PfqActivationQuantizer",
    "PfqBiasQuantizer",
    "PfqWeightQuantizer",
    "PruneReport",
    "__version__",
    "apply",
    "canonicalize",
    "choose_bits",
    "load",
    "save",
    "compat",
    "count_macs",
    "count_params",
    "data",
    "export",
    "fold_batchnorm",
    "graph",
    "layer_costs",
    "models",
    "prune",
    "quantization_params",
    "quantize_scope",
    "sensitivity",
    "strip",
]
