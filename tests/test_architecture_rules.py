"""Architecture rules read from the source: only the layer table says what a layer is.

Every module of `tf_pfq` is parsed with `ast` (nothing is imported or run), and the
test fails, naming file:line, where a module outside the table
(`tf_pfq/layers/table.py`) and the Keras 3 translator (`tf_pfq/compat/keras3.py`,
which maps Keras 3 class names onto tf_keras ones) tests a layer's class itself:

(a) `isinstance` / `issubclass` against a Keras layer class, or a comparison (`is`,
    `is not`, `==`, `!=`, `in`, `not in`) with one, e.g. `type(x) is L.MaxPooling2D`.
    A Keras layer class is written `L.X`, `layers.X`, `keras.layers.X`,
    `tf.keras.layers.X` (any alias bound to a `layers` module), a name imported from
    such a module, or a name bound to any of these (also inside a tuple or `A | B`),
    where X is a subclass of `keras.layers.Layer` in `keras.layers`.
(b) a comparison (`==`, `!=`, `in`, `not in`) between a class name and a string
    naming a layer class (a class of `keras.layers` or a table entry's name, such as
    "TFOpLambda"), the string also inside a tuple, list, set or dict literal or a
    name bound to one. A class name is `type(x).__name__`, `x.__class__.__name__`
    (any `__name__` / `__qualname__`), a `class_name` attribute, call (`graph.
    class_name(n)`) or item (`config["class_name"]`, `.get("class_name")`), a
    comprehension of those, or a variable assigned one of them.
(c) indexing (`[...]`, `.get(...)`) a dict literal keyed by layer class names with a
    class name, the same test written as a lookup.

Passes ask the table instead: `family_of(layer)`, `exact_family(layer)` where a
subclass must not count, `family_named(class_name)` for a model config, or
`entry_for(layer)` for the other fields.

Allowed, because they do not ask which kind of layer a layer is:

* `keras.layers.Layer` itself: whether an object is a layer at all;
* models (`keras.Model`, `keras.Sequential`): a nested model is graph structure,
  not a layer family (`tf_pfq.graph`, `tf_pfq.compat`, `tf_pfq.cost`);
* tfmot's classes (`QuantizeWrapper`, `QuantizeLayer`, also by name in
  `tf_pfq.saving`), quantizers and quantize configs: what tf_pfq wrapped, not what
  the wrapped layer is;
* tf_pfq's own classes (e.g. `isinstance(x, Simulate)`); its one layer class,
  `ElementwiseOp`, is asked through the table like the Keras ones (`Family.
  ELEMENTWISE_OP`, then the op's `kind`), though `isinstance` would not be flagged;
* building a config (`{"class_name": "Conv2D", ...}`) or a message naming a class:
  assignments and f-strings are no comparisons.

The negative controls run the same checker on small snippets that break each rule,
and on the exempt table itself, so a checker that stopped seeing violations fails.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from tf_pfq.compat import keras
from tf_pfq.layers import table

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tf_pfq"
# The table (the one place that maps classes to families) and the Keras 3 translator.
EXEMPT = frozenset(["tf_pfq/layers/table.py", "tf_pfq/compat/keras3.py"])


def _keras_layer_classes() -> frozenset[str]:
    names = set()
    for name in dir(keras.layers):
        value = getattr(keras.layers, name, None)
        if (
            isinstance(value, type)
            and issubclass(value, keras.layers.Layer)
            and value is not keras.layers.Layer
        ):
            names.add(name)
    return frozenset(names)


LAYER_CLASSES = _keras_layer_classes()
LAYER_NAMES = LAYER_CLASSES | {entry.name for entry in table.entries()}
_COMPARISONS = (ast.Eq, ast.NotEq, ast.In, ast.NotIn)
_CLASS_COMPARISONS = (*_COMPARISONS, ast.Is, ast.IsNot)
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)
_DEPTH = 8  # how many name bindings deep a value is followed


@dataclasses.dataclass
class _Scope:
    """The names bound in one module, class or function body (not in nested ones)."""

    parent: _Scope | None
    bindings: dict[str, list[ast.expr]] = dataclasses.field(default_factory=dict)
    layer_modules: set[str] = dataclasses.field(default_factory=set)  # L = keras.layers
    imported: dict[str, str] = dataclasses.field(default_factory=dict)  # C -> "Conv2D"

    def values(self, name: str) -> list[ast.expr]:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.bindings:
                return scope.bindings[name]
            scope = scope.parent
        return []

    def is_layer_module(self, name: str) -> bool:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.layer_modules:
                return True
            scope = scope.parent
        return False

    def imported_class(self, name: str) -> str | None:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.imported:
                return scope.imported[name]
            scope = scope.parent
        return None


def _own_nodes(scope_node: ast.AST):
    """The nodes of a scope's body, not entering nested functions, lambdas or classes."""
    stack = list(ast.iter_child_nodes(scope_node))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, _SCOPES):
            stack.extend(ast.iter_child_nodes(node))


def _targets(node: ast.AST) -> list[tuple[str, ast.expr]]:
    if isinstance(node, ast.Assign) and node.value is not None:
        return [(t.id, node.value) for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, (ast.AnnAssign, ast.NamedExpr)) and node.value is not None:
        target = node.target
        return [(target.id, node.value)] if isinstance(target, ast.Name) else []
    return []


def _is_layers_path(dotted: str) -> bool:
    return dotted == "layers" or dotted.endswith(".layers")


def _collect(scope_node: ast.AST, parent: _Scope | None) -> _Scope:
    scope = _Scope(parent)
    for node in _own_nodes(scope_node):
        for name, value in _targets(node):
            scope.bindings.setdefault(name, []).append(value)
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_layers_path(alias.name) and alias.asname:
                    scope.layer_modules.add(alias.asname)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            for alias in node.names:
                bound = alias.asname or alias.name
                if alias.name == "layers":
                    scope.layer_modules.add(bound)
                elif _is_layers_path(module) and alias.name in LAYER_CLASSES:
                    scope.imported[bound] = alias.name
    for name, values in scope.bindings.items():
        if any(_is_layer_module_expr(v, scope) for v in values):
            scope.layer_modules.add(name)
    return scope


def _is_layer_module_expr(node: ast.expr, scope: _Scope) -> bool:
    """`keras.layers`, `tf.keras.layers`, `layers`, or an alias of one (`L`)."""
    if isinstance(node, ast.Attribute):
        return node.attr == "layers"
    if isinstance(node, ast.Name):
        return node.id == "layers" or scope.is_layer_module(node.id)
    return False


def _layer_classes(node: ast.expr | None, scope: _Scope, depth: int = 0) -> list[str]:
    """The Keras layer classes `node` is (a class, a tuple of them, `A | B`, a name)."""
    if node is None or depth > _DEPTH:
        return []
    if isinstance(node, ast.Attribute):
        if node.attr in LAYER_CLASSES and _is_layer_module_expr(node.value, scope):
            return [node.attr]
        return []
    if isinstance(node, ast.Name):
        imported = scope.imported_class(node.id)
        if imported is not None:
            return [imported]
        return [c for v in scope.values(node.id) for c in _layer_classes(v, scope, depth + 1)]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [c for e in node.elts for c in _layer_classes(e, scope, depth + 1)]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _layer_classes(node.left, scope, depth + 1) + _layer_classes(
            node.right, scope, depth + 1
        )
    return []


def _is_class_name(node: ast.expr | None, scope: _Scope, depth: int = 0) -> bool:
    """Whether `node` holds a class name (see the module docstring)."""
    if node is None or depth > _DEPTH:
        return False
    if isinstance(node, ast.Attribute):
        return node.attr in ("__name__", "__qualname__", "class_name")
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "class_name":
            return True
        key = node.args[1] if len(node.args) > 1 else None
        if isinstance(func, ast.Name) and func.id == "getattr" and _is_constant(key, "__name__"):
            return True
        first = node.args[0] if node.args else None
        return (
            isinstance(func, ast.Attribute)
            and func.attr == "get"
            and _is_constant(first, "class_name")
        )
    if isinstance(node, ast.Subscript):
        return _is_constant(node.slice, "class_name")
    if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp)):
        return _is_class_name(node.elt, scope, depth + 1)
    if isinstance(node, ast.Name):
        return any(_is_class_name(v, scope, depth + 1) for v in scope.values(node.id))
    return False


def _is_constant(node: ast.expr | None, value: str) -> bool:
    return isinstance(node, ast.Constant) and node.value == value


def _layer_names(node: ast.expr | None, scope: _Scope, depth: int = 0) -> list[str]:
    """The layer class names among the strings `node` holds (literals, collections)."""
    if node is None or depth > _DEPTH:
        return []
    if isinstance(node, ast.Constant):
        return [node.value] if isinstance(node.value, str) and node.value in LAYER_NAMES else []
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [n for e in node.elts for n in _layer_names(e, scope, depth + 1)]
    if isinstance(node, ast.Dict):
        return [n for k in node.keys for n in _layer_names(k, scope, depth + 1)]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("frozenset", "set", "tuple", "list", "dict")
        and len(node.args) == 1
    ):
        return _layer_names(node.args[0], scope, depth + 1)
    if isinstance(node, ast.Name):
        return [n for v in scope.values(node.id) for n in _layer_names(v, scope, depth + 1)]
    return []


def _keyed_by_layer_names(node: ast.expr, scope: _Scope) -> list[str]:
    """The layer class names keying the dict literal `node` is (or is bound to)."""
    values = scope.values(node.id) if isinstance(node, ast.Name) else [node]
    return [n for v in values if isinstance(v, ast.Dict) for n in _layer_names(v, scope)]


def _check_node(node: ast.AST, scope: _Scope) -> list[tuple[int, str]]:
    found = []
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("isinstance", "issubclass")
        and len(node.args) == 2
    ):
        classes = _layer_classes(node.args[1], scope)
        if classes:
            found.append((node.lineno, f"{node.func.id} against {', '.join(classes)}"))
    if isinstance(node, ast.Compare):
        operands = [node.left, *node.comparators]
        for left, op, right in zip(operands, node.ops, operands[1:]):
            if not isinstance(op, _CLASS_COMPARISONS):
                continue
            classes = _layer_classes(left, scope) + _layer_classes(right, scope)
            if classes:
                found.append((node.lineno, f"comparison with class {', '.join(classes)}"))
                continue
            if not isinstance(op, _COMPARISONS):
                continue
            for name_side, other in ((left, right), (right, left)):
                names = _layer_names(other, scope)
                if names and _is_class_name(name_side, scope):
                    found.append((node.lineno, f"class name compared with {', '.join(names)}"))
                    break
    if isinstance(node, ast.Subscript) and _is_class_name(node.slice, scope):
        names = _keyed_by_layer_names(node.value, scope)
        if names:
            found.append((node.lineno, f"class name looked up in a dict of {', '.join(names)}"))
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "get"
        and node.args
        and _is_class_name(node.args[0], scope)
    ):
        names = _keyed_by_layer_names(node.func.value, scope)
        if names:
            found.append((node.lineno, f"class name looked up in a dict of {', '.join(names)}"))
    return found


def violations(source: str, path: str = "<snippet>") -> list[str]:
    """Every layer-class test in `source` (see the module docstring), as "path:line: what"."""
    found: list[tuple[int, str]] = []

    def visit(scope_node: ast.AST, parent: _Scope | None) -> None:
        scope = _collect(scope_node, parent)
        for node in _own_nodes(scope_node):
            found.extend(_check_node(node, scope))
            if isinstance(node, _SCOPES):
                visit(node, scope)

    visit(ast.parse(source), None)
    return [f"{path}:{line}: {what}" for line, what in sorted(set(found))]


def _modules() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py"))


def test_the_scan_sees_the_package():
    modules = _modules()
    assert "tf_pfq/prune.py" in modules and "tf_pfq/export/lowering.py" in modules
    assert set(modules) >= EXEMPT, "an exempt file moved: update EXEMPT"
    # The names the rule knows: Keras' layer classes and the op layers matched by name.
    assert {"Conv2D", "BatchNormalization", "InputLayer"} <= LAYER_CLASSES
    assert "Layer" not in LAYER_CLASSES and "TFOpLambda" in LAYER_NAMES


def test_no_layer_class_test_outside_the_table():
    problems = []
    for rel in _modules():
        if rel not in EXEMPT:
            problems += violations((ROOT / rel).read_text(), rel)
    assert not problems, (
        "Ask tf_pfq.layers.table (family_of, exact_family, family_named, entry_for) "
        "instead of testing classes:\n" + "\n".join(problems)
    )


def test_the_exempt_table_itself_would_be_flagged():
    # Negative control on real code: the table does test classes (that is its job).
    source = (ROOT / "tf_pfq/layers/table.py").read_text()
    assert any("isinstance against Softmax" in v for v in violations(source))


VIOLATING = """
from tf_keras.layers import Conv2D as C
from tf_pfq.compat import keras
import tf_keras.layers as KL
L = keras.layers
POOLS = (L.MaxPooling2D, L.AveragePooling2D)
NAMES = frozenset(["Dropout", "SpatialDropout2D"])
HANDLERS = {"Dense": 1, "Conv2D": 2}

def f(layer, graph, config, tf):
    a = isinstance(layer, L.Conv2D)                                   # !
    b = isinstance(layer, (keras.layers.Dense, L.ReLU))               # !
    c = isinstance(layer, POOLS)                                      # !
    d = isinstance(layer, L.DepthwiseConv2D | L.Conv2D)               # !
    e = type(layer) is not keras.layers.MaxPooling2D                  # !
    g = isinstance(layer, tf.keras.layers.Add) or isinstance(layer, C)  # !
    h = type(layer).__name__ == "BatchNormalization"                  # !
    i = layer.__class__.__name__ in ("Add", "Multiply")               # !
    j = config["class_name"] != "TFOpLambda"                          # !
    cls = graph.class_name("x")
    k = cls in NAMES                                                  # !
    m = HANDLERS[type(layer).__name__]                                # !
    n = HANDLERS.get(cls)                                             # !
    o = issubclass(type(layer), KL.Flatten)                           # !
    p = "ReLU" == layer.class_name                                    # !
    return a, b, c, d, e, g, h, i, j, k, m, n, o, p
"""


def test_checker_flags_each_kind_of_violation():
    # Each line marked "# !" breaks the rule once; no other line does.
    marked = [i for i, line in enumerate(VIOLATING.splitlines(), 1) if line.endswith("# !")]
    assert len(marked) == 14
    found = violations(VIOLATING)
    assert sorted({int(v.split(":")[1]) for v in found}) == marked
    assert len(found) == len(marked) + 1  # two tests on the `or` line
    assert violations(VIOLATING, "m.py")[0] == f"m.py:{marked[0]}: isinstance against Conv2D"


ALLOWED = """
import tensorflow_model_optimization as tfmot
from tf_pfq.compat import keras
from tf_pfq.layers.table import Family, family_of

def f(layer, model, config, activation):
    a = isinstance(layer, keras.layers.Layer)
    b = isinstance(model, (keras.Model, keras.Sequential))
    c = isinstance(layer, tfmot.quantization.keras.QuantizeWrapper)
    d = type(layer).__name__ in {"QuantizeLayer", "QuantizeWrapperV2"}
    e = getattr(activation, "__name__", "") == "linear"
    g = family_of(layer) is Family.BATCHNORM
    h = {"class_name": "Conv2D", "config": config}
    i = f"{type(layer).__name__} is not a Conv2D"
    j = config["activation"] == "relu"
    return a, b, c, d, e, g, h, i, j
"""


def test_checker_allows_what_is_no_layer_class_test():
    assert violations(ALLOWED) == []


@pytest.mark.parametrize(
    "snippet",
    [
        # The alias is bound in an enclosing scope; the test is in a nested function.
        "L = keras.layers\ndef f(x):\n    def g():\n        return isinstance(x, L.Dense)\n",
        # A local collection of names, compared in the same function.
        "def f(x):\n    names = ('Conv2D',)\n    return type(x).__name__ in names\n",
    ],
)
def test_checker_follows_names_through_scopes(snippet):
    assert len(violations(snippet)) == 1


# Graph edits go through `tf_pfq.graph.rewrite`; only it (and the Keras 3 translator,
# which writes tf_keras configs from Keras 3 ones) assigns a layer's inbound nodes.
_GRAPH_WRITERS = {"tf_pfq/graph.py", "tf_pfq/compat/keras3.py"}


def inbound_writes(source: str) -> list[int]:
    """Lines that assign `something["inbound_nodes"]`."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for target in targets:
            if isinstance(target, ast.Subscript) and _is_constant(target.slice, "inbound_nodes"):
                lines.append(node.lineno)
    return lines


def test_only_the_rewrite_primitive_edits_inbound_nodes():
    problems = [
        f"{rel}:{line}"
        for rel in _modules()
        if rel not in _GRAPH_WRITERS
        for line in inbound_writes((ROOT / rel).read_text())
    ]
    assert not problems, "edit the graph with tf_pfq.graph.rewrite instead: " + ", ".join(problems)


def test_an_inbound_edit_would_be_flagged():
    assert inbound_writes('c["inbound_nodes"] = []\nd = c["inbound_nodes"]\n') == [1]
