"""Checking tf_pfq on an architecture without trained weights: fixtures and the whole chain.

Pretrained weights are often not at hand (no download, a new architecture), and an
untrained network is a poor test subject for PfQ: its BN statistics are the
initial ones (mean 0, variance 1, so no channel is dead and deep signals fade) and
its Normalization layers are identities. The helpers here give such a model what
training would:

* `with_live_batchnorm`: random BN scales and shifts, statistics measured on the
  given images, so signals stay alive through a deep net;
* `with_dead_channels`: channels that are dead the way long training with weight
  decay leaves them (zero filter into the BN, moving variance far below epsilon, so
  the channel's output is the constant beta);
* `with_preprocessing_statistics`: ImageNet's mean and variance in Normalization
  layers (a non-trivial per-channel affine for the fold to handle).

`run_chain` then runs prune -> apply (stage A) -> strip -> fold_batchnorm -> apply
(stage W) -> to_tflite and measures what a deployment needs: whether the pruned model
computes the same function, how many values each exported weight holds, and how far
the integer file on LiteRT's XNNPACK path is from the Keras QAT model, in int8 output
steps (`measure_export`). By default no training happens: a training-mode pass sets
the QAT ranges, which is all the export reads, so the numbers measure the conversion,
not accuracy; `ChainSettings` adds short fine-tunings, a second PfQ and other bits.
`benchmarks/zoo.py` tabulates it for the `tf_keras.applications` zoo; the tests assert
it. `random_graph` / `run_random_graph` (`tf_pfq.testing.graphs`) do the same on
random graphs of every exportable layer (`benchmarks/export_fuzz.py`).

Every helper returns a new model; the model passed in is not changed.
"""

from tf_pfq.testing.chain import (
    ZOO,
    ChainResult,
    ChainSettings,
    measure_export,
    run_chain,
    with_dead_channels,
    with_live_batchnorm,
    with_preprocessing_statistics,
)
from tf_pfq.testing.graphs import GraphDescription, random_graph, run_random_graph

__all__ = [
    "ZOO",
    "ChainResult",
    "ChainSettings",
    "GraphDescription",
    "measure_export",
    "random_graph",
    "run_chain",
    "run_random_graph",
    "with_dead_channels",
    "with_live_batchnorm",
    "with_preprocessing_statistics",
]
