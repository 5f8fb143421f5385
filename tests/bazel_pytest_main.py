"""Bazel `main` of every py_test: runs pytest on the test files given as arguments.

Bazel runs a py_test's main as a plain script from the runfiles tree; pytest then
collects the file with conftest.py and setup.cfg's [tool:pytest] beside it, exactly as
`python -m pytest tests/test_x.py` does in a checkout.
"""

from __future__ import annotations

import os
import sys

import pytest


def pytest_args(argv: list[str], env: dict[str, str]) -> list[str]:
    """pytest arguments for a Bazel test run.

    Maps Bazel's `--test_filter` (TESTBRIDGE_TEST_ONLY) to `-k` and writes the per-test
    JUnit XML Bazel asks for (XML_OUTPUT_FILE); no cache is written into runfiles.

    Example:
        >>> pytest_args(["tests/test_a.py"], {"TESTBRIDGE_TEST_ONLY": "fold"})
        ['tests/test_a.py', '-q', '-p', 'no:cacheprovider', '-k', 'fold']
    """
    args = [*argv, "-q", "-p", "no:cacheprovider"]
    if env.get("TESTBRIDGE_TEST_ONLY"):
        args += ["-k", env["TESTBRIDGE_TEST_ONLY"]]
    if env.get("XML_OUTPUT_FILE"):
        args.append(f"--junitxml={env['XML_OUTPUT_FILE']}")
    return args


def main() -> int:
    # HOME is read-only in Bazel's sandbox; matplotlib (imported by TF add-ons) caches.
    if "TEST_TMPDIR" in os.environ:
        os.environ.setdefault("MPLCONFIGDIR", os.environ["TEST_TMPDIR"])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return int(pytest.main(pytest_args(sys.argv[1:], dict(os.environ))))


if __name__ == "__main__":
    sys.exit(main())
