"""Whole optimizer steps through each fast backend equal the reference step (fp32 tolerance).

The optimizers never call a backend directly: ``backend=`` flows through the op dispatch. With
CUDA the models, inputs and both runs (reference and backend) sit on the GPU; under CI (no
CUDA) they stay on the CPU and the Triton kernels run in the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so the shapes stay small.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import grng
from grng.optim.cases import CASES
from grng.ops import dispatch


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _live(backend: str) -> bool:
    """Whether ``backend`` runs on DEVICE: Triton on CUDA or under the interpreter, ext when its
    ops have kernels for DEVICE (a CPU-only build has none for CUDA)."""
    status = grng.backends()[backend]
    if backend == "triton":
        return status.startswith("live") and (DEVICE == "cuda" or dispatch.interpreter_enabled())
    key = {"cpu": "CPU", "cuda": "CUDA"}[DEVICE]
    return status.startswith("live") and torch._C._dispatch_has_kernel_for_dispatch_key(
        "grng_ext::factor_update", key)


BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not _live(b), reason=f"{b} backend not live"))
            for b in ("triton", "ext")]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.LayerNorm(13), nn.Linear(13, 5)).to(DEVICE)


# case of grng.optim.cases -> this test's hyperparameters
_HP = {"kfac-eigen": dict(lr=0.05, damping=1e-2, momentum=0.5, inverse_every=2),
       "kfac-newton": dict(lr=0.05, damping=1e-2, inverse_every=2),
       "ring": dict(lr=0.05, damping=1e-2, rho=0.1, kl_clip=1e-2),
       "rkalman": dict(lr=0.05, rho=0.1, kalman_rank=8)}


def _make(name: str, model: nn.Module, backend: str):
    return CASES[name].make(model, backend=backend, **_HP[name])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["kfac-eigen", "kfac-newton", "ring", "rkalman"])
def test_step_matches_reference(name: str, backend: str) -> None:
    """Three steps (factors, inverses or Kalman updates, fused update) equal the reference's."""
    ref_model = _model()
    fast_model = copy.deepcopy(ref_model)
    ref_opt = _make(name, ref_model, "reference")
    fast_opt = _make(name, fast_model, backend)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(19, 7, generator=gen).to(DEVICE)  # 19 rows > kalman_rank: sketched
        y = torch.randint(0, 5, (19,), generator=gen).to(DEVICE)
        for model, opt in ((ref_model, ref_opt), (fast_model, fast_opt)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for p_ref, p_fast in zip(ref_model.parameters(), fast_model.parameters()):
        torch.testing.assert_close(p_fast, p_ref, rtol=2e-4, atol=2e-5)
    assert fast_opt.skipped_steps == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_forced_backend_is_used(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """backend='X' routes the factor update through X's implementation, not the reference."""
    calls = []
    impl = dispatch._IMPLS["factor_update"][backend]
    monkeypatch.setitem(dispatch._IMPLS["factor_update"], backend,
                        dispatch.Impl(lambda *a: calls.append(1) or impl.fn(*a), impl.supports))
    model = _model()
    opt = grng.KFAC(model, lr=0.05, damping=1e-2, backend=backend)
    x, y = torch.randn(9, 7, device=DEVICE), torch.randint(0, 5, (9,), device=DEVICE)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert len(calls) == 4  # A and G of both Linear layers
