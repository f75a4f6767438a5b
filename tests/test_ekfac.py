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
import math
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
from optimizer_helpers import linear_factors

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
                         rho_rel=0.0, max_factor_dim=1)
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


@pytest.mark.parametrize("shape", [(1, 1), (17, 17), (123, 123), (3, 65, 65), (2, 257, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_householder_q_is_linalg_qr_bit_for_bit(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """The refresh's Q (geqrf then orgqr on the CPU, no R) is torch.linalg.qr's Q exactly, on
    contiguous and transposed (non-contiguous) inputs."""
    g = torch.Generator().manual_seed(len(shape) * 1000 + shape[-1])
    Y = torch.randn(*shape, generator=g, dtype=dtype)
    for inp in (Y, Y.transpose(-2, -1)):
        assert torch.equal(eigenbasis.householder_q(inp), torch.linalg.qr(inp).Q)


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
@pytest.mark.parametrize("qr", ["householder", "cholesky"])
def test_no_eigh_after_the_first_refresh_at_the_defaults(monkeypatch, sync_free: bool,
                                                         qr: str) -> None:
    """The default schedule (refresh_warmup 30 at geometric gaps of 10% of the step, then every
    inverse_every) over 45 steps: 21 refreshes, eigh only in the first (one call per dense side,
    four), none in the warmup's other 18 or after it; no eigh outside grng.ops either
    (torch.linalg.eigh counted where grng.ops.eigh is not on the stack)."""
    eigh_steps: list[int] = []
    refresh_steps: list[int] = []
    direct = [0]
    inside = [False]
    real_ops, real_linalg = ops.eigh, torch.linalg.eigh
    real_refresh = eigenbasis.EigenbasisPreconditioner._refresh_bases

    def counting_ops(*args, **kwargs):
        eigh_steps.append(opt._steps)
        inside[0] = True
        try:
            return real_ops(*args, **kwargs)
        finally:
            inside[0] = False

    def counting_linalg(*args, **kwargs):
        direct[0] += not inside[0]
        return real_linalg(*args, **kwargs)

    def counting_refresh(self, units):
        if units:
            refresh_steps.append(opt._steps)
        return real_refresh(self, units)

    monkeypatch.setattr(ops, "eigh", counting_ops)
    monkeypatch.setattr(torch.linalg, "eigh", counting_linalg)
    monkeypatch.setattr(eigenbasis.EigenbasisPreconditioner, "_refresh_bases", counting_refresh)
    torch.manual_seed(0)
    model = small_mlp(F64)
    opt = grng.EKFAC(model, sync_free=sync_free, qr=qr)
    assert (opt.refresh_warmup, opt.inverse_every) == (30, 10)  # the CPU defaults
    _train(model, opt, classification_batches(45, 8, dtype=F64, seed=1))
    assert refresh_steps == [*range(12), 13, 15, 17, 19, 21, 24, 27, 30, 40]
    assert eigh_steps == [0] * 4
    assert direct[0] == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _refreshed_steps(monkeypatch, steps: int, **kwargs) -> list[int]:
    """The steps whose bases refresh over ``steps`` steps of EKFAC(small_mlp, **kwargs)."""
    refreshed: list[int] = []
    real = eigenbasis.EigenbasisPreconditioner._refresh_bases

    def counting(self, units):
        if units:
            refreshed.append(opt._steps)
        return real(self, units)

    monkeypatch.setattr(eigenbasis.EigenbasisPreconditioner, "_refresh_bases", counting)
    torch.manual_seed(0)
    model = small_mlp(F64)
    opt = grng.EKFAC(model, lr=0.01, **kwargs)
    _train(model, opt, classification_batches(steps, 8, dtype=F64, seed=1))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return refreshed


@pytest.mark.parametrize("warmup", [0, 4])
def test_bases_refresh_every_step_of_the_warmup_then_every_inverse_every(monkeypatch,
                                                                         warmup: int) -> None:
    """The steps whose refresh runs: 0, 1, ..., warmup - 1, then the multiples of
    inverse_every (here 3) among 0..9."""
    refreshed = _refreshed_steps(monkeypatch, 10, inverse_every=3, refresh_warmup=warmup,
                                 refresh_warmup_schedule="every")
    assert refreshed == sorted({*range(warmup), 0, 3, 6, 9})


@pytest.mark.parametrize("warmup", [0, 12])
def test_a_geometric_warmup_refreshes_at_growing_gaps_then_every_inverse_every(
        monkeypatch, warmup: int) -> None:
    """refresh_warmup_schedule="geometric", growth 0.3: the warmup's refreshes at 0, 1, 2, 3,
    4, 6, 8, 11 (gaps max(1, ceil(0.3 s))), not at its other steps (5, 9, 10), then the
    multiples of inverse_every (here 4) from the warmup's end; the rule's steps below 30."""
    refreshed = _refreshed_steps(monkeypatch, 20, inverse_every=4, refresh_warmup=warmup,
                                 refresh_warmup_schedule="geometric", refresh_warmup_growth=0.3)
    assert refreshed == ([0, 1, 2, 3, 4, 6, 8, 11, 12, 16] if warmup else [0, 4, 8, 12, 16])
    due = grng.optim.ekfac.warmup_refresh_due
    assert [s for s in range(40) if due(s, 30, "geometric", 0.3)] == [
        0, 1, 2, 3, 4, 6, 8, 11, 15, 20, 26]
    assert [s for s in range(9) if due(s, 5, "every")] == [0, 1, 2, 3, 4]
    # nothing is materialized: a warmup of 10**12 steps costs nothing to build or ask
    assert due(10**6, 10**12, "every") and not due(10**6 + 1, 10**12, "geometric", 0.3)


def _geometric_steps(growth: float, below: int) -> list[int]:
    """The rule written as a plain loop: s_0 = 0, s_(k+1) = s_k + max(1, ceil(growth s_k))."""
    steps, s = [], 0
    while s < below:
        steps.append(s)
        s += max(1, math.ceil(growth * s))
    return steps


def test_refresh_warmup_growth_sets_the_geometric_gaps(monkeypatch) -> None:
    """refresh_warmup_growth=0.1: gaps max(1, ceil(0.1 s)), i.e. every step to 11, then gaps of
    2 (13, ..., 21) and 3 (24, 27), then every inverse_every (10) from the warmup's end (30);
    warmup_refresh_due agrees with the plain loop at other rates, and stays cheap."""
    refreshed = _refreshed_steps(monkeypatch, 41, refresh_warmup_growth=0.1,
                                 refresh_warmup_schedule="geometric")
    assert refreshed == [*range(12), 13, 15, 17, 19, 21, 24, 27, 30, 40]
    due = grng.optim.ekfac.warmup_refresh_due
    for growth in (0.1, 0.15, 0.3, 1e-3, 0.5, 1.0, 2.5, 1e-7):
        assert [s for s in range(3000) if due(s, 3000, "geometric", growth)] == (
            _geometric_steps(growth, 3000)), growth
    assert [s for s in range(30) if due(s, 30, "geometric", 0.15)] == [
        *range(8), 9, 11, 13, 15, 18, 21, 25, 29]
    # a run of equal gaps is one jump: a 10**12-step warmup at a small rate costs nothing
    assert due(10**6, 10**12, "geometric", 1e-9) and not due(10**6 + 1, 10**12, "geometric", 1e-3)


def test_the_default_warmup_is_geometric_with_growth_0_1_bit_for_bit(monkeypatch) -> None:
    """EKFAC's defaults refresh at growth 0.1's steps (0-11, 13, ..., 27, then every 10), and
    refresh_warmup_growth=None, the geometric schedule named or not, trains the same parameters
    as 0.1 exactly."""
    expected = [*range(12), 13, 15, 17, 19, 21, 24, 27, 30, 40]
    assert _refreshed_steps(monkeypatch, 41) == expected
    assert [s for s in range(41) if grng.EKFAC(small_mlp(F64)).refresh_due(s)] == expected
    params = []
    for kwargs in ({}, dict(refresh_warmup_growth=None), dict(refresh_warmup_growth=0.1),
                   dict(refresh_warmup_schedule="geometric", refresh_warmup_growth=0.1)):
        torch.manual_seed(0)
        model = small_mlp(F64)
        opt = grng.EKFAC(model, lr=0.01, inverse_every=4, refresh_warmup=24, **kwargs)
        _train(model, opt, classification_batches(26, 8, dtype=F64, seed=1))
        params.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(p, q) for other in params[1:] for p, q in zip(params[0], other))
    due = grng.optim.ekfac.warmup_refresh_due
    assert all(due(s, 10**4, "geometric") == due(s, 10**4, "geometric", 0.1)
               for s in range(10**4))


@pytest.mark.parametrize("sync_free", [False, True])
def test_a_non_finite_subspace_step_falls_back(monkeypatch, sync_free: bool) -> None:
    """A non-finite subspace step: eigh on the host path, the previous basis on the device."""
    torch.manual_seed(0)
    model = small_mlp(F64)
    opt = grng.EKFAC(model, lr=0.01, inverse_every=2, sync_free=sync_free)
    batches = classification_batches(3, 8, dtype=F64, seed=1)
    _train(model, opt, batches[:2])
    before = [u.state.QG.clone() for u in opt._blocks]
    monkeypatch.setattr(eigenbasis, "subspace_step", lambda M, Q, qr: Q * float("nan"))
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


def _twin_mlp(dtype: torch.dtype = F64) -> nn.Module:
    """Linear(4,6)-Tanh-Linear(6,6)-Tanh-Linear(6,6)-LayerNorm-Linear(6,3): two blocks of one
    shape (updated and applied in one batch) among four."""
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6),
                         nn.LayerNorm(6), nn.Linear(6, 3)).to(dtype)


#: (model, EKFAC keywords): the defaults on blocks of distinct shapes, and the original scaling
#: with the relative GR term on a model whose equal-shape blocks batch
VARIANTS = {"adam": (small_mlp, {}),
            "fisher-batched": (_twin_mlp, dict(scaling="fisher", rho_rel=0.1))}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("at", [3, 4])  # 4: a refresh step (inverse_every=2, no warmup)
@pytest.mark.parametrize("sync_free", [False, True])
def test_a_skipped_step_leaves_the_state_bit_for_bit(sync_free: bool, at: int,
                                                     variant: str) -> None:
    """A NaN loss at step ``at``: parameters, factors, bases and moments of every unit as they
    were, on the host path and on the sync-free (device) path; the next step goes on."""
    torch.manual_seed(0)
    make, kwargs = VARIANTS[variant]
    model = make(torch.float32)
    opt = grng.EKFAC(model, lr=0.01, inverse_every=2, refresh_warmup=0, sync_free=sync_free,
                     **kwargs)
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


def _nan_direction_run(monkeypatch, sync_free: bool) -> tuple[list[dict], list[dict], bool, int]:
    """Three steps, then one whose direction is NaN from finite inputs: the per-step fields
    before and after it, whether the parameters are unchanged, and the skip count."""
    torch.manual_seed(0)
    model = small_mlp(torch.float32)
    opt = grng.EKFAC(model, lr=0.01, inverse_every=2, refresh_warmup=0, sync_free=sync_free)
    batches = classification_batches(4, 8, dtype=torch.float32, seed=1)
    _train(model, opt, batches[:3])  # step 3 refreshes no basis (no warmup)
    moments = [{k: t.clone() for k, t in u.state.per_step().items()}
               for u, _ in opt._curvature_units()]
    params = [p.detach().clone() for p in model.parameters()]
    real = eigenbasis.EigenbasisPreconditioner.apply
    with monkeypatch.context() as patch:
        patch.setattr(eigenbasis.EigenbasisPreconditioner, "apply",
                      lambda self, unit, V, group: real(self, unit, V, group) * float("nan"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            _train(model, opt, batches[3:])
    now = [{k: t.clone() for k, t in u.state.per_step().items()}
           for u, _ in opt._curvature_units()]
    unchanged = all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    return moments, now, unchanged, opt.skipped_steps


def test_a_non_finite_direction_keeps_the_moments_advance_on_both_gates(monkeypatch) -> None:
    """Finite inputs, so the update phase runs, but a NaN direction: the parameters are
    unchanged and the step counted as skipped; the moments (no copy of them on either gate: the
    update wrote them where its inputs' flag said) keep their advance, finite, and the host and
    device gates end equal (docs/architecture.md "Phases and the gate")."""
    runs = {sync_free: _nan_direction_run(monkeypatch, sync_free) for sync_free in (False, True)}
    for before, now, unchanged, skipped in runs.values():
        assert not _same(now, before)
        assert all(bool(torch.isfinite(t).all()) for fields in now for t in fields.values())
        assert all(int(fields["step"]) == 4 for fields in now)
        assert unchanged and skipped == 1
    for host, device in zip(runs[False][1], runs[True][1]):
        assert host.keys() == device.keys()
        for key in host:
            torch.testing.assert_close(device[key], host[key], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("sync_free", [False, True])
def test_checkpoint_resumes_bit_for_bit(sync_free: bool, variant: str) -> None:
    """Save after 5 steps, train 5 more; a new model and optimizer loaded from the checkpoint
    take the same 5 steps bit for bit (a refresh among them)."""
    torch.manual_seed(0)
    make, kwargs = VARIANTS[variant]
    model = make(torch.float32)
    opt = grng.EKFAC(model, lr=0.01, inverse_every=3, weight_decay=0.01, sync_free=sync_free,
                     **kwargs)
    batches = classification_batches(10, 8, dtype=torch.float32, seed=1)
    _train(model, opt, batches[:5])
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(opt.state_dict())
    names = set(saved["state"][0])
    assert {"A", "G", "QG", "QA", "exp_avg_basis", "exp_avg_sq", "step"} <= names
    _train(model, opt, batches[5:])
    other = make(torch.float32)
    other.load_state_dict(saved_model)
    resumed = grng.EKFAC(other, lr=0.01, inverse_every=3, weight_decay=0.01,
                         sync_free=sync_free, **kwargs)
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
                      (dict(refresh_warmup=-1), "refresh_warmup"),
                      (dict(refresh_warmup=2.0), "refresh_warmup"),
                      (dict(refresh_warmup_schedule="log"), "refresh_warmup_schedule"),
                      *[(dict(refresh_warmup_schedule="geometric", refresh_warmup_growth=g),
                         "refresh_warmup_growth")
                        for g in (0.0, -0.1, float("nan"), float("inf"), "0.1", True)],
                      (dict(param_groups=[{"params": list(model.parameters()),
                                           "momentum": 0.9}]), "momentum")):
        with pytest.raises(ValueError, match=name):
            grng.EKFAC(small_mlp(F64), **bad) if name != "momentum" else grng.EKFAC(model, **bad)
    for bad, name in ((dict(scaling="sqrt"), "scaling"), (dict(rho_rel=-0.1), "rho_rel"),
                      (dict(damping=0.0), "damping"),
                      (dict(scaling="fisher", factor_every=2), "factor_every")):
        with pytest.raises(ValueError, match=name):
            grng.EKFAC(small_mlp(F64), **bad)
    # a growth without the geometric schedule would be ignored: refused, naming both
    with pytest.raises(ValueError, match="refresh_warmup_growth.*refresh_warmup_schedule"):
        grng.EKFAC(small_mlp(F64), refresh_warmup_schedule="every", refresh_warmup_growth=0.1)
    with pytest.raises(TypeError, match="inverse"):  # K-FAC's, not EKFAC's
        grng.EKFAC(small_mlp(F64), inverse="eigen")


# ------------------------------------------------------------------ original scaling, GR, batching
class _TokenNet(nn.Module):
    """Embedding(7, 5) -> Tanh -> Linear(5, 3), one token per example."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.lin = nn.Embedding(7, 5), nn.Linear(5, 3)

    def forward(self, idx: Tensor) -> Tensor:
        return self.lin(torch.tanh(self.emb(idx)))


def test_fisher_correction_is_the_per_example_squared_projection() -> None:
    """With beta2 = 0, v after one step is the original scaling's s: the mean over examples of
    the squared per-example gradient matrix in the block's eigenbasis, (Q_G^T V_i Q_A)^2,
    per-example gradients from torch.func (a Linear block; an Embedding block with its
    one-hot, diagonal A side)."""
    torch.manual_seed(0)
    model = _TokenNet().double()
    opt = grng.EKFAC(model, lr=0.01, betas=(0.9, 0.0), scaling="fisher")
    idx, y = torch.randint(0, 7, (11,)), torch.randint(0, 3, (11,))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p: dict[str, Tensor], i: Tensor, t: Tensor) -> Tensor:
        out = torch.func.functional_call(model, p, (i.unsqueeze(0),))
        return F.cross_entropy(out, t.unsqueeze(0))

    per = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, idx, y)
    opt.zero_grad()
    F.cross_entropy(model(idx), y).backward()
    opt.step()
    for unit in opt._blocks:
        layer, st = unit.layer, unit.state
        name = "emb" if layer.module is model.emb else "lin"
        Vi = torch.stack([layer.to_matrix([per[f"{name}.{k}"][i] for k in ("weight", "bias")
                                           if f"{name}.{k}" in per]) for i in range(len(idx))])
        P = eigenbasis.to_basis(Vi, st.QG, st.QA)
        torch.testing.assert_close(st.exp_avg_sq, (P * P).mean(0), rtol=1e-10, atol=1e-14)
        assert float(st.exp_avg_sq.abs().max()) > 1e-4


def test_fisher_rows_per_position_scale_to_kronecker_eigenvalues() -> None:
    """Rows per position (a conv's patches): s sums to tr(A) tr(G) when each row's a and g are
    independent (here: g rows a permutation of their pairing), the scale K-FAC's l_G l_A^T
    has; with the pairing kept it is the per-row sum."""
    g = torch.Generator().manual_seed(0)
    n, T, dA, dG = 3, 5, 4, 2
    XA, XG = torch.randn(n * T, dA, generator=g, dtype=F64), torch.randn(n * T, dG, generator=g,
                                                                         dtype=F64)
    a, gr = eigenbasis.Rows(XA, n * T), eigenbasis.Rows(XG, n, float(n))
    s = eigenbasis.eigenvalue_correction((a, gr), None, None, dA, F64)
    A, G = XA.T @ XA / (n * T), n * (XG.T @ XG)  # the conv factors (s^2 / n) X^T X
    ref = sum(torch.outer(XG[r] ** 2, XA[r] ** 2) for r in range(n * T)) * n
    torch.testing.assert_close(s, ref)
    # averaged over every pairing, the per-row sum is tr(G) tr(A) (independence)
    mixed = sum(torch.outer(XG[r] ** 2, XA[q] ** 2) for r in range(n * T)
                for q in range(n * T)) * n / (n * T)
    torch.testing.assert_close(mixed.sum(), A.trace() * G.trace())
    assert eigenbasis.eigenvalue_correction((a, eigenbasis.Rows(XG[:-1], n, float(n))), None,
                                            None, dA, F64) is None


def test_unpaired_rows_take_kronecker_eigenvalues(monkeypatch) -> None:
    """A block whose rows do not pair takes K-FAC's eigenvalue product l_G l_A^T in its basis
    (the factors' Rayleigh quotients): beta2 = 0 makes v that product."""
    monkeypatch.setattr(eigenbasis, "eigenvalue_correction", lambda *a, **k: None)
    torch.manual_seed(0)
    model = small_mlp(F64)
    opt = grng.EKFAC(model, lr=0.01, betas=(0.9, 0.0), scaling="fisher")
    _train(model, opt, classification_batches(1, 8, dtype=F64, seed=1))
    for unit in opt._blocks:
        st = unit.state
        lG = torch.linalg.eigvalsh(st.G).flip(-1)
        lA = torch.linalg.eigvalsh(st.A).flip(-1)
        torch.testing.assert_close(st.exp_avg_sq, torch.outer(lG, lA).clamp_min(0),
                                   rtol=1e-8, atol=1e-12)


def test_fisher_ratio_and_relative_gr_term() -> None:
    """One step from a fresh optimizer: theta_1 - theta_0 = -lr d', with the fisher ratio
    d = Q_G [Q_G^T V Q_A / (s + damping)] Q_A^T (bias-corrected moments of one gradient) and
    d' = d + rho_rel ||d|| / ||V|| V per block (per parameter for the LayerNorm's Adam)."""
    torch.manual_seed(0)
    model = small_mlp(F64)
    start = copy.deepcopy(model)
    lr, damping, rho = 0.05, 1e-2, 0.3
    opt = grng.EKFAC(model, lr=lr, betas=(0.9, 0.0), eps=1e-8, damping=damping, rho_rel=rho,
                     scaling="fisher")
    _train(model, opt, classification_batches(1, 8, dtype=F64, seed=1))
    moved = {id(q): (q.detach() - p.detach()) / -lr
             for p, q in zip(start.parameters(), model.parameters())}
    for unit in opt._blocks:
        st, layer = unit.state, unit.layer
        V = layer.grad_matrix()
        P = eigenbasis.to_basis(V, st.QG, st.QA)
        d = eigenbasis.from_basis(P / (st.exp_avg_sq + damping), st.QG, st.QA)
        d = d + rho * d.norm() / V.norm() * V
        got = layer.to_matrix([moved[id(p)] for p in layer.params])
        torch.testing.assert_close(got, d, rtol=1e-9, atol=1e-12)
    for p in model[2].parameters():  # LayerNorm: Adam's first step is sign(g) (eps aside)
        g = p.grad
        d = g / (g.abs() + 1e-8)
        torch.testing.assert_close(moved[id(p)], d + rho * d.norm() / g.norm() * g,
                                   rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kwargs", [{}, dict(scaling="fisher", rho_rel=0.2)])
def test_batched_blocks_equal_one_at_a_time(monkeypatch, kwargs) -> None:
    """Equal-shape blocks updated and applied in one batch give what one block at a time gives
    (float64, rounding; 6 steps, refreshes among them)."""
    batches = classification_batches(6, 8, dtype=F64, seed=1)
    runs = []
    for batched in (True, False):
        if not batched:
            monkeypatch.setattr(eigenbasis.EigenbasisPreconditioner, "_layout",
                                lambda self, unit: None)
        torch.manual_seed(0)
        model = _twin_mlp(F64)
        start = [p.detach().clone() for p in model.parameters()]
        opt = grng.EKFAC(model, lr=0.02, inverse_every=2, **kwargs)
        _train(model, opt, batches)
        runs.append(list(model.parameters()))
        if batched:  # the two 6 x 7 blocks' fields are one stack's slices
            a, b = opt._blocks[1].state, opt._blocks[2].state
            assert a.exp_avg_basis._base is not None
            assert a.exp_avg_basis._base is b.exp_avg_basis._base
    # batched GEMMs round differently, and the rounding picks the basis inside the factors'
    # degenerate eigenspaces (the softmax's and the LayerNorm's null directions of G; docs
    # "Degenerate eigenspaces"), so the runs agree to 1e-7 of parameters that moved by > 0.05
    assert max(float((p - q).abs().max()) for p, q in zip(runs[0], start)) > 0.05
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9)


def test_fisher_refuses_mem_opt() -> None:
    """Under a process group the original scaling averages each rank's correction in the
    block's bases, which mem-opt keeps on the owner only: refused, naming the strategy."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="mem-opt"):
            grng.EKFAC(small_mlp(F64), scaling="fisher", process_group=dist.group.WORLD,
                       distributed_strategy="mem-opt")
        grng.EKFAC(small_mlp(F64), scaling="fisher", process_group=dist.group.WORLD).close()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sync_free", [False, True])
def test_block_diagonal_and_dense_sides_refresh_in_separate_batches(sync_free: bool) -> None:
    """A depthwise convolution's block-diagonal factor (groups, b, b) next to a dense b x b
    factor of another layer: the subspace refresh batches sides by their full shape, so each
    side keeps its own shape and stays orthogonal (per group), and the steps stay finite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=4),
                          nn.Flatten(), nn.Linear(64, 10)).double()
    opt = grng.EKFAC(model, inverse_every=1, sync_free=sync_free)
    x = torch.randn(8, 1, 8, 8, dtype=F64)
    y = torch.randint(0, 10, (8,))
    for _ in range(3):  # the second and third refreshes take the batched subspace step
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    dense, depthwise = opt._blocks[0].state, opt._blocks[1].state
    assert dense.QG.shape == (4, 4) and depthwise.QG.shape == (4, 1, 1)
    for Q in (dense.QG, dense.QA, depthwise.QA):
        eye = torch.eye(Q.shape[-1], dtype=Q.dtype).expand_as(Q)
        torch.testing.assert_close(Q.transpose(-2, -1) @ Q, eye, rtol=0, atol=1e-10)
    assert all(bool(p.isfinite().all()) for p in model.parameters())


def test_cholesky_qr3_is_the_householder_q_up_to_signs() -> None:
    """CholeskyQR3 of an ill-conditioned float32 Y (condition 1e7, columns of very different
    norms): orthonormal to float32's rounding, spanning Y's leading columns as Householder's Q
    does (equal up to column signs); a Y with a zero column cannot be orthonormalized and comes
    back non-finite (the refresh's fallback)."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=F64))
    W, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=F64))
    Y = (U @ torch.diag(torch.logspace(0, -7, 40, dtype=F64)) @ W.T).float()
    Q = eigenbasis.cholesky_qr3(Y)
    assert Q.dtype == torch.float32
    assert float((Q.T.double() @ Q.double() - torch.eye(40, dtype=F64)).abs().max()) < 1e-6
    H = torch.linalg.qr(Y.double()).Q
    signs = torch.sign((H * Q.double()).sum(0))
    assert float((H * signs - Q.double()).abs()[:, :20].max()) < 1e-4  # the well-determined part
    Y[:, 3] = 0.0
    assert not bool(torch.isfinite(eigenbasis.cholesky_qr3(Y)).all())


@pytest.mark.parametrize("sync_free", [False, True])
def test_cholesky_refresh_takes_the_householder_steps(sync_free: bool) -> None:
    """qr="cholesky" changes how the subspace step orthonormalizes, not the optimizer: the bases
    differ from Householder's by column signs only, which the moments' rotation and the
    sandwich cancel, so in float64 the parameters agree to rounding over refreshes."""
    params = []
    for qr in ("householder", "cholesky"):
        torch.manual_seed(0)
        model = small_mlp(F64)
        opt = grng.EKFAC(model, lr=0.01, inverse_every=2, qr=qr, sync_free=sync_free)
        _train(model, opt, classification_batches(8, 8, dtype=F64, seed=1))
        params.append([p.detach().clone() for p in model.parameters()])
        assert opt.block.qr == qr
    assert max(float((p - q).abs().max()) for p, q in zip(*params)) < 1e-9


def test_fold_period_default_by_device_and_scaling() -> None:
    """factor_every defaults to the device's (the CPU's: 3, bench/results/ekfac_factor_every.md),
    1 with the fisher scaling (which reads every step's rows); an explicit value is kept, and
    the fisher scaling refuses another than 1, naming the argument."""
    from grng.optim import device_defaults

    cpu = device_defaults.EKFAC_CPU.factor_every
    for kwargs, want in (({}, cpu), (dict(scaling="fisher"), 1), (dict(factor_every=2), 2),
                         (dict(factor_every=1), 1)):
        opt = grng.EKFAC(small_mlp(F64), **kwargs)
        assert opt.factor_every == want, kwargs
        opt.close()
    with pytest.raises(ValueError, match="factor_every"):
        grng.EKFAC(small_mlp(F64), scaling="fisher", factor_every=2)


def _fold_reference(lin: nn.Linear, beta: float, folds: set[int], steps: int,
                    seed: int) -> tuple[Tensor, Tensor, list[Tensor]]:
    """The factors of ``lin`` folded by hand at the steps ``folds``: set at the first, then
    M <- beta^k M + (1 - beta^k) M_batch, k the steps since the previous fold; also the inputs."""
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(5 + s % 3, 3, dtype=F64, generator=gen) for s in range(steps)]
    A = G = None
    last = None
    for s, x in enumerate(xs):
        if s not in folds:
            continue
        out = lin(x)
        out.retain_grad()
        F.mse_loss(out, torch.zeros_like(out)).backward()
        Ab, Gb = linear_factors(lin, x, out)
        if A is None:
            A, G = Ab, Gb
        else:
            b = beta ** (s - last)
            A, G = b * A + (1 - b) * Ab, b * G + (1 - b) * Gb
        last = s
        lin.zero_grad()
    return A, G, xs


@pytest.mark.parametrize("sync_free", [False, True])
def test_folds_every_warmup_step_then_every_factor_every_at_the_per_step_decay(
        sync_free: bool) -> None:
    """factor_every=3, refresh_warmup=4: the factors fold at steps 0-3 (the warmup), then 6, 9;
    each fold decays by factor_decay ** (steps since the previous fold), so the EMA spans the
    same steps at any F. lr=0 keeps the layer fixed, so the factors are checked against a fold
    by hand in float64; a checkpoint taken between two folds resumes bit for bit."""
    beta, steps, folds = 0.8, 11, {0, 1, 2, 3, 6, 9}
    lin = nn.Linear(3, 2).double()
    A, G, xs = _fold_reference(lin, beta, folds, steps, seed=3)

    def make() -> grng.EKFAC:
        return grng.EKFAC(lin, lr=0.0, factor_every=3, refresh_warmup=4, factor_decay=beta,
                          sync_free=sync_free)

    def train(opt: grng.EKFAC, span: range) -> None:
        for s in span:
            opt.zero_grad()
            out = lin(xs[s])
            F.mse_loss(out, torch.zeros_like(out)).backward()
            opt.step()

    opt = make()
    assert [s for s in range(steps) if opt._fold_due(s)] == sorted(folds)
    assert [opt.fold_gap(s) for s in sorted(folds)] == [1, 1, 1, 1, 3, 3]
    train(opt, range(5))
    saved = copy.deepcopy(opt.state_dict())
    train(opt, range(5, steps))
    st = opt.layer_state(opt.layers[0])
    torch.testing.assert_close(st["A"], A, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st["G"], G, rtol=1e-12, atol=1e-12)
    opt.close()
    resumed = make()
    resumed.load_state_dict(saved)
    train(resumed, range(5, steps))
    assert _same(_state(resumed), _state(opt))


def test_factor_every_1_folds_every_step_at_factor_decay() -> None:
    """At F = 1 the per-step decay is the fold's: factor_decay ** 1, every step (the fold
    every other member makes)."""
    opt = grng.EKFAC(small_mlp(F64), factor_every=1, refresh_warmup=0)
    assert all(opt._fold_due(s) and opt.fold_gap(s) == 1 for s in range(12))
    opt.close()
