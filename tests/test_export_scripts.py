"""Smoke tests of export/to_tflite.py and export/evaluate.py on a tiny saved QAT model."""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import tf_pfq
from tf_pfq import cli, models
from tf_pfq.compat import keras

ROOT = pathlib.Path(__file__).resolve().parents[1]
# TensorFlow's and LiteRT's INFO lines that a script run used to show on stderr.
TENSORFLOW_INFO = (
    "Sharding callback duration",
    "Assets written to",
    "Writing fingerprint",
    "Created TensorFlow Lite XNNPACK delegate",
)


def _env(quiet_env: bool = True) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    if quiet_env:
        env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def _run(
    script: str, *args: str, expect_ok: bool = True, quiet_env: bool = True
) -> subprocess.CompletedProcess:
    # A subprocess keeps the scripts' absl flags out of the test process. Without
    # `quiet_env` the script runs as a user would start it: it must quiet itself.
    result = subprocess.run(
        [sys.executable, str(ROOT / "export" / script), *args],
        capture_output=True,
        text=True,
        env=_env(quiet_env),
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


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">i4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _fashion_tflite(tmp_path) -> pathlib.Path:
    """A tiny 28x28x1 integer model (untrained: accuracy is not the point here)."""
    model = models.mobilenet_v1(input_shape=(28, 28, 1), widths=(4,), strides=(2,))
    folded, _ = tf_pfq.fold_batchnorm(model)
    qat = tf_pfq.apply(folded, activation_bits=4, weight_bits=4)
    images = np.random.default_rng(0).uniform(0, 1, (16, 28, 28, 1)).astype(np.float32)
    qat(images, training=True)
    tflite = tf_pfq.export.to_tflite(qat, representative_data=images)
    return pathlib.Path(tf_pfq.export.save(tflite, tmp_path / "fashion.tflite"))


@pytest.mark.slow
def test_evaluate_fashion_mnist_reads_the_idx_files(tmp_path):
    path = _fashion_tflite(tmp_path)
    # --data_dir: a folder of our own IDX files, so the images are known.
    folder = tmp_path / "idx"
    folder.mkdir()
    rng = np.random.default_rng(1)
    test_images = rng.integers(0, 256, (12, 28, 28))
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(3),
        "t10k-images-idx3-ubyte": test_images,
        "t10k-labels-idx1-ubyte": np.arange(12) % 10,
    }
    for name, array in arrays.items():
        with gzip.open(folder / f"{name}.gz", "wb") as f:
            f.write(_idx_bytes(array))
    json_path = tmp_path / "own.json"
    _run(
        "evaluate.py",
        f"--tflite={path}",
        "--dataset=fashion_mnist",
        f"--data_dir={folder}",
        "--num_runs=2",
        f"--output_json={json_path}",
    )
    result = json.loads(json_path.read_text())
    split = tf_pfq.data.load_fashion_mnist(str(folder), num_train=1)["test"]
    interpreter = tf_pfq.export.litert.make_interpreter(path)
    assert result["examples"] == 12 and result["dataset"] == "fashion_mnist"
    expected = tf_pfq.export.litert.accuracy(interpreter, split.images, split.labels)
    assert np.isclose(result["accuracy"], expected)

    # The installed dataset (Debian's dataset-fashion-mnist): all 10,000 test images.
    json_path = tmp_path / "real.json"
    _run(
        "evaluate.py",
        f"--tflite={path}",
        "--dataset=fashion_mnist",
        "--num_runs=2",
        f"--output_json={json_path}",
    )
    assert json.loads(json_path.read_text())["examples"] == 10000


@pytest.mark.slow
def test_evaluate_compare_layers_prints_the_table_and_draws_it(saved_qat, tmp_path):
    with tf_pfq.quantize_scope():
        qat = keras.models.load_model(saved_qat)
    images = tf_pfq.data.load_digits(image_size=16)["train"].images[:32]
    out = tf_pfq.export.save(
        tf_pfq.export.to_tflite(qat, representative_data=images), tmp_path / "m.tflite"
    )
    plot = tmp_path / "plots" / "layers.png"
    json_path = tmp_path / "eval.json"
    result = _run(
        "evaluate.py",
        f"--tflite={out}",
        "--compare_layers",
        f"--qat_model={saved_qat}",
        f"--compare_plot={plot}",
        "--compare_examples=12",
        "--max_examples=40",
        "--num_runs=2",
        f"--output_json={json_path}",
        quiet_env=False,
    )
    assert "No divergence" in result.stdout, result.stdout
    assert "| conv1_relu | ReLU |" in result.stdout and "fused into conv1_relu" in result.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    compared = json.loads(json_path.read_text())["compare_layers"]
    assert compared["first_divergence"] is None
    assert [row["layer"] for row in compared["layers"]][:3] == ["image", "conv1", "conv1_relu"]
    for line in TENSORFLOW_INFO:
        assert line not in result.stderr, result.stderr

    # A comparison needs the QAT model.
    failed = _run("evaluate.py", f"--tflite={out}", "--compare_layers", expect_ok=False)
    assert failed.returncode != 0 and "needs --qat_model" in failed.stderr


_CONVERT_OUTSIDE_THE_SCRIPTS = """
import sys
from absl import app
import tf_pfq

def main(argv):
    with tf_pfq.quantize_scope():
        qat = tf_pfq.compat.load_model(sys.argv[1])
    tflite = tf_pfq.export.to_tflite(qat, input_range=(0.0, 1.0))
    tf_pfq.export.litert.make_interpreter(tflite)

app.run(main, argv=sys.argv[:1])
"""


@pytest.mark.slow
def test_scripts_show_no_tensorflow_info_lines(saved_qat, tmp_path):
    result = _run(
        "to_tflite.py",
        f"--model={saved_qat}",
        f"--output={tmp_path / 'm.tflite'}",
        "--num_representative=16",
        quiet_env=False,
    )
    for line in TENSORFLOW_INFO[:3]:
        assert line not in result.stderr, result.stderr
    assert f"wrote {tmp_path / 'm.tflite'}" in result.stdout

    # The same work in a program that is not one of the project's scripts shows
    # those lines: what the script hides is real.
    program = tmp_path / "convert.py"
    program.write_text(_CONVERT_OUTSIDE_THE_SCRIPTS)
    plain = subprocess.run(
        [sys.executable, str(program), str(saved_qat)],
        capture_output=True,
        text=True,
        env=_env(quiet_env=False),
        timeout=300,
        check=False,
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    for line in TENSORFLOW_INFO:
        assert line in plain.stderr, (line, plain.stderr[-3000:])


def test_quiet_native_logs_drops_noise_and_keeps_errors(capfd):
    with cli.quiet_native_logs():
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
        os.write(2, b"E0000 00:00:1.5 7 kernel.cc:9] a real error\n")
    err = capfd.readouterr().err
    assert "a real error" in err
    assert "Created TensorFlow Lite" not in err
    with pytest.raises(ValueError, match="raised inside"), cli.quiet_native_logs():
        raise ValueError("raised inside")
    os.write(2, b"after the block\n")  # descriptor 2 is back
    assert "after the block" in capfd.readouterr().err
