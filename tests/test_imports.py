"""The house's import rules, checked on the source with `ast` (NOTES.md, "Layout"):
- no import cycle among ctformat's and the CLI's modules, counting imports made inside
  functions, so no module reaches up to one that imports it;
- an import inside a function is there for one reason only, to keep a heavy or optional
  package (torch, transformers, triton) out of a module that does not need it at load time:
  it must import a module that loads such a package the importing module does not load.
(That `inspect` and `validate` stay torch-free is test_cli's.)
"""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

HEAVY = {"torch", "transformers", "triton"}
PACKAGES = {"ctformat": ROOT / "ctformat", "ctformat_cli": ROOT / "cli"}


def _modules() -> dict[str, Path]:
    """Dotted name -> file, sub-packages included (ctformat.formats.naive)."""
    out = {}
    for pkg, root in PACKAGES.items():
        for p in sorted(root.rglob("*.py")):
            parts = [pkg, *p.relative_to(root).with_suffix("").parts]
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _target(node: ast.ImportFrom | ast.Import, module: str) -> list[str]:
    """Project modules (or heavy packages) an import statement names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        # a package's __init__ is the package itself: level 1 is that package
        level = node.level - (_MODS[module].name == "__init__.py")
        pkg = module.rsplit(".", level)[0] if level else module
        base = f"{pkg}.{base}" if base else pkg
    # `from . import x` names module x, not the package it sits in
    return [f"{base}.{a.name}" for a in node.names] + ([base] if node.module else [])


_MODS: dict[str, Path] = {}


def _imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], dict[str, set[str]], dict[str, set[str]]]:
    """(top-level project imports, function-level project imports, top-level heavy imports) per module."""
    _MODS.update(mods)
    top, inner, heavy = {m: set() for m in mods}, {m: set() for m in mods}, {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(f)}
        type_only = {id(n) for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
                     for n in ast.walk(n)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in type_only:
                continue
            names = _target(node, mod)
            found = {n for n in names if n in mods}
            (inner if id(node) in in_function else top)[mod] |= found
            if id(node) not in in_function:
                heavy[mod] |= {n.split(".")[0] for n in names if n.split(".")[0] in HEAVY}
    return top, inner, heavy


def _heavy_closure(mod: str, top: dict[str, set[str]], heavy: dict[str, set[str]]) -> set[str]:
    """Heavy packages a module loads when it is imported (through its top-level imports)."""
    seen, todo, found = set(), [mod], set()
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            found |= heavy[m]
            todo += top[m]
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None
    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles_even_through_function_level_imports():
    mods = _modules()
    top, inner, _ = _imports(mods)
    both = {m: (top[m] | inner[m]) - {m, "ctformat"} for m in mods}     # the package root only re-exports lazily
    assert _cycle(both) is None, f"import cycle: {' -> '.join(_cycle(both))}"


def test_function_level_imports_only_keep_heavy_packages_out():
    mods = _modules()
    top, inner, heavy = _imports(mods)
    bad = [f"{m} imports {d} inside a function" for m in mods for d in sorted(inner[m])
           if not _heavy_closure(d, top, heavy) - _heavy_closure(m, top, heavy)]
    assert not bad, "\n".join(bad)
