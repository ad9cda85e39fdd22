"""The package's layering: no import circle, no import hidden in a function.

Reads the source (`ast`), so it checks what a change adds, not what happens
to be imported already.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "keras_sfp"


def _modules() -> dict:
    """`{dotted module name: parsed tree}` of every module of keras_sfp."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), str(path))
    return found


MODULES = _modules()


def _targets(node, modules) -> list:
    """The keras_sfp modules an import statement loads."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
        return []
    return [n for n in names if n in modules]


def _top_level_imports(tree) -> list:
    """Import statements run when the module is imported (not in functions)."""
    found = []

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def _graph(modules) -> dict:
    graph = {}
    for name, tree in modules.items():
        edges = set()
        for node in _top_level_imports(tree):
            for target in _targets(node, modules):
                # Importing a.b.c runs a and a.b first.
                parts = target.split(".")
                edges.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
        edges.discard(name)
        # A package's __init__ is run before its modules, not by them.
        graph[name] = {e for e in edges if not name.startswith(e + ".")}
    return graph


def _cycle(graph) -> list | None:
    state = {}
    stack = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_has_no_import_circle():
    assert _cycle(_graph(MODULES)) is None, " -> ".join(_cycle(_graph(MODULES)))


def test_the_circle_check_finds_a_circle():
    # The check itself: a -> b -> a is found, a -> b alone is not.
    trees = {
        "keras_sfp.a": ast.parse("from keras_sfp import b"),
        "keras_sfp.b": ast.parse("import keras_sfp.a"),
        "keras_sfp": ast.parse(""),
    }
    assert _cycle(_graph(trees)) == ["keras_sfp.a", "keras_sfp.b", "keras_sfp.a"]
    trees["keras_sfp.b"] = ast.parse("def f():\n    import keras_sfp.a")
    assert _cycle(_graph(trees)) is None


# Modules that import TensorFlow when imported (an optional dependency):
# the core imports them when first used, so that it runs without TensorFlow.
NEEDS_TENSORFLOW = {
    name
    for name, tree in MODULES.items()
    if any(
        isinstance(node, ast.Call)
        and getattr(node.func, "id", None) == "import_tensorflow"
        for node in tree.body
        if isinstance(node, ast.Assign)
        for node in ast.walk(node)
    )
}


def test_the_tensorflow_modules_are_found():
    assert "keras_sfp.export.saved_model" in NEEDS_TENSORFLOW
    assert "keras_sfp.core.prune" not in NEEDS_TENSORFLOW


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_keras_sfp_inside_a_function(name):
    hidden = []
    for node in ast.walk(MODULES[name]):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                targets = set(_targets(inner, MODULES))
                lazy = {
                    t
                    for t in targets
                    if t in NEEDS_TENSORFLOW
                    or any(m.startswith(t + ".") for m in NEEDS_TENSORFLOW)
                }
                if targets - lazy:
                    hidden.append(f"line {inner.lineno} in {node.name}")
    assert not hidden, hidden


LIBRARY = ("core", "recovery", "graph", "allocation", "latency")
PROGRAMS = ("training", "export", "cli")


def test_the_library_does_not_import_the_programs():
    # The pruning library runs without the training program, the exporters
    # (TensorFlow) and the command lines; they build on it, not it on them.
    graph = _graph(MODULES)
    found = [
        f"{name} -> {target}"
        for name, targets in graph.items()
        if name.split(".")[1:2] and name.split(".")[1] in LIBRARY
        for target in targets
        if target.split(".")[1:2] and target.split(".")[1] in PROGRAMS
    ]
    assert not found, found
