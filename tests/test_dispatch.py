"""One dispatch for every op: backend validation, reporting, auto order and fallbacks.

Every test that touches the registry works on private copies of the dispatch tables (the
``registry`` fixture), so the global state is restored afterwards and other backends that
may be registered in this process (Triton, the extension) cannot change the outcome.
"""
from __future__ import annotations

import types

import pytest
import torch

import grng
import grng.ops as ops
from grng.ops import dispatch, reference
from grng.ops.registry import SPECS

TEST_OP = "_grng_test_op"


@pytest.fixture
def registry(monkeypatch):
    """Private copies of the registry, the load states and the auto order."""
    impls = {op: dict(per_backend) for op, per_backend in dispatch._IMPLS.items()}
    monkeypatch.setattr(dispatch, "_IMPLS", impls)
    monkeypatch.setattr(dispatch, "_LOADED", {"reference": "live",
                                              "triton": "unavailable: test: no triton here",
                                              "ext": "unavailable: test: no extension here"})
    monkeypatch.setattr(dispatch, "AUTO_ORDER", {"cpu": {}, "cuda": {}})
    # the public functions must have no non-reference implementation in these tests
    for per_backend in impls.values():
        for name in [b for b in per_backend if b != "reference"]:
            del per_backend[name]
    dispatch.register(TEST_OP, "reference", lambda *args: ("reference", args))
    return dispatch


def _mark_live(monkeypatch, name: str) -> None:
    monkeypatch.setitem(dispatch._LOADED, name, "live")


def _sym(d: int, dtype=torch.float64) -> torch.Tensor:
    B = torch.randn(d, d, dtype=dtype)
    return B @ B.T + d * torch.eye(d, dtype=dtype)


def _all_public_calls(backend: str):
    """One call of every public op with the given backend (as zero-argument callables)."""
    M = _sym(4)
    X = torch.randn(3, 4, dtype=torch.float64)
    l, Q = torch.linalg.eigh(M)
    V = torch.randn(4, 4, dtype=torch.float64)
    p, g, d = torch.randn(3), torch.randn(3), torch.randn(3)
    return {
        "factor_update": lambda: ops.factor_update(M.clone(), X, 1.0, 0.5, backend=backend),
        "eigh": lambda: ops.eigh(M, backend=backend),
        "eigen_apply": lambda: ops.eigen_apply(V, Q, l, Q, l, 0.1, backend=backend),
        "newton_schulz_step": lambda: ops.newton_schulz_step(M, torch.eye(4, dtype=M.dtype) / 10,
                                                             backend=backend),
        "newton_schulz_inverse": lambda: ops.newton_schulz_inverse(M, backend=backend),
        "cholesky_inverse": lambda: ops.cholesky_inverse(M, backend=backend),
        "kalman_update": lambda: ops.kalman_update(torch.linalg.inv(M), X, 10.0, 0.9, 0.0,
                                                   backend=backend),
        "fused_update": lambda: ops.fused_update([p.clone()], [g], [d], None, 0.1, 0.0, 0.0, 0.0,
                                                 None, backend=backend),
    }


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad", ["bogus", "Reference", "cuda", ""])
def test_validate_backend_rejects_unknown(bad):
    with pytest.raises(ValueError, match="backend") as info:
        ops.validate_backend(bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("good", ["auto", "reference", "triton", "ext"])
def test_validate_backend_accepts_known(good):
    assert ops.validate_backend(good) == good


@pytest.mark.parametrize("op", list(_all_public_calls("reference")))
def test_every_public_op_rejects_unknown_backend(op):
    with pytest.raises(ValueError, match="backend") as info:
        _all_public_calls("bogus")[op]()
    assert "'bogus'" in str(info.value)


@pytest.mark.parametrize("op", list(_all_public_calls("reference")))
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_every_public_op_runs_on_reference_and_auto(registry, op, backend):
    out = _all_public_calls(backend)[op]()
    assert out is not None


# ----------------------------------------------------------------------------- backends()


def test_grng_backends_is_the_dispatch_report():
    assert grng.backends is dispatch.backends
    assert ops.backends is dispatch.backends


def test_backends_reports_every_backend_with_a_reason():
    report = grng.backends()
    assert isinstance(report, dict)
    assert set(report) == {"reference", "triton", "ext"}
    assert report["reference"] == "live"
    for name, status in report.items():
        assert isinstance(status, str) and status
        if not status.startswith("live"):
            assert status.startswith("unavailable: ")
            assert len(status) > len("unavailable: ")


def test_backends_records_import_failure_once(registry, monkeypatch):
    attempts = []

    def failing_import(name):
        attempts.append(name)
        raise ImportError(f"simulated: cannot import {name}")

    monkeypatch.delitem(dispatch._LOADED, "ext")
    monkeypatch.setattr(dispatch, "importlib", types.SimpleNamespace(import_module=failing_import))
    first = dispatch.backends()
    second = dispatch.backends()
    assert first["ext"].startswith("unavailable: ImportError")
    assert "simulated" in first["ext"] and "grng.ops.ext" in first["ext"]
    assert second == first
    assert attempts == ["grng.ops.ext"]  # imported (tried) once, then remembered
    assert first["reference"] == "live"


def test_backends_records_missing_module(registry, monkeypatch):
    monkeypatch.delitem(dispatch._LOADED, "ext")
    monkeypatch.setitem(dispatch._BACKEND_MODULES, "ext", "grng._no_such_module_for_tests")
    status = dispatch.backends()["ext"]
    assert status.startswith("unavailable: ModuleNotFoundError")
    assert "_no_such_module_for_tests" in status


def test_backends_triton_without_cuda_explains(registry, monkeypatch):
    _mark_live(monkeypatch, "triton")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "TRITON_INTERPRET=1" in dispatch.backends()["triton"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA tensors only" in dispatch.backends()["triton"]


def test_reference_is_always_live_even_if_others_fail(registry):
    assert dispatch.backends()["reference"] == "live"
    M = _sym(5)
    X = torch.randn(4, 5, dtype=torch.float64)
    expected = 0.5 * M + 2.0 * X.T @ X
    out = ops.factor_update(M.clone(), X, 2.0, 0.5, backend="reference")
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- auto


@pytest.mark.parametrize("op,args", [
    ("factor_update", (torch.eye(3), torch.ones(2, 3), 1.0, 0.0)),
    ("eigh", (torch.eye(3),)),
    ("cholesky_inverse", (torch.eye(3),)),
    ("fused_update", ([torch.ones(2)], [torch.ones(2)], [torch.ones(2)], None,
                      0.1, 0.0, 0.0, 0.0, None)),
])
def test_auto_resolves_to_reference_when_nothing_else_registered(registry, op, args):
    assert dispatch.resolve(op, "auto", *args) is getattr(reference, op)


def test_auto_skips_backends_that_are_not_live(registry, monkeypatch):
    called = []
    dispatch.register(TEST_OP, "triton", lambda *a: called.append(a) or "triton")
    monkeypatch.setitem(dispatch.AUTO_ORDER["cpu"], TEST_OP, ("triton",))
    # triton is registered and listed, but not live in this fixture
    assert dispatch.call(TEST_OP, "auto", torch.ones(2))[0] == "reference"
    assert called == []


def test_auto_picks_fake_backend_listed_in_auto_order(registry, monkeypatch):
    _mark_live(monkeypatch, "ext")
    dispatch.register(TEST_OP, "ext", lambda *args: ("ext", args))
    x = torch.ones(2)
    # registered but not listed: auto still takes the reference
    assert dispatch.call(TEST_OP, "auto", x)[0] == "reference"
    monkeypatch.setitem(dispatch.AUTO_ORDER["cpu"], TEST_OP, ("ext",))
    name, args = dispatch.call(TEST_OP, "auto", x, 3.0)
    assert name == "ext" and args[0] is x and args[1] == 3.0
    # listed for CUDA only: CPU tensors still get the reference
    monkeypatch.setitem(dispatch.AUTO_ORDER["cpu"], TEST_OP, ())
    monkeypatch.setitem(dispatch.AUTO_ORDER["cuda"], TEST_OP, ("ext",))
    assert dispatch.call(TEST_OP, "auto", x)[0] == "reference"


def test_auto_order_first_capable_backend_wins(registry, monkeypatch):
    _mark_live(monkeypatch, "ext")
    _mark_live(monkeypatch, "triton")
    monkeypatch.setitem(dispatch.AUTO_ORDER["cpu"], TEST_OP, ("triton", "ext"))
    dispatch.register(TEST_OP, "ext", lambda *a: ("ext", a))
    # triton listed first but lacks the op: ext
    assert dispatch.call(TEST_OP, "auto", torch.ones(1))[0] == "ext"
    # triton implements it but only for float64: float32 goes on to ext
    dispatch.register(TEST_OP, "triton", lambda *a: ("triton", a),
                      supports=lambda x: x.dtype == torch.float64)
    assert dispatch.call(TEST_OP, "auto", torch.ones(1))[0] == "ext"
    assert dispatch.call(TEST_OP, "auto", torch.ones(1, dtype=torch.float64))[0] == "triton"


def test_auto_device_type_from_tensor_lists(registry, monkeypatch):
    _mark_live(monkeypatch, "ext")
    dispatch.register(TEST_OP, "ext", lambda *a: ("ext", a))
    monkeypatch.setitem(dispatch.AUTO_ORDER["cpu"], TEST_OP, ("ext",))
    assert dispatch.call(TEST_OP, "auto", [torch.ones(1)], 0.1)[0] == "ext"
    # no tensor at all: counted as CPU
    assert dispatch.call(TEST_OP, "auto", 0.1)[0] == "ext"
    # the device type is read from the first tensor, also inside a list (meta: not CPU)
    monkeypatch.setitem(dispatch.AUTO_ORDER, "meta", {TEST_OP: ("ext",)})
    monkeypatch.setitem(dispatch.AUTO_ORDER["cpu"], TEST_OP, ())
    assert dispatch.call(TEST_OP, "auto", [torch.ones(1, device="meta")], 0.1)[0] == "ext"
    assert dispatch.call(TEST_OP, "auto", 0.1, torch.ones(1, device="meta"))[0] == "ext"
    assert dispatch.call(TEST_OP, "auto", [torch.ones(1)], 0.1)[0] == "reference"


def test_public_op_routes_through_registered_backend(registry, monkeypatch):
    _mark_live(monkeypatch, "ext")
    seen = []

    def fake_factor_update(M, X, alpha, beta):
        seen.append((alpha, beta, type(alpha), type(beta)))
        return M.fill_(7.0)

    dispatch.register("factor_update", "ext", fake_factor_update)
    M = torch.zeros(3, 3)
    out = ops.factor_update(M, torch.ones(2, 3), 2, 0, backend="ext")
    assert torch.equal(out, torch.full((3, 3), 7.0))
    assert seen == [(2.0, 0.0, float, float)]  # the public function passes floats
    # auto takes it only once it is listed for the device
    M = torch.zeros(3, 3)
    ops.factor_update(M, torch.ones(2, 3), 1.0, 0.0, backend="auto")
    assert torch.equal(M, torch.full((3, 3), 2.0))
    monkeypatch.setitem(dispatch.AUTO_ORDER["cpu"], "factor_update", ("ext",))
    ops.factor_update(M, torch.ones(2, 3), 1.0, 0.0, backend="auto")
    assert torch.equal(M, torch.full((3, 3), 7.0))
    # and "reference" always means the reference
    M = torch.zeros(3, 3)
    ops.factor_update(M, torch.ones(2, 3), 1.0, 0.0, backend="reference")
    assert torch.equal(M, torch.full((3, 3), 2.0))
    assert len(seen) == 2


# ----------------------------------------------------------------------------- forced backends


def test_forced_fake_backend_is_selected(registry, monkeypatch):
    _mark_live(monkeypatch, "ext")
    dispatch.register(TEST_OP, "ext", lambda *args: ("ext", args))
    assert dispatch.call(TEST_OP, "ext", torch.ones(1))[0] == "ext"
    assert dispatch.call(TEST_OP, "reference", torch.ones(1))[0] == "reference"


def test_forced_backend_rejecting_inputs_raises(registry, monkeypatch):
    _mark_live(monkeypatch, "ext")
    dispatch.register(TEST_OP, "ext", lambda *a: ("ext", a),
                      supports=lambda x: x.dtype == torch.float64)
    assert dispatch.call(TEST_OP, "ext", torch.ones(1, dtype=torch.float64))[0] == "ext"
    with pytest.raises(ops.BackendUnavailable, match="ext"):
        dispatch.call(TEST_OP, "ext", torch.ones(1))
    # the same inputs under auto quietly take the reference
    monkeypatch.setitem(dispatch.AUTO_ORDER["cpu"], TEST_OP, ("ext",))
    assert dispatch.call(TEST_OP, "auto", torch.ones(1))[0] == "reference"


def test_forced_public_op_rejecting_inputs_raises(registry, monkeypatch):
    _mark_live(monkeypatch, "triton")
    dispatch.register("cholesky_inverse", "triton", lambda M: M, supports=lambda M: M.is_cuda)
    with pytest.raises(ops.BackendUnavailable):
        ops.cholesky_inverse(_sym(3), backend="triton")


def test_forced_backend_lacking_op_falls_back_to_reference(registry, monkeypatch):
    _mark_live(monkeypatch, "ext")
    assert "ext" not in dispatch._IMPLS[TEST_OP]
    assert dispatch.call(TEST_OP, "ext", torch.ones(1))[0] == "reference"
    # a public op too: no "ext" eigh is registered, so the reference eigh runs
    evals = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    M = (Q * evals) @ Q.T
    M = 0.5 * (M + M.T)
    l, V = ops.eigh(M, backend="ext")
    torch.testing.assert_close(l, evals, rtol=0, atol=1e-12)
    torch.testing.assert_close((V * l) @ V.T, M, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["triton", "ext"])
def test_forced_backend_not_live_raises_with_reason(registry, name):
    with pytest.raises(ops.BackendUnavailable, match="test: no"):
        ops.factor_update(torch.zeros(2, 2), torch.ones(1, 2), 1.0, 0.0, backend=name)
    # even for an op the backend does not implement: it cannot run at all
    with pytest.raises(ops.BackendUnavailable, match=name):
        dispatch.call(TEST_OP, name, torch.ones(1))


def test_errors_are_runtime_errors():
    assert issubclass(ops.BackendUnavailable, RuntimeError)
    assert issubclass(ops.FactorizationError, RuntimeError)
    assert ops.BackendUnavailable is not ops.FactorizationError


def test_registry_is_restored_after_tests():
    """No test above may leak its fake registrations into the real tables."""
    assert TEST_OP not in dispatch._IMPLS
    for op, spec in SPECS.items():
        assert dispatch._IMPLS[op]["reference"].fn is spec.reference, op
