"""The layers, read from the source: the method library (``clic``) never imports the command layer (``clic.cli``), the
web page (``clic.ui``) or the research tools (``clic_lab``); its modules import each other without a cycle; and an
import inside a function is the exception, each with a comment that says why."""

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import clic
import clic_lab

#: the edges of the package: they may import anything (the library never imports them)
EDGES = ("clic.cli", "clic.ui", "clic.__main__")
#: research code whose imports this check leaves to its own owners
UNCHECKED = ("clic_lab.toyworld",)


def _modules(package) -> dict[str, Path]:
    root = Path(package.__file__).parent
    out = {package.__name__: root / "__init__.py"}
    for info in pkgutil.walk_packages([str(root)], prefix=package.__name__ + "."):
        path = root.joinpath(*info.name.split(".")[1:])
        out[info.name] = path / "__init__.py" if info.ispkg else path.with_suffix(".py")
    return out


MODULES = {**_modules(clic), **_modules(clic_lab)}
LIBRARY = sorted(m for m in _modules(clic) if not m.startswith(EDGES))


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` of every import statement of ``module``; ``from X import y``
    counts as an import of ``X.y`` when that is a module."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    local = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
             for node in ast.walk(fn)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno, id(node) in local) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            out.append((base, node.lineno, id(node) in local))
            out += [(f"{base}.{alias.name}", node.lineno, id(node) in local) for alias in node.names
                    if f"{base}.{alias.name}" in MODULES]
    return out


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module):
    importlib.import_module(module)


@pytest.mark.parametrize("module", LIBRARY)
def test_the_library_never_imports_the_commands_the_page_or_the_research_tools(module):
    wrong = [(name, line) for name, line, _ in _imports(module) if _within(name, EDGES + ("clic_lab",))]
    assert not wrong, f"{module} imports {wrong}"


def test_no_import_cycle_among_library_modules():
    graph = {m: {name for name, _, _ in _imports(m) if name in LIBRARY and name != m} for m in LIBRARY}
    done, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in done:
            return
        stack.append(m)
        for n in sorted(graph[m]):
            visit(n)
        stack.pop()
        done.add(m)

    for m in LIBRARY:
        visit(m)


def test_imports_inside_functions_say_why():
    """Imports belong at the top of a module; the few inside a function (an optional dependency, loaded only when
    needed) carry a comment on their line or the line above."""
    silent = []
    for module, path in MODULES.items():
        if _within(module, UNCHECKED):
            continue
        lines = path.read_text().splitlines()
        for name, line, local in _imports(module):
            if local and "#" not in lines[line - 1] and not lines[line - 2].strip().startswith("#"):
                silent.append(f"{module}:{line} {name}")
    assert not silent, silent
