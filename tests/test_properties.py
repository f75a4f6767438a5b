"""Hypothesis property tests of the reference ops (grng.ops.reference and the Newton-Schulz
driver) over random shapes, damping values and dtypes: the invariants docs/numerics.md relies
on (symmetry, positive semi-definiteness, finite output for singular or all-zero factors,
exact inverses of the damped operators, all-or-nothing updates, loss-scale invariance)."""
from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grng import ops
from grng.curvature.factors import DenseFactor
from grng.curvature.inverse import tikhonov_split
from grng.ops import reference as ref

SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
F64 = torch.float64


def _tol(dtype: torch.dtype) -> dict:
    return dict(rtol=1e-9, atol=1e-10) if dtype == F64 else dict(rtol=2e-3, atol=2e-4)


def _psd(d: int, rank: int, seed: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """A random PSD matrix of the given rank (rank 0: the zero matrix)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rank, d, generator=g, dtype=F64) * scale
    return (X.T @ X / max(rank, 1)).to(dtype)


dims = st.integers(1, 6)
seeds = st.integers(0, 2 ** 31 - 1)
dampings = st.floats(1e-3, 1.0)
float_dtypes = st.sampled_from([torch.float32, F64])


@SETTINGS
@given(m=st.integers(0, 9), d=dims, alpha=st.floats(1e-3, 10.0), beta=st.floats(0.0, 0.99),
       dtype=float_dtypes, rows_dtype=st.sampled_from(["same", "bfloat16"]), seed=seeds)
def test_factor_update_is_symmetric_psd_and_exact(m, d, alpha, beta, dtype, rows_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(m, d, generator=g, dtype=F64)
    if rows_dtype == "bfloat16":
        X = X.to(torch.bfloat16)
    M0 = _psd(d, d, seed + 1, dtype)
    M = M0.clone()
    ref.factor_update(M, X, alpha, beta)
    assert M.dtype == dtype
    assert torch.equal(M, M.T)                       # exactly symmetric
    Xd = X.to(F64)
    expected = (0.0 if beta == 0.0 else beta) * M0.to(F64) + alpha * Xd.T @ Xd
    torch.testing.assert_close(M.to(F64), expected, **_tol(dtype))
    assert float(torch.linalg.eigvalsh(M.to(F64)).min()) >= -1e-5 * max(1.0, float(expected.abs().max()))


@SETTINGS
@given(m=st.integers(1, 9), d=dims, log2_scale=st.integers(0, 16), dtype=float_dtypes, seed=seeds)
def test_factor_of_loss_scaled_rows_equals_unscaled_bit_for_bit(m, d, log2_scale, dtype, seed):
    """GradScaler: G rows carry S = 2^k; dividing the row scale by S gives the same factor."""
    X = torch.randn(m, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    S = 2.0 ** log2_scale
    n = float(m)
    M1 = torch.empty(d, d, dtype=dtype)
    M2 = torch.empty(d, d, dtype=dtype)
    ref.factor_update(M1, X, n ** 2 / n, 0.0)
    ref.factor_update(M2, X * S, (n / S) ** 2 / n, 0.0)
    assert torch.equal(M1, M2)


@SETTINGS
@given(dG=dims, dA=dims, rank_g=st.integers(0, 6), rank_a=st.integers(0, 6), damping=dampings,
       dtype=float_dtypes, diagonal_a=st.booleans(), seed=seeds)
def test_eigen_apply_inverts_the_damped_kronecker_operator(dG, dA, rank_g, rank_a, damping, dtype,
                                                           diagonal_a, seed):
    """(A (x) G + damping I)^-1 applied to (A (x) G + damping I) V gives V back, for singular
    and all-zero factors too (rank 0), and never a NaN."""
    G = _psd(dG, min(rank_g, dG), seed, F64)
    A = _psd(dA, min(rank_a, dA), seed + 1, F64)
    if diagonal_a:
        A = torch.diag(A.diagonal())
    V = torch.randn(dG, dA, generator=torch.Generator().manual_seed(seed + 2), dtype=F64)
    forward = G @ V @ A + damping * V                # (A (x) G + damping I) V in V -> G V A form
    lG, QG = ref.eigh(G.to(dtype))
    if diagonal_a:
        out = ref.eigen_apply(forward.to(dtype), QG, lG, None, A.diagonal().to(dtype), damping)
    else:
        lA, QA = ref.eigh(A.to(dtype))
        out = ref.eigen_apply(forward.to(dtype), QG, lG, QA, lA, damping)
    assert bool(torch.isfinite(out).all())
    tol = dict(rtol=1e-7, atol=1e-8) if dtype == F64 else dict(rtol=5e-3, atol=5e-3)
    torch.testing.assert_close(out.to(F64), V, **tol)


@SETTINGS
@given(dG=dims, dA=dims, rank_g=st.integers(0, 6), rank_a=st.integers(0, 6), damping=dampings,
       dtype=float_dtypes, seed=seeds)
def test_newton_and_cholesky_invert_the_tikhonov_damped_factors(dG, dA, rank_g, rank_a, damping,
                                                               dtype, seed):
    G = _psd(dG, min(rank_g, dG), seed, dtype)
    A = _psd(dA, min(rank_a, dA), seed + 1, dtype)
    da, dg = tikhonov_split(A, G, damping, DenseFactor(dA), DenseFactor(dG))
    assert da > 0.0 and dg > 0.0 and math.isclose(da * dg, damping, rel_tol=1e-9)
    for M, extra in ((A, da), (G, dg)):
        Md = M.clone()
        Md.diagonal().add_(extra)
        chol = ref.cholesky_inverse(Md)
        newton = ops.newton_schulz_inverse(Md, backend="reference")
        exact = torch.linalg.inv(Md.to(F64))
        assert bool(torch.isfinite(chol).all()) and bool(torch.isfinite(newton.inverse).all())
        torch.testing.assert_close(chol.to(F64), exact, **_tol(dtype))
        assert torch.equal(chol, chol.T)
        if newton.converged:
            tol = dict(rtol=1e-8, atol=1e-8) if dtype == F64 else dict(rtol=1e-2, atol=1e-2)
            torch.testing.assert_close(newton.inverse.to(F64) @ Md.to(F64),
                                       torch.eye(M.shape[0], dtype=F64), **tol)
        else:  # the optimizer then falls back to Cholesky (tested in test_hardening.py)
            assert dtype == torch.float32


@SETTINGS
@given(d=dims, k=st.integers(1, 5), beta=st.floats(0.5, 0.99), r=st.floats(0.1, 10.0),
       q=st.sampled_from([0.0, 1e-4]), seed=seeds)
def test_kalman_update_is_woodbury_and_stays_spd(d, k, beta, r, q, seed):
    P0 = _psd(d, d + 2, seed, F64)
    P0.diagonal().add_(0.1)
    H = torch.randn(k, d, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    P = P0.clone()
    ref.kalman_update(P, H, r, beta, q)
    assert torch.equal(P, P.T)
    assert float(torch.linalg.eigvalsh(P).min()) > 0.0
    P_minus = P0 / beta + q * torch.eye(d, dtype=F64)
    expected = torch.linalg.inv(torch.linalg.inv(P_minus) + H.T @ H / r)
    torch.testing.assert_close(P, expected, rtol=1e-7, atol=1e-9)


def test_fused_update_kl_clip_with_an_underflowing_lr() -> None:
    """Found by hypothesis: lr > 0 with lr^2 <g, d> == 0 in float64 divided by zero."""
    p, g = torch.ones(2, dtype=F64), torch.ones(2, dtype=F64)
    assert ref.fused_update([p], [g], [g.clone()], None, 5e-324, 0.0, 0.0, 0.0, 1e-3)
    assert bool(torch.isfinite(p).all())


@SETTINGS
@given(shapes=st.lists(st.tuples(dims, dims), min_size=1, max_size=3),
       lr=st.floats(0.0, 1.0), momentum=st.floats(0.0, 0.99), wd=st.floats(0.0, 0.1),
       rho=st.floats(0.0, 1.0), kl_clip=st.one_of(st.none(), st.floats(1e-4, 1.0)),
       poison=st.one_of(st.none(), st.sampled_from(["nan", "inf", "-inf"])),
       dtype=float_dtypes, seed=seeds)
def test_fused_update_is_all_or_nothing(shapes, lr, momentum, wd, rho, kl_clip, poison, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(*s, generator=g, dtype=dtype) for s in shapes]
    grads = [torch.randn(*s, generator=g, dtype=dtype) for s in shapes]
    dirs = [torch.randn(*s, generator=g, dtype=dtype) for s in shapes]
    bufs = [torch.randn(*s, generator=g, dtype=dtype) for s in shapes]
    if poison is not None:
        dirs[-1].view(-1)[0] = float(poison)
    p0, b0 = [p.clone() for p in params], [b.clone() for b in bufs]
    ok = ref.fused_update(params, grads, dirs, bufs, lr, momentum, wd, rho, kl_clip)
    assert ok == (poison is None)
    if not ok:
        assert all(torch.equal(p, q) for p, q in zip(params, p0))
        assert all(torch.equal(b, c) for b, c in zip(bufs, b0))
        return
    combined = [d + rho * gr for d, gr in zip(dirs, grads)]
    nu = 1.0
    if kl_clip is not None and lr > 0.0:
        vg = sum(float((c.double() * gr.double()).sum()) for c, gr in zip(combined, grads))
        if vg > 0.0 and lr * lr * vg > 0.0:   # a tiny lr: lr^2 vg underflows, nu = 1
            nu = min(1.0, math.sqrt(kl_clip / (lr * lr * vg)))
    for p, q0, b, c0, c in zip(params, p0, bufs, b0, combined):
        if momentum == 0.0:          # no momentum: the buffers are not used
            buf = nu * c
            assert torch.equal(b, c0)
        else:
            buf = momentum * c0 + nu * c
            torch.testing.assert_close(b, buf, **_tol(dtype))
        torch.testing.assert_close(p, (1 - lr * wd) * q0 - lr * buf, **_tol(dtype))
        assert bool(torch.isfinite(p).all())
