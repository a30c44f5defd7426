"""The shape of the package: no import cycles, small modules, a core that
imports no web framework."""

from __future__ import annotations

import ast
from pathlib import Path

import deferred_middleware

PACKAGE = Path(deferred_middleware.__file__).parent
NAME = "deferred_middleware"
CORE = ["_jobs", "_policy", "_protocol", "_routes", "_core", "_config", "_notify", "store"]
FRAMEWORKS = ("starlette", "flask", "werkzeug", "fastapi", "django")


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        if "migrations" in path.parts:
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's own modules that ``name`` imports (a submodule imported
    from a package counts as that submodule, not as the package)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in known:
                    found.add(submodule)
                elif target in known:
                    found.add(target)
    return found - {name}


def external_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_no_module_imports_itself_through_others():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    cycles = []

    def walk(name: str, stack: list[str]) -> None:
        for dependency in graph[name]:
            if dependency in stack:
                cycles.append(" -> ".join([*stack[stack.index(dependency) :], dependency]))
            else:
                walk(dependency, [*stack, dependency])

    for name in graph:
        walk(name, [name])
    assert cycles == []


def test_no_module_is_over_400_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {name: size for name, size in sizes.items() if size > 400} == {}


def test_the_core_imports_no_web_framework():
    for name, path in modules().items():
        short = name.removeprefix(NAME + ".")
        if short.split(".")[0] in CORE:
            assert external_imports(path).isdisjoint(FRAMEWORKS), name
