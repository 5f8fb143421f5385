"""Run directories: tied to their settings, atomic checkpoints, corrupt-file fallback, kills."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from test_prune_helpers import tiny_dead_model

from tf_pfq import data
from tf_pfq.compat import keras
from tf_pfq.step_context import load_checkpoint
from tf_pfq.training import TrainConfig
from tf_pfq.workflow import (
    SETTINGS_FILE,
    STATE_FILE,
    FoldBatchNorm,
    Train,
    check_settings,
    run_steps,
    run_workflow,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE = TrainConfig(epochs=1, learning_rate=0.02)


@pytest.fixture(scope="module")
def digits():
    splits = data.load_digits(image_size=8, num_train=64)
    return data.to_dataset(splits["train"], 32), data.to_dataset(splits["test"], 256)


def _workflow(train, test, out, **kwargs):
    kwargs = {"stage_a": ONE, "stage_w": ONE, **kwargs}
    return run_workflow(
        tiny_dead_model(), train, test_data=test, output_dir=str(out), verbose=0, **kwargs
    )


def test_changed_settings_raise_naming_the_difference_and_overwrite_restarts(digits, tmp_path):
    train, test = digits
    _, first = _workflow(train, test, tmp_path)
    settings = json.loads((tmp_path / SETTINGS_FILE).read_text())
    assert settings["steps"]["stage_w"]["weight_bits"] == 4
    assert settings["train_data"]["batches"] == 2

    # Same settings: the finished run is returned as it is, nothing is retrained.
    _, again = _workflow(train, test, tmp_path)
    assert again.to_dict() == first.to_dict()

    with pytest.raises(ValueError, match=r"steps\.stage_w\.weight_bits: 4 -> 3") as err:
        _workflow(train, test, tmp_path, activation_bits=3, weight_bits=3)
    assert "steps.stage_a.activation_bits: 4 -> 3" in str(err.value)
    assert "overwrite=True" in str(err.value)
    with pytest.raises(ValueError, match=r"steps\.stage_a\.config\.epochs: 1 -> 2"):
        _workflow(train, test, tmp_path, stage_a=TrainConfig(epochs=2, learning_rate=0.02))
    with pytest.raises(ValueError, match=r"prune_kwargs\.threshold"):
        _workflow(train, test, tmp_path, prune_kwargs={"threshold": 1e-3})
    # Another model with the same architecture: only its weights differ.
    other = tiny_dead_model()
    other.layers[1].kernel.assign(other.layers[1].kernel * 2)
    with pytest.raises(ValueError, match=r"model\.weights") as err:
        run_workflow(other, train, stage_a=ONE, stage_w=ONE, output_dir=str(tmp_path), verbose=0)
    assert "model.architecture" not in str(err.value)
    # Another amount of data.
    with pytest.raises(ValueError, match=r"train_data\.batches: 2 -> 1"):
        _workflow(train.take(1), test, tmp_path)
    # The refused calls changed nothing.
    assert json.loads((tmp_path / SETTINGS_FILE).read_text()) == settings

    qat, fresh = _workflow(train, test, tmp_path, activation_bits=3, weight_bits=3, overwrite=True)
    assert (fresh.activation_bits, fresh.weight_bits) == (3, 3)
    assert json.loads((tmp_path / STATE_FILE).read_text())["done"] == 5
    bits = {
        layer.quantize_config.weight_quantizer.num_bits
        for layer in qat.layers
        if getattr(getattr(layer, "quantize_config", None), "weight_quantizer", None)
    }
    assert bits == {3}


def test_check_settings_refuses_unrecorded_results(tmp_path):
    (tmp_path / "pretrained.keras").write_text("old")
    with pytest.raises(ValueError, match=f"no {SETTINGS_FILE}"):
        check_settings(str(tmp_path), {"epochs": 1})
    assert not check_settings(str(tmp_path), {"epochs": 1}, overwrite=True)
    assert not (tmp_path / "pretrained.keras").exists()
    assert check_settings(str(tmp_path), {"epochs": 1})


def test_truncated_state_file_names_the_file(digits, tmp_path):
    train, _ = digits
    steps = [FoldBatchNorm("fold")]
    run_steps(tiny_dead_model(), train, steps, output_dir=str(tmp_path))
    state = tmp_path / STATE_FILE
    state.write_bytes(state.read_bytes()[:20])
    with pytest.raises(ValueError, match=f"{state}.*corrupt"):
        run_steps(tiny_dead_model(), train, steps, output_dir=str(tmp_path))


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def test_truncated_step_checkpoint_falls_back_to_the_last_good_step(digits, tmp_path):
    train, test = digits
    qat, first = _workflow(train, test, tmp_path)
    weights = tmp_path / "04_stage_w" / "qat_weights.h5"
    _truncate(weights)
    with pytest.raises(ValueError, match=f"{re.escape(str(weights))} is corrupt or truncated"):
        load_checkpoint(str(weights), lambda: qat.load_weights(str(weights)))
    # Stage W is redone from the fold checkpoint, which is intact.
    qat2, second = _workflow(train, test, tmp_path)
    assert [s.name for s in second.steps] == [s.name for s in first.steps]
    assert [s.accuracy for s in second.steps[:4]] == [s.accuracy for s in first.steps[:4]]
    qat2.load_weights(str(weights))  # rewritten whole
    # With the first step's model damaged too, the run starts from the input model.
    _truncate(weights)
    _truncate(tmp_path / "04_stage_w" / "input.h5")
    _truncate(tmp_path / "03_fold" / "model.h5")
    _truncate(tmp_path / "02_pfq_2" / "model.h5")
    _truncate(tmp_path / "01_stage_a" / "qat_weights.h5")
    _truncate(tmp_path / "00_pfq_1" / "model.h5")
    _, third = _workflow(train, test, tmp_path)
    assert third.steps[0].channels_removed == first.steps[0].channels_removed
    assert len(third.steps) == 5


class _Crash(keras.callbacks.Callback):
    """Raises in epoch 1, after epoch 0's checkpoint is written."""

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            raise RuntimeError("simulated crash")


def test_truncated_epoch_checkpoint_restarts_the_stage(digits, tmp_path):
    train, _ = digits
    steps = [FoldBatchNorm("fold"), Train("stage_w", 4, 4, TrainConfig(epochs=2))]
    with pytest.raises(RuntimeError, match="simulated"):
        run_steps(
            tiny_dead_model(),
            train,
            steps,
            output_dir=str(tmp_path),
            callbacks=[_Crash()],
            verbose=0,
        )
    backup = tmp_path / "01_stage_w" / "backup"
    data_files = [
        os.path.join(root, f) for root, _, files in os.walk(backup) for f in files if ".data-" in f
    ]
    assert data_files
    for path in data_files:
        _truncate(path)
    _, summary = run_steps(tiny_dead_model(), train, steps, output_dir=str(tmp_path), verbose=0)
    assert summary.steps[-1].epochs == 2


_KILL_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    from test_prune_helpers import tiny_dead_model
    from tf_pfq import data
    from tf_pfq.compat import keras
    from tf_pfq.training import TrainConfig
    from tf_pfq.workflow import run_workflow

    out, kill_step = sys.argv[1], sys.argv[2]

    class Kill(keras.callbacks.Callback):
        def __init__(self, step):
            super().__init__()
            self.step, self.epoch = step, 0
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
        def on_train_batch_end(self, batch, logs=None):
            if self.step == kill_step and self.epoch == 1 and batch == 1:
                os.kill(os.getpid(), signal.SIGKILL)

    splits = data.load_digits(image_size=8, num_train=96)
    train = data.to_dataset(splits["train"], 32)
    stage = TrainConfig(epochs=2, learning_rate=0.02)
    qat, summary = run_workflow(
        tiny_dead_model(), train, stage_a=stage, stage_w=stage, output_dir=out, verbose=0,
        callbacks=lambda step: [Kill(step.name)],
    )
    x = splits["test"].images[:16]
    print("RESULT", json.dumps(qat.predict(x, verbose=0).tolist()))
    """
)


def _run_kill_script(tmp_path, out, kill_step):
    script = tmp_path / "kill_run.py"
    script.write_text(_KILL_SCRIPT)
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
    }
    return subprocess.run(
        [sys.executable, str(script), str(out), kill_step],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _result(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return np.array(json.loads(line[len("RESULT ") :]))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stage_a", "stage_w"])
def test_sigkill_in_a_stage_then_resume_matches_an_uninterrupted_run(tmp_path, stage):
    reference = _result(_run_kill_script(tmp_path, tmp_path / "plain", "none"))
    out = tmp_path / "killed"
    killed = _run_kill_script(tmp_path, out, stage)
    assert killed.returncode == -signal.SIGKILL
    state = json.loads((out / STATE_FILE).read_text())
    assert state["steps"][state["done"]] == stage  # killed inside that stage
    resumed = _result(_run_kill_script(tmp_path, out, "none"))
    np.testing.assert_allclose(resumed, reference, rtol=0, atol=1e-5)
