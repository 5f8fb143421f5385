"""Modules and functions of tf_pfq stay small enough to read in one sitting.

A module over 600 lines or a function over 60 lines of code (docstring, blank and
comment lines not counted) must say why at its top: a module in a comment line
starting with "# Long:" among its first lines after the docstring, a function in a
"# Long:" comment as the first line of its body. The checker is tested on source
that breaks the rule, so the test can fail.
"""

from __future__ import annotations

import ast
import pathlib
import textwrap

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "tf_pfq"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60
JUSTIFIED = "# Long:"


def _code_lines(lines: list[str], first: int, last: int) -> int:
    return sum(1 for line in lines[first - 1 : last] if line.strip() and not _comment(line))


def _comment(line: str) -> bool:
    return line.strip().startswith("#")


def _body_start(node) -> int:
    first = node.body[0]
    is_docstring = isinstance(first, ast.Expr) and isinstance(
        getattr(first, "value", None), ast.Constant
    )
    if is_docstring and isinstance(first.value.value, str) and len(node.body) > 1:
        return node.body[1].lineno
    return first.lineno


def violations(source: str, name: str) -> list[str]:
    """What in `source` (a module called `name`) breaks the size rules."""
    lines = source.splitlines()
    tree = ast.parse(source)
    found = []
    if len(lines) > MAX_MODULE_LINES and not any(line.startswith(JUSTIFIED) for line in lines[:80]):
        found.append(f"{name}: {len(lines)} lines > {MAX_MODULE_LINES}, no '{JUSTIFIED}' comment")
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        start = _body_start(node)
        size = _code_lines(lines, start, node.end_lineno)
        # The justification is the first line of the body, before or after the docstring.
        head = lines[node.lineno : start]
        justified = any(line.strip().startswith(JUSTIFIED) for line in head) or lines[
            start - 1
        ].strip().startswith(JUSTIFIED)
        if size > MAX_FUNCTION_LINES and not justified:
            found.append(
                f"{name}:{node.lineno} {node.name}: {size} lines of code > {MAX_FUNCTION_LINES}"
            )
    return found


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_module_and_functions_are_small_or_say_why(path):
    found = violations(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    assert not found, found


def test_the_checker_finds_a_long_function_and_a_long_module():
    body = "\n".join(f"    x{k} = {k}" for k in range(MAX_FUNCTION_LINES + 1))
    long_function = f'def f():\n    """Doc."""\n{body}\n'
    assert violations(long_function, "m") == [f"m:1 f: {MAX_FUNCTION_LINES + 1} lines of code > 60"]
    justified = long_function.replace('"""Doc."""\n', '"""Doc."""\n    # Long: a table.\n')
    assert violations(justified, "m") == []
    short = textwrap.dedent(
        """
        def g():
            # comments and blank lines are not code

            return 1
        """
    )
    assert violations(short, "m") == []
    module = "\n".join(f"x{k} = {k}" for k in range(MAX_MODULE_LINES + 1))
    assert violations(module, "m") == [
        f"m: {MAX_MODULE_LINES + 1} lines > 600, no '# Long:' comment"
    ]
    assert violations("# Long: one table.\n" + module, "m") == []
