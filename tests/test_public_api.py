"""The curated public surface: `tf_pfq.__all__` names exist and are documented.

Everything is discovered from `tf_pfq.__all__` (and the `__all__` of the public
submodules it lists), so new public names are checked without editing this file.
"""

from __future__ import annotations
import __future__

import inspect
import re
import types
from pathlib import Path

import pytest

import tf_pfq

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = sorted(tf_pfq.__all__)
# PEP 440 release (optionally pre/post/dev), e.g. 0.1.0, 1.0.0rc1, 0.2.0.dev0.
VERSION_RE = re.compile(r"^\d+\.\d+\.\d+((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?$")


def _callables(module: types.ModuleType) -> list[tuple[str, object]]:
    return [
        (name, getattr(module, name))
        for name in sorted(getattr(module, "__all__", []))
        if inspect.isclass(getattr(module, name, None))
        or inspect.isfunction(getattr(module, name, None))
    ]


def _has_params(fn: object) -> bool:
    try:
        params = inspect.signature(fn).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return any(p not in ("self", "cls") for p in params)


def test_all_has_no_duplicates_and_is_not_empty():
    assert len(tf_pfq.__all__) == len(set(tf_pfq.__all__))
    assert "__version__" in tf_pfq.__all__


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_exists_and_is_documented(name):
    assert hasattr(tf_pfq, name), f"tf_pfq.__all__ lists {name!r} but tf_pfq has no such name"
    obj = getattr(tf_pfq, name)
    if name == "__version__":
        return  # a string; checked by test_version_* below
    doc = inspect.getdoc(obj)
    assert doc and doc.strip(), f"tf_pfq.{name} has no docstring"
    if inspect.isfunction(obj) or inspect.isclass(obj):
        # One runnable example per public entry point (run by tests/test_docstrings.py).
        assert ">>>" in doc, f"tf_pfq.{name}: docstring has no runnable `>>>` example"
        if inspect.isfunction(obj) and _has_params(obj):
            assert "Args:" in doc, f"tf_pfq.{name}: docstring has no Google-style Args:"


def test_no_undeclared_public_names():
    # Curated surface: any public non-module attribute of tf_pfq must be in __all__.
    leaked = [
        name
        for name, value in vars(tf_pfq).items()
        if not name.startswith("_")
        and not isinstance(value, (types.ModuleType, __future__._Feature))
        and name not in tf_pfq.__all__
    ]
    assert not leaked, f"public names missing from tf_pfq.__all__: {leaked}"


PUBLIC_SUBMODULES = [
    name for name in PUBLIC if isinstance(getattr(tf_pfq, name, None), types.ModuleType)
]


@pytest.mark.parametrize("module_name", PUBLIC_SUBMODULES)
def test_public_submodule_names_documented(module_name):
    module = getattr(tf_pfq, module_name)
    for name in getattr(module, "__all__", []):
        assert hasattr(module, name), f"tf_pfq.{module_name}.__all__ lists missing {name!r}"
    undocumented = [name for name, obj in _callables(module) if not inspect.getdoc(obj)]
    assert not undocumented, f"tf_pfq.{module_name}: no docstring on {undocumented}"


def test_version_is_pep440_and_in_changelog():
    version = tf_pfq.__version__
    assert isinstance(version, str) and VERSION_RE.match(version), version
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## \[?([^\]\s]+)\]?", changelog, flags=re.MULTILINE)
    assert version in headings, f"CHANGELOG.md has no '## [{version}]' section: {headings}"


def test_version_regex_rejects_non_pep440():
    # Negative control for the version check above.
    assert VERSION_RE.match("0.1.0") and VERSION_RE.match("1.2.3rc1")
    assert not VERSION_RE.match("v0.1") and not VERSION_RE.match("0.1.0-beta")
