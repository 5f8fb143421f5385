"""The Bazel BUILD files cover every module and test file, so they cannot silently rot.

Parses the checked-in BUILD files (no Bazel needed) and checks them against the tree
with `tools/update_build.py`'s `coverage_problems`; the negative controls feed the
checker synthetic trees that lack a target, a dep or a size.
"""

from __future__ import annotations

import doctest
import importlib.util
import sys
from pathlib import Path

import pytest

# Under `bazel test` this file is a symlink in the runfiles tree: resolve it to reach
# the real checkout, whose full file list is what BUILD must cover.
ROOT = Path(__file__).resolve().parents[1]


def _load_update_build():
    path = ROOT / "tools" / "update_build.py"
    spec = importlib.util.spec_from_file_location("update_build", path)
    assert spec is not None and spec.loader is not None, f"cannot load {path}"
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("update_build", module)
    spec.loader.exec_module(module)
    return module


ub = _load_update_build()


def test_checkout_found():
    assert (ROOT / "WORKSPACE").is_file(), f"{ROOT} is not the repository root"
    assert (ROOT / "tf_pfq" / "__init__.py").is_file()


def test_every_module_and_test_is_covered():
    files = ub.tree_sources(ROOT)
    # The tree really holds what BUILD must cover; an empty scan would pass vacuously.
    assert "tf_pfq/graph.py" in files and "tests/test_bazel_build.py" in files
    problems = ub.coverage_problems(ub.read_build_rules(ROOT), files)
    assert not problems, "BUILD is stale; run `python tools/update_build.py`:\n" + "\n".join(
        problems
    )


def test_generated_build_covers_tree(tmp_path):
    # The generator's output for the current tree passes the checker.
    files, _ = ub.generate(ROOT)
    rules = []
    for rel, text in files.items():
        package = str(Path(rel).parent) if "/" in rel else ""
        rules.extend(ub.parse_build(text, package))
    assert ub.coverage_problems(rules, ub.tree_sources(ROOT)) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


SYNTHETIC = {
    "WORKSPACE": "",
    "tf_pfq/__init__.py": "from tf_pfq import a\n",
    "tf_pfq/a.py": "import numpy\n",
    "tf_pfq/b.py": "from tf_pfq.a import x\n",
    "tf_pfq/sub/__init__.py": "",
    "tf_pfq/sub/c.py": "from .. import b\nfrom . import d\n",
    "tf_pfq/sub/d.py": "",
    "tests/conftest.py": "",
    "tests/bazel_pytest_main.py": "",
    "tests/test_fast.py": "def test_x():\n    pass\n",
    "tests/test_slow.py": "import pytest\n\n@pytest.mark.slow\ndef test_y():\n    pass\n",
    "tests/test_quoted.py": "TEXT = '@pytest.mark.slow'\n\ndef test_z():\n    pass\n",
    "examples/train.py": "from tf_pfq import a\nif __name__ == '__main__':\n    pass\n",
}


def test_generator_on_synthetic_tree(tmp_path):
    root = _tree(tmp_path, SYNTHETIC)
    assert ub.main(["--root", str(root)]) == 0
    assert ub.main(["--root", str(root), "--check"]) == 0
    rules = {f"//{r.package}:{r.name}": r for r in ub.read_build_rules(root)}
    assert rules["//tf_pfq:b"].list_attr("deps") == [":a"]
    assert sorted(rules["//tf_pfq:sub_c"].list_attr("deps")) == [":b", ":sub_d"]
    assert rules["//tf_pfq:sub_c"].list_attr("srcs") == ["sub/c.py"]
    assert set(rules["//tf_pfq:tf_pfq"].list_attr("deps")) == {
        ":a",
        ":b",
        ":sub",
        ":sub_c",
        ":sub_d",
    }
    assert rules["//tests:test_slow"].attrs["size"] == "large"
    assert rules["//tests:test_slow"].list_attr("tags") == ["slow"]
    assert rules["//tests:test_fast"].attrs["size"] == "medium"
    # The marker quoted in a string is not a slow test.
    assert rules["//tests:test_quoted"].attrs["size"] == "medium"
    assert "tags" not in rules["//tests:test_quoted"].attrs
    assert rules["//tests:test_fast"].list_attr("args") == ["tests/test_fast.py"]
    assert rules["//examples:train"].kind == "py_binary"
    assert rules["//examples:examples"].list_attr("deps") == ["//tf_pfq"]
    assert ub.coverage_problems(list(rules.values()), ub.tree_sources(root)) == []


def test_check_mode_detects_new_module(tmp_path):
    root = _tree(tmp_path, SYNTHETIC)
    ub.main(["--root", str(root)])
    (root / "tf_pfq" / "e.py").write_text("")
    assert ub.main(["--root", str(root), "--check"]) == 1
    problems = ub.coverage_problems(ub.read_build_rules(root), ub.tree_sources(root))
    assert problems == ["tf_pfq/e.py: no py_library in tf_pfq/BUILD lists it"]


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        (
            lambda t: t.replace('        "test_fast.py",\n', ""),
            "tests/test_fast.py: no py_test in tests/BUILD lists it",
        ),
        (
            lambda t: t.replace('size = "large"', 'size = "medium"'),
            "tests/test_slow.py: uses pytest.mark.slow",
        ),
        (
            lambda t: t.replace('size = "medium"', 'size = "enormous"', 1),
            "tests/test_fast.py: //tests:test_fast has size='enormous'",
        ),
        (
            lambda t: t.replace('args = ["tests/test_fast.py"]', 'args = ["tests/x.py"]'),
            "tests/test_fast.py: //tests:test_fast does not pass it to pytest",
        ),
    ],
    ids=["test_not_listed", "slow_test_sized_medium", "fast_test_sized_enormous", "wrong_args"],
)
def test_checker_flags_broken_tests_build(tmp_path, mutation, expected):
    root = _tree(tmp_path, SYNTHETIC)
    ub.main(["--root", str(root)])
    build = root / "tests" / "BUILD"
    broken = mutation(build.read_text())
    assert broken != build.read_text(), "mutation did not apply"
    build.write_text(broken)
    problems = ub.coverage_problems(ub.read_build_rules(root), ub.tree_sources(root))
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_checker_flags_missing_dep_and_stale_src(tmp_path):
    root = _tree(tmp_path, SYNTHETIC)
    ub.main(["--root", str(root)])
    (root / "tf_pfq" / "a.py").unlink()
    # b imports a, which now no longer exists as a module: only the stale src remains.
    problems = ub.coverage_problems(ub.read_build_rules(root), ub.tree_sources(root))
    assert problems == ["tf_pfq/a.py: listed by //tf_pfq:a but not in the tree"]

    root2 = _tree(tmp_path / "two", SYNTHETIC)
    ub.main(["--root", str(root2)])
    (root2 / "tf_pfq" / "d2.py").write_text("from tf_pfq import b\n")
    build = root2 / "tf_pfq" / "BUILD"
    build.write_text(build.read_text() + '\npy_library(name = "d2", srcs = ["d2.py"])\n')
    problems = ub.coverage_problems(ub.read_build_rules(root2), ub.tree_sources(root2))
    assert problems == ["tf_pfq/d2.py: imports tf_pfq.b but no dep provides it"]


def test_import_cycle_is_broken_not_emitted(tmp_path):
    tree = dict(SYNTHETIC)
    tree["tf_pfq/a.py"] = "from tf_pfq import b\n"  # b imports a: a cycle
    root = _tree(tmp_path, tree)
    files, warnings = ub.generate(root)
    assert any("import cycle" in w for w in warnings)
    rules = ub.parse_build(files["tf_pfq/BUILD"], "tf_pfq")
    deps = {r.name: r.list_attr("deps") for r in rules}
    assert not (":b" in deps["a"] and ":a" in deps["b"])


def test_update_build_docstring_examples():
    # tools/ is outside tf_pfq, so tests/test_docstrings.py does not reach it.
    results = doctest.testmod(ub, optionflags=doctest.ELLIPSIS)
    assert results.attempted >= 10
    assert results.failed == 0


def test_bazel_pytest_main_arguments():
    path = ROOT / "tests" / "bazel_pytest_main.py"
    spec = importlib.util.spec_from_file_location("bazel_pytest_main", path)
    assert spec is not None and spec.loader is not None
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    base = ["tests/test_a.py", "-q", "-p", "no:cacheprovider"]
    assert main.pytest_args(["tests/test_a.py"], {}) == base
    env = {"XML_OUTPUT_FILE": "/x/test.xml", "TESTBRIDGE_TEST_ONLY": "fold and not slow"}
    assert main.pytest_args(["tests/test_a.py"], env) == [
        *base,
        "-k",
        "fold and not slow",
        "--junitxml=/x/test.xml",
    ]
    assert doctest.testmod(main).failed == 0
