"""The compiled ``ext`` backend (grng.ops._C, torch.ops.grng_ext) against the reference ops."""
from __future__ import annotations

import math

import pytest
import torch

try:
    from grng.ops import ext
except ImportError as _err:  # the package stays usable without the extension; these tests cannot run
    pytest.skip(f"grng.ops._C is not available: {_err}", allow_module_level=True)

from grng.testing import spd_matrix
from grng import ops
from grng.ops import batched
from grng.ops.errors import FactorizationError

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def spd(*shape: int, dtype: torch.dtype = torch.float64, device: str = "cpu") -> torch.Tensor:
    """A well-conditioned SPD matrix (or batch of shape[:-2]), eigenvalues in [1, 5]
    (grng.testing.spd_matrix)."""
    return spd_matrix(shape[-1], 5.0, largest=5.0, batch=shape[:-2], dtype=dtype, device=device)


def transposed_copy(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous tensor equal to ``t`` (2-D: a transposed view of a contiguous copy)."""
    return t.transpose(-2, -1).contiguous().transpose(-2, -1)


def run_both(op, *args):
    """Run ``op`` with ext and reference on clones of the tensor arguments; return both arg lists."""
    def clone(a):
        if isinstance(a, torch.Tensor):
            return a.clone()
        if isinstance(a, list):
            return [t.clone() for t in a]
        return a
    ext_args, ref_args = [clone(a) for a in args], [clone(a) for a in args]
    out_ext = getattr(ops, op)(*ext_args, backend="ext")
    out_ref = getattr(ops, op)(*ref_args, backend="reference")
    return (out_ext, ext_args), (out_ref, ref_args)


# ------------------------------------------------------------------------------ factor_update

FACTOR_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [1, 7, 123])
@pytest.mark.parametrize("mdtype,xdtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                           (torch.float64, torch.float64), (torch.float64, torch.float32)])
@pytest.mark.parametrize("beta", [0.0, 0.95])
def test_factor_update_matches_reference(device, d, mdtype, xdtype, beta):
    X = torch.randn(33, d, device=device).to(xdtype)
    M = spd(d, d, dtype=mdtype, device=device)
    if beta == 0.0:
        M.fill_(float("nan"))  # beta == 0 must never read M
    (_, (Me, _, _, _)), (_, (Mr, _, _, _)) = run_both("factor_update", M, X, 0.05, beta)
    assert torch.isfinite(Me).all()
    torch.testing.assert_close(Me, Mr, **FACTOR_TOL[mdtype])
    assert torch.equal(Me, Me.T)


@pytest.mark.parametrize("device", DEVICES)
def test_factor_update_noncontiguous_and_batched(device):
    M = transposed_copy(spd(300, 300, dtype=torch.float32, device=device))  # d > one GEMM block
    X = torch.randn(300, 40, device=device).T  # (40, 300), non-contiguous
    assert not M.is_contiguous() and not X.is_contiguous()
    (_, (Me, _, _, _)), (_, (Mr, _, _, _)) = run_both("factor_update", M, X, 0.1, 0.9)
    torch.testing.assert_close(Me, Mr, **FACTOR_TOL[torch.float32])
    assert torch.equal(Me, Me.T)
    Mb, Xb = spd(3, 7, 7, dtype=torch.float64, device=device), torch.randn(3, 5, 7, dtype=torch.float64, device=device)
    (_, (Me, _, _, _)), (_, (Mr, _, _, _)) = run_both("factor_update", Mb, Xb, 0.5, 0.5)
    torch.testing.assert_close(Me, Mr, **FACTOR_TOL[torch.float64])
    assert torch.equal(Me, Me.transpose(-2, -1))


# ------------------------------------------------------------------------------ kalman_update

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [1, 7, 123])
@pytest.mark.parametrize("k,q", [(1, 0.0), (5, 0.01)])
@pytest.mark.parametrize("pdtype,hdtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                           (torch.float64, torch.float64)])
def test_kalman_update_matches_reference(device, d, k, q, pdtype, hdtype):
    P = spd(d, d, dtype=pdtype, device=device)
    H = torch.randn(k, d, device=device).to(hdtype)
    (_, (Pe, *_)), (_, (Pr, *_)) = run_both("kalman_update", P, H, 4.0, 0.9, q)
    tol = dict(rtol=1e-4, atol=1e-5) if pdtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(Pe, Pr, **tol)
    assert torch.equal(Pe, Pe.T)


@pytest.mark.parametrize("device", DEVICES)
def test_kalman_update_noncontiguous(device):
    P = transposed_copy(spd(300, 300, dtype=torch.float32, device=device))  # d > one GEMM block
    H = torch.randn(300, 6, device=device).T
    (_, (Pe, *_)), (_, (Pr, *_)) = run_both("kalman_update", P, H, 2.0, 0.8, 0.001)
    torch.testing.assert_close(Pe, Pr, rtol=1e-4, atol=1e-5)
    assert torch.equal(Pe, Pe.T)


@pytest.mark.parametrize("device", DEVICES)
def test_kalman_update_cholesky_failure_raises_and_keeps_P(device):
    P = spd(9, 9, device=device)
    before = P.clone()
    with pytest.raises(FactorizationError, match="innovation Cholesky failed"):
        ops.kalman_update(P, torch.randn(3, 9, dtype=torch.float64, device=device), -100.0, 0.9, 0.0,
                          backend="ext")
    assert torch.equal(P, before)


# ------------------------------------------------------------------------------ fused_update

SHAPES = [(1,), (7,), (123,), (7, 123), (123, 7), (300, 257), (64,), (3, 3, 3, 3)]


def make_group(n: int, dtype: torch.dtype, device: str = "cpu", noncontiguous: bool = False,
               shapes: list[tuple[int, ...]] = SHAPES):
    """n (param, grad, direction, momentum buffer) tensors of mixed shapes (one spans several chunks)."""
    shapes = [shapes[i % len(shapes)] for i in range(n)]

    def draw(shape):
        t = torch.randn(*shape, device=device).to(dtype)
        return transposed_copy(t) if noncontiguous and t.dim() >= 2 else t
    return tuple([draw(s) for s in shapes] for _ in range(4))


FUSED_CASES = [
    # momentum, weight_decay, rho, kl_clip
    (0.0, 0.0, 0.0, None),
    (0.9, 0.01, 0.3, None),
    (0.0, 0.01, 0.3, 1e-3),  # clip active (nu < 1)
    (0.9, 0.01, 0.3, 1e-3),
    (0.9, 0.0, 0.0, 1e9),  # clip inactive (nu = 1)
]


def assert_group_close(got, want, dtype):
    tol = {torch.float32: dict(rtol=2e-6, atol=2e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=2**-6)}.get(dtype, {})
    for a, b in zip(got, want):
        torch.testing.assert_close(a.to(b.dtype), b, **tol)


def fused_expected(params, grads, dirs, bufs, *scalars):
    """(params, buffers) after the reference update; bf16 groups are computed in float32.

    The reference's bf16 ops round their scalars (rho, -lr) and every intermediate to bf16, while
    the fused kernel computes in float32 and rounds only what it stores, so bf16 results are
    checked against the float32 truth on the same inputs, within bf16 rounding (one ulp is 2^-6
    at magnitudes 2 to 4).
    """
    up = (lambda t: t.float()) if params[0].dtype == torch.bfloat16 else (lambda t: t.clone())
    p, b = [up(t) for t in params], [up(t) for t in bufs]
    assert ops.fused_update(p, [up(t) for t in grads], [up(t) for t in dirs], b, *scalars, backend="reference")
    return p, b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("momentum,weight_decay,rho,kl_clip", FUSED_CASES)
def test_fused_update_matches_reference(device, dtype, momentum, weight_decay, rho, kl_clip):
    params, grads, dirs, bufs = make_group(11, dtype, device)
    scalars = (0.1, momentum, weight_decay, rho, kl_clip)
    want_p, want_b = fused_expected(params, grads, dirs, bufs, *scalars)
    assert ops.fused_update(params, grads, dirs, bufs, *scalars, backend="ext") is True
    assert_group_close(params, want_p, dtype)
    assert_group_close(bufs, want_b, dtype)


def test_fused_update_kl_clip_scales_the_step():
    params, grads, dirs, _ = make_group(9, torch.float64)
    lr, rho, kl_clip = 0.1, 0.3, 1e-3
    vg = sum(float(((d + rho * g) * g).sum()) for d, g in zip(dirs, grads))
    nu = min(1.0, math.sqrt(kl_clip / (lr * lr * vg)))
    assert nu < 1.0
    new = [p.clone() for p in params]
    assert ops.fused_update(new, grads, dirs, None, lr, 0.0, 0.0, rho, kl_clip, backend="ext")
    for p0, p1, d, g in zip(params, new, dirs, grads):
        torch.testing.assert_close(p1, p0 - lr * nu * (d + rho * g))


def test_fused_update_kl_clip_tiny_lr_means_no_clip():
    params, grads, dirs, bufs = make_group(4, torch.float64)
    scalars = (1e-200, 0.9, 0.0, 0.3, 1e-3)  # lr^2 <d + rho g, g> underflows to 0: nu = 1
    want_p, want_b = fused_expected(params, grads, dirs, bufs, *scalars)
    assert ops.fused_update(params, grads, dirs, bufs, *scalars, backend="ext")
    assert_group_close(bufs, want_b, torch.float64)
    assert_group_close(params, want_p, torch.float64)


def test_fused_update_momentum_semantics():
    params, grads, dirs, bufs = make_group(5, torch.float64)
    new_p, new_b = [p.clone() for p in params], [b.clone() for b in bufs]
    assert ops.fused_update(new_p, grads, dirs, new_b, 0.5, 0.9, 0.1, 0.0, None, backend="ext")
    for p0, p1, b0, b1, d in zip(params, new_p, bufs, new_b, dirs):
        torch.testing.assert_close(b1, 0.9 * b0 + d)
        torch.testing.assert_close(p1, (1 - 0.5 * 0.1) * p0 - 0.5 * b1)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_update_noncontiguous(device):
    params, grads, dirs, bufs = make_group(12, torch.float32, device, noncontiguous=True)
    assert not params[3].is_contiguous() and not bufs[3].is_contiguous()
    want_p, want_b = fused_expected(params, grads, dirs, bufs, 0.1, 0.9, 0.01, 0.3, 1e-3)
    assert ops.fused_update(params, grads, dirs, bufs, 0.1, 0.9, 0.01, 0.3, 1e-3, backend="ext")
    assert_group_close(params, want_p, torch.float32)
    assert_group_close(bufs, want_b, torch.float32)


def test_fused_update_mixed_dtypes_per_tensor():
    g32, g16 = make_group(4, torch.float32), make_group(4, torch.bfloat16)
    scalars = (0.1, 0.9, 0.0, 0.3, None)  # no KL clip: nu would couple the two halves
    want32, want16 = fused_expected(*g32, *scalars), fused_expected(*g16, *scalars)
    params, bufs = g32[0] + g16[0], g32[3] + g16[3]
    assert ops.fused_update(params, g32[1] + g16[1], g32[2] + g16[2], bufs, *scalars, backend="ext")
    assert_group_close(params[:4] + bufs[:4], want32[0] + want32[1], torch.float32)
    assert_group_close(params[4:] + bufs[4:], want16[0] + want16[1], torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("poison,where", [(float("nan"), "directions"), (float("inf"), "grads")])
def test_fused_update_nonfinite_guard(device, poison, where):
    params, grads, dirs, bufs = make_group(120, torch.float32, device, shapes=SHAPES[:5])
    {"directions": dirs, "grads": grads}[where][57].view(-1)[-1] = poison
    before_p, before_b = [p.clone() for p in params], [b.clone() for b in bufs]
    assert ops.fused_update(params, grads, dirs, bufs, 0.1, 0.9, 0.01, 0.3, 1e-3, backend="ext") is False
    assert all(torch.equal(a, b) for a, b in zip(params, before_p))
    assert all(torch.equal(a, b) for a, b in zip(bufs, before_b))


def test_fused_supports_rejects_what_it_does_not_implement():
    params, grads, dirs, bufs = make_group(3, torch.float32)
    assert ext._fused_supports(params, grads, dirs, bufs, 0.1, 0.9, 0.0, 0.0, None)
    assert not ext._fused_supports(params, grads, dirs, None, 0.1, 0.9, 0.0, 0.0, None)
    half = [p.half() for p in params]
    assert not ext._fused_supports(half, [g.half() for g in grads], [d.half() for d in dirs], None,
                                   0.1, 0.0, 0.0, 0.0, None)
    assert not ext._fused_supports(params, [g.double() for g in grads], dirs, None, 0.1, 0.0, 0.0, 0.0, None)


# ------------------------------------------------------------------------------ masked (sync-free) ops

def _flag(value: bool, device: str) -> torch.Tensor:
    return torch.tensor(value, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("momentum,weight_decay,rho,kl_clip", FUSED_CASES)
def test_fused_update_masked_applies_as_the_fused_update(device, dtype, momentum, weight_decay, rho,
                                                          kl_clip):
    """ok True, finite: the same update as ext's fused_update (bit for bit: one kernel body)."""
    params, grads, dirs, bufs = make_group(11, dtype, device, noncontiguous=True)
    scalars = (0.1, momentum, weight_decay, rho, kl_clip)
    p2, b2 = [p.clone() for p in params], [b.clone() for b in bufs]
    applied = ops.fused_update_masked(params, grads, dirs, bufs, *scalars, _flag(True, device), backend="ext")
    assert applied.dtype == torch.bool and applied.dim() == 0 and applied.device.type == device
    assert bool(applied)
    assert ops.fused_update(p2, grads, dirs, b2, *scalars, backend="ext") is True
    for a, b in zip(params + (bufs if momentum else []), p2 + (b2 if momentum else [])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flag,poison", [(False, None), (True, float("nan")), (True, float("inf")),
                                         (False, float("nan"))])
def test_fused_update_masked_skips_writing_anything(device, flag, poison):
    params, grads, dirs, bufs = make_group(120, torch.float32, device, shapes=SHAPES[:5])
    if poison is not None:
        dirs[57].view(-1)[-1] = poison
    before_p, before_b = [p.clone() for p in params], [b.clone() for b in bufs]
    applied = ops.fused_update_masked(params, grads, dirs, bufs, 0.1, 0.9, 0.01, 0.3, 1e-3,
                                      _flag(flag, device), backend="ext")
    assert not bool(applied)
    assert all(torch.equal(a, b) for a, b in zip(params, before_p))
    assert all(torch.equal(a, b) for a, b in zip(bufs, before_b))


def test_fused_masked_supports_checks_the_flag():
    params, grads, dirs, bufs = make_group(3, torch.float32)
    args = (params, grads, dirs, bufs, 0.1, 0.9, 0.0, 0.0, None)
    assert ext._fused_masked_supports(*args, torch.tensor(True))
    assert not ext._fused_masked_supports(*args, torch.tensor(1.0))  # not a bool flag
    assert not ext._fused_masked_supports(*args, torch.tensor([True, True]))
    assert not ext._fused_masked_supports(params, grads, dirs, None, 0.1, 0.9, 0.0, 0.0, None,
                                          torch.tensor(True))
    with pytest.raises(RuntimeError, match="ok must be a one-element bool tensor"):
        torch.ops.grng_ext.fused_update_masked(*args, torch.tensor(1.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pdtype,hdtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                           (torch.float64, torch.float64)])
def test_kalman_update_masked_updates_or_keeps_P(device, pdtype, hdtype):
    d, k = 37, 5
    P0 = transposed_copy(spd(d, d, dtype=pdtype, device=device))
    H = torch.randn(k, d, device=device).to(hdtype)
    want = P0.clone()
    ops.kalman_update(want, H, 3.0, 0.9, 1e-3, backend="ext")
    P = P0.clone()
    ok = ops.kalman_update_masked(P, H, 3.0, 0.9, 1e-3, backend="ext")
    assert ok.dtype == torch.bool and ok.dim() == 0 and bool(ok)
    assert torch.equal(P, want)
    # an indefinite innovation (negative noise), or a NaN observation: P is kept bit for bit
    H_nan = H.clone()
    H_nan[1, 3] = float("nan")
    for r, h in ((-1e6, H), (3.0, H_nan)):
        P = P0.clone()
        assert not bool(ops.kalman_update_masked(P, h, r, 0.9, 1e-3, backend="ext"))
        assert torch.equal(P, P0)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_masked(device):
    grng_ext = torch.ops.grng_ext
    params, grads, dirs, bufs = make_group(3, torch.float32, device)
    for flag in (True, False):
        torch.library.opcheck(grng_ext.fused_update_masked.default,
                              (params, grads, dirs, bufs, 0.1, 0.9, 0.01, 0.3, 1e-3, _flag(flag, device)))
    torch.library.opcheck(grng_ext.fused_update_masked.default,
                          (params, grads, dirs, [], 0.1, 0.0, 0.0, 0.0, None, _flag(True, device)))
    torch.library.opcheck(grng_ext.kalman_update_masked.default,
                          (spd(9, 9, dtype=torch.float32, device=device), torch.randn(3, 9, device=device), 2.0,
                           0.9, 0.01))


def _profiled_calls(opt: torch.optim.Optimizer, model: torch.nn.Module, steps: int, op: str) -> list[int]:
    """Per step, how many times the profiler saw ``op`` run (steps after a first, host-path one)."""
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(0)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(torch.randn(16, 6, generator=gen)), torch.randint(0, 3, (16,), generator=gen))
        loss.backward()
        return loss

    opt.step(closure)  # the first step creates the statistics (host path)
    counts = []
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            opt.step(closure)
        counts.append(sum(e.count for e in prof.key_averages() if e.key == op))
    return counts


def _two_layer_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))


def test_sync_free_step_runs_the_extensions_masked_update():
    """sync_free=True, backend="ext" on the CPU: the step's update is ext's masked op, once a step."""
    import grng
    model = _two_layer_model()
    opt = grng.KFAC(model, lr=0.05, inverse="newton", inverse_every=2, sync_free=True, backend="ext")
    assert _profiled_calls(opt, model, 4, "grng_ext::fused_update_masked") == [1, 1, 1, 1]


def test_sync_free_fold_runs_the_extensions_masked_fold():
    """sync_free=True, backend="ext": each fold step folds every dense factor (A and G of the two
    layers, four sizes: no batching) through ext's masked fold, and none through the plain one."""
    import grng
    model = _two_layer_model()
    opt = grng.KFAC(model, lr=0.05, inverse="cholesky", inverse_every=2, factor_every=2,
                    sync_free=True, backend="ext")
    assert _profiled_calls(opt, model, 4, "grng_ext::factor_update_masked") == [0, 4, 0, 4]
    assert _profiled_calls(opt, model, 4, "grng_ext::factor_update") == [0, 0, 0, 0]


def test_sync_free_rkalman_runs_the_extensions_masked_kalman_update():
    """R-Kalman's fold steps run ext's masked Kalman update, once per covariance (P_A and P_G of
    each of the two dense layers), and no other step does."""
    import grng
    model = _two_layer_model()
    opt = grng.RKalman(model, lr=0.05, kalman_rank=4, factor_every=2, sync_free=True, backend="ext")
    counts = _profiled_calls(opt, model, 4, "grng_ext::kalman_update_masked")
    assert counts == [0, 4, 0, 4]  # factor_every=2: the folds are steps 0, 2, 4 (0 is the host one)


# ------------------------------------------------------------------------------ batched_spd_inverse

@pytest.mark.parametrize("d", [1, 7, 123])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["cholesky", "newton"])
def test_batched_spd_inverse_matches_reference(d, dtype, method):
    Ms = spd(3, d, d, dtype=dtype)
    inv_e, ok_e = batched.batched_spd_inverse(Ms, method, backend="ext")
    inv_r, ok_r = batched.batched_spd_inverse(Ms, method, backend="reference")
    assert ok_e.all() and ok_r.all()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(inv_e, inv_r, **tol)
    assert torch.equal(inv_e, inv_e.transpose(-2, -1))
    eye = torch.eye(d, dtype=torch.float64)
    residual = (Ms.double() @ inv_e.double() - eye).norm(dim=(-2, -1)) / math.sqrt(d)
    assert residual.max() < (1e-3 if dtype == torch.float32 else 1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_spd_inverse_flags_failures(device):
    Ms = spd(5, 7, 7, device=device)
    Ms[2] = -Ms[2]  # negative definite: Cholesky fails
    Ms = transposed_copy(Ms)
    assert not Ms.is_contiguous()
    for backend in ("ext", "reference"):
        inv, ok = batched.batched_spd_inverse(Ms, "cholesky", backend=backend)
        assert ok.tolist() == [True, True, False, True, True]
        assert torch.equal(inv[2], torch.zeros_like(inv[2]))
        torch.testing.assert_close(inv[ok], torch.linalg.inv(Ms[ok]))


def test_batched_spd_inverse_newton_reports_non_convergence():
    Ms = spd(3, 7, 7)
    inv, ok = batched.batched_spd_inverse(Ms, "newton", max_iter=2, backend="ext")
    assert not ok.any() and torch.equal(inv, torch.zeros_like(inv))


def test_batched_spd_inverse_validates_arguments():
    with pytest.raises(ValueError, match="method"):
        batched.batched_spd_inverse(spd(2, 3, 3), "lu")
    with pytest.raises(ValueError, match="B, d, d"):
        batched.batched_spd_inverse(spd(3, 3), "cholesky")
    assert not ext._batched_supports(spd(2, 129, 129), "cholesky", 1e-3, 60)


# ------------------------------------------------------------------------------ registration

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    grng_ext = torch.ops.grng_ext
    params, grads, dirs, bufs = make_group(3, torch.float32, device)
    torch.library.opcheck(grng_ext.fused_update.default, (params, grads, dirs, bufs, 0.1, 0.9, 0.01, 0.3, 1e-3))
    torch.library.opcheck(grng_ext.fused_update.default, (params, grads, dirs, [], 0.1, 0.0, 0.0, 0.0, None))
    torch.library.opcheck(grng_ext.factor_update.default,
                          (spd(9, 9, dtype=torch.float32, device=device), torch.randn(4, 9, device=device), 0.1, 0.9))
    torch.library.opcheck(grng_ext.kalman_update.default,
                          (spd(9, 9, dtype=torch.float32, device=device), torch.randn(3, 9, device=device), 2.0, 0.9,
                           0.01))
    for method in ("cholesky", "newton") if device == "cpu" else ("cholesky",):
        torch.library.opcheck(grng_ext.batched_spd_inverse.default,
                              (spd(3, 5, 5, dtype=torch.float32, device=device), method, 1e-3, 60))


def test_auto_runs_ext_masked_ops_on_cpu():
    """AUTO_ORDER's measured CPU entries (bench/results/masked_cpu.csv) pick ext's masked ops."""
    from grng.ops import dispatch
    params, grads, dirs, bufs = make_group(3, torch.float32)
    args = (params, grads, dirs, bufs, 0.1, 0.9, 0.0, 0.0, None, torch.tensor(True))
    assert dispatch.resolve("fused_update_masked", "auto", *args) is ext.fused_update_masked
    P, H = spd(9, 9, dtype=torch.float32), torch.randn(3, 9)
    assert dispatch.resolve("kalman_update_masked", "auto", P, H, 2.0, 0.9, 0.01) is ext.kalman_update_masked
    X, ok = torch.randn(4, 9), torch.tensor(True)
    assert dispatch.resolve("factor_update_masked", "auto", P, X, 0.1, 0.9, ok) is ext.factor_update_masked


def test_kernels_are_listed_from_the_registry():
    """ext._KERNELS names the registered ops the build defines (no hand-written list)."""
    from grng.ops import dispatch, registry
    assert {op for op, _ in ext._KERNELS} <= set(registry.SPECS)
    assert {op for op, device in ext._KERNELS if device == "cpu"} == {
        op for op in registry.SPECS if dispatch.implementation(op, "ext") is not None}


def test_dispatch_reports_ext_live():
    import grng
    assert grng.backends()["ext"] == "live"
