"""A stage's code version: the hash of its module and of every project module it imports,
transitively, found by reading import statements (nothing is imported or executed).

A stage module's presentation functions (`describe`, `report_section`, `tables`; see
tasks/core/stage.py) never change what the stage computes, so they and the imports inside them
are left out of its version: editing how a result is shown never retrains. The report, which
shows every stage it needs, counts their presentation instead.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

from agelens.tasks.core.hashing import sha256_bytes
from agelens.tasks.core.stage import PRESENTATION

ROOT = Path(__file__).resolve().parents[2]  # holds flows/ and tasks/: the checkout, or the installed package
PACKAGE = "agelens"
PACKAGES = ("tasks", "flows")  # the project's own code; libraries are versioned by the environment


def module_file(name: str, root: Path) -> Path | None:
    """The file of `agelens.<package>.<...>` below `root` (which stands for `agelens`)."""
    parts = name.split(".")
    if parts[0] != PACKAGE or len(parts) < 2:
        return None
    path = root.joinpath(*parts[1:])
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def is_stage_module(name: str) -> bool:
    """Stages live at the top of `tasks/`; helpers below it, by concern."""
    parts = name.split(".")
    return len(parts) == 3 and parts[:2] == [PACKAGE, "tasks"]


def _imports(nodes) -> frozenset[str]:
    """Project modules imported anywhere in `nodes`, including `from package import module`."""
    names = set()
    for tree in nodes:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return frozenset(n for n in names if n.split(".")[:2] in ([PACKAGE, p] for p in PACKAGES))


@functools.cache
def _parts(path: Path, stage: bool) -> tuple[tuple[frozenset[str], str], tuple[frozenset[str], str]]:
    """((imports, hash) of the code, (imports, hash) of the presentation). For a module that is
    not a stage everything is code; the hashes cover the source text, comments included."""
    source = path.read_bytes()
    tree = ast.parse(source, filename=str(path))
    shown = [n for n in tree.body if stage and isinstance(n, ast.FunctionDef) and n.name in PRESENTATION]
    if not shown:
        return (_imports([tree]), sha256_bytes(source)), (frozenset(), sha256_bytes(b""))
    lines = source.splitlines(keepends=True)
    cut = set()
    for node in shown:  # with its decorators and the comment lines right above it
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
        while first > 0 and lines[first - 1].lstrip().startswith(b"#"):
            first -= 1
        cut.update(range(first, node.end_lineno))
    code = b"".join(line for i, line in enumerate(lines) if i not in cut)
    presentation = b"".join(line for i, line in enumerate(lines) if i in cut)
    kept = [n for n in tree.body if n not in shown]
    return (_imports(kept), sha256_bytes(code)), (_imports(shown), sha256_bytes(presentation))


@functools.cache
def closure(module: str, root: Path = ROOT) -> tuple[str, ...]:
    """`module` and every project module it imports, transitively, sorted."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        path = module_file(name, root)
        if name in seen or path is None:  # `from agelens.tasks import x` also yields 'agelens.tasks.x'
            continue
        seen.add(name)
        todo.extend(_parts(path, is_stage_module(name))[0][0])
    return tuple(sorted(seen))


@functools.cache
def code_version(module: str, root: Path = ROOT, presents: tuple[str, ...] = ()) -> dict[str, str]:
    """{project-relative file: sha256} of the module's import closure; for each module in
    `presents`, also its presentation functions and what they import."""
    version = {}
    for name in closure(module, root):
        path = module_file(name, root)
        version[str(path.relative_to(root))] = _parts(path, is_stage_module(name))[0][1]
    for shown in presents:
        path = module_file(shown, root)
        imports, digest = _parts(path, is_stage_module(shown))[1]
        version[f"{path.relative_to(root)}#presentation"] = digest
        for name in (n for imported in sorted(imports) for n in closure(imported, root)):
            other = module_file(name, root)
            version.setdefault(str(other.relative_to(root)), _parts(other, is_stage_module(name))[0][1])
    return dict(sorted(version.items()))


def forget() -> None:
    """Drop what was read (for code edited while this process runs: tests)."""
    for cached in (_parts, closure, code_version):
        cached.cache_clear()
