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


def test_every_launcher_is_a_custom_op() -> None:
    """The Triton ops of the registry, and each has its grng_triton custom op."""
    assert {"factor_update", "eigen_apply", "newton_schulz_step", "kalman_update",
            "fused_update_masked", "newton_schulz_masked", "kalman_update_masked"} <= set(TRITON_OPS)
    for name in ("factor_update", "eigen_apply", "newton_schulz_step", "kalman_update",
                 "fused_update_masked", "kalman_update_masked"):
        assert hasattr(torch.ops.grng_triton, name), name


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
