"""EKFAC, Adam in the Kronecker eigenbasis (docs/algorithms.md "EKFAC").

Equivalences: with every basis the identity (every factor side kept diagonal) EKFAC is AdamW
on the parameters (float64, rounding); the eigenbasis makes it rotation-equivariant: a rotated
problem gives the rotated trajectory (which AdamW does not). The default refresh runs eigh only
at the first refresh (then subspace iteration, eigh its fallback); skipped steps leave the
moments, bases and factors bit for bit on the host and sync-free paths; checkpoints resume bit
for bit; ``coverage()`` names the blocks and the Adam fallback.
"""
from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import grng
from grng import ops
from grng.optim.cases import make_optimizer
from grng.precondition import eigenbasis
from grng.testing import classification_batches, small_mlp

F64 = torch.float64


def _train(model: nn.Module, opt: torch.optim.Optimizer, batches, poison_at: int | None = None
           ) -> None:
    for t, (x, y) in enumerate(batches):
        def closure() -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if t == poison_at:
                loss = loss * float("nan")
            loss.backward()
            return loss
        opt.step(closure)


def _state(opt) -> list[dict[str, Tensor]]:
    """Every unit's state tensors (cloned)."""
    return [{k: v.clone() for k, v in u.state.items()} for u, _ in opt._curvature_units()]


def _same(a: list[dict[str, Tensor]], b: list[dict[str, Tensor]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_identity_bases_equal_adamw() -> None:
    """Every factor side diagonal (max_factor_dim=1): the bases are the identity and EKFAC is
    AdamW (decoupled weight decay, bias correction) on every parameter, blocks and LayerNorm."""
    torch.manual_seed(0)
    model = small_mlp(F64)
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="max_factor_dim"):
        opt = grng.EKFAC(model, lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1,
                         max_factor_dim=1)
    adamw = torch.optim.AdamW(ref.parameters(), lr=0.02, betas=(0.8, 0.95), eps=1e-6,
                              weight_decay=0.1)
    batches = classification_batches(12, 8, dtype=F64, seed=1)
    _train(model, opt, batches)
    _train(ref, adamw, batches)
    moved = max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(model.parameters(),
                                                            small_mlp(F64).parameters()))
    assert moved > 0.05
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_dense_bases_differ_from_adamw() -> None:
    """The same run with dense factors is not AdamW (the test above can fail)."""
    torch.manual_seed(0)
    model = small_mlp(F64)
    ref = copy.deepcopy(model)
    opt = grng.EKFAC(model, lr=0.02, inverse_every=2)
    adamw = torch.optim.AdamW(ref.parameters(), lr=0.02)
    batches = classification_batches(6, 8, dtype=F64, seed=1)
    _train(model, opt, batches)
    _train(ref, adamw, batches)
    assert max(float((p - q).detach().abs().max()) for p, q in zip(model.parameters(),
                                                           ref.parameters())) > 1e-3


def _orthogonal(d: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64)).Q


def _rotated_runs(make) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
    """A linear least-squares model trained on (x, t) and on the rotated problem
    (R_A x, R_G t) from W' = R_G W R_A^T: the weights after each step of both runs."""
    i, o, n = 5, 4, 32
    RA, RG = _orthogonal(i, 1), _orthogonal(o, 2)
    g = torch.Generator().manual_seed(3)
    mix = torch.randn(i, i, generator=g, dtype=F64)
    data = [(torch.randn(n, i, generator=g, dtype=F64) @ mix, torch.randn(n, o, generator=g,
                                                                           dtype=F64))
            for _ in range(9)]
    torch.manual_seed(4)
    model = nn.Linear(i, o, bias=False).double()
    rotated = copy.deepcopy(model)
    with torch.no_grad():
        rotated.weight.copy_(RG @ model.weight @ RA.T)
    out = []
    for net, rot in ((model, False), (rotated, True)):
        opt = make(net)
        ws = []
        for x, t in data:
            if rot:
                x, t = x @ RA.T, t @ RG.T

            def closure() -> Tensor:
                opt.zero_grad()
                loss = ((net(x) - t) ** 2).sum(-1).mean()
                loss.backward()
                return loss
            opt.step(closure)
            ws.append(net.weight.detach().clone())
        out.append(ws)
    return out[0], out[1], RG, RA


@pytest.mark.parametrize("basis", ["subspace", "eigh"])
def test_a_rotated_problem_gives_the_rotated_trajectory(basis: str) -> None:
    """EKFAC's update is expressed in the factors' eigenbases, so rotating inputs and outputs
    rotates every iterate (eigh, then subspace steps, the second moment re-projected)."""
    plain, rotated, RG, RA = _rotated_runs(
        lambda m: grng.EKFAC(m, lr=0.05, inverse_every=2, factor_every=1, basis=basis))
    for w, w_rot in zip(plain, rotated):
        torch.testing.assert_close(w_rot, RG @ w @ RA.T, rtol=1e-9, atol=1e-11)


def test_adamw_is_not_rotation_equivariant() -> None:
    """The check above is not vacuous: AdamW's rotated trajectory differs."""
    plain, rotated, RG, RA = _rotated_runs(lambda m: torch.optim.AdamW(m.parameters(), lr=0.05))
    assert float((rotated[-1] - RG @ plain[-1] @ RA.T).abs().max()) > 1e-3


def test_subspace_step_keeps_an_eigenbasis_and_converges_to_one() -> None:
    """An eigenbasis (by decreasing eigenvalue) is a fixed point up to column signs; from a
    perturbed one, repeated steps converge back to it."""
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=F64)).Q
    lam = torch.tensor([9.0, 5.0, 3.0, 2.0, 1.0, 0.5, 0.1], dtype=F64)
    M = Q @ torch.diag(lam) @ Q.T
    same = eigenbasis.subspace_step(M, Q)
    torch.testing.assert_close((same.T @ Q).abs(), torch.eye(7, dtype=F64), atol=1e-12, rtol=0)
    start = torch.linalg.qr(Q + 0.05 * torch.randn(7, 7, generator=g, dtype=F64)).Q
    for _ in range(60):
        start = eigenbasis.subspace_step(M, start)
    torch.testing.assert_close((start.T @ Q).abs(), torch.eye(7, dtype=F64), atol=1e-6, rtol=0)


def _count_eigh(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = ops.eigh

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(ops, "eigh", counting)
    return calls


def test_default_refresh_runs_eigh_only_at_the_first_refresh(monkeypatch) -> None:
    """Five refreshes of two blocks (four dense sides): four eigh calls, all in the first."""
    calls = _count_eigh(monkeypatch)
    torch.manual_seed(0)
    model = small_mlp(F64)
    opt = grng.EKFAC(model, lr=0.01, inverse_every=2)
    batches = classification_batches(10, 8, dtype=F64, seed=1)
    _train(model, opt, batches[:1])
    assert calls[0] == 4
    _train(model, opt, batches[1:])
    assert calls[0] == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("sync_free", [False, True])
def test_a_non_finite_subspace_step_falls_back(monkeypatch, sync_free: bool) -> None:
    """A non-finite subspace step: eigh on the host path, the previous basis on the device."""
    torch.manual_seed(0)
    model = small_mlp(F64)
    opt = grng.EKFAC(model, lr=0.01, inverse_every=2, sync_free=sync_free)
    batches = classification_batches(3, 8, dtype=F64, seed=1)
    _train(model, opt, batches[:2])
    before = [u.state.QG.clone() for u in opt._blocks]
    monkeypatch.setattr(eigenbasis, "subspace_step", lambda M, Q: Q * float("nan"))
    calls = _count_eigh(monkeypatch)
    _train(model, opt, batches[2:])
    assert calls[0] == (0 if sync_free else 4)
    for u, Q in zip(opt._blocks, before):
        assert torch.isfinite(u.state.QG).all()
        if sync_free:
            assert torch.equal(u.state.QG, Q)
        else:
            _, vecs = torch.linalg.eigh(u.state.G)
            torch.testing.assert_close((u.state.QG.T @ vecs.flip(-1)).abs().diagonal(),
                                       torch.ones(len(Q), dtype=F64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("at", [3, 4])  # 4: a refresh step (inverse_every=2)
@pytest.mark.parametrize("sync_free", [False, True])
def test_a_skipped_step_leaves_the_state_bit_for_bit(sync_free: bool, at: int) -> None:
    """A NaN loss at step ``at``: parameters, factors, bases and moments of every unit as they
    were, on the host path and on the sync-free (device) path; the next step goes on."""
    torch.manual_seed(0)
    model = small_mlp(torch.float32)
    opt = grng.EKFAC(model, lr=0.01, inverse_every=2, sync_free=sync_free)
    batches = classification_batches(at + 2, 8, dtype=torch.float32, seed=1)
    _train(model, opt, batches[:at])
    state, params = _state(opt), [p.detach().clone() for p in model.parameters()]
    context = contextlib.nullcontext() if sync_free else pytest.warns(RuntimeWarning,
                                                                      match="step skipped")
    with context:
        _train(model, opt, batches[at:at + 1], poison_at=0)
    assert _same(_state(opt), state)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert opt.skipped_steps == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _train(model, opt, batches[at + 1:])
    assert int(opt._blocks[0].state.step) == at + 1


@pytest.mark.parametrize("sync_free", [False, True])
def test_a_non_finite_direction_puts_the_moments_back(monkeypatch, sync_free: bool) -> None:
    """Finite inputs, so the update phase runs, but a NaN direction: the moments are put back
    bit for bit and the parameters are unchanged."""
    torch.manual_seed(0)
    model = small_mlp(torch.float32)
    opt = grng.EKFAC(model, lr=0.01, inverse_every=2, sync_free=sync_free)
    batches = classification_batches(4, 8, dtype=torch.float32, seed=1)
    _train(model, opt, batches[:3])
    moments = [{k: t.clone() for k, t in u.state.per_step().items()}
               for u, _ in opt._curvature_units()]
    params = [p.detach().clone() for p in model.parameters()]
    real = eigenbasis.EigenbasisPreconditioner.apply
    monkeypatch.setattr(eigenbasis.EigenbasisPreconditioner, "apply",
                        lambda self, unit, V, group: real(self, unit, V, group) * float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _train(model, opt, batches[3:])
    assert _same([{k: t for k, t in u.state.per_step().items()}
                  for u, _ in opt._curvature_units()], moments)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("sync_free", [False, True])
def test_checkpoint_resumes_bit_for_bit(sync_free: bool) -> None:
    """Save after 5 steps, train 5 more; a new model and optimizer loaded from the checkpoint
    take the same 5 steps bit for bit (a refresh among them)."""
    torch.manual_seed(0)
    model = small_mlp(torch.float32)
    opt = grng.EKFAC(model, lr=0.01, inverse_every=3, weight_decay=0.01, sync_free=sync_free)
    batches = classification_batches(10, 8, dtype=torch.float32, seed=1)
    _train(model, opt, batches[:5])
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(opt.state_dict())
    names = set(saved["state"][0])
    assert {"A", "G", "QG", "QA", "exp_avg", "exp_avg_sq", "step"} <= names
    _train(model, opt, batches[5:])
    other = small_mlp(torch.float32)
    other.load_state_dict(saved_model)
    resumed = grng.EKFAC(other, lr=0.01, inverse_every=3, weight_decay=0.01,
                         sync_free=sync_free)
    resumed.load_state_dict(saved)
    _train(other, resumed, batches[5:])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))
    assert _same(_state(resumed), _state(opt))


def test_case_coverage_and_arguments() -> None:
    """The case table builds it; coverage names the blocks and the Adam fallback; bad
    arguments are refused naming the argument."""
    torch.manual_seed(0)
    model = small_mlp(F64)
    opt = make_optimizer("ekfac", model, lr=0.01)
    assert isinstance(opt, grng.EKFAC)
    text = str(opt.coverage())
    assert "kronecker" in text and "diagonal" in text
    for bad, name in ((dict(betas=(0.9, 1.0)), "betas"), (dict(eps=-1.0), "eps"),
                      (dict(basis="qr"), "basis"), (dict(carry="rotate"), "carry"),
                      (dict(param_groups=[{"params": list(model.parameters()),
                                           "momentum": 0.9}]), "momentum")):
        with pytest.raises(ValueError, match=name):
            grng.EKFAC(small_mlp(F64), **bad) if name != "momentum" else grng.EKFAC(model, **bad)
    with pytest.raises(TypeError, match="damping"):
        grng.EKFAC(small_mlp(F64), damping=0.1)
