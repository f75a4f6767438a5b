"""torch.compile calls the Triton backend: every launcher is a ``torch.library`` custom op.

For every op the ``triton`` backend implements (generated from the registry, so a new Triton
op is covered without an edit here), a function calling it through the dispatch, compiled with
``fullgraph=True`` (any graph break is an error) and ``backend="aot_eager"`` (the custom ops'
fake implementations and the functionalization of their in-place arguments run), takes the
eager call's outputs bit for bit, and its graph holds the ``grng_triton`` op. CPU: Triton's
interpreter (TRITON_INTERPRET=1, tests/conftest.py).
"""
from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("triton")

from grng.ops import dispatch, registry  # noqa: E402

if not (torch.cuda.is_available() or dispatch.interpreter_enabled()):
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import grng.kernels  # noqa: E402,F401 - registers the triton backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OPS = sorted(op for op in registry.SPECS if dispatch.implementation(op, "triton") is not None)
#: Triton ops that are Python glue around other ops' launchers (no launcher of their own)
GLUE = {"newton_schulz_masked"}
#: the ops registered as grng_triton custom ops (one per launcher)
CUSTOM_OPS = [op for op in TRITON_OPS if op not in GLUE]


def test_every_launcher_is_a_custom_op() -> None:
    """The Triton ops of the registry, and each launcher's grng_triton custom op
    (newton_schulz_masked is Python glue around the newton_schulz_step op); the masked update
    is tagged cudagraph_unsafe."""
    assert GLUE <= set(TRITON_OPS) and CUSTOM_OPS
    for name in CUSTOM_OPS:
        assert hasattr(torch.ops.grng_triton, name), name
    # its host-built address table would replay stale inside a captured CUDA graph
    assert torch.Tag.cudagraph_unsafe in torch.ops.grng_triton.fused_update_masked.default.tags


@pytest.mark.parametrize("name", CUSTOM_OPS)
def test_custom_op_passes_opcheck(name: str) -> None:
    """torch.library.opcheck on the spec's inputs (n = 5): the schema (declared mutations), the
    fake implementation against the real outputs, autograd registration, AOT dispatch."""
    args = list(registry.spec(name).inputs(5, torch.float32, DEVICE, 1, "contiguous"))
    if name == "fused_update_masked":  # the custom op takes [] for "no momentum buffers"
        args[3] = args[3] or []
    torch.library.opcheck(getattr(torch.ops.grng_triton, name).default, tuple(args))


@pytest.mark.parametrize("variant", ["contiguous", "strided"])
@pytest.mark.parametrize("op", TRITON_OPS)
def test_compiled_call_equals_eager(op: str, variant: str) -> None:
    """fullgraph compile of the dispatch call (n = 17, fp32; batched eigen_apply through its
    "batched" variant below) equals the eager call bit for bit; the graph calls grng_triton."""
    spec = registry.spec(op)
    if variant not in spec.variants:
        pytest.skip(f"{op} has no {variant} variant")
    _check_compiled(op, variant)


def test_compiled_batched_eigen_apply() -> None:
    """The batched form (stacked blocks) compiles to the same custom op."""
    _check_compiled("eigen_apply", "batched")


def _check_compiled(op: str, variant: str) -> None:
    spec = registry.spec(op)
    torch._dynamo.reset()
    call = functools.partial(dispatch.call, op, "triton")
    eager_args = spec.inputs(17, torch.float32, DEVICE, 5, variant)
    compiled_args = spec.inputs(17, torch.float32, DEVICE, 5, variant)
    explained = torch._dynamo.explain(call)(*spec.inputs(17, torch.float32, DEVICE, 5, variant))
    assert explained.graph_break_count == 0, explained.break_reasons
    targets = {str(node.target) for graph in explained.graphs for node in graph.graph.nodes}
    assert any("grng_triton" in t for t in targets), sorted(targets)
    torch._dynamo.reset()
    eager_out = call(*eager_args)
    compiled_out = torch.compile(call, backend="aot_eager", fullgraph=True)(*compiled_args)
    for want, got in zip(spec.outputs(eager_args, eager_out),
                         spec.outputs(compiled_args, compiled_out), strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("name", ["kfac-newton", "rkalman"])
def test_compiled_sync_free_step_through_triton(name: str) -> None:
    """torch.compile(opt.step) of a sync-free step with backend="triton" takes the eager steps
    bit for bit; the traced fold-and-refresh step is one graph (K-FAC) calling the grng_triton
    ops: the masked update, and the masked fold and the masked Newton-Schulz's steps (K-FAC)
    or the masked Kalman update (R-Kalman)."""
    from grng.optim.cases import optimizer_factory

    factories = {
        "kfac-newton": optimizer_factory("kfac-newton", lr=0.05, momentum=0.9, inverse_every=2,
                                         sync_free=True, backend="triton"),
        "rkalman": optimizer_factory("rkalman", lr=0.05, kalman_rank=4, sync_free=True,
                                     backend="triton"),
    }
    torch._dynamo.reset()
    out = {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))
        opt = factories[name](model)
        step = torch.compile(opt.step, backend="aot_eager") if mode == "compiled" else opt.step
        gen = torch.Generator().manual_seed(3)
        for i in range(4):
            x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if mode == "compiled" and i == 2:  # a refresh step, traced and explained
                explained = torch._dynamo.explain(opt.step)()
                if name != "rkalman":  # R-Kalman's sketch draws from a torch.Generator
                    assert explained.graph_break_count == 0, explained.break_reasons
                targets = {str(n.target) for g in explained.graphs for n in g.graph.nodes}
                want = {"fused_update_masked"} | ({"kalman_update_masked"} if name == "rkalman"
                                                  else {"factor_update_masked", "newton_schulz_step"})
                assert {f"grng_triton.{op}" for op in want} <= targets, sorted(targets)
            else:  # the first step creates the factors (host path)
                (opt.step if i == 0 else step)()
        assert opt.steps == 4 and opt.skipped_steps == 0
        out[mode] = [p.detach().clone() for p in model.parameters()]
    for p, q in zip(out["eager"], out["compiled"], strict=True):
        assert torch.equal(p, q)
