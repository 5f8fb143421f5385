"""tf_pfq.prune on tf_keras.applications MobileNet V1 and V2 with planted dead channels.

Small widths and 96x96 inputs, four images: each test builds and prunes once or twice.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_prune_helpers import (
    ROUND_OFF,
    assert_same_outputs,
    live_threshold,
    max_change,
    plant_dead,
    randomize_bn,
)

import tf_pfq
from tf_pfq.compat import keras


@pytest.fixture(autouse=True)
def _keras_seed():
    # Unseeded Keras initializers draw from Python's `random` as well.
    keras.utils.set_random_seed(0)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(3).uniform(-1, 1, (4, 96, 96, 3)).astype(np.float32)


_STATS = np.random.default_rng(4).uniform(-1, 1, (4, 96, 96, 3)).astype(np.float32)


def _mobilenet_v1():
    model = keras.applications.MobileNet(
        alpha=0.25, input_shape=(96, 96, 3), weights=None, classifier_activation=None
    )
    randomize_bn(model, _STATS)
    return model


def _mobilenet_v2():
    model = keras.applications.MobileNetV2(
        alpha=0.35, input_shape=(96, 96, 3), weights=None, classifier_activation=None
    )
    randomize_bn(model, _STATS)
    return model


def test_mobilenet_v1_exact_cases(images):
    model = _mobilenet_v1()
    # After a depthwise conv: removed with the pw filter feeding it (backward), the
    # constant goes into conv_pw_3_bn's moving mean.
    plant_dead(model, "conv_dw_3_bn", 1, beta=0.5)
    # act(beta) == 0 crosses ZeroPadding2D and a stride-2 depthwise conv (cascade).
    plant_dead(model, "conv_pw_5_bn", 3, beta=-0.4)
    # Last block: global pooling (keepdims), Dropout, then conv_preds' bias.
    plant_dead(model, "conv_pw_13_bn", 0, beta=0.6)
    pruned, report = tf_pfq.prune(model, calibration_data=images)
    assert report.num_dead == 3 and report.num_pruned == 3 and report.exact
    assert report.layer("conv_pw_2").removed == [1]  # backward dead code
    assert report.layer("conv_dw_6").removed == [3]  # cascade
    assert report.macs_after < report.macs_before
    assert report.max_output_change <= ROUND_OFF * np.max(np.abs(model(images)))
    assert_same_outputs(model, pruned, images)


def test_mobilenet_v1_border_case_approximation_within_measured_bound(images):
    model = _mobilenet_v1()
    plant_dead(model, "conv_pw_1_bn", 2, beta=0.5)  # then ZeroPadding2D + depthwise
    plant_dead(model, "conv_dw_2_bn", 5, beta=0.3)  # an exact one beside it
    pruned, report = tf_pfq.prune(model, padding="approximate", calibration_data=images[:2])
    assert report.num_pruned == 2 and not report.exact
    assert max_change(model, pruned, images[:2]) == pytest.approx(
        report.max_output_change, rel=1e-6
    )
    assert report.max_output_change > 0
    for padding in ("keep", "exact"):  # the depthwise conv keeps its channel in both
        pruned, report = tf_pfq.prune(model, padding=padding)
        assert report.num_pruned == 1 and report.num_kept == 1 and report.exact
        assert_same_outputs(model, pruned, images[:2])


def _v2_plants(model):
    plant_dead(model, "block_3_depthwise_BN", 2, beta=0.7)  # project 1x1 -> mean shift
    plant_dead(model, "block_3_expand_BN", 5, beta=-0.3)  # act 0 through pad + stride 2
    # The cascaded depthwise BN channel sees a constant 0; training brings its moving
    # mean there, which makes inference and training mode agree.
    bn = model.get_layer("block_3_depthwise_BN")
    gamma, beta, mean, var = bn.get_weights()
    mean[5] = 0.0
    bn.set_weights([gamma, beta, mean, var])
    plant_dead(model, "Conv_1_bn", 7, beta=0.4)  # global pooling -> Dense bias
    plant_dead(model, "block_5_project_BN", 1, beta=0.3)  # Add with a live branch: kept


def test_mobilenet_v2_exact_cases_both_modes(images):
    model = _mobilenet_v2()
    _v2_plants(model)
    pruned, report = tf_pfq.prune(model)
    assert report.num_dead == 4 and report.num_pruned == 3 and report.num_kept == 1
    assert "block_5_add" in report.layer("block_5_project_BN").kept[1]
    assert report.layer("block_3_expand").removed == [2, 5]
    assert report.exact
    assert_same_outputs(model, pruned, images)
    assert_same_outputs(model, pruned, images, training=True)


def test_mobilenet_v2_negative_control(images):
    model = _mobilenet_v2()
    threshold, channel = live_threshold(model, "block_3_depthwise_BN")  # same path
    pruned, report = tf_pfq.prune(model, threshold=threshold)
    assert report.num_pruned == 1 and report.layer("block_3_expand").removed == [channel]
    scale = float(np.max(np.abs(model(images))))
    assert max_change(model, pruned, images) > 100 * ROUND_OFF * scale
