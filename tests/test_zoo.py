"""The whole chain on the `tf_keras.applications` zoo: every stage runs, prune is exact,
weights hold at most 2^n values, and the integer file reproduces the Keras QAT model.

weights=None (nothing can be downloaded), 32x32 inputs, live BN statistics, dead
channels planted in four BN layers (`tf_pfq.testing`); A4/W4 with `tf_pfq.apply`'s
defaults. `benchmarks/zoo.py` tabulates the same measurements.
"""

from __future__ import annotations

import numpy as np
import pytest

import tf_pfq
from tf_pfq import testing
from tf_pfq.compat import keras

BITS = 4


def _application(name: str, size: int = 32):
    kwargs = {"input_shape": (size, size, 3), "weights": None, "classes": 10}
    kwargs["classifier_activation"] = None
    if name.startswith("MobileNetV3"):
        kwargs["include_preprocessing"] = False
    return getattr(keras.applications, name)(**kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("name", testing.ZOO)
def test_chain_is_exact_on_the_zoo(name):
    keras.utils.set_random_seed(0)
    images = np.random.default_rng(0).uniform(0, 1, (48, 32, 32, 3)).astype(np.float32)
    model = testing.with_preprocessing_statistics(_application(name))
    model, planted = testing.with_dead_channels(model, num_layers=4, per_layer=2)
    model = testing.with_live_batchnorm(model, images)
    result = testing.run_chain(model, images, bits=BITS)
    if result.error is not None:
        raise AssertionError(f"{name}: {result.stages}") from result.error
    assert result.prune["dead_found"] >= 2 * len(planted) - 2, result.prune
    calibration = images[:16]
    tolerance = 1e-4 * max(1.0, float(np.abs(model.predict(calibration, verbose=0)).max()))
    # Exact up to float32 round-off, which a deep net with random BN statistics can
    # amplify: EfficientNetV2B0's logits move by 0.011 when its stem kernel moves by
    # one ulp, and by 0.004 when PfQ merges a stem channel into a carrier. The bound
    # is the model's own response to one-ulp changes of the kernels PfQ rewrote.
    if result.prune["prune_exact"]:
        if result.prune["prune_max_change"] > tolerance:  # measured only when needed
            tolerance = max(tolerance, 2.0 * _ulp_sensitivity(model, calibration))
        assert result.prune["prune_max_change"] <= tolerance, result.prune
    else:
        # A planted constant that meets zero padding is absorbed in the interior
        # only; with exact_only=True PfQ keeps those channels and must be exact.
        _, report = tf_pfq.prune(model, calibration_data=calibration, exact_only=True)
        assert report.exact and report.num_removed > 0, report
        assert report.max_output_change <= tolerance, report
    assert result.max_weight_levels <= 2**BITS
    # Exact: p99 <= 0.5 and max <= 1 output step (values beyond the calibrated logit
    # range saturate and are counted apart, `measure_export`).
    assert result.p99_steps <= 0.5, (result.p99_steps, result.max_steps)
    assert result.max_steps <= 1.0, (result.p99_steps, result.max_steps)


def _ulp_sensitivity(model, images) -> float:
    """Largest logit change when the kernels PfQ rewrites move by one float32 ulp."""
    pruned, _ = tf_pfq.prune(model, calibration_data=images)
    names = {layer.name for layer in model.layers}
    rewritten = [
        layer.name
        for layer in pruned.layers
        if layer.name in names
        and layer.weights
        and any(
            a.shape != b.shape or not np.array_equal(a, b)
            for a, b in zip(layer.get_weights(), model.get_layer(layer.name).get_weights())
        )
    ]
    before = model.predict(images, verbose=0)
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    rng = np.random.default_rng(1)
    for name in rewritten:
        weights = copy.get_layer(name).get_weights()
        ulp = 1.0 + rng.choice([-1.0, 1.0], weights[0].shape) * 2.0**-23
        copy.get_layer(name).set_weights([(weights[0] * ulp).astype(np.float32), *weights[1:]])
    return float(np.abs(copy.predict(images, verbose=0) - before).max())


def test_helpers_leave_the_model_alone_and_plant_constant_channels():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    model = keras.Model(inputs, keras.layers.ReLU()(x))
    before = [w.copy() for w in model.get_weights()]
    images = np.random.default_rng(1).uniform(0, 1, (8, 8, 8, 3)).astype(np.float32)
    dead, planted = testing.with_dead_channels(model, num_layers=1, per_layer=2)
    dead = testing.with_live_batchnorm(dead, images)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert planted == ["bn"]
    bn_out = keras.Model(dead.input, dead.get_layer("bn").output)(images).numpy()
    spread = bn_out.std(axis=(0, 1, 2))
    assert int(np.sum(spread < 1e-6)) == 2  # exactly the planted channels are constant
    variance = dead.get_layer("bn").moving_variance.numpy()
    assert int(np.sum(variance < 1e-3)) == 2


def test_run_chain_records_the_failing_stage():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.LayerNormalization(name="ln")(x)  # unknown to tf_pfq
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    images = np.random.default_rng(0).uniform(0, 1, (24, 8, 8, 3)).astype(np.float32)
    result = testing.run_chain(model, images, num_test=8)
    failed = [stage for stage, status in result.stages.items() if status not in ("ok", "not run")]
    assert len(failed) == 1 and result.error is not None
    assert "ln" in result.stages[failed[0]]
    assert not result.ok
