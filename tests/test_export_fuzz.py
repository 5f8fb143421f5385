"""Random graphs through the whole chain: the integer file reproduces every one.

Each seed is a `tf_pfq.testing.random_graph` (random compositions of the layers the
export supports, random widths and strides, bit widths 2..8, both weight schemes,
per-tensor or per-channel weights, live BN statistics with planted dead channels)
run through prune -> stage A -> fine-tuning -> strip -> prune -> fold -> stage W ->
fine-tuning -> to_tflite (`run_random_graph`). The file on XNNPACK must be within
half an int8 output step of the Keras QAT model at the 99th percentile and one step
at the maximum, or the export must have refused the graph with an error naming the
layer. `benchmarks/export_fuzz.py` runs the same on hundreds of seeds.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from tf_pfq import testing
from tf_pfq.compat import keras
from tf_pfq.testing import graphs
from tf_pfq.testing.graphs import BLOCKS

L = keras.layers
# The first 50 seeds, and four that draw what they draw rarely: a depth multiplier
# (54), a Conv2DTranspose (62), nearest (88) and bilinear (94) upsampling.
SEEDS = (*range(50), 54, 62, 88, 94)
# The Keras logits are float32: half a step reads 0.5000003.
NOISE_STEPS = 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_a_random_graph_exports_exactly(seed):
    keras.backend.clear_session()  # layer names of the seed's own, as in the benchmark
    _check_exact(testing.run_random_graph(seed))


# Graphs that draw LeakyReLU, PReLU and max / min with numbers too: two seeds whose
# graphs hold all three (260 feeds a clamp into a Concatenate).
@pytest.mark.slow
@pytest.mark.parametrize("seed", [102, 260])
def test_a_random_graph_with_the_newer_activations_exports_exactly(seed):
    keras.backend.clear_session()
    activations = graphs.ACTIVATIONS + graphs.MORE_ACTIVATIONS
    result = testing.run_random_graph(seed, activations=activations)
    assert all(kind in str(result.description) for kind in graphs.MORE_ACTIVATIONS)
    assert result.error is None, result.error  # both measured exact: no refusal here
    _check_exact(result)


def _check_exact(result):
    where = f"{result.description}\n{result.stages}"
    if result.error is not None:
        refused = result.failed_stage == "tflite" and isinstance(result.error, ValueError)
        if not refused:
            raise AssertionError(where) from result.error
        named = re.findall(r"[Ll]ayer '([^']+)'", str(result.error))
        layers = {layer.name for layer in result.qat.layers} | {
            getattr(layer, "layer", layer).name for layer in result.qat.layers
        }
        assert named and named[0] in layers, (where, str(result.error))
        return
    assert result.p99_steps <= 0.5 + NOISE_STEPS, (where, result.p99_steps, result.max_steps)
    assert result.max_steps <= 1.0 + NOISE_STEPS, (where, result.p99_steps, result.max_steps)
    # The test images are calibration data too: no logit may fall outside the
    # file's range (that would be a wrong range, which the clipped steps hide).
    assert result.saturated == 0.0, (where, result.saturated)


def test_a_seed_builds_the_same_graph_every_time():
    built = []
    for seed in (7, 7, 8):
        keras.backend.clear_session()  # op layers are named by a session counter
        built.append(testing.random_graph(seed))
    (first, described), (again, described_again), (_, other) = built
    assert described == described_again and other != described
    assert [layer.name for layer in first.layers] == [layer.name for layer in again.layers]
    for a, b in zip(first.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_the_seeds_cover_every_layer_and_setting():
    seen: set[str] = set()
    settings: set = set()
    planted = 0
    for seed in SEEDS:
        keras.backend.clear_session()
        model, description = testing.random_graph(seed)
        seen.update(b.split(":")[0].split(" ")[-1] for b in description.blocks)
        seen.update(_features(model))
        settings |= {
            ("A", description.activation_bits),
            ("W", description.weight_bits),
            description.weight_scheme,
            description.per_channel_weights,
        }
        planted += len(description.planted)
    assert planted >= len(SEEDS)  # dead channels in most graphs
    assert set(BLOCKS) <= seen
    assert {
        "Conv2DTranspose",
        "Dense",
        "Rescaling",
        "grouped",
        "dilated",
        "depth multiplier",
        "nearest",
        "bilinear",
        "relu",
        "relu6",
        "swish",
        "hard_swish",
        "sigmoid",
        "tanh",
        "Add + ReLU",
    } <= seen
    assert {("A", b) for b in range(2, 9)} | {("W", b) for b in range(2, 9)} <= settings
    assert {"min_max", "symmetric", True, False} <= settings


def _features(model) -> set[str]:
    found = set()
    for layer in model.layers:
        config = layer.get_config()
        found.add(type(layer).__name__)
        if isinstance(layer, L.DepthwiseConv2D) and config["depth_multiplier"] > 1:
            found.add("depth multiplier")
        elif isinstance(layer, L.Conv2D) and config.get("groups", 1) > 1:
            found.add("grouped")
        if isinstance(layer, L.Conv2D) and tuple(config["dilation_rate"]) != (1, 1):
            found.add("dilated")
        if isinstance(layer, L.UpSampling2D):
            found.add(config["interpolation"])
        if isinstance(layer, L.Activation):
            found.add(config["activation"])
        if isinstance(layer, L.ReLU):
            found.add("relu6" if config.get("max_value") else "relu")
            inbound = layer.inbound_nodes[0].inbound_layers
            if isinstance(inbound, L.Add):
                found.add("Add + ReLU")
        if layer.name.endswith("hard_swish"):
            found.add("hard_swish")
    return found
