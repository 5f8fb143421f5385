"""Smoke test of examples/prune.py: a tiny pretraining run, PfQ, report and reload."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tf_pfq.compat import keras

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--widths=8,16", "--strides=1,2", "--image_size=16", "--num_train=300"]


def _run(*args: str) -> str:
    # A subprocess keeps the script's absl flags out of the test process.
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "prune.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_prune_example_pretrains_prunes_and_reloads(tmp_path):
    report_json = tmp_path / "report.json"
    # A large threshold stands in for 40 epochs of weight decay: it makes channels
    # "dead" after one epoch so that the whole path runs.
    out = _run(
        *TINY,
        "--epochs=1",
        "--threshold=1.0",
        f"--workdir={tmp_path}",
        f"--report_json={report_json}",
    )
    assert "PfQ report for 'mobilenet_v1'" in out and "digits test accuracy" in out
    report = json.loads(report_json.read_text())
    assert report["dead_bn_channels"] > 0
    assert report["pruned_bn_channels"] + report["kept_bn_channels"] == report["dead_bn_channels"]
    assert report["max_output_change"] is not None
    pretrained = keras.models.load_model(tmp_path / "pretrained.keras", compile=False)
    pruned = keras.models.load_model(tmp_path / "pruned.keras", compile=False)
    assert pretrained.count_params() == report["params_before"]
    assert pruned.count_params() == report["params_after"]

    # --model: prune the saved model again, with the default (eq. 17) rule.
    output = tmp_path / "again.keras"
    out = _run(*TINY, f"--model={tmp_path / 'pretrained.keras'}", f"--output={output}")
    assert "PfQ report" in out
    again = keras.models.load_model(output, compile=False)
    x = np.zeros((1, 16, 16, 3), np.float32)
    assert again(x).shape == (1, 10)


def test_unwritable_output_fails_before_any_work(tmp_path):
    # Before the early check, this failed only after the whole pretraining and PfQ.
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    workdir = tmp_path / "work"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "prune.py"),
            f"--workdir={workdir}",
            f"--output={blocker / 'pruned.keras'}",
            *TINY,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode != 0
    assert "cannot create the folder of output" in result.stderr
    assert not (workdir / "pretrained.keras").exists()  # no pretraining ran
