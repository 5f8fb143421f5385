"""tf_pfq: filter pre-pruning (PfQ) and staged quantized fine-tuning for tf_keras.

Implements Nishikawa et al., "Filter Pre-Pruning for Improved Fine-tuning of
Quantized Deep Neural Networks", arXiv:2011.06751.
"""

from tf_pfq import compat, data, graph, models
from tf_pfq.ranges import ActivationRange
from tf_pfq.version import __version__

__all__ = [
    "ActivationRange",
    "__version__",
    "compat",
    "data",
    "graph",
    "models",
]
