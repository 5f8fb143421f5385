"""tf_pfq.cli: a quiet start for the scripts, per-epoch logs off a terminal, early paths."""

from __future__ import annotations

import io
import os
import pathlib
import subprocess
import sys

import pytest

from tf_pfq import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_fit_verbosity():
    assert cli.fit_verbosity(_Tty()) == 1  # progress bar on a terminal
    assert cli.fit_verbosity(io.StringIO()) == 2  # one line per epoch in a file


@pytest.mark.parametrize(
    ("line", "noise"),
    [
        ("WARNING: All log messages before absl::InitializeLog() is called are written", True),
        ("I0000 00:00:1796221949.131512   19175 port.cc:153] oneDNN custom operations", True),
        (
            "E0000 00:00:17.52   19175 cuda_platform.cc:52] failed call to cuInit: INTERNAL",
            True,
        ),
        ("To enable the following instructions: AVX2 FMA, in other operations, rebuild", True),
        ("E0000 00:00:17.5 19175 kernel.cc:9] real error while running", False),
        ("Traceback (most recent call last):", False),
    ],
)
def test_startup_noise(line, noise):
    assert cli.is_startup_noise(line) is noise


def test_cuinit_error_kept_when_a_gpu_exists():
    line = "E0000 00:00:1.5 1 cuda_platform.cc:52] failed call to cuInit: INTERNAL"
    assert not cli.is_startup_noise(line, has_gpu=True)


def test_ensure_output_path(tmp_path):
    out = tmp_path / "a" / "b" / "model.keras"
    assert cli.ensure_output_path(out) == str(out)
    assert out.parent.is_dir() and not out.exists()
    cli.ensure_output_path(tmp_path / "dir", directory=True)
    assert (tmp_path / "dir").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cannot create the folder of output"):
        cli.ensure_output_path(tmp_path / "file" / "model.keras")


def test_script_starts_quietly_and_checks_paths_first(tmp_path):
    # A script that fails at once on a missing input still imports TensorFlow: its
    # stderr shows the error and none of TensorFlow's start-up lines.
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "export" / "to_tflite.py"),
            f"--model={tmp_path / 'missing.h5'}",
            f"--output={tmp_path / 'out' / 'm.tflite'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode != 0
    assert "missing.h5 does not exist" in result.stderr
    for noise in ("oneDNN", "cuInit", "absl::InitializeLog", "cpu_feature_guard"):
        assert noise not in result.stderr, result.stderr
