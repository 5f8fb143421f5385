"""The evidence benchmark's --quick configuration end to end: runs, resumption, report."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, *extra):
    command = [sys.executable, "benchmarks/accuracy.py", "--quick", f"--workdir={workdir}", *extra]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_quick_benchmark_records_runs_resumes_and_reports(tmp_path):
    _run(tmp_path)
    runs_dir = tmp_path / "accuracy_quick_runs"
    records = {p.name: json.loads(p.read_text()) for p in runs_dir.glob("*.json")}
    assert len(records) == 4
    for record in records.values():
        stages = [point["stage"] for point in record["curve"]]
        if record["method"] == "pfq":
            assert stages == ["stage_a", "stage_w"]  # one epoch per stage
        else:
            assert stages == ["stage_aw", "stage_aw"]  # the same budget in one stage
        assert record["accuracy"] == record["curve"][-1]["accuracy"]
        # The deployed file computes what the QAT model computes: it only rounds the
        # logits, which QAT leaves in float, to int8 (half an output step), and
        # saturates those beyond the range calibrated on training images.
        assert record["tflite_logit_steps_p99"] <= 0.5 + 1e-3
        assert record["tflite_logit_steps_max"] <= 0.5 + 1e-3
        assert 0.0 <= record["tflite_saturated"] < 0.01
        # So top-1 changes only where the two best logits are within about a step of
        # each other, which a briefly trained model's are on a few images.
        assert record["tflite_agreement"] >= 0.95
    summary = json.loads((tmp_path / "accuracy_quick.json").read_text())
    (regime,) = summary["pretrained"].values()
    assert regime["bn_epsilon"] == 1e-5 and 0.2 < regime["float_accuracy"] <= 1.0
    assert regime["dead_1e-5"]["all"][1] == sum(
        v[1] for k, v in regime["dead_1e-5"].items() if k != "all"
    )
    (ptq,) = summary["ptq"].values()
    # Per tensor: W4, W3, A4, A3, A4/W4, A3/W3; per channel: the four with weights;
    # each with and without PfQ.
    assert len(ptq) == 20 and {row["pfq"] for row in ptq} == {False, True}
    assert sum(row["per_channel"] for row in ptq) == 8
    report = (tmp_path / "accuracy_quick.md").read_text()
    for section in ("## 1. The regime", "## 2. Before any fine-tuning", "## 5. Claims"):
        assert section in report
    assert "4 of 4 planned fine-tuning runs recorded (complete)" in report
    # Started again, it finds every run recorded and trains nothing.
    mtimes = {p.name: p.stat().st_mtime_ns for p in runs_dir.glob("*.json")}
    _run(tmp_path)
    assert {p.name: p.stat().st_mtime_ns for p in runs_dir.glob("*.json")} == mtimes
