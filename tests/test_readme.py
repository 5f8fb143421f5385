"""The README's Python blocks run as written, and CI runs the README's test command.

The blocks run on tiny data: a prelude defines the names the README takes as given
(`model`, `train_ds`, `test_ds`: an 8x8 digits MobileNetV1 with two dead BN channels),
and `epochs=100` becomes `epochs=1` textually; nothing else of the README is changed.
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```python\n(.*?)^```$", README, flags=re.S | re.M)

PRELUDE = """
from tf_pfq import data
from test_prune_helpers import tiny_dead_model

splits = data.load_digits(image_size=8, num_train=64)
train_ds = data.to_dataset(splits["train"], 32)
test_ds = data.to_dataset(data.Split(splits["test"].images[:64], splits["test"].labels[:64]), 64)
model = tiny_dead_model(l2=1e-3)  # 2 dead BN channels; pretraining-style L2 regularizers
"""


def test_readme_has_python_blocks():
    assert BLOCKS, "no ```python block found in README.md"
    assert any("run_workflow" in b and "fit(" in b for b in BLOCKS)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # output_dir="runs/..." lands in the temporary folder
    code = BLOCKS[index].replace("epochs=100", "epochs=1")
    assert code != BLOCKS[index] or "epochs=" not in code, "epoch patch did not apply"
    namespace: dict = {}
    exec(compile(PRELUDE, "<prelude>", "exec"), namespace)
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)
    printed = capsys.readouterr().out
    if "edgetpu_compatibility" in code:
        assert "PfQ report" in printed and "CONV_2D" in printed
        # The step-by-step path really removed the dead channels and the L2 terms.
        assert not namespace["float_model"].losses
        assert namespace["model"].losses  # the input model is not modified


def _sh_blocks() -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```$", README, flags=re.S | re.M)


def test_ci_runs_exactly_the_readme_test_command():
    tests = [b.strip() for b in _sh_blocks() if "pytest" in b]
    assert len(tests) == 1, tests
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert ci == tests[0]
    # Each test runs once: Bazel builds and runs only its smoke suite, pytest the rest.
    assert "bazel build //..." in ci and "bazel test //tests:smoke" in ci
    assert "bazel test //..." not in ci
