"""A stage's code version: the hash of its module and of every project module it imports,
transitively, found by reading import statements (nothing is imported or executed)."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

from tasks.hashing import sha256_file

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "flows")  # the project's own code; libraries are versioned by the environment


def module_file(name: str, root: Path) -> Path | None:
    path = root.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@functools.cache
def _imported(path: Path) -> frozenset[str]:
    """Project modules a file imports (anywhere in it), including `from package import module`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return frozenset(n for n in names if n.split(".")[0] in PACKAGES)


@functools.cache
def closure(module: str, root: Path = ROOT) -> tuple[str, ...]:
    """`module` and every project module it imports, transitively, sorted."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        path = module_file(name, root)
        if name in seen or path is None:  # `from tasks import plots` also yields 'tasks.plots' and 'tasks'
            continue
        seen.add(name)
        todo.extend(_imported(path))
    return tuple(sorted(seen))


@functools.cache
def code_version(module: str, root: Path = ROOT) -> dict[str, str]:
    """{project-relative file: sha256} of the module's import closure."""
    files = {module_file(name, root) for name in closure(module, root)}
    return {str(path.relative_to(root)): sha256_file(path) for path in sorted(files)}
