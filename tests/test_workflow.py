"""Tests for tf_pfq.workflow (paper Algorithm 1) and tf_pfq.training."""

import dataclasses
import json
import os
from typing import ClassVar

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
    DFQ,
    STATE_FILE,
    FoldBatchNorm,
    Prune,
    Train,
    Transform,
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
    steps = [Train("stage_a", 4, None, TrainConfig(epochs=1))]
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
    steps = [Train("stage_a", 4, None, TrainConfig(epochs=3, target_drop=1.0))]
    _, summary = run_steps(tiny_dead_model(l2=1e-3), train, steps, validation_data=test, verbose=0)
    # A budget of 100 % is met after the first epoch.
    assert summary.steps[0].epochs == 1
    assert "within" in summary.steps[0].stopped_early
    # Negative control: no budget, all epochs run.
    steps = [Train("stage_a", 4, None, TrainConfig(epochs=3))]
    _, summary = run_steps(tiny_dead_model(l2=1e-3), train, steps, validation_data=test, verbose=0)
    assert summary.steps[0].epochs == 3 and summary.steps[0].stopped_early == ""


class _ScaleLogits(Transform):
    """A user-defined transform: scales the last layer's kernel and bias by `factor`."""

    kind = "scale_logits"
    calls: ClassVar[list[str]] = []  # every apply, across runs

    def __init__(self, name, factor):
        super().__init__(name)
        self.factor = factor

    def arguments(self):
        return {"factor": self.factor}

    def apply(self, model, context):
        type(self).calls.append(self.name)
        out = keras.models.clone_model(model)
        out.set_weights(model.get_weights())
        last = out.layers[-1]
        last.set_weights([w * self.factor for w in last.get_weights()])
        return out, {"details": {"factor": self.factor}}


@pytest.mark.slow
def test_user_defined_step_runs_resumes_and_reports(digits, tmp_path):
    train, test = digits
    steps = [_ScaleLogits("scale", 0.5), Train("stage_a", 8, None, TrainConfig(epochs=2))]
    _ScaleLogits.calls.clear()
    log = []
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_steps(
            tiny_dead_model(),
            train,
            steps,
            test_data=test,
            output_dir=str(tmp_path),
            verbose=0,
            callbacks=_callbacks(log, "stage_a", 1),
        )
    assert _ScaleLogits.calls == ["scale"]
    # Its checkpoint holds what its own apply made.
    saved = keras.models.load_model(tmp_path / "00_scale" / "model.h5", compile=False)
    original = tiny_dead_model().layers[-1].get_weights()
    for a, b in zip(saved.layers[-1].get_weights(), original):
        np.testing.assert_allclose(a, 0.5 * b)
    log.clear()
    _, summary = run_steps(
        tiny_dead_model(),
        train,
        steps,
        test_data=test,
        output_dir=str(tmp_path),
        verbose=0,
        callbacks=_callbacks(log),
    )
    # Resumed from its checkpoint: not applied again; the stage went on at epoch 1.
    assert _ScaleLogits.calls == ["scale"]
    assert log == [("stage_a", 1)]
    first = summary.steps[0]
    assert (first.name, first.kind, first.details) == ("scale", "scale_logits", {"factor": 0.5})
    assert first.params == summary.float_params
    # Scaling logits keeps every argmax: the float accuracy is unchanged.
    assert first.accuracy == pytest.approx(summary.float_accuracy, abs=1e-6)
    assert [s.name for s in summary.steps] == ["scale", "stage_a"]
    # Its arguments are part of the run's fingerprint.
    with pytest.raises(ValueError, match=r"steps\.scale\.factor: 0\.5 -> 0\.25"):
        run_steps(
            tiny_dead_model(),
            train,
            [_ScaleLogits("scale", 0.25), steps[1]],
            output_dir=str(tmp_path),
            verbose=0,
        )
    assert _ScaleLogits.calls == ["scale"]


def test_user_defined_step_reporting_unknown_fields_is_refused(digits):
    class Renamed(Transform):
        def apply(self, model, context):
            return model, {"channels": 3}

    with pytest.raises(
        ValueError, match=r"'renamed' reported unknown StepResult fields \['channels'\]"
    ):
        run_steps(tiny_dead_model(), digits[0], [Renamed("renamed")])


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


def test_step_validation_names_the_argument():
    with pytest.raises(ValueError, match="config"):
        Train("x", 4)
    with pytest.raises(ValueError, match="quantizer='qkeras'"):
        Train("x", 4, None, TrainConfig(), quantizer="qkeras")
    with pytest.raises(ValueError, match="activation_bits=0"):
        Train("x", 0, None, TrainConfig())
    with pytest.raises(ValueError, match="weight_bits='4'"):
        Train("x", 4, "4", TrainConfig())
    with pytest.raises(ValueError, match=r"\['per_channel'\].*tf_pfq\.quantize\.apply"):
        Train("x", 4, 4, TrainConfig(), per_channel=True)
    with pytest.raises(ValueError, match="'pfq' quantizer only"):
        Train("x", 4, 4, TrainConfig(), quantizer="tfmot", per_channel_weights=True)
    with pytest.raises(ValueError, match=r"\['treshold'\].*tf_pfq\.prune\.prune"):
        Prune("p", treshold=0.1)
    with pytest.raises(ValueError, match=r"\['calibration_data'\]"):
        Prune("p", calibration_data=np.zeros(1))  # the run's, not the step's
    with pytest.raises(ValueError, match=r"\['per_channel'\]"):
        FoldBatchNorm("f", per_channel=False)
    with pytest.raises(ValueError, match=r"\['bias_correction'\]"):
        DFQ("d", bias_correction=False)
    for bad in ("", "a/b", ".."):
        with pytest.raises(ValueError, match="`name`"):
            FoldBatchNorm(bad)
    # Valid options are kept, and are values: repr, equality and fingerprint.
    step = Prune("p", threshold=0.01, absorb=False)
    assert repr(step) == "Prune('p', threshold=0.01, absorb=False)"
    assert step == Prune("p", absorb=False, threshold=0.01) != Prune("p")
    assert step.run_settings() == {
        "kind": "prune",
        "quantizer": "pfq",
        "threshold": 0.01,
        "absorb": False,
    }
    names = [s.name for s in algorithm1_steps(TrainConfig(), TrainConfig(), 3, 3)]
    assert names == ["pfq_1", "stage_a", "pfq_2", "fold", "stage_w"]


def test_step_settings_keep_the_earlier_fingerprint():
    # Run directories made before steps were objects still resume: same JSON per step.
    steps = algorithm1_steps(TrainConfig(epochs=2), TrainConfig(epochs=3), 4, 3)
    settings = {s.name: s.run_settings() for s in steps}
    config = dataclasses.asdict(TrainConfig(epochs=3))
    assert settings["pfq_1"] == settings["pfq_2"] == {"kind": "prune", "quantizer": "pfq"}
    assert settings["fold"] == {"kind": "fold", "quantizer": "pfq"}
    assert settings["stage_a"]["activation_bits"] == 4 and "weight_bits" not in settings["stage_a"]
    assert settings["stage_w"] == {
        "kind": "train",
        "activation_bits": 4,
        "weight_bits": 3,
        "config": config,
        "quantizer": "pfq",
    }
    assert DFQ("dfq", weight_bits=4).run_settings() == {
        "kind": "dfq",
        "weight_bits": 4,
        "quantizer": "pfq",
    }


def test_run_steps_rejects_bad_step_lists(digits, tmp_path):
    train, _ = digits
    model = tiny_dead_model(l2=1e-3)
    with pytest.raises(ValueError, match="unique"):
        run_steps(model, train, [FoldBatchNorm("a"), FoldBatchNorm("a")])
    tfmot_first = [Train("t", 4, 4, TrainConfig(), quantizer="tfmot"), FoldBatchNorm("f")]
    with pytest.raises(ValueError, match="'t' must be the last step"):
        run_steps(model, train, tfmot_first)
    with pytest.raises(TypeError, match=r"`steps\[1\]` must be a tf_pfq\.workflow\.Step"):
        run_steps(model, train, [FoldBatchNorm(), "fold"])
    with pytest.raises(ValueError, match=r"`prune_kwargs` .*\['threshhold'\]"):
        run_steps(model, train, [Prune("p")], prune_kwargs={"threshhold": 0.1})
    with pytest.raises(ValueError, match=r"`dfq_kwargs` .*\['iters'\]"):
        run_steps(model, train, [DFQ()], dfq_kwargs={"iters": 2})
    with pytest.raises(
        ValueError, match=r"export=True.*Train\('t', activation_bits=4, weight_bits=None"
    ):
        run_steps(model, train, [Train("t", 4, None, TrainConfig())], export=True)
    # A checkpoint directory without recorded settings is refused, not silently mixed.
    (tmp_path / STATE_FILE).write_text(json.dumps({"steps": ["other"], "done": 0}))
    with pytest.raises(ValueError, match=r"no run_settings\.json"):
        run_steps(model, train, [FoldBatchNorm("fold")], output_dir=str(tmp_path))
    with pytest.raises(TypeError, match="tf_keras"):
        run_steps(object(), train, [FoldBatchNorm("fold")])


def test_calibration_images_and_unknown_length():
    ds = tf.data.Dataset.from_tensor_slices((np.ones((5, 2, 2, 1)), np.zeros(5))).batch(2)
    assert calibration_images(ds, 3).shape == (3, 2, 2, 1)
    from tf_pfq.training import steps_per_epoch

    with pytest.raises(ValueError, match="cardinality"):
        steps_per_epoch(ds.repeat())
