"""The structure docs/architecture.md describes, checked: no import cycles, the optimizers never
branch on distributed, ``grng/curvature`` sits below ``grng/distributed``, ``grng/distributed``
holds only the communicator and the assignment, no code outside the layer helpers asks whether
a layer's A is diagonal, and no code outside the factor structures tells a diagonal factor by
its tensor's rank."""
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
tables_spec = importlib.util.spec_from_file_location("tables", ROOT / "tools" / "tables.py")
tables = importlib.util.module_from_spec(tables_spec)
sys.modules["tables"] = tables
tables_spec.loader.exec_module(tables)


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
    assert files == ["__init__.py", "assignment.py", "checkpoint.py", "comm.py", "communicator.py",
                     "plan.py", "sharded.py"]


#: what a communicator may define: the plain verbs and the parameter layout (docs/architecture.md
#: "The communicator"); the policy of fold, refresh and directions is grng/distributed/plan.py's
COMMUNICATOR_VERBS = {"all_true", "all_true_flag", "sync_context", "average", "reduce_sum",
                      "masked_folds", "broadcast_from", "scatter_directions", "gather_gradients",
                      "all_gather", "all_gather_rows"}
COMMUNICATOR_LAYOUT = {"owner_of", "owns", "holder", "holds", "keeps_inverse", "shares_inverse",
                       "sum_over_shards", "any_rank", "all_true_sharded", "all_true_sharded_flag",
                       "local", "bind_local", "update_arguments"}


def _communicator_methods(path: Path) -> dict[str, set[str]]:
    """Public methods defined by each class whose name ends in Communicator in ``path``."""
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef) and node.name.endswith("Communicator"):
            out[node.name] = {f.name for f in node.body
                              if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                              and not f.name.startswith("_")}
    return out


def test_communicators_define_only_verbs_and_layout() -> None:
    """Local, DDP and FSDP2 implement one small interface; no communicator folds, refreshes or
    computes directions (the policy lives once in grng/distributed/plan.py, on the verbs)."""
    found = {}
    for name in ("communicator.py", "sharded.py"):
        found.update(_communicator_methods(ROOT / "grng" / "distributed" / name))
    assert set(found) == {"Communicator", "LocalCommunicator", "ProcessGroupCommunicator",
                          "ShardedCommunicator"}
    for cls, methods in found.items():
        assert methods <= COMMUNICATOR_VERBS | COMMUNICATOR_LAYOUT, (cls, methods - (
            COMMUNICATOR_VERBS | COMMUNICATOR_LAYOUT))
    assert found["Communicator"] == COMMUNICATOR_VERBS | COMMUNICATOR_LAYOUT


def test_the_communicator_method_finder_finds_a_policy_method(tmp_path: Path) -> None:
    src = tmp_path / "c.py"
    src.write_text("class XCommunicator:\n    def fold_factors(self): ...\n"
                   "    def _helper(self): ...\n")
    methods = _communicator_methods(src)["XCommunicator"]
    assert methods == {"fold_factors"}
    assert not methods <= COMMUNICATOR_VERBS | COMMUNICATOR_LAYOUT


def test_the_distributed_policy_is_written_on_verbs_only() -> None:
    """grng/distributed/plan.py never imports torch.distributed nor an implementation of the
    communicator (only the interface), and never asks the world size, the strategy or whether
    it is distributed."""
    path = ROOT / "grng" / "distributed" / "plan.py"
    tree = ast.parse(path.read_text())
    implementations = {"LocalCommunicator", "ProcessGroupCommunicator", "ShardedCommunicator"}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not any(n.startswith("torch.distributed") for n in names), node.lineno
            assert not implementations & set(names), node.lineno
            assert not any(n.startswith("grng.distributed.sharded") for n in names), node.lineno
        if isinstance(node, ast.Attribute):
            assert node.attr not in ("world_size", "shards_parameters", "strategy",
                                     "masks_folds"), node.lineno
        if isinstance(node, ast.Name):
            assert "distributed" not in node.id.lower(), node.lineno
            assert node.id not in implementations, node.lineno


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


def test_one_list_of_optimizers_and_one_of_ops() -> None:
    """No hand-written optimizer table or op list (``python tools/tables.py`` lists them).

    The optimizer configurations are ``grng.optim.cases.CASES`` and the ops the registry's
    (``grng.ops.registry.SPECS``, implementations in ``grng.ops.dispatch``); tests, benchmarks,
    checks and the demo select from them by name and keep their own hyperparameters. Found,
    with ``ast``: (1) outside ``grng/optim/``, a dict, list or set literal (or a tuple a loop
    iterates) with an entry that constructs ``KFAC``, ``RING``, ``RENG``, ``RKalman`` or
    ``GradReg`` (a call anywhere in the entry, a ``functools.partial`` of one, or the class
    itself); (2) in ``grng/`` outside ``grng/optim/``, ``bench/`` and ``tools/``, any call of
    those classes (an if-chain is a table too); (3) outside ``grng/ops/`` and ``kernels/``, a
    list, tuple or set literal naming three or more registered ops (one or two is a chosen
    example). A test constructing the optimizer it tests, outside a table, is not matched.
    """
    assert tables.problems(ROOT) == []


def test_the_table_finder_finds_tables(tmp_path: Path) -> None:
    """Each kind of hand-written table is found; unpacking, a chosen pair of ops and per-op
    dicts are not."""
    files = {
        "tests/test_a.py": (
            "import grng\n"
            "from grng import KFAC, GradReg\n"
            "T = {'k': lambda m: grng.KFAC(m, lr=0.1)}\n"                 # 3: dict of lambdas
            "L = [(lambda m: GradReg(KFAC(m), 0.1, 0.1), 'gamma')]\n"      # 4: nested, in a list
            "C = {'k': KFAC}\n"                                            # 5: the class
            "for make in (lambda m: KFAC(m), lambda m: KFAC(m)):\n"       # 6: iterated tuple
            "    pass\n"
            "a, b = KFAC(m1), KFAC(m2)\n"                                  # unpacking: no
            "OPS = ('factor_update', 'eigh', 'kalman_update')\n"           # 9: op list
            "PAIR = ('factor_update', 'fused_update')\n"                   # a chosen pair: no
            "CALLS = {'eigh': 1, 'factor_update': 2, 'kalman_update': 3}\n"),  # per-op dict: no
        "bench/b.py": ("import functools, grng\n"
                       "def make(name, m):\n"
                       "    if name == 'kfac':\n"
                       "        return grng.RKalman(m)\n"                  # 4: a construction
                       "    return functools.partial(grng.RING, lr=0.1)(m)\n"),  # 5: partial
        "grng/optim/cases.py": "from grng import KFAC\nCASES = {'kfac': KFAC}\n",  # the home
        "grng/ops/x.py": "OPS = ['factor_update', 'eigh', 'kalman_update']\n",     # the home
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = sorted(line.split(": ")[0] for line in tables.problems(tmp_path))
    assert found == ["bench/b.py:4", "bench/b.py:5", "tests/test_a.py:3", "tests/test_a.py:4",
                     "tests/test_a.py:5", "tests/test_a.py:6", "tests/test_a.py:9"]


def test_curvature_does_not_import_distributed() -> None:
    """grng/curvature is below grng/distributed (the communicator uses the factor structures
    and the stacks), so nothing in it may import grng.distributed."""
    graph = import_graph.edges(import_graph.modules())
    for module, targets in graph.items():
        if module.startswith("grng.curvature"):
            assert not [t for t in targets if t.startswith("grng.distributed")], module


#: modules that hold factors, inverses or covariances without being the factor structures
FACTOR_USERS = ["grng/curvature/inverse.py", "grng/precondition/kalman.py",
                "grng/precondition/kronecker.py", "grng/distributed/communicator.py"]
#: rank tests that are about something other than a factor: (module, tested expression)
RANK_TESTS_ALLOWED = {("grng/distributed/communicator.py", "X")}  # a fold's observation rows


def rank_tests(source: str) -> list[str]:
    """The expressions whose rank ``source`` compares (``x.dim() == 1``, ``x.ndim != 2``, ...)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        for operand in [node.left, *node.comparators]:
            if (isinstance(operand, ast.Call) and isinstance(operand.func, ast.Attribute)
                    and operand.func.attr in ("dim", "ndimension") and not operand.args):
                out.append(ast.unparse(operand.func.value))
            elif isinstance(operand, ast.Attribute) and operand.attr == "ndim":
                out.append(ast.unparse(operand.value))
    return out


def test_the_rank_test_finder_finds_rank_tests() -> None:
    source = ("a = M.dim() == 1\nb = 1 != XG.dim()\nc = t.ndim == 2\n"
              "d = any(t.dim() != (1 if n.startswith('l') else 2) for n, t in f)\n"
              "e = M.shape[0] == 1\nf = x.sum(dim=0) == 1\n")
    assert rank_tests(source) == ["M", "XG", "t", "t"]


@pytest.mark.parametrize("module", FACTOR_USERS)
def test_only_the_factor_structures_tell_a_diagonal_factor(module: str) -> None:
    """Whether a factor is diagonal, and how to eigendecompose, invert, trace and multiply by
    it, is its structure's (grng/curvature/factors.py), never a ``.dim() == 1`` test."""
    found = {(module, expr) for expr in rank_tests((ROOT / module).read_text())}
    assert found <= RANK_TESTS_ALLOWED, sorted(found - RANK_TESTS_ALLOWED)


def test_bench_and_package_ask_the_structure_not_the_module_type() -> None:
    """Outside the layer helpers, no code tells an embedding's diagonal A by its module type."""
    for folder in ("grng", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "grng" / "curvature" / "layers.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                        and node.func.id == "isinstance" and len(node.args) == 2):
                    assert "Embedding" not in ast.unparse(node.args[1]), path


def test_a_helpers_orientation_is_its_dim0_not_its_own_transpose() -> None:
    """Which Kronecker side a weight's dim 0 is, is the helper's ``dim0``; only the base helper
    lays a weight out as the gradient matrix from it (no helper writes its own transpose)."""
    for path in sorted((ROOT / "grng" / "curvature").rglob("*.py")):
        for cls in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)):
            defined = {f.name for f in cls.body if isinstance(f, ast.FunctionDef)}
            if cls.name != "KroneckerLayer":
                assert not defined & {"_weight_to_matrix", "_matrix_to_weight"}, (path, cls.name)


def test_outside_the_curvature_package_a_layer_is_only_a_block() -> None:
    """The step, the preconditioners and the communicators ask a layer only what
    ``grng.curvature.blocks.Block`` declares (parameters, sizes, factor structures, gradient
    maps), never how its calls are observed (rows, hooks, its module): that is the capture's."""
    from grng.curvature.blocks import Block
    allowed = {n for n in dir(Block) if not n.startswith("_")} | set(Block.__annotations__)
    for folder in ("grng/optim", "grng/precondition", "grng/distributed"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Attribute)
                        and ast.unparse(node.value).split(".")[-1] == "layer"):
                    assert node.attr in allowed, (path, node.lineno, node.attr)
