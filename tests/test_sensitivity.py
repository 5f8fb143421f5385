"""Per-layer sensitivity and the bit-width plan chosen from it."""

from __future__ import annotations

import numpy as np
import pytest

import tf_pfq
from tf_pfq import data
from tf_pfq.compat import keras
from tf_pfq.mixed_precision import SensitivityReport, SensitivityRow, choose_bits, sensitivity

L = keras.layers


def _report(
    changes: dict[str, dict[int, float]], params: dict[str, int], macs: dict | None = None
) -> SensitivityReport:
    rows = [
        SensitivityRow(name, "weights", bits, change, 0.0)
        for name, by_bits in changes.items()
        for bits, change in by_bits.items()
    ]
    return SensitivityReport(rows, 1.0, 0.5, None, None, params, macs or {})


def test_the_plan_spends_the_budget_where_the_loss_is():
    report = _report(
        {
            "sensitive": {2: 1.0, 4: 0.1, 8: 0.0},
            "robust": {2: 0.01, 4: 0.005, 8: 0.0},
        },
        {"sensitive": 100, "robust": 100},
    )
    # Uniform 4 bits (100 bytes): both at 4 is the best that fits.
    assert choose_bits(report, 200 * 4 / 8) == {"sensitive": (None, 4), "robust": (None, 4)}
    # The bytes of uniform 5 bits: the sensitive layer at 8, the robust one at 2.
    plan = choose_bits(report, 125)
    assert plan == {"sensitive": (None, 8), "robust": (None, 2)}
    assert plan.weight_bytes == 125 == plan.budget_bytes
    assert plan.predicted_loss_change == pytest.approx(0.01)
    assert "sensitive: 8" in plan.describe() and "125 of 125" in plan.describe()
    # Below every kernel at its fewest bits: refused, with the floor.
    with pytest.raises(ValueError, match="below 50 bytes"):
        choose_bits(report, 40)
    # No budget to spare: everything at the fewest bits.
    assert choose_bits(report, 50) == {"sensitive": (None, 2), "robust": (None, 2)}


def test_a_layer_that_only_recovers_at_8_bits_is_reached():
    # 2, 3 and 4 bits ruin "cliff" alike (a range held by one huge weight); the next
    # width gains nothing, so a one-step greedy search left it at 2 bits.
    changes = {"cliff": {2: 5.0, 3: 5.0, 4: 5.0, 8: 0.0}, "other": {2: 0.2, 3: 0.1, 4: 0.0, 8: 0.0}}
    report = _report(changes, {"cliff": 16, "other": 160})
    plan = choose_bits(report, (16 + 160) * 3 / 8)
    assert plan["cliff"] == (None, 8)
    assert plan.predicted_loss_change < 5.0


def test_a_bit_operations_budget_keeps_the_compute_heavy_layer_narrow():
    # Same bytes, but "sensitive" does 100x the MACs: the bit-operations budget of
    # uniform 4 bits (x 8-bit activations) cannot pay for it at 8 bits.
    changes = {"sensitive": {2: 1.0, 4: 0.1, 8: 0.0}, "robust": {2: 0.01, 4: 0.005, 8: 0.0}}
    report = _report(changes, {"sensitive": 100, "robust": 100}, {"sensitive": 1000, "robust": 10})
    uniform_4 = (1000 + 10) * 4 * 8
    plan = choose_bits(report, 125, bitops_budget=uniform_4)
    assert plan == {"sensitive": (None, 4), "robust": (None, 4)}
    assert plan.bitops == (1000 * 4 + 10 * 4) * 8 <= uniform_4
    assert "bit-operations" in plan.describe()
    # Without it, the bytes alone decide (as above).
    assert choose_bits(report, 125)["sensitive"] == (None, 8)
    with pytest.raises(ValueError, match="below 16160 bit-operations"):
        choose_bits(report, 125, bitops_budget=1000)
    with pytest.raises(ValueError, match="kernel_macs"):
        choose_bits(_report(changes, {"sensitive": 100, "robust": 100}), 125, bitops_budget=1)


@pytest.mark.slow
def test_sensitivity_of_a_trained_net_and_its_plan_applies(tmp_path):
    keras.utils.set_random_seed(0)
    splits = data.load_digits(image_size=8, num_train=600)
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="conv")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU(name="relu")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inputs, L.Dense(10, name="logits")(x))
    model.compile(
        keras.optimizers.Adam(0.02),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(splits["train"].images, splits["train"].labels, epochs=15, verbose=0)
    test = (splits["test"].images, splits["test"].labels)
    weights = [w.copy() for w in model.get_weights()]
    report = sensitivity(model, test, bits=(2, 4))
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), weights))
    assert report.reference_accuracy > 0.25  # a net that learned something (chance: 0.1)
    by = {(r.layer, r.tensor, r.bits): r.loss_change for r in report.rows}
    assert set(by) == {
        *((n, "weights", b) for n in ("conv", "logits") for b in (2, 4, 8)),
        *((n, "activations", b) for n in ("relu", "pool") for b in (2, 4)),
    }
    # Coarser grids cost more: 2-bit weights change the loss more than 8-bit ones.
    for name in ("conv", "logits"):
        assert abs(by[(name, "weights", 2)]) > abs(by[(name, "weights", 8)])
    assert "| conv | weights | 216 |" in report.to_markdown()
    # MACs per image: 8x8 outputs x 216 taps for the conv, 8 x 10 for the logits.
    assert report.kernel_macs == {"conv": 8 * 8 * 216, "logits": 80}
    report.plot(str(tmp_path / "sensitivity.png"))
    assert (tmp_path / "sensitivity.png").stat().st_size > 0
    plan = choose_bits(report, sum(report.kernel_params.values()) * 4 / 8)
    folded, _ = tf_pfq.fold_batchnorm(model)
    qat = tf_pfq.apply(folded, activation_bits=4, weight_bits=4, layer_bits=plan)
    widths = {
        layer.layer.name: layer.quantize_config.weight_quantizer.num_bits
        for layer in qat.layers
        if getattr(getattr(layer, "quantize_config", None), "weight_quantizer", None)
    }
    assert widths == {name: bits[1] for name, bits in plan.items()}
