"""Faults (docs/numerics.md): non-finite gradients and losses skip the whole step; failed factorizations keep the previous inverse; singular factors never give NaN."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import grng.curvature.inverse as inverse_mod
from grng import KFAC, make_closure
from grng.ops import NewtonResult
from optimizer_helpers import (ALL, F64, FACTORIES, _all_state_finite, _assert_unchanged, _curv, _data, _mlp, _snapshot, _train)

class _InfGrad(torch.autograd.Function):
    """Identity whose backward returns inf: an injected overflow in one gradient."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return torch.full_like(g, float("inf"))



@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("fault", ["nan-input", "inf-grad", "nan-loss-only"])
def test_non_finite_step_leaves_parameters_and_state_unchanged(name: str, fault: str) -> None:
    torch.manual_seed(0)
    model = _mlp()
    opt = FACTORIES[name](model)
    _train(model, opt, _data(3))
    before = _snapshot(model, opt)
    steps = getattr(_curv(opt), "steps", None)
    x, y = _data(1, seed=3)[0]
    if fault == "nan-input":
        x = x.clone()
        x[2, 1] = float("nan")

        def closure():
            return F.cross_entropy(model(x), y)
    elif fault == "inf-grad":  # an inf in one parameter's gradient only (finite loss)
        def closure():
            return F.cross_entropy(model(x), y) + 1e-30 * _InfGrad.apply(model[3].bias[:1]).sum()
    else:  # the loss is NaN, the gradient finite
        def closure():
            return F.cross_entropy(model(x), y) + torch.tensor(float("nan"), dtype=F64)
    with pytest.warns(RuntimeWarning, match="skip"):
        opt.step(make_closure(opt, closure))
    _assert_unchanged(model, opt, before)
    assert opt.skipped_steps == 1
    if steps is not None:
        assert _curv(opt).steps == steps
    # and training goes on normally afterwards
    _train(model, opt, _data(2, seed=5))
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if steps is not None:
        assert _curv(opt).steps == steps + 2


def test_eigh_failure_retries_in_float64(monkeypatch) -> None:
    real = torch.linalg.eigh
    calls = []

    def flaky(M, *a, **k):
        calls.append(M.dtype)
        if M.dtype != torch.float64:
            raise torch._C._LinAlgError("injected: float32 eigh failed")
        return real(M, *a, **k)

    model = _mlp(torch.float32)
    opt = KFAC(model, lr=0.1, inverse_every=1)
    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(model, opt, _data(2, dtype=torch.float32))
    assert torch.float32 in calls and torch.float64 in calls
    st = opt.layer_state(opt.layers[0])
    assert st["QA"].dtype == torch.float32
    l, Q = real(st["A"].double())
    torch.testing.assert_close(st["lA"].double(), l, rtol=1e-4, atol=1e-5)


def test_eigh_failure_keeps_previous_inverse_with_a_warning(monkeypatch) -> None:
    model = _mlp()
    opt = KFAC(model, lr=0.1, inverse_every=1)
    _train(model, opt, _data(2))
    st = opt.layer_state(opt.layers[0])
    kept = {k: st[k].clone() for k in ("QA", "lA", "QG", "lG")}

    def broken(*a, **k):
        raise torch._C._LinAlgError("injected: eigh failed")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.warns(RuntimeWarning, match="keeping the previous inverse"):
        _train(model, opt, _data(1, seed=9))
    for k, v in kept.items():
        assert torch.equal(st[k], v), k
    assert not torch.equal(st["A"], kept["QA"])  # the factors moved on; the inverse was kept
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_eigh_failure_without_previous_inverse_uses_damping_only(monkeypatch) -> None:
    monkeypatch.setattr(torch.linalg, "eigh",
                        lambda *a, **k: (_ for _ in ()).throw(torch._C._LinAlgError("injected")))
    model = _mlp()
    opt = KFAC(model, lr=0.01, damping=1.0)
    with pytest.warns(RuntimeWarning, match="damping only"):
        _train(model, opt, _data(1))
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_newton_schulz_not_converging_falls_back_to_cholesky(monkeypatch) -> None:
    def never(M, X0=None, **kw):
        return NewtonResult(torch.eye(M.shape[0], dtype=M.dtype), False, 0.5, 60)

    model = _mlp()
    opt = KFAC(model, lr=0.1, damping=0.05, inverse="newton", inverse_every=1)
    monkeypatch.setattr(inverse_mod.ops, "newton_schulz_inverse", never)
    with pytest.warns(RuntimeWarning, match="Newton-Schulz did not converge.*Cholesky"):
        _train(model, opt, _data(1))
    layer = opt.layers[0]
    st = opt.layer_state(layer)
    da, dg = inverse_mod.tikhonov_split(st["A"], st["G"], 0.05, layer.a_factor, layer.g_factor)
    for key, extra in (("A", da), ("G", dg)):
        M = st[key] + extra * torch.eye(st[key].shape[0], dtype=F64)
        torch.testing.assert_close(st["X" + key], torch.linalg.inv(M), rtol=1e-9, atol=1e-11)


class _DeadNet(nn.Module):
    """Singular and all-zero factors: a no-bias layer whose inputs are all 0 (A = 0), a layer
    whose output is multiplied by 0 (G = 0), a ReLU layer that is dead (biases very negative),
    and an embedding whose rows 5..9 are never used (zero diagonal of A)."""

    def __init__(self) -> None:
        super().__init__()
        self.zero_in = nn.Linear(3, 4, bias=False)
        self.unused_out = nn.Linear(3, 4)
        self.dead = nn.Linear(3, 4)
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.dead.bias.fill_(-100.0)

    def forward(self, x: Tensor, idx: Tensor) -> Tensor:
        h = self.zero_in(torch.zeros_like(x)) + 0.0 * self.unused_out(x)
        h = h + torch.relu(self.dead(x)) + self.emb(idx).mean(1)
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("name", ["kfac-eigen", "kfac-newton", "kfac-cholesky", "rkalman"])
def test_singular_and_zero_factors_never_give_nan(name: str) -> None:
    torch.manual_seed(1)
    model = _DeadNet().double()
    opt = FACTORIES[name](model)
    g = torch.Generator().manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(6):
            x = torch.randn(8, 3, generator=g, dtype=F64)
            idx = torch.randint(0, 5, (8, 2), generator=g)
            y = torch.randint(0, 2, (8,), generator=g)
            opt.step(make_closure(opt, lambda: F.cross_entropy(model(x, idx), y)))
    assert opt.steps == 6 and opt.skipped_steps == 0
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert _all_state_finite(opt)
    st = opt.layer_state(opt.layers[0])
    if name != "rkalman":
        assert torch.count_nonzero(st["A"]) == 0  # the all-zero factor really was there
