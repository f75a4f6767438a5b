"""Every op of grng, declared once: an :class:`~grng.ops.registry.OpSpec` per op.

Inputs are drawn on the CPU in float64 from a seeded generator (reproducible across devices),
never zeros, then cast to the case dtype and moved to the device. Sizes: ``n`` is the matrix
side (factor_update: M n x n, X n x n; eigen_apply: V, Q_G, Q_A n x n; newton_schulz_step:
M, X n x n; kalman_update: P n x n, H k x n with k = min(64, n); fused_update: one n x n and
one n-vector parameter; batched_spd_inverse: 3 matrices n x n; the sync-free ("masked") ops as
their host-branching ops, with "skip" variants where a device flag says to write nothing).
Layout variants: "strided" passes in-place targets as column slices of a wider buffer and
read-only matrices in column-major order. The FLOP counts are the useful work (the same for
every backend, so TFLOP/s compare); byte counts are the minimal traffic: each input read once,
each output written once (an in-place target read and written).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from grng.ops import masked, reference
from grng.ops.registry import OpSpec, define

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
LOW_AND_DOUBLE = (F32, BF16, F64)
FACTOR_DTYPES = (F32, F64)
BATCH = 3  # matrices per batched_spd_inverse case


def kalman_rank(n: int) -> int:
    """Rows k of the Kalman observation H at size n."""
    return min(64, n)


def wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype of factors / eigenvectors / P in a case of ``dtype`` (float64 stays float64)."""
    return F64 if dtype == F64 else F32


def size_of(dtype: torch.dtype) -> int:
    """Bytes per element."""
    return torch.empty((), dtype=dtype).element_size()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) % (2 ** 63))


def _randn(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, dtype=F64, generator=gen)


def _spd(gen: torch.Generator, n: int, batch: tuple[int, ...] = ()) -> Tensor:
    """A A^T / n + I for Gaussian A: SPD, eigenvalues in about [1, 5], exactly symmetric."""
    A = _randn(gen, *batch, n, n)
    return reference.symmetrize_from_upper(A @ A.transpose(-2, -1) / n + torch.eye(n, dtype=F64))


def _orthogonal(gen: torch.Generator, n: int) -> Tensor:
    Q, R = torch.linalg.qr(_randn(gen, n, n))
    return Q * torch.sign(torch.diagonal(R))


def place(t: Tensor, dtype: torch.dtype, device: torch.device, layout: str = "contiguous") -> Tensor:
    """``t`` cast to ``dtype`` on ``device``: contiguous, "slice" (a column slice of a wider
    buffer: non-contiguous rows) or "colmajor" (transposed storage of the last two dims)."""
    t = t.to(device=device, dtype=dtype)
    if layout == "contiguous" or t.dim() < 2:
        return t.contiguous()
    if layout == "slice":
        buf = torch.full((*t.shape[:-1], t.shape[-1] + 3), math.nan, dtype=dtype, device=device)
        buf[..., 1:t.shape[-1] + 1] = t
        return buf[..., 1:t.shape[-1] + 1]
    if layout == "colmajor":
        return t.transpose(-2, -1).contiguous().transpose(-2, -1)
    raise ValueError(f"layout must be contiguous, slice or colmajor, got {layout!r}")


def _layouts(variant: str) -> tuple[str, str]:
    """(layout of in-place targets, layout of read-only matrices) of a variant."""
    return ("slice", "colmajor") if variant == "strided" else ("contiguous", "contiguous")


# ----------------------------------------------------------------------------- factor_update

def _factor_inputs(n: int, dtype: torch.dtype, device: torch.device, seed: int, variant: str) -> tuple:
    g = _gen(seed)
    batch = (2,) if variant == "batched" else ()
    M0 = reference.symmetrize_from_upper(_randn(g, *batch, n, n))
    X0 = _randn(g, *batch, n, n)
    target, read = _layouts(variant)
    M = place(M0, wide(dtype), device, target)
    beta = 0.9
    if variant == "beta0":
        M.fill_(math.nan)  # beta == 0 must never read M
        beta = 0.0
    return M, place(X0, dtype, device, read), 0.37, beta


define(OpSpec(
    name="factor_update",
    signature="factor_update(M, X, alpha, beta) -> M",
    math="M <- beta M + alpha X^T X in place (exactly symmetric; beta == 0 never reads M)",
    reference=reference.factor_update,
    make_inputs=_factor_inputs,
    outputs=lambda args, out: (args[0],),
    dtypes=LOW_AND_DOUBLE,
    dtype_role="X (M is float32, float64 for float64)",
    shape=lambda n: f"M {n}x{n}, X {n}x{n}",
    reduction=lambda n: n,
    flops=lambda n: n * n * (n + 1.0),  # m d (d + 1): one triangle of X^T X, m = d = n
    bytes=lambda n, dt: 2.0 * n * n * size_of(wide(dt)) + n * n * size_of(dt),
    variants=("contiguous", "strided", "beta0", "batched"),
    symmetric=(0,),
    returns_arg=0,
    output_names=("M",),
))


# ----------------------------------------------------------------------------- eigh

def _eigh_inputs(n: int, dtype: torch.dtype, device: torch.device, seed: int, variant: str) -> tuple:
    g = _gen(seed)
    B = _randn(g, *((2,) if variant == "batched" else ()), n, n)
    return (place(0.5 * (B + B.transpose(-2, -1)), dtype, device,
                  "slice" if variant == "strided" else "contiguous"),)


def _eigh_outputs(args: tuple, out: tuple[Tensor, Tensor]) -> tuple[Tensor, ...]:
    # eigenvectors are unique only up to sign: compare the eigenvalues, Q diag(l) Q^T and Q^T Q
    evals, Q = out
    return evals, (Q * evals[..., None, :]) @ Q.transpose(-2, -1), Q.transpose(-2, -1) @ Q


define(OpSpec(
    name="eigh",
    signature="eigh(M) -> (l, Q)",
    math="M = Q diag(l) Q^T (a failed solve is retried in float64)",
    reference=reference.eigh,
    make_inputs=_eigh_inputs,
    outputs=_eigh_outputs,
    dtypes=FACTOR_DTYPES,
    dtype_role="M",
    shape=lambda n: f"M {n}x{n}",
    reduction=lambda n: n,
    flops=lambda n: 9.0 * n ** 3,  # symmetric QR with eigenvectors (Golub & Van Loan 8.3)
    bytes=lambda n, dt: (2.0 * n * n + n) * size_of(dt),
    variants=("contiguous", "strided", "batched"),
    output_names=("l", "Q diag(l) Q^T", "Q^T Q"),
))


# ----------------------------------------------------------------------------- eigen_apply

def _eigen_apply_inputs(n: int, dtype: torch.dtype, device: torch.device, seed: int,
                        variant: str) -> tuple:
    g = _gen(seed)
    if variant == "batched":  # two blocks of the same shape in one call
        parts = [_eigen_apply_inputs(n, dtype, device, seed + 1 + b, "contiguous") for b in range(2)]
        return (*(torch.stack([p[i] for p in parts]) for i in range(5)), parts[0][5])
    V = _randn(g, n, n)
    QG, QA = _orthogonal(g, n), _orthogonal(g, n)
    lG = torch.rand(n, dtype=F64, generator=g) * 2.0 - 0.2  # a few negatives: clamped at 0
    lA = torch.rand(n, dtype=F64, generator=g) * 2.0 - 0.2
    w = wide(dtype)
    if variant == "strided":
        return (place(V, dtype, device, "slice"), place(QG, w, device, "colmajor"), place(lG, w, device),
                place(QA, w, device, "slice"), place(lA, w, device), 1e-2)
    QA_arg = None if variant == "diagonal_a" else place(QA, w, device)
    return (place(V, dtype, device), place(QG, w, device), place(lG, w, device), QA_arg,
            place(lA, w, device), 1e-2)


define(OpSpec(
    name="eigen_apply",
    signature="eigen_apply(V, QG, lG, QA, lA, damping) -> out",
    math="Q_G [(Q_G^T V Q_A) / (l_G l_A^T + damping)] Q_A^T = (A (x) G + damping I)^-1 V",
    reference=reference.eigen_apply,
    make_inputs=_eigen_apply_inputs,
    outputs=lambda args, out: (out,),
    dtypes=LOW_AND_DOUBLE,
    dtype_role="V (Q_G, Q_A, l_G, l_A are float32, float64 for float64)",
    shape=lambda n: f"V {n}x{n}, Q_G {n}x{n}, Q_A {n}x{n}",
    reduction=lambda n: 2 * n,
    flops=lambda n: 4.0 * n * n * (2 * n) + n * n,  # 4 d_G d_A (d_G + d_A) + d_G d_A
    bytes=lambda n, dt: n * n * size_of(dt) + (3.0 * n * n + 2 * n) * size_of(wide(dt)),
    variants=("contiguous", "strided", "diagonal_a", "batched"),
    output_names=("out",),
))


# ----------------------------------------------------------------------------- newton_schulz_step

def _newton_inputs(n: int, dtype: torch.dtype, device: torch.device, seed: int, variant: str) -> tuple:
    g = _gen(seed)
    M = _spd(g, n)
    X = torch.linalg.inv(M) + 0.05 * _randn(g, n, n) / math.sqrt(n)  # near, not at, M^-1
    target, read = _layouts(variant)
    return place(M, dtype, device, target), place(X, dtype, device, read)


define(OpSpec(
    name="newton_schulz_step",
    signature="newton_schulz_step(M, X) -> (X_next, residual)",
    math="X_next = X (2I - M X), residual = ||I - M X||_F of the input X",
    reference=reference.newton_schulz_step,
    make_inputs=_newton_inputs,
    outputs=lambda args, out: (out[0], out[1]),
    dtypes=LOW_AND_DOUBLE,
    dtype_role="M and X",
    shape=lambda n: f"M {n}x{n}, X {n}x{n}",
    reduction=lambda n: 2 * n,
    flops=lambda n: 4.0 * n ** 3 + 2.0 * n * n,  # two GEMMs, the 2I - and the residual
    bytes=lambda n, dt: 3.0 * n * n * size_of(dt),
    output_names=("X_next", "residual"),
))


# ----------------------------------------------------------------------------- cholesky_inverse

def _cholesky_inputs(n: int, dtype: torch.dtype, device: torch.device, seed: int, variant: str) -> tuple:
    return (place(_spd(_gen(seed), n), dtype, device, "slice" if variant == "strided" else "contiguous"),)


define(OpSpec(
    name="cholesky_inverse",
    signature="cholesky_inverse(M) -> M^-1",
    math="M^-1 for SPD M through M = L L^T (retried in float64)",
    reference=reference.cholesky_inverse,
    make_inputs=_cholesky_inputs,
    outputs=lambda args, out: (out,),
    dtypes=FACTOR_DTYPES,
    dtype_role="M",
    shape=lambda n: f"M {n}x{n}",
    reduction=lambda n: n,
    flops=lambda n: float(n) ** 3,  # n^3 / 3 (Cholesky) + 2 n^3 / 3 (inverse from the factor)
    bytes=lambda n, dt: 2.0 * n * n * size_of(dt),
    symmetric=(0,),
    output_names=("M^-1",),
))


# ----------------------------------------------------------------------------- kalman_update

def _kalman_inputs(n: int, dtype: torch.dtype, device: torch.device, seed: int, variant: str) -> tuple:
    g = _gen(seed)
    P = reference.symmetrize_from_upper(torch.linalg.inv(_spd(g, n)))
    H = _randn(g, kalman_rank(n), n)
    target, read = _layouts(variant)
    # "steady": beta = 1, q = 0, a large r: repeated calls (a benchmark) keep P bounded and SPD
    r, beta, q = (1e3, 1.0, 0.0) if variant == "steady" else (7.0, 0.95, 1e-3)
    return place(P, wide(dtype), device, target), place(H, dtype, device, read), r, beta, q


define(OpSpec(
    name="kalman_update",
    signature="kalman_update(P, H, r, beta, q) -> P",
    math="P <- P/beta + qI - W W^T, W = P- H^T L^-T, L L^T = r I + H P- H^T (in place)",
    reference=reference.kalman_update,
    make_inputs=_kalman_inputs,
    outputs=lambda args, out: (args[0],),
    dtypes=LOW_AND_DOUBLE,
    dtype_role="H (P is float32, float64 for float64)",
    shape=lambda n: f"P {n}x{n}, H {kalman_rank(n)}x{n}",
    reduction=lambda n: n + kalman_rank(n),
    # P H^T, H U and the triangular solve, one triangle of W W^T
    flops=lambda n: (2.0 * n * n * kalman_rank(n) + 3.0 * kalman_rank(n) ** 2 * n
                     + kalman_rank(n) * n * (n + 1.0)),
    bytes=lambda n, dt: 2.0 * n * n * size_of(wide(dt)) + kalman_rank(n) * n * size_of(dt),
    variants=("contiguous", "strided", "steady"),
    bench_variant="steady",
    symmetric=(0,),
    returns_arg=0,
    output_names=("P",),
))


# ----------------------------------------------------------------------------- fused_update

def _fused_shapes(n: int) -> list[tuple[int, ...]]:
    return [(n, n), (n,)]


def _fused_inputs(n: int, dtype: torch.dtype, device: torch.device, seed: int, variant: str) -> tuple:
    g = _gen(seed)
    layout = "colmajor" if variant == "strided" else "contiguous"
    groups = [[place(_randn(g, *s), dtype, device, layout) for s in _fused_shapes(n)] for _ in range(4)]
    params, grads, dirs, bufs = groups
    if variant == "plain":  # no momentum, no decay, no clip
        return params, grads, dirs, None, 0.1, 0.0, 0.0, 0.3, None
    return params, grads, dirs, bufs, 0.1, 0.9, 0.01, 0.3, 1e-3  # the clip is active (nu < 1)


def _fused_outputs(args: tuple, out: bool) -> tuple[Tensor, ...]:
    params, bufs = args[0], args[3]
    flat_params = torch.cat([p.reshape(-1) for p in params])
    flat_bufs = flat_params[:0] if bufs is None else torch.cat([b.reshape(-1) for b in bufs])
    return flat_params, flat_bufs, torch.tensor([float(out)], dtype=F64)


def _fused_numel(n: int) -> int:
    return sum(math.prod(s) for s in _fused_shapes(n))


define(OpSpec(
    name="fused_update",
    signature=("fused_update(params, grads, directions, momentum_buffers, lr, momentum, "
               "weight_decay, rho, kl_clip) -> ok"),
    math="theta <- (1 - lr wd) theta - lr buf, buf = m buf + nu (d + rho g); False = skipped (non-finite)",
    reference=reference.fused_update,
    make_inputs=_fused_inputs,
    outputs=_fused_outputs,
    dtypes=LOW_AND_DOUBLE,
    dtype_role="every tensor",
    shape=lambda n: f"params {n}x{n} + {n}",
    reduction=lambda n: 1,  # elementwise; the clip's <d + rho g, g> is summed in float64
    flops=lambda n: 10.0 * _fused_numel(n),  # d + rho g, the clip's dot, buf, decay, step
    bytes=lambda n, dt: 6.0 * _fused_numel(n) * size_of(dt),  # theta, buf read+written; g, d read
    variants=("contiguous", "strided", "plain"),
    output_names=("params", "momentum_buffers", "ok"),
))


# ----------------------------------------------------------------------------- batched_spd_inverse

def _batched_inputs(n: int, dtype: torch.dtype, device: torch.device, seed: int, variant: str) -> tuple:
    layout = "colmajor" if variant == "strided" else "contiguous"
    Ms = place(_spd(_gen(seed), n, (BATCH,)), dtype, device, layout)
    method = "newton" if variant == "newton" else "cholesky"
    return Ms, method, reference.default_newton_tol(dtype), 60


define(OpSpec(
    name="batched_spd_inverse",
    signature="batched_spd_inverse(Ms, method, tol, max_iter) -> (inverses, ok)",
    math="(M_b^-1, ok_b) for SPD M_b (B x d x d): Cholesky, or Newton-Schulz to an RMS residual <= tol",
    reference=reference.batched_spd_inverse,
    make_inputs=_batched_inputs,
    outputs=lambda args, out: (out[0], out[1].to(F64)),
    dtypes=FACTOR_DTYPES,
    dtype_role="Ms",
    shape=lambda n: f"Ms {BATCH}x{n}x{n}",
    reduction=lambda n: n,
    flops=lambda n: BATCH * float(n) ** 3,  # per matrix n^3 / 3 (Cholesky) + 2 n^3 / 3 (inverse)
    bytes=lambda n, dt: 2.0 * BATCH * n * n * size_of(dt),
    variants=("contiguous", "strided", "newton"),
    symmetric=(0,),
    output_names=("inverses", "ok"),
))


# ----------------------------------------------------------------------------- masked (sync-free) ops
# The sync-free step's variants of the ops above (:mod:`grng.ops.masked`): every decision is a
# device flag, and where it is False nothing is written. Each spec has "skip" variants (the flag
# False, or a non-finite / indefinite input) whose check is that the outputs equal the
# reference's, which leaves its in-place targets untouched there.

def _masked_fused_inputs(n: int, dtype: torch.dtype, device: torch.device, seed: int,
                         variant: str) -> tuple:
    base = "plain" if variant == "plain" else "strided" if variant == "strided" else "contiguous"
    params, grads, dirs, bufs, *coefficients = _fused_inputs(n, dtype, device, seed, base)
    if variant == "skip_nonfinite":  # one non-finite direction element: d + rho g is not finite
        dirs[-1][n // 2] = math.inf
    ok = torch.tensor(variant != "skip", device=device)
    return (params, grads, dirs, bufs, *coefficients, ok)


def _masked_fused_outputs(args: tuple, out: Tensor) -> tuple[Tensor, ...]:
    params, bufs = args[0], args[3]
    flat_params = torch.cat([p.reshape(-1) for p in params])
    flat_bufs = flat_params[:0] if bufs is None else torch.cat([b.reshape(-1) for b in bufs])
    return flat_params, flat_bufs, out.reshape(1).to(device="cpu", dtype=F64)


define(OpSpec(
    name="fused_update_masked",
    signature=("fused_update_masked(params, grads, directions, momentum_buffers, lr, momentum, "
               "weight_decay, rho, kl_clip, ok) -> ok"),
    math=("where ok & finite(d + rho g): theta <- (1 - lr wd) theta - lr buf, "
          "buf = m buf + nu (d + rho g), nu on the device; returns that flag"),
    reference=masked.fused_update_masked,
    make_inputs=_masked_fused_inputs,
    outputs=_masked_fused_outputs,
    dtypes=LOW_AND_DOUBLE,
    dtype_role="every tensor (ok: a 0-dim bool)",
    shape=lambda n: f"params {n}x{n} + {n}",
    reduction=lambda n: 1,  # elementwise; the clip's <d + rho g, g> is summed in float64
    flops=lambda n: 10.0 * _fused_numel(n),
    bytes=lambda n, dt: 6.0 * _fused_numel(n) * size_of(dt),
    variants=("contiguous", "strided", "plain", "skip", "skip_nonfinite"),
    output_names=("params", "momentum_buffers", "ok"),
))


def _masked_factor_inputs(n: int, dtype: torch.dtype, device: torch.device, seed: int,
                          variant: str) -> tuple:
    base = variant if variant in ("strided", "batched") else "contiguous"
    M, X, alpha, beta = _factor_inputs(n, dtype, device, seed, base)
    if variant == "skip_nonfinite":  # non-finite rows under a False flag: M must stay as it was
        X[..., n // 2, 0] = math.nan
    ok = torch.tensor(not variant.startswith("skip"), device=device)
    return M, X, alpha, beta, ok


define(OpSpec(
    name="factor_update_masked",
    signature="factor_update_masked(M, X, alpha, beta, ok) -> M",
    math="M <- beta M + alpha X^T X in place where ok (exactly symmetric), M untouched otherwise",
    reference=masked.factor_update_masked,
    make_inputs=_masked_factor_inputs,
    outputs=lambda args, out: (args[0],),
    dtypes=LOW_AND_DOUBLE,
    dtype_role="X (M is float32, float64 for float64; ok: a 0-dim bool)",
    shape=lambda n: f"M {n}x{n}, X {n}x{n}",
    reduction=lambda n: n,
    flops=lambda n: n * n * (n + 1.0),
    bytes=lambda n, dt: 2.0 * n * n * size_of(wide(dt)) + n * n * size_of(dt),
    variants=("contiguous", "strided", "batched", "skip", "skip_nonfinite"),
    symmetric=(0,),
    returns_arg=0,
    output_names=("M",),
))


#: fixed Newton-Schulz steps of a newton_schulz_masked case (a warm start converges in ~5, the
#: cold scaled start from 2I in ~12 at these well-conditioned inputs)
NEWTON_MASKED_ITERATIONS = 20


def _masked_newton_inputs(n: int, dtype: torch.dtype, device: torch.device, seed: int,
                          variant: str) -> tuple:
    g = _gen(seed)
    batch = (2,) if variant == "batched" else ()
    M = _spd(g, n, batch)
    if variant == "cold":  # ||I - M X0||_F >= 1 (M's eigenvalues are >= 1): the scaled start
        X0 = 2.0 * torch.eye(n, dtype=F64).expand(*batch, n, n)
    else:  # near, not at, M^-1
        X0 = torch.linalg.inv(M) + 0.05 * _randn(g, *batch, n, n) / math.sqrt(n)
        X0 = 0.5 * (X0 + X0.transpose(-2, -1))
    if variant == "skip":  # a non-finite factor: ok is False, the caller keeps its old inverse
        M[..., n // 2, n // 2] = math.nan
    target, read = _layouts(variant)
    return (place(M, dtype, device, read), place(X0, dtype, device, target),
            NEWTON_MASKED_ITERATIONS, reference.default_newton_tol(dtype))


def _where_ok(args: tuple, out: tuple[Tensor, Tensor]) -> tuple[Tensor, ...]:
    """(X where ok else 0, ok): X is unusable, and not compared, where the flag is False."""
    X, ok = out
    return torch.where(ok[..., None, None], X, torch.zeros((), dtype=X.dtype, device=X.device)), ok.to(F64)


define(OpSpec(
    name="newton_schulz_masked",
    signature="newton_schulz_masked(M, X0, iterations, tol) -> (X, ok)",
    math=("X <- X (2I - M X) a fixed number of times from X0 (or X0 / ||M X0||_F when "
          "||I - M X0||_F >= 1); ok: the last RMS residual <= tol and X finite"),
    reference=masked.newton_schulz_fixed,
    make_inputs=_masked_newton_inputs,
    outputs=_where_ok,
    dtypes=FACTOR_DTYPES,
    dtype_role="M and X0",
    shape=lambda n: f"M {n}x{n}, X0 {n}x{n}",
    reduction=lambda n: 2 * n,
    flops=lambda n: 2.0 * n ** 3 + NEWTON_MASKED_ITERATIONS * (4.0 * n ** 3 + 2.0 * n * n),
    bytes=lambda n, dt: 3.0 * n * n * size_of(dt),
    variants=("contiguous", "strided", "cold", "batched", "skip"),
    symmetric=(0,),
    output_names=("X", "ok"),
))


def _masked_cholesky_inputs(n: int, dtype: torch.dtype, device: torch.device, seed: int,
                            variant: str) -> tuple:
    M = _spd(_gen(seed), n, (2,) if variant == "batched" else ())
    if variant == "skip":  # indefinite (a negative leading pivot): ok is False
        M[..., 0, 0] = -1.0
    return (place(M, dtype, device, "slice" if variant == "strided" else "contiguous"),)


define(OpSpec(
    name="cholesky_inverse_masked",
    signature="cholesky_inverse_masked(M) -> (X, ok)",
    math="(M^-1, ok) for SPD M through M = L L^T; ok False (a non-positive pivot): X unusable",
    reference=masked.cholesky_inverse_masked,
    make_inputs=_masked_cholesky_inputs,
    outputs=_where_ok,
    dtypes=FACTOR_DTYPES,
    dtype_role="M",
    shape=lambda n: f"M {n}x{n}",
    reduction=lambda n: n,
    flops=lambda n: float(n) ** 3,
    bytes=lambda n, dt: 2.0 * n * n * size_of(dt),
    variants=("contiguous", "strided", "batched", "skip"),
    symmetric=(0,),
    output_names=("X", "ok"),
))


def _masked_kalman_inputs(n: int, dtype: torch.dtype, device: torch.device, seed: int,
                          variant: str) -> tuple:
    base = variant if variant in ("strided", "steady") else "contiguous"
    P, H, r, beta, q = _kalman_inputs(n, dtype, device, seed, base)
    if variant == "skip":  # a negative observation noise: the innovation is indefinite
        r = -1e6
    if variant == "skip_nonfinite":
        H[0, n // 2] = math.nan
    return P, H, r, beta, q


define(OpSpec(
    name="kalman_update_masked",
    signature="kalman_update_masked(P, H, r, beta, q) -> ok",
    math=("P <- P/beta + qI - W W^T, W = P- H^T L^-T, L L^T = r I + H P- H^T, in place where "
          "the innovation Cholesky succeeds and P+ is finite (P kept otherwise); returns that flag"),
    reference=masked.kalman_update_masked,
    make_inputs=_masked_kalman_inputs,
    outputs=lambda args, out: (args[0], out.reshape(1).to(device="cpu", dtype=F64)),
    dtypes=LOW_AND_DOUBLE,
    dtype_role="H (P is float32, float64 for float64)",
    shape=lambda n: f"P {n}x{n}, H {kalman_rank(n)}x{n}",
    reduction=lambda n: n + kalman_rank(n),
    flops=lambda n: (2.0 * n * n * kalman_rank(n) + 3.0 * kalman_rank(n) ** 2 * n
                     + kalman_rank(n) * n * (n + 1.0)),
    bytes=lambda n, dt: 2.0 * n * n * size_of(wide(dt)) + kalman_rank(n) * n * size_of(dt),
    variants=("contiguous", "strided", "steady", "skip", "skip_nonfinite"),
    bench_variant="steady",
    symmetric=(0,),
    output_names=("P", "ok"),
))


#: Adam's decays and eps of an adam_moments_masked case, and the step count t of each block
ADAM_CASE = (0.9, 0.999, 1e-8)
ADAM_STEPS = (3.0, 1.0, 40.0)


def _masked_adam_inputs(n: int, dtype: torch.dtype, device: torch.device, seed: int,
                        variant: str) -> tuple:
    g = _gen(seed)
    batch = (len(ADAM_STEPS),) if variant == "batched" else ()
    shape = (*batch, n, n + 1)  # a weight with its bias column: odd widths
    Vb, m = _randn(g, *shape), 0.1 * _randn(g, *shape)
    v = 0.01 * _randn(g, *shape) ** 2 + 1e-4  # positive, as an EMA of squares
    if variant == "skip_nonfinite":  # a non-finite gradient under a False flag: m, v stay
        Vb[..., n // 2, 0] = math.nan
    beta1, beta2, eps = ADAM_CASE
    t = torch.tensor(ADAM_STEPS if batch else ADAM_STEPS[0], dtype=F64)
    bias1, bias2 = 1.0 - beta1 ** t, (1.0 - beta2 ** t).sqrt()
    target, read = _layouts(variant)
    ok = torch.tensor(not variant.startswith("skip"), device=device)
    return (place(Vb, dtype, device, read), place(m, dtype, device, target),
            place(v, dtype, device, target), beta1, beta2, place(bias1, wide(dtype), device),
            place(bias2, wide(dtype), device), eps, ok)


define(OpSpec(
    name="adam_moments_masked",
    signature="adam_moments_masked(Vb, m, v, beta1, beta2, bias1, bias2, eps, ok) -> N",
    math=("where ok: m <- b1 m + (1 - b1) Vb, v <- b2 v + (1 - b2) Vb^2 in place (untouched "
          "otherwise); N = (m / bias1) / (sqrt(v) / bias2 + eps)"),
    reference=masked.adam_moments_masked,
    make_inputs=_masked_adam_inputs,
    outputs=lambda args, out: (args[1], args[2], out),
    dtypes=LOW_AND_DOUBLE,
    dtype_role="Vb, m and v (bias1, bias2: float32, float64 for float64; ok: a 0-dim bool)",
    shape=lambda n: f"Vb, m, v {n}x{n + 1}",
    reduction=lambda n: 1,  # elementwise
    flops=lambda n: 12.0 * n * (n + 1),
    bytes=lambda n, dt: 6.0 * n * (n + 1) * size_of(dt),
    variants=("contiguous", "strided", "batched", "skip", "skip_nonfinite"),
    output_names=("m", "v", "N"),
))
