"""Tests for tf_pfq.baselines: the paper's comparison methods through one API."""

import numpy as np
import pytest
from test_prune_helpers import tiny_dead_model

from tf_pfq import comparison, data
from tf_pfq.baselines import METHODS, method_steps, run_method
from tf_pfq.training import TrainConfig

A = TrainConfig(epochs=1, learning_rate=0.01)
W = TrainConfig(epochs=2, learning_rate=0.02)


@pytest.fixture(scope="module")
def digits():
    splits = data.load_digits(image_size=8, num_train=96)
    return data.to_dataset(splits["train"], 32), data.to_dataset(splits["test"], 256)


def test_method_steps_structure():
    names = {m: [(s.name, s.kind) for s in method_steps(m, A, W, 3, 3)] for m in METHODS}
    assert names["pfq"] == [
        ("pfq_1", "prune"),
        ("stage_a", "train"),
        ("pfq_2", "prune"),
        ("fold", "fold"),
        ("stage_w", "train"),
    ]
    assert names["original"] == [("stage_a", "train"), ("fold", "fold"), ("stage_w", "train")]
    assert names["pfq_once"] == [("pfq_1", "prune"), ("fold", "fold"), ("stage_aw", "train")]
    assert names["qat_once"] == [("fold", "fold"), ("stage_aw", "train")]
    assert names["dfq"] == [("fold", "fold"), ("dfq", "dfq"), ("stage_aw", "train")]
    assert names["tfmot"] == [("stage_aw", "train")]
    assert names["tfmot_matched"] == [("stage_aw", "train")]
    # Equal epochs for all methods (paper §4.2.2: 2 x 100 vs 200).
    for method in METHODS:
        steps = method_steps(method, A, W, 3, 3)
        assert sum(s.config.epochs for s in steps if s.kind == "train") == 3, method
        last = steps[-1]
        assert (last.activation_bits, last.weight_bits) == (3, 3)
    # Stage A quantizes activations only; the tfmot step uses tfmot's scheme.
    assert method_steps("original", A, W)[0].weight_bits is None
    assert method_steps("tfmot", A, W)[0].quantizer == "tfmot"
    assert method_steps("tfmot_matched", A, W)[0].quantizer == "tfmot_matched"
    # DFQ fine-tunes with the paper's DFQ settings; the control differs only in DFQ.
    dfq_stage, once_stage = method_steps("dfq", A, W)[-1], method_steps("qat_once", A, W)[-1]
    assert (dfq_stage.config.momentum, dfq_stage.config.weight_decay) == (0.0, 1e-4)
    assert once_stage.config.momentum == W.momentum
    assert dfq_stage.config.learning_rate == once_stage.config.learning_rate
    # The ablation's steps say what differs: PfQ without absorbing act(beta).
    ablation = method_steps("pfq_no_bias_correction", A, W)
    assert [s.options for s in ablation if s.kind == "prune"] == [{"absorb": False}] * 2
    assert [s.options for s in method_steps("pfq", A, W) if s.kind == "prune"] == [{}, {}]
    with pytest.raises(ValueError, match="method"):
        method_steps("dsq", A, W)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["original", "pfq_once", "qat_once", "dfq", "tfmot_matched"])
def test_method_runs_and_reports(method, digits):
    train, test = digits
    model = tiny_dead_model()
    qat, summary = run_method(method, model, train, stage_a=A, stage_w=W, test_data=test, verbose=0)
    float_macs = summary.float_macs
    steps = {s.name: s for s in summary.steps}
    assert steps["stage_aw" if method != "original" else "stage_w"].epochs == (
        3 if method != "original" else 2
    )
    assert 0.0 <= summary.accuracy <= 1.0
    if method == "pfq_once":
        assert steps["pfq_1"].channels_removed == 4
        assert summary.macs < float_macs and summary.params_pruned_fraction > 0
    else:
        # No PfQ: nothing pruned, MACs unchanged.
        assert summary.channels_removed == 0 and summary.macs == float_macs
        assert summary.params_pruned_fraction == 0.0
    if method == "dfq":
        assert steps["dfq"].details["equalized_pairs"] >= 2
    wrappers = [type(layer).__name__ for layer in qat.layers]
    assert any("QuantizeWrapper" in name for name in wrappers)
    if method.startswith("tfmot"):
        # tfmot's default n-bit scheme keeps BN (its transforms handle it); ours fold it.
        assert any("bn" in layer.name for layer in qat.layers)
    else:
        assert not any(layer.name.endswith("_bn") for layer in qat.layers)
    # The pretrained model is never modified.
    np.testing.assert_array_equal(
        model.get_layer("conv_dw_1").get_weights()[0],
        tiny_dead_model().get_layer("conv_dw_1").get_weights()[0],
    )


@pytest.mark.slow
def test_compare_is_resumable_and_aggregates(digits, tmp_path):
    splits = data.load_digits(image_size=8, num_train=96)
    model = tiny_dead_model()
    kwargs = {"methods": ["tfmot"], "bits": [(4, 4)], "seeds": [0, 1], "stage_a": A, "stage_w": A}
    rows = comparison.compare(model, splits, str(tmp_path), **kwargs)
    assert [(r["method"], r["seed"]) for r in rows] == [("tfmot", 0), ("tfmot", 1)]
    # A second call finds both runs finished and reads their summaries back.
    states = sorted(tmp_path.glob("*/workflow_state.json"))
    assert len(states) == 2
    mtimes = [p.stat().st_mtime_ns for p in states]
    again = comparison.compare(model, splits, str(tmp_path), **kwargs)
    assert [p.stat().st_mtime_ns for p in states] == mtimes  # nothing re-ran
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in rows]
    # Another model in the same directory is refused, naming what differs.
    other = tiny_dead_model()
    other.layers[1].kernel.assign(other.layers[1].kernel * 2)
    with pytest.raises(
        ValueError, match=r"tfmot_a4w4_s0 holds results of other settings: model\.weights"
    ):
        comparison.compare(other, splits, str(tmp_path), **kwargs)
    assert [p.stat().st_mtime_ns for p in states] == mtimes
    table = comparison.aggregate(rows)
    assert len(table) == 1 and table[0]["runs"] == 2
    expected_std = float(np.std([r["accuracy"] for r in rows], ddof=1))
    assert table[0]["accuracy_std"] == pytest.approx(expected_std)
    assert "| tfmot |" in comparison.to_markdown(table)
