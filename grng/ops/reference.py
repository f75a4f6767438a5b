"""Reference implementations of grng's ops: plain, readable PyTorch, float64-capable.

These are the truth every fast backend (Triton, the C++/CUDA extension) is tested against.
The math is docs/algorithms.md sections 1, 2, 4, 5 and 6; each function states its formula in
its first docstring line. Every backend implements exactly these signatures.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from grng.ops.errors import FactorizationError


def symmetrize_from_upper(S: Tensor) -> Tensor:
    """Return triu(S) + triu(S, 1)^T: a matrix that is symmetric bit for bit."""
    upper = torch.triu(S)
    return upper + torch.triu(S, 1).transpose(-2, -1)


def factor_update(M: Tensor, X: Tensor, alpha: float, beta: float) -> Tensor:
    """M <- beta * M + alpha * X^T X, in place; ``beta == 0`` never reads M.

    X (rows x d) may be any floating dtype; the product is accumulated in M's dtype. Only the
    upper triangle of X^T X is kept and mirrored, so M stays exactly symmetric. Batched over
    leading dimensions (M: (..., d, d), X: (..., m, d)).
    """
    Xc = X.to(M.dtype)
    S = symmetrize_from_upper(Xc.transpose(-2, -1) @ Xc)
    if beta == 0.0:
        return M.copy_(S.mul_(alpha))
    return M.mul_(beta).add_(S, alpha=alpha)


def eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    """M = Q diag(l) Q^T for symmetric M; a failed or non-finite solve is retried in float64.

    Returns (eigenvalues, eigenvectors) in M's dtype. Raises :class:`FactorizationError` when the
    float64 retry fails too (the optimizer then keeps the previous inverse and warns).
    """
    try:
        evals, evecs = torch.linalg.eigh(M)
        if bool(torch.isfinite(evals).all()) and bool(torch.isfinite(evecs).all()):
            return evals, evecs
    except RuntimeError:
        pass
    try:
        evals, evecs = torch.linalg.eigh(M.to(torch.float64))
    except RuntimeError as err:
        raise FactorizationError(f"eigh failed in float64 too: {err}") from err
    if not (bool(torch.isfinite(evals).all()) and bool(torch.isfinite(evecs).all())):
        raise FactorizationError("eigh returned non-finite values in float64")
    return evals.to(M.dtype), evecs.to(M.dtype)


def eigen_apply(
    V: Tensor, QG: Tensor, lG: Tensor, QA: Tensor | None, lA: Tensor, damping: float
) -> Tensor:
    """Q_G [(Q_G^T V Q_A) / (l_G l_A^T + damping)] Q_A^T = (A (x) G + damping I)^-1 V.

    Eigenvalues are clamped at 0. ``QA is None`` means A is diagonal (its eigenvectors are the
    identity), as for an embedding. V is (d_G x d_A); the result has V's shape and QG's dtype.
    Batched over leading dimensions (V: (..., d_G, d_A), Q_G: (..., d_G, d_G), l_G: (..., d_G)).
    """
    Vc = V.to(QG.dtype)
    denom = lG.clamp(min=0)[..., :, None] * lA.clamp(min=0)[..., None, :] + damping
    inner = QG.transpose(-2, -1) @ Vc
    if QA is not None:
        inner = inner @ QA
    inner = inner / denom
    out = QG @ inner
    return out if QA is None else out @ QA.transpose(-2, -1)


def newton_schulz_step(M: Tensor, X: Tensor) -> tuple[Tensor, Tensor]:
    """X_next = X (2I - M X), with the residual ||I - M X||_F of the input X (same pass).

    Since I - M X_next = (I - M X)^2, the returned residual r bounds the next one by r^2.
    """
    R = -(M @ X)
    R.diagonal().add_(1.0)
    residual = torch.linalg.matrix_norm(R)
    return X + X @ R, residual


def cholesky_inverse(M: Tensor) -> Tensor:
    """M^-1 for symmetric positive definite M, through M = L L^T (retried in float64)."""
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) == 0:
        return symmetrize_from_upper(torch.cholesky_inverse(L))
    L64, info = torch.linalg.cholesky_ex(M.to(torch.float64))
    if int(info) != 0:
        raise FactorizationError(f"Cholesky failed: leading minor {int(info)} not positive")
    return symmetrize_from_upper(torch.cholesky_inverse(L64)).to(M.dtype)


def kalman_posterior(P: Tensor, H: Tensor, r: float, beta: float, q: float) -> tuple[Tensor, Tensor]:
    """(P+, info): P+ = P- - W W^T with P- = P/beta + q I, S = r I + H P- H^T = L L^T,
    W = P- H^T L^-T; ``info`` is the innovation Cholesky's (0: success; P+ is then not usable).

    Out of place; :func:`kalman_update` raises on info != 0, the sync-free step
    (:mod:`grng.ops.masked`) keeps P instead, without reading ``info`` on the host.
    """
    Hc = H.to(P.dtype)
    U = (P @ Hc.transpose(0, 1)).div_(beta)
    if q != 0.0:
        U.add_(Hc.transpose(0, 1), alpha=q)
    S = (Hc.to(torch.float64) @ U.to(torch.float64))
    S = 0.5 * (S + S.transpose(0, 1))
    S.diagonal().add_(r)
    L, info = torch.linalg.cholesky_ex(S)
    W = torch.linalg.solve_triangular(L, U.to(torch.float64).transpose(0, 1), upper=False)
    W = W.transpose(0, 1).to(P.dtype)
    Pn = P / beta - W @ W.transpose(0, 1)
    if q != 0.0:
        Pn.diagonal().add_(q)
    return symmetrize_from_upper(Pn), info


def kalman_update(P: Tensor, H: Tensor, r: float, beta: float, q: float) -> Tensor:
    """P <- P- - W W^T with P- = P/beta + q I, S = r I + H P- H^T = L L^T, W = P- H^T L^-T.

    In place on P (d x d); H is (k x d). This is the Kalman covariance update of docs/algorithms.md
    section 5: with q = 0 and H = X, P^-1 becomes beta P^-1 + X^T X / r (Woodbury). Only the
    k x k innovation S is factorized (in float64); P is never inverted. The result is mirrored
    from one triangle, so it is exactly symmetric.
    """
    Pn, info = kalman_posterior(P, H, r, beta, q)
    if int(info) != 0:
        raise FactorizationError(f"innovation Cholesky failed: leading minor {int(info)}")
    return P.copy_(Pn)


def combine(directions: Sequence[Tensor], grads: Sequence[Tensor], rho: float) -> list[Tensor]:
    """d + rho g per parameter (d itself when rho == 0)."""
    return [d.add(g, alpha=rho) if rho != 0.0 else d for d, g in zip(directions, grads)]


def fused_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    directions: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor] | None,
    lr: float,
    momentum: float,
    weight_decay: float,
    rho: float,
    kl_clip: float | None,
) -> bool:
    """theta <- (1 - lr wd) theta - lr buf, buf = momentum buf + nu (d + rho g); all or nothing.

    nu = min(1, sqrt(kl_clip / (lr^2 sum <d + rho g, g>))) when ``kl_clip`` is set, else 1.
    Returns False, touching nothing, when any direction or gradient value is NaN or Inf.
    ``momentum_buffers`` is required when momentum != 0.
    """
    combined = combine(directions, grads, rho)
    if not all(bool(torch.isfinite(t).all()) for t in (*combined, *grads)):
        return False
    nu = 1.0
    if kl_clip is not None and lr > 0.0:
        vg = sum(float(torch.sum(c.double() * g.double())) for c, g in zip(combined, grads))
        # lr^2 vg can underflow to 0 for a tiny lr: then nu = 1 (the C++/CUDA ops get inf -> 1)
        if vg > 0.0 and lr * lr * vg > 0.0:
            nu = min(1.0, math.sqrt(kl_clip / (lr * lr * vg)))
    for i, (p, c) in enumerate(zip(params, combined)):
        if momentum != 0.0:
            assert momentum_buffers is not None
            step = momentum_buffers[i].mul_(momentum).add_(c, alpha=nu)
        else:
            step = c.mul(nu) if nu != 1.0 else c
        if weight_decay != 0.0:
            p.mul_(1.0 - lr * weight_decay)
        p.add_(step.to(p.dtype), alpha=-lr)
    return True


#: the methods of :func:`batched_spd_inverse`
BATCHED_METHODS: tuple[str, ...] = ("cholesky", "newton")


def default_newton_tol(dtype: torch.dtype) -> float:
    """Stopping tolerance on the RMS residual ||I - M X||_F / sqrt(d) for a dtype."""
    return 1e-10 if dtype == torch.float64 else 1e-3


def batched_spd_inverse(Ms: Tensor, method: str, tol: float, max_iter: int) -> tuple[Tensor, Tensor]:
    """(M_b^-1, ok_b): Cholesky in float64, or X <- X (2I - M X) per matrix from I / ||M_b||_F.

    Cholesky: ok_b says the factorization succeeded. Newton-Schulz: each matrix stops at its own
    step k with ||I - M X_k||_F / sqrt(d) <= tol and returns X_{k+1} (as
    :func:`grng.ops.newton_schulz_inverse` does); ok_b says it converged within ``max_iter``.
    Results are exactly symmetric; matrices with ok_b False come back as zeros.
    """
    if method == "cholesky":
        L, info = torch.linalg.cholesky_ex(Ms.to(torch.float64))
        ok = info == 0
        inv = symmetrize_from_upper(torch.cholesky_inverse(L))
        return torch.where(ok[:, None, None], inv, 0.0).to(Ms.dtype), ok
    d = Ms.shape[-1]
    eye = torch.eye(d, dtype=Ms.dtype, device=Ms.device)
    X = eye / torch.linalg.matrix_norm(Ms)[:, None, None]
    active = torch.ones(Ms.shape[0], dtype=torch.bool, device=Ms.device)
    converged = torch.zeros_like(active)
    for _ in range(max_iter):
        R = eye - Ms @ X
        rms = torch.linalg.matrix_norm(R) / math.sqrt(d)
        X = torch.where(active[:, None, None], X + X @ R, X)
        done = active & (rms <= tol)
        converged |= done
        active &= ~done & torch.isfinite(rms)
        if not bool(active.any()):
            break
    X = 0.5 * (X + X.transpose(-2, -1))
    return torch.where(converged[:, None, None], X, 0.0), converged
