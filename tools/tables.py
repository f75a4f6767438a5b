"""Find hand-written tables of optimizers and lists of ops (docs/architecture.md "Shared tables").

    python tools/tables.py [ROOT]      # prints each one found under ROOT (default: this checkout)

There is one table of optimizer configurations, ``grng.optim.cases.CASES``, and one list of
ops, the registry (``grng.ops.registry.SPECS``, with the backends' implementations in
``grng.ops.dispatch``). Everything else selects from them by name. Read with ``ast``:

- **optimizer table**: a dict literal (its values), list or set literal (its elements), or a
  tuple literal that a ``for`` loop or comprehension iterates, with an entry that constructs a
  grng optimizer -- a call of ``KFAC``, ``RING``, ``RENG``, ``RKalman`` or ``GradReg`` (a bare
  name or an attribute, e.g. ``grng.KFAC(...)``; anywhere inside the entry: a lambda, a tuple,
  ``GradReg(KFAC(m))``), ``functools.partial`` of one, or the class itself (alone or in a
  tuple: ``{"kfac": KFAC}``). Checked in ``grng/`` outside ``grng/optim/`` (the classes and
  CASES live there), ``bench/``, ``tools/``, ``tests/`` and ``examples/``.
- **optimizer construction outside the tests**: in ``grng/`` outside ``grng/optim/``,
  ``bench/`` and ``tools/``, no call of those classes at all (an ``if name == ...: return
  KFAC(...)`` chain is a table too); a benchmark or check names a case and its overrides.
  ``examples/`` teach the public API and construct the classes as a user would.
- **op list**: a list, tuple or set literal holding three or more distinct names of registered
  ops. Naming one or two ops is choosing examples (a bench CLI test picks two); three or more
  is an enumeration that goes stale when an op is added. A dict keyed by op names holds per-op
  data (a call per op), not a list of names, and is not counted. Checked everywhere but
  ``grng/ops/`` and ``kernels/``, where ops are declared and backends implement them.

A test that constructs the optimizer it tests (``KFAC(model, inverse="newton")``, outside a
table) is not a table. The demo's own peer optimizers (Sophia, Shampoo, ...) are not grng
optimizers and are not matched.
"""
from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

OPTIMIZERS = frozenset({"KFAC", "RING", "RENG", "RKalman", "GradReg"})
TABLE_FOLDERS = ("grng", "bench", "tools", "tests", "examples")
NO_CONSTRUCTION_FOLDERS = ("grng", "bench", "tools")
OPTIMIZER_HOME = "grng/optim/"
OP_HOMES = ("grng/ops/", "kernels/")
MIN_OP_LIST = 3


def _files(root: Path, folders: tuple[str, ...], skip: tuple[str, ...]) -> Iterator[tuple[str, ast.AST]]:
    """(path relative to root, parsed module) of every .py file under the folders, not under skip."""
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if not rel.startswith(skip):
                yield rel, ast.parse(path.read_text(), filename=rel)


def _names_optimizer(node: ast.AST) -> bool:
    """``KFAC`` or ``anything.KFAC`` (likewise the other optimizer classes)."""
    return ((isinstance(node, ast.Name) and node.id in OPTIMIZERS)
            or (isinstance(node, ast.Attribute) and node.attr in OPTIMIZERS))


def _is_partial(call: ast.Call) -> bool:
    func = call.func
    name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
    return name == "partial" and bool(call.args) and _names_optimizer(call.args[0])


def _constructs(entry: ast.AST) -> bool:
    """The entry of a literal constructs a grng optimizer (see the module docstring)."""
    if _names_optimizer(entry) or (isinstance(entry, ast.Tuple)
                                   and any(_names_optimizer(e) for e in entry.elts)):
        return True
    return any(isinstance(n, ast.Call) and (_names_optimizer(n.func) or _is_partial(n))
               for n in ast.walk(entry))


def _entries(tree: ast.AST) -> Iterator[tuple[ast.AST, list[ast.AST]]]:
    """(literal, its entries) of every dict, list and set literal, and of every tuple literal a
    loop or comprehension iterates."""
    iterated = {id(n.iter) for n in ast.walk(tree) if isinstance(n, (ast.For, ast.comprehension))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            yield node, node.values
        elif isinstance(node, (ast.List, ast.Set)) or (isinstance(node, ast.Tuple)
                                                       and id(node) in iterated):
            yield node, node.elts


def optimizer_tables(root: Path) -> list[str]:
    """``path:line`` of every hand-written optimizer table under ``root``."""
    found = []
    for rel, tree in _files(root, TABLE_FOLDERS, (OPTIMIZER_HOME,)):
        for literal, entries in _entries(tree):
            if any(_constructs(e) for e in entries):
                found.append(f"{rel}:{literal.lineno}: optimizer table")
    return found


def optimizer_constructions(root: Path) -> list[str]:
    """``path:line`` of every optimizer constructed in library or benchmark code."""
    found = []
    for rel, tree in _files(root, NO_CONSTRUCTION_FOLDERS, (OPTIMIZER_HOME,)):
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and (_names_optimizer(node.func) or _is_partial(node)):
                found.append(f"{rel}:{node.lineno}: constructs an optimizer")
    return found


def op_lists(root: Path, op_names: frozenset[str]) -> list[str]:
    """``path:line`` of every literal listing MIN_OP_LIST or more of ``op_names``."""
    found = []
    for rel, tree in _files(root, TABLE_FOLDERS, OP_HOMES):
        for node in ast.walk(tree):
            if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
                named = {e.value for e in node.elts
                         if isinstance(e, ast.Constant) and e.value in op_names}
                if len(named) >= MIN_OP_LIST:
                    found.append(f"{rel}:{node.lineno}: op list {sorted(named)}")
    return found


def registered_ops() -> frozenset[str]:
    """The names of the registry's ops."""
    from grng.ops.registry import SPECS
    return frozenset(SPECS)


def problems(root: Path) -> list[str]:
    """Every hand-written optimizer table, construction and op list under ``root``."""
    return (optimizer_tables(root) + optimizer_constructions(root)
            + op_lists(root, registered_ops()))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]) if args else Path(__file__).resolve().parents[1]
    found = problems(root)
    for line in found:
        print(line)
    print(f"{len(found)} hand-written tables")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
