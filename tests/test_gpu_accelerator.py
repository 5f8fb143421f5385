"""LiteRT's GPU accelerator (CompiledModel, WebGPU on Vulkan): result or a clear error."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tf_pfq.export import litert

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _float_model() -> bytes:
    f = tf.function(lambda x: tf.nn.relu(x * 2.0 - 1.0), input_signature=[tf.TensorSpec([1, 4])])
    return tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f).convert()


def test_gpu_runner_runs_on_the_gpu_or_says_what_is_missing():
    model = _float_model()
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    try:
        runner = litert.make_gpu_runner(model)
    except litert.DelegateUnavailableError as err:
        message = str(err)
        assert "GPU accelerator" in message and "does not fall back" in message
        missing = litert._vulkan_loader_missing()
        if missing is not None:  # e.g. this CI machine: no libvulkan.so.1
            assert "no Vulkan" in message and "libvulkan" in message
        else:
            assert "no usable GPU adapter" in message
        return
    np.testing.assert_allclose(litert.predict(runner, x), np.maximum(2 * x - 1, 0), atol=1e-3)


def test_gpu_error_names_missing_vulkan(monkeypatch):
    from ai_edge_litert import compiled_model

    def fail(*args, **kwargs):
        raise RuntimeError("ERROR: [litert/runtime/compiled_model.cc:1036]")

    monkeypatch.setattr(compiled_model.CompiledModel, "from_buffer", fail)
    monkeypatch.setattr(litert, "_vulkan_loader_missing", lambda: "libvulkan.so.1 cannot be loaded")
    with pytest.raises(litert.DelegateUnavailableError, match=r"no Vulkan: libvulkan\.so\.1"):
        litert.make_gpu_runner(_float_model())
    monkeypatch.setattr(litert, "_vulkan_loader_missing", lambda: None)
    with pytest.raises(litert.DelegateUnavailableError, match="no usable GPU adapter"):
        litert.make_gpu_runner(_float_model())


def test_gpu_partial_acceleration_is_refused(monkeypatch):
    from ai_edge_litert import compiled_model

    class Partial:
        def is_fully_accelerated(self):
            return False

    monkeypatch.setattr(
        compiled_model.CompiledModel, "from_buffer", classmethod(lambda cls, *a, **k: Partial())
    )
    with pytest.raises(litert.DelegateUnavailableError, match="fall back to the CPU"):
        litert.make_gpu_runner(_float_model())


@pytest.mark.skipif(
    litert._vulkan_loader_missing() is None, reason="needs a machine without Vulkan"
)
def test_evaluate_script_gpu_error(tmp_path):
    path = tmp_path / "m.tflite"
    path.write_bytes(_float_model())
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "export" / "evaluate.py"),
            f"--tflite={path}",
            "--accelerator=gpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode != 0
    assert "DelegateUnavailableError" in result.stderr and "no Vulkan" in result.stderr
    assert "accuracy" not in result.stdout  # nothing was evaluated on the CPU instead
