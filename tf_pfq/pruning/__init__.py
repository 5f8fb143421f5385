"""The PfQ pruning pass (`tf_pfq.prune`), one module per job.

The pass has three stages that used to live in one class, and each is easier to
check on its own:

* `plan`: which BN channels are dead (the threshold of eq. 17), which of them can
  go, and what every layer loses; the graph walk, re-planned until no removal fails,
  and the channel alignment of `channel_multiple`.
* `rules`: how each consumer kind (the layer table's `Absorb`) absorbs a constant
  input channel or carries it on; `padding` holds the part of that where constants
  meet zero padding (border patterns, the carrier channels of the exact mode).
* `rewrite`: the pruned model, built from a plan: weights sliced, biases or BN
  moving means updated, carrier channels set to their constant.
* `report`: the `PruneReport` of what was done.

`context` is what the stages share: the model's graph and weights, the options,
and the plan's vocabulary (a removed channel's constant, a carrier). The public
entry point stays `tf_pfq.prune.prune`.
"""
