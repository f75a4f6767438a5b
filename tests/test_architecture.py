"""The structure docs/architecture.md describes, checked: no import cycles, the optimizers never
branch on distributed, ``grng/distributed`` holds only the communicator and the assignment,
and no code outside the layer helpers asks whether a layer's A is diagonal."""
from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
import_graph = importlib.util.module_from_spec(spec)
sys.modules["import_graph"] = import_graph
spec.loader.exec_module(import_graph)


def test_the_package_has_no_import_cycle() -> None:
    assert import_graph.cycles(import_graph.edges(import_graph.modules())) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_graph.cycles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize("folder", ["grng/optim", "grng/precondition", "grng/curvature"])
def test_optimizers_and_preconditioners_do_not_touch_torch_distributed(folder: str) -> None:
    for path in sorted((ROOT / folder).rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.startswith("torch.distributed") for n in names), path
        assert "_dist" not in path.read_text(), path


def test_distributed_holds_only_the_communicator_and_the_assignment() -> None:
    files = sorted(p.name for p in (ROOT / "grng" / "distributed").glob("*.py"))
    assert files == ["__init__.py", "assignment.py", "comm.py", "communicator.py"]


def test_no_code_asks_a_layer_whether_its_a_is_diagonal() -> None:
    """The factor structures (``layer.a_factor``) answer that; no ``layer.diagonal_a`` flag."""
    for path in sorted((ROOT / "grng").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            assert not (isinstance(node, ast.Attribute) and node.attr == "diagonal_a"), path


def test_the_ops_layer_imports_nothing_from_the_package_root() -> None:
    """grng/ops (and the Triton kernels under it) sit below everything: no ``import grng``,
    ``from grng import ...`` or ``grng._C``; the extension is ``grng.ops._C``."""
    for path in sorted([*(ROOT / "grng" / "ops").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module not in ("grng", "grng._C"), (path, node.lineno)
            elif isinstance(node, ast.Import):
                assert not any(a.name in ("grng", "grng._C") for a in node.names), (path, node.lineno)
