"""The import graph of src/alexnet, read from the sources: no module imports, directly or through others,
a module that imports it back. Imports inside functions count (they are circles put off, not removed).
Importing alexnet.a.b runs the package alexnet.a first, so it counts as importing alexnet/a/__init__.py
too, except from inside alexnet.a (which Python has imported already). A package's __init__ re-exporting
from its own submodules is not a circle: its edges into its own package are left out."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_names() -> dict[str, Path]:
    names = {}
    for path in (SRC / "alexnet").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imported(name: str, path: Path, modules: set[str]) -> set[str]:
    """The modules of `modules` that `name` (at `path`) imports, with the packages each import runs."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from ..x import y, relative to this module's package
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            # from a import b: b is a submodule of a, or a name defined in a
            targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    found = set()
    for target in targets & modules:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):  # the packages it runs on the way, then the module itself
            step = ".".join(parts[:i])
            inside = name == step or name.startswith(step + ".")  # its own package: imported already
            if step in modules and not inside and not (path.name == "__init__.py" and step.startswith(name + ".")):
                found.add(step)
    return found


def import_graph() -> dict[str, set[str]]:
    names = module_names()
    return {name: imported(name, path, set(names)) for name, path in names.items()}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of `graph` (a path that comes back to its start), or None: a depth-first walk."""
    done: set[str] = set()

    def walk(path: list[str]) -> list[str] | None:
        for nxt in sorted(graph[path[-1]]):
            if nxt in path:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in done and (circle := walk(path + [nxt])):
                return circle
        done.add(path[-1])
        return None

    return next((c for start in sorted(graph) if start not in done and (c := walk([start]))), None)


def test_the_graph_sees_imports():
    graph = import_graph()
    assert "alexnet.train.config" in graph["alexnet.train.loop"]  # from .config import TrainConfig
    assert "alexnet.model.lrn" in graph["alexnet.model.net"]
    assert "alexnet.kernels.lrn" in graph["alexnet.model.lrn"]  # inside a function
    assert "alexnet.train" in graph["alexnet.cli"]  # the package, run on the way to its modules
    assert "alexnet.train" not in graph["alexnet.train.loop"]  # its own package: imported already
    assert "alexnet.train.loop" not in graph["alexnet.train"]  # a package re-exporting its own module


def test_find_circle():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b", "c"}, "b": {"c"}, "c": {"d"}, "d": {"c"}}) == ["c", "d", "c"]


def test_no_import_circles():
    circle = find_circle(import_graph())
    assert circle is None, "import circle: " + " -> ".join(circle)
