"""Tests for tf_pfq.workflow (paper Algorithm 1) and tf_pfq.training."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from test_prune_helpers import tiny_dead_model

from tf_pfq import data, models
from tf_pfq.compat import keras
from tf_pfq.training import (
    AccuracyTargetStopping,
    TrainConfig,
    clear_regularizers,
    make_optimizer,
)
from tf_pfq.workflow import (
    STATE_FILE,
    Step,
    WorkflowSummary,
    algorithm1_steps,
    calibration_images,
    run_steps,
    run_workflow,
)

STAGE = TrainConfig(epochs=2, learning_rate=0.02)


@pytest.fixture(scope="module")
def digits():
    splits = data.load_digits(image_size=8, num_train=96)
    return data.to_dataset(splits["train"], 32), data.to_dataset(splits["test"], 256)


class _Recorder(keras.callbacks.Callback):
    """Records (step name, epoch) of every epoch that starts."""

    def __init__(self, log, step):
        super().__init__()
        self.log, self.step = log, step

    def on_epoch_begin(self, epoch, logs=None):
        self.log.append((self.step, epoch))


class _Crash(keras.callbacks.Callback):
    """Simulates a killed run: raises in batch 1 of `epoch`."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch, self.current = epoch, -1

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.current == self.epoch and batch == 1:
            raise RuntimeError("simulated crash")


def _callbacks(log, crash_step=None, crash_epoch=None):
    def make(step):
        cbs = [_Recorder(log, step.name)]
        if step.name == crash_step:
            cbs.append(_Crash(crash_epoch))
        return cbs

    return make


@pytest.fixture(scope="module")
def reference_run(digits, tmp_path_factory):
    """One uninterrupted Algorithm 1 run, shared by the tests below."""
    train, test = digits
    model = tiny_dead_model(l2=1e-3)
    before = [w.copy() for w in model.get_weights()]
    log = []
    out = str(tmp_path_factory.mktemp("reference"))
    qat, summary = run_workflow(
        model,
        train,
        stage_a=STAGE,
        stage_w=STAGE,
        test_data=test,
        output_dir=out,
        verbose=0,
        callbacks=_callbacks(log),
    )
    return {
        "model": model,
        "before": before,
        "qat": qat,
        "summary": summary,
        "log": log,
        "out": out,
    }


@pytest.mark.slow
def test_algorithm1_runs_all_stages_and_reports(reference_run, digits):
    summary, qat, model = reference_run["summary"], reference_run["qat"], reference_run["model"]
    assert [s.name for s in summary.steps] == ["pfq_1", "stage_a", "pfq_2", "fold", "stage_w"]
    pfq_1 = summary.steps[0]
    # The two dead depthwise channels, their inputs (dead code) and nothing else.
    assert pfq_1.dead_pruned == 2
    assert pfq_1.channels_removed == 4
    assert pfq_1.params < summary.float_params and pfq_1.macs < summary.float_macs
    # PfQ is exact here (a_c = 0): the pruned float model classifies identically.
    assert pfq_1.accuracy == pytest.approx(summary.float_accuracy, abs=1e-6)
    assert [s.epochs for s in summary.steps if s.kind == "train"] == [2, 2]
    assert all(0.0 <= s.accuracy <= 1.0 for s in summary.steps)
    assert summary.accuracy == summary.steps[-1].accuracy
    assert summary.params_pruned_fraction > 0
    # Stage W quantizes weights: the final model's kernels are on a 4-bit grid.
    assert any("quant_" in layer.name for layer in qat.layers)
    assert reference_run["log"] == [("stage_a", 0), ("stage_a", 1), ("stage_w", 0), ("stage_w", 1)]
    # The input model is untouched.
    for a, b in zip(model.get_weights(), reference_run["before"]):
        np.testing.assert_array_equal(a, b)
    # Summary round-trips through JSON.
    again = WorkflowSummary.from_dict(json.loads(json.dumps(summary.to_dict())))
    assert again.to_markdown() == summary.to_markdown()


@pytest.mark.slow
def test_tensorboard_logs_or_clear_error(digits, tmp_path):
    import importlib.util

    train, _ = digits
    steps = [Step("stage_a", "train", 4, None, TrainConfig(epochs=1))]
    kwargs = {"output_dir": str(tmp_path), "tensorboard": True, "verbose": 0}
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ImportError, match="pip install tensorboard"):
            run_steps(tiny_dead_model(l2=1e-3), train, steps, **kwargs)
    else:
        run_steps(tiny_dead_model(l2=1e-3), train, steps, **kwargs)
        assert os.listdir(tmp_path / "tensorboard" / "stage_a")


@pytest.mark.slow
def test_killed_run_resumes_from_last_stage_and_epoch(reference_run, digits, tmp_path):
    train, test = digits
    out = str(tmp_path / "run")
    log = []
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_workflow(
            tiny_dead_model(l2=1e-3),
            train,
            stage_a=STAGE,
            stage_w=STAGE,
            test_data=test,
            output_dir=out,
            verbose=0,
            callbacks=_callbacks(log, "stage_w", 1),
        )
    with open(os.path.join(out, STATE_FILE)) as f:
        assert json.load(f)["done"] == 4  # pfq_1, stage_a, pfq_2, fold finished
    assert log[-1] == ("stage_w", 1)
    log.clear()
    qat, summary = run_workflow(
        tiny_dead_model(l2=1e-3),
        train,
        stage_a=STAGE,
        stage_w=STAGE,
        test_data=test,
        output_dir=out,
        verbose=0,
        callbacks=_callbacks(log),
    )
    # Nothing before stage W ran again, and stage W restarted at its second epoch.
    assert log == [("stage_w", 1)]
    assert [s.name for s in summary.steps] == ["pfq_1", "stage_a", "pfq_2", "fold", "stage_w"]
    # Same result as the uninterrupted run: the restored optimizer state, schedule
    # step and quantizer ranges make the resumed epoch identical up to round-off.
    x = calibration_images(test, 64)
    np.testing.assert_allclose(
        qat.predict(x, verbose=0),
        reference_run["qat"].predict(x, verbose=0),
        rtol=1e-4,
        atol=1e-4,
    )
    # A third call finds everything done and trains nothing.
    log.clear()
    run_workflow(
        tiny_dead_model(l2=1e-3),
        train,
        stage_a=STAGE,
        stage_w=STAGE,
        test_data=test,
        output_dir=out,
        verbose=0,
        callbacks=_callbacks(log),
    )
    assert log == []


@pytest.mark.slow
def test_appendix_a1_stops_a_stage_early(digits):
    train, test = digits
    steps = [Step("stage_a", "train", 4, None, TrainConfig(epochs=3, target_drop=1.0))]
    _, summary = run_steps(tiny_dead_model(l2=1e-3), train, steps, validation_data=test, verbose=0)
    # A budget of 100 % is met after the first epoch.
    assert summary.steps[0].epochs == 1
    assert "within" in summary.steps[0].stopped_early
    # Negative control: no budget, all epochs run.
    steps = [Step("stage_a", "train", 4, None, TrainConfig(epochs=3))]
    _, summary = run_steps(tiny_dead_model(l2=1e-3), train, steps, validation_data=test, verbose=0)
    assert summary.steps[0].epochs == 3 and summary.steps[0].stopped_early == ""


class _FakeModel:
    stop_training = False

    def get_weights(self):
        return [np.zeros(1)]

    def set_weights(self, weights):
        self.restored = weights


def test_accuracy_target_stopping_rules():
    cb = AccuracyTargetStopping(reference=0.9, max_drop=0.005)
    cb.set_model(_FakeModel())
    cb.on_epoch_end(0, {"val_accuracy": 0.8})
    assert not cb.model.stop_training
    cb.on_epoch_end(1, {"val_accuracy": 0.896})
    assert cb.model.stop_training and cb.stopped_epoch == 1

    patient = AccuracyTargetStopping(reference=0.9, max_drop=None, patience=2)
    patient.set_model(_FakeModel())
    for epoch, acc in enumerate([0.5, 0.6, 0.55, 0.58]):
        patient.on_epoch_end(epoch, {"val_accuracy": acc})
    assert patient.model.stop_training and patient.stopped_epoch == 3
    assert "did not improve" in patient.reason

    with pytest.raises(ValueError, match="val_accuracy"):
        cb.on_epoch_end(2, {"loss": 1.0})


def test_optimizer_follows_eq19_and_has_weight_decay():
    opt = make_optimizer(TrainConfig(epochs=4, learning_rate=0.1, weight_decay=1e-4), steps=10)
    from tf_pfq.schedules import WarmupCosine

    schedule = WarmupCosine.from_config(opt.get_config()["learning_rate"]["config"])
    assert [round(float(schedule(s)), 5) for s in (0, 20, 40)] == [0.1, 0.05, 0.0]
    assert opt.weight_decay == pytest.approx(1e-4)
    assert float(opt.momentum) == pytest.approx(0.9)


def test_train_config_validation():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=-1)
    with pytest.raises(ValueError, match="target_drop"):
        TrainConfig(target_drop=-0.1)


def test_clear_regularizers_keeps_weights():
    model = models.mobilenet_v1(input_shape=(8, 8, 3), widths=(4, 8), strides=(1, 2), l2=1e-2)
    cleared = clear_regularizers(model)
    assert model.losses and not cleared.losses
    x = np.random.default_rng(0).uniform(size=(2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(cleared.predict(x, verbose=0), model.predict(x, verbose=0))


def test_step_validation():
    with pytest.raises(ValueError, match="kind"):
        Step("x", "distill")
    with pytest.raises(ValueError, match="config"):
        Step("x", "train", 4)
    with pytest.raises(ValueError, match="quantizer"):
        Step("x", "train", 4, None, TrainConfig(), quantizer="qkeras")
    names = [s.name for s in algorithm1_steps(TrainConfig(), TrainConfig(), 3, 3)]
    assert names == ["pfq_1", "stage_a", "pfq_2", "fold", "stage_w"]


def test_run_steps_rejects_bad_step_lists(digits, tmp_path):
    train, _ = digits
    model = tiny_dead_model(l2=1e-3)
    with pytest.raises(ValueError, match="unique"):
        run_steps(model, train, [Step("a", "fold"), Step("a", "fold")])
    tfmot_first = [
        Step("t", "train", 4, 4, TrainConfig(), quantizer="tfmot"),
        Step("f", "fold"),
    ]
    with pytest.raises(ValueError, match="last step"):
        run_steps(model, train, tfmot_first)
    # A checkpoint directory without recorded settings is refused, not silently mixed.
    (tmp_path / STATE_FILE).write_text(json.dumps({"steps": ["other"], "done": 0}))
    with pytest.raises(ValueError, match=r"no run_settings\.json"):
        run_steps(model, train, [Step("fold", "fold")], output_dir=str(tmp_path))
    with pytest.raises(TypeError, match="tf_keras"):
        run_steps(object(), train, [Step("fold", "fold")])


def test_calibration_images_and_unknown_length():
    ds = tf.data.Dataset.from_tensor_slices((np.ones((5, 2, 2, 1)), np.zeros(5))).batch(2)
    assert calibration_images(ds, 3).shape == (3, 2, 2, 1)
    from tf_pfq.training import steps_per_epoch

    with pytest.raises(ValueError, match="cardinality"):
        steps_per_epoch(ds.repeat())
