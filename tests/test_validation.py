"""Bad data is refused at the entry of a public call, naming the argument and index.

Covers `tf_pfq.validation` itself and its callers: `prune(calibration_data=)`,
`export.to_tflite(representative_data=)` and `run_workflow`'s training data; in each
case nothing is computed or written (the output directory is never created).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import tensorflow as tf

import tf_pfq
from tf_pfq import models, validation


def _images(n=6, shape=(8, 8, 3), seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, *shape)).astype(np.float32)


def _tiny():
    return models.mobilenet_v1(input_shape=(8, 8, 3), widths=(4,), strides=(1,), num_classes=3)


@pytest.mark.parametrize(("value", "word"), [(np.nan, "NaN"), (np.inf, "+Inf"), (-np.inf, "-Inf")])
def test_check_finite_array_names_first_bad_example(value, word):
    x = _images()
    x[4, 1, 2, 0] = value
    x[5, 0, 0, 0] = np.nan  # a later bad value: the first one is reported
    with pytest.raises(ValueError, match=rf"`calib` holds {re.escape(word)} at example 4 "):
        validation.check_finite(x, "calib")


def test_check_finite_dataset_counts_examples_over_batches():
    x = _images(10)
    y = np.zeros(10, np.float32)
    x[7, 0, 0, 0] = np.nan
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    with pytest.raises(ValueError, match=r"example 7 \(element \[3, 0, 0, 0\] in batch 1\)"):
        validation.check_finite(ds, "train_data")
    # Labels are data too.
    y[2] = np.inf
    x[7, 0, 0, 0] = 0.0
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    with pytest.raises(ValueError, match=r"\+Inf at example 2 .*component 1"):
        validation.check_finite(ds, "train_data")


def test_clean_data_passes_and_integers_are_not_checked():
    x = _images()
    validation.check_data(x, "x")
    validation.check_data(tf.data.Dataset.from_tensor_slices(x).batch(2), "x")
    validation.check_data(np.arange(5), "x")
    # An infinite dataset is checked over its first batches instead of forever.
    validation.check_data(tf.data.Dataset.from_tensor_slices(x).batch(2).repeat(), "x")


@pytest.mark.parametrize(
    "data",
    [
        np.zeros((0, 8, 8, 3), np.float32),
        tf.data.Dataset.from_tensor_slices(np.zeros((0, 8, 8, 3), np.float32)).batch(2),
        tf.data.Dataset.from_tensor_slices(_images()).filter(lambda x: False),
        None,
    ],
    ids=["array", "dataset", "filtered_to_nothing", "none"],
)
def test_check_nonempty(data):
    with pytest.raises(ValueError, match=r"`train_data` is (empty|an empty dataset|None)"):
        validation.check_nonempty(data, "train_data")


def test_prune_refuses_nan_calibration_data():
    model = _tiny()
    before = [w.copy() for w in model.get_weights()]
    x = _images()
    x[3, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="`calibration_data` holds NaN at example 3"):
        tf_pfq.prune(model, calibration_data=x)
    with pytest.raises(ValueError, match="`calibration_data` is empty"):
        tf_pfq.prune(model, calibration_data=x[:0])
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def _qat():
    folded, _ = tf_pfq.fold_batchnorm(_tiny())
    qat = tf_pfq.apply(folded, activation_bits=4, weight_bits=4)
    qat(_images(), training=True)
    return qat


def test_to_tflite_refuses_nan_representative_data():
    qat = _qat()
    x = _images()
    x[2, 5, 5, 1] = np.nan
    with pytest.raises(ValueError, match=r"`representative_data` holds NaN at example 2"):
        tf_pfq.export.to_tflite(qat, representative_data=x)
    ds = tf.data.Dataset.from_tensor_slices((x, np.zeros(6))).batch(4)
    with pytest.raises(ValueError, match=r"`representative_data` holds NaN at example 2"):
        tf_pfq.export.to_tflite(qat, representative_data=ds)


@pytest.mark.parametrize("case", ["nan", "inf_label", "empty"])
def test_run_workflow_refuses_bad_training_data_and_writes_nothing(tmp_path, case):
    x, y = _images(8), np.zeros(8, np.int64)
    if case == "nan":
        x[5, 0, 0, 0] = np.nan
    train = tf.data.Dataset.from_tensor_slices(
        (x, y.astype(np.float32) if case == "inf_label" else y)
    )
    if case == "inf_label":
        train = train.map(lambda a, b: (a, b + np.inf))
    if case == "empty":
        train = train.take(0)
    output_dir = tmp_path / "run"
    expected = {"nan": "holds NaN at example 5", "inf_label": r"\+Inf", "empty": "empty"}[case]
    with pytest.raises(ValueError, match=rf"`train_data` .*{expected}"):
        tf_pfq.run_workflow(_tiny(), train.batch(4), output_dir=str(output_dir))
    assert not output_dir.exists()
