"""Smoke tests of the workflow example scripts, tiny configs.

Each script runs in a subprocess (absl flags are process-global) for one tiny epoch.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_PRETRAIN = ["--width=0.125", "--image_size=8", "--num_train=100"]


def _run(args, timeout=400):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT}
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc.stdout + proc.stderr


def _json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny float model from examples/pretrain.py, shared by the scripts below."""
    model_path = str(tmp_path_factory.mktemp("pretrain") / "float.keras")
    out = _run(["examples/pretrain.py", *TINY_PRETRAIN, "--epochs=1", f"--output={model_path}"])
    assert "BN channels with variance < eps" in out and os.path.exists(model_path)
    return model_path


@pytest.mark.slow
def test_pretrain_then_quantize_and_resume(pretrained, tmp_path):
    model_path = pretrained
    run_dir = str(tmp_path / "pfq")
    args = [
        "examples/quantize.py",
        f"--model={model_path}",
        "--method=pfq",
        "--epochs_a=1",
        "--epochs_w=1",
        "--num_train=100",
        "--activation_bits=3",
        "--weight_bits=3",
        f"--output_dir={run_dir}",
        "--export",
    ]
    out = _run(args)
    final = os.path.join(run_dir, "final")
    assert f"QAT model: {os.path.join(final, 'qat_model.h5')}" in out
    assert f"TFLite model: {os.path.join(final, 'model.tflite')}" in out
    assert os.path.getsize(os.path.join(final, "model.tflite")) > 0
    summary = _json(os.path.join(run_dir, "summary.json"))
    assert [s["name"] for s in summary["steps"]] == ["pfq_1", "stage_a", "pfq_2", "fold", "stage_w"]
    assert (summary["activation_bits"], summary["weight_bits"]) == (3, 3)
    assert "| stage_w | train |" in out
    # Started again with the same output directory, nothing is retrained.
    again = _run(args)
    assert "Resuming from" in again and "Step 1/5" not in again
    assert _json(os.path.join(run_dir, "summary.json")) == summary
    # Other flags on the same directory fail before any work, naming the difference.
    other = [a if a != "--weight_bits=3" else "--weight_bits=4" for a in args]
    proc = subprocess.run(
        [sys.executable, *other],
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode != 0
    assert "steps.stage_w.weight_bits: 3 -> 4" in proc.stderr


@pytest.mark.slow
def test_pretrain_on_a_tfds_dataset_with_mock_data(tmp_path):
    # tfds.testing.mock_data patches tfds.load in-process, so wrap the script.
    runner = tmp_path / "runner.py"
    runner.write_text(
        textwrap.dedent(
            f"""
            import runpy, sys
            import tensorflow_datasets as tfds
            sys.argv = ["pretrain.py", "--dataset=cifar10", "--data_dir={tmp_path}",
                        "--width=0.125", "--image_size=8", "--epochs=1",
                        "--output={tmp_path / "cifar.keras"}"]
            with tfds.testing.mock_data(num_examples=40):
                runpy.run_path("examples/pretrain.py", run_name="__main__")
            """
        )
    )
    out = _run([str(runner)])
    assert "test accuracy" in out and (tmp_path / "cifar.keras").exists()


@pytest.mark.slow
def test_compare_writes_tables_and_figures(pretrained, tmp_path):
    out = _run(
        [
            "examples/compare.py",
            f"--model={pretrained}",
            "--num_train=100",
            "--methods=pfq_once,dfq",
            "--epochs_a=1",
            "--epochs_w=1",
            f"--output_dir={tmp_path}",
        ]
    )
    assert "| pfq_once |" in out and "| dfq |" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert {r["method"] for r in results["aggregated"]} == {"pfq_once", "dfq"}
    for name in ("results.md", "fig2_weight_ranges.png", "fig3_bn_variance.png"):
        assert (tmp_path / name).stat().st_size > 0, name


@pytest.mark.slow
def test_demo_reuses_its_cache_only_for_the_same_settings(tmp_path):
    args = [
        "examples/demo.py",
        f"--workdir={tmp_path / 'demo'}",
        "--width=0.125",
        "--image_size=8",
        "--num_train=100",
        "--pretrain_epochs=1",
        "--epochs=1",
        "--methods=pfq",
    ]
    first = _run(args)
    assert "| mobilenet_v1 | A4/W4 | pfq |" in first and "demo wall time" in first
    final = tmp_path / "demo" / "runs" / "pfq_a4w4_s0" / "final" / "qat_model.h5"
    assert f"pfq QAT model: {final}" in first and final.exists()
    table = [line for line in first.splitlines() if line.startswith("| mobilenet_v1")]
    again = _run(args)
    assert "Loading the pretrained model" in again
    assert [line for line in again.splitlines() if line.startswith("| mobilenet_v1")] == table
    # Other settings are refused rather than answered from the cache.
    proc = subprocess.run(
        [sys.executable, *args, "--epochs=2"],
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode != 0
    assert "steps.stage_a.config.epochs: 1 -> 2" in proc.stderr
