"""Runs the `>>>` examples in the docstrings of every tf_pfq module with doctest.

Modules are discovered with pkgutil, so a new module is tested without editing this
file. A module without examples passes; a failing or erroring example fails its
module's test with doctest's report.
"""

from __future__ import annotations

import doctest
import importlib
import io
import pkgutil

import pytest

import tf_pfq
from tf_pfq.compat import keras

OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _module_names() -> list[str]:
    names = [tf_pfq.__name__]
    names += [
        info.name
        for info in pkgutil.walk_packages(
            tf_pfq.__path__, prefix=tf_pfq.__name__ + ".", onerror=_raise
        )
    ]
    return sorted(names)


def _raise(name: str) -> None:
    # walk_packages would otherwise skip a subpackage that fails to import, silently.
    raise ImportError(f"cannot import {name} while collecting docstring examples")


MODULES = _module_names()


def run_doctests(module_name: str) -> tuple[doctest.TestResults, str]:
    """Runs a module's docstring examples; returns (failed, attempted) and the report."""
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    for test in finder.find(module, module_name):
        runner.run(test, out=out.write)
    return runner.summarize(verbose=False), out.getvalue()


def test_modules_discovered():
    # Discovery reached the submodules (and subpackages), not just the package itself.
    assert "tf_pfq.graph" in MODULES and "tf_pfq.compat" in MODULES
    assert len(MODULES) == len(set(MODULES))


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name):
    # Each module's examples start as in a fresh interpreter: earlier modules' models
    # must not shift Keras' automatic layer names (dense_1, ...) shown in outputs.
    keras.backend.clear_session()
    results, report = run_doctests(module_name)
    assert results.failed == 0, f"{results.failed} docstring example(s) failed:\n{report}"


def test_failing_example_is_reported(tmp_path, monkeypatch):
    # Negative control: an example whose output is wrong must be counted as failed.
    (tmp_path / "pfq_doctest_probe.py").write_text(
        'def f():\n    """Doubles.\n\n    >>> 1 + 1\n    3\n    >>> 2 * 2\n    4\n    """\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    results, report = run_doctests("pfq_doctest_probe")
    assert results == (1, 2)
    assert "Expected:\n    3\nGot:\n    2" in report
