"""The sync-free ops (grng/ops/masked.py) against the host-branching reference ops on fresh
random inputs: odd sizes, non-contiguous views, float32 / float64 / bfloat16 parameters."""
from __future__ import annotations

import pytest
import torch

from grng.ops import masked, reference
from grng.ops.errors import FactorizationError

SIZES = (1, 17, 123)


def _spd(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    A = torch.randn(n, n, dtype=torch.float64, generator=gen)
    M = A @ A.T / n + torch.eye(n, dtype=torch.float64)
    return reference.symmetrize_from_upper(M).to(dtype)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view (a column slice of a wider buffer)."""
    buf = torch.full((*t.shape[:-1], t.shape[-1] + 2), float("nan"), dtype=t.dtype)
    buf[..., 1:-1] = t
    return buf[..., 1:-1]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("momentum,weight_decay,rho,kl_clip", [(0.0, 0.0, 0.0, None),
                                                                (0.9, 1e-2, 0.1, 1e-3)])
def test_fused_update_masked_equals_the_reference(n: int, dtype: torch.dtype, momentum: float,
                                                  weight_decay: float, rho: float,
                                                  kl_clip: float | None) -> None:
    cdt = torch.float32 if dtype == torch.bfloat16 else dtype

    def inputs():
        g = torch.Generator().manual_seed(n)
        params = [torch.randn(n, 3, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)]
        grads = [_strided(torch.randn(n, 3, generator=g).to(dtype)),
                 torch.randn(n, generator=g).to(dtype)]
        dirs = [torch.randn(n, 3, generator=g).to(cdt),
                _strided(torch.randn(1, n, generator=g).to(cdt))[0]]
        bufs = [torch.randn(n, 3, generator=g).to(cdt), torch.randn(n, generator=g).to(cdt)]
        return params, grads, dirs, bufs

    args = (0.05, momentum, weight_decay, rho, kl_clip)
    p_ref, g_ref, d_ref, b_ref = inputs()
    assert reference.fused_update(p_ref, g_ref, d_ref, b_ref, *args)
    p, g, d, b = inputs()
    ok = masked.fused_update_masked(p, g, d, b, *args, torch.tensor(True))
    assert bool(ok)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    for x, y in zip(p + (b if momentum else []), p_ref + (b_ref if momentum else [])):
        torch.testing.assert_close(x, y, **tol)
    # skipped: by the flag, or by a non-finite direction; nothing is written
    for flag, poison in ((False, False), (True, True)):
        p, g, d, b = inputs()
        if poison:
            d[1][0] = float("nan")
        saved = [t.clone() for t in (*p, *b)]
        ok = masked.fused_update_masked(p, g, d, b, *args, torch.tensor(flag))
        assert not bool(ok)
        for t, s in zip((*p, *b), saved):
            assert torch.equal(t, s)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kalman_update_masked_equals_the_reference_or_keeps_p(n: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(n + 1)
    P0 = torch.linalg.inv(_spd(n, torch.float64, gen)).to(dtype)
    P0 = reference.symmetrize_from_upper(P0)
    H = _strided(torch.randn(min(5, n), n, dtype=dtype, generator=gen))
    expected = reference.kalman_update(P0.clone(), H, 3.0, 0.9, 1e-3)
    P = P0.clone()
    assert bool(masked.kalman_update_masked(P, H, 3.0, 0.9, 1e-3))
    assert torch.equal(P, expected)
    # a negative noise makes the innovation indefinite: the reference raises, masked keeps P
    with pytest.raises(FactorizationError):
        reference.kalman_update(P0.clone(), H, -1e6, 0.9, 0.0)
    P = P0.clone()
    assert not bool(masked.kalman_update_masked(P, H, -1e6, 0.9, 0.0))
    assert torch.equal(P, P0)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cholesky_and_newton_masked_invert_or_say_they_did_not(n: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(n + 2)
    M = _spd(n, dtype, gen)
    X, ok = masked.cholesky_inverse_masked(M)
    assert bool(ok)
    torch.testing.assert_close(X, reference.cholesky_inverse(M), rtol=1e-5, atol=1e-6)
    bad = M.clone()
    bad[0, 0] = -1.0
    assert not bool(masked.cholesky_inverse_masked(bad)[1])
    # Newton-Schulz, batched, warm-started from a perturbed inverse
    Ms = torch.stack([M, _spd(n, dtype, gen)])
    X0 = torch.linalg.inv(Ms.double() + 0.05 * torch.eye(n, dtype=torch.float64)).to(dtype)
    tol = reference.default_newton_tol(dtype)
    X, ok = masked.newton_schulz_fixed(Ms, X0, 20, tol)
    assert ok.tolist() == [True, True] and torch.equal(X, X.transpose(-2, -1))
    torch.testing.assert_close(X.double(), torch.linalg.inv(Ms.double()),
                               rtol=1e-2 if dtype == torch.float32 else 1e-8, atol=0.0)
