"""Smoke tests of export/to_tflite.py and export/evaluate.py on a tiny saved QAT model."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import tf_pfq
from tf_pfq import models

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    # A subprocess keeps the scripts' absl flags out of the test process.
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, str(ROOT / "export" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    if expect_ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def saved_qat(tmp_path_factory):
    model = models.mobilenet_v1(input_shape=(16, 16, 3), widths=(8, 16), strides=(2, 2))
    folded, _ = tf_pfq.fold_batchnorm(model)
    qat = tf_pfq.apply(folded, activation_bits=4, weight_bits=4)
    images = tf_pfq.data.load_digits(image_size=16)["train"].images[:64]
    qat(images, training=True)  # activation ranges
    path = tmp_path_factory.mktemp("qat") / "qat.h5"
    qat.save(path)
    return path


@pytest.mark.slow
def test_to_tflite_then_evaluate(saved_qat, tmp_path):
    out = tmp_path / "m.tflite"
    result = _run(
        "to_tflite.py",
        f"--model={saved_qat}",
        f"--output={out}",
        "--num_representative=32",
        "--io_dtype=uint8",
    )
    assert out.exists()
    assert "CONV_2D" in result.stdout and "DEPTHWISE_CONV_2D" in result.stdout
    assert "Edge TPU static check" in result.stdout and "no problems" in result.stdout
    summary = tf_pfq.export.inspect(out)
    assert max(summary.weight_levels().values()) <= 16
    assert summary.inputs[0].dtype == "uint8" and summary.outputs[0].dtype == "uint8"

    json_path = tmp_path / "eval.json"
    _run(
        "evaluate.py",
        f"--tflite={out}",
        "--max_examples=40",
        "--num_runs=5",
        "--num_threads=1",
        f"--output_json={json_path}",
    )
    result = json.loads(json_path.read_text())
    assert result["examples"] == 40 and result["backend"] == "xnnpack"
    assert 0.0 <= result["accuracy"] <= 1.0 and result["median_ms"] > 0

    # The accuracy the script reports is the interpreter's on the digits test split.
    split = tf_pfq.data.load_digits(image_size=16)["test"]
    interpreter = tf_pfq.export.litert.make_interpreter(out)
    expected = tf_pfq.export.litert.accuracy(interpreter, split.images[:40], split.labels[:40])
    assert np.isclose(result["accuracy"], expected)

    # Asking for a delegate that is not installed fails loudly; no CPU fallback.
    failed = _run(
        "evaluate.py", f"--tflite={out}", "--delegate=edgetpu", "--num_runs=1", expect_ok=False
    )
    assert failed.returncode != 0
    assert "does not fall back" in failed.stderr


def test_evaluate_refuses_a_file_that_is_not_tflite(tmp_path):
    bad = tmp_path / "model.tflite"
    bad.write_bytes(b"garbage")
    result = _run("evaluate.py", f"--tflite={bad}", "--num_runs=1", expect_ok=False)
    assert result.returncode != 0
    assert "ValueError: `model` is not a .tflite flatbuffer" in result.stderr
    assert str(bad) in result.stderr


def test_to_tflite_checks_its_output_path_first(saved_qat, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = _run(
        "to_tflite.py", f"--model={saved_qat}", f"--output={blocker / 'm.tflite'}", expect_ok=False
    )
    assert result.returncode != 0
    assert "cannot create the folder of output" in result.stderr
    assert "Edge TPU static check" not in result.stdout  # nothing was converted
