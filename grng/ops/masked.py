"""Sync-free variants of the step's ops (docs/performance.md "A sync-free step").

Every decision these functions take is a device tensor: a non-finite value, a failed
factorization or an unconverged iteration selects the previous value with ``torch.where``
instead of a Python branch, so nothing is read on the host and a CUDA step never waits for the
device. They are plain PyTorch (any device, float64-capable) and match the host-branching ops of
:mod:`grng.ops.reference` where those succeed. They are the reference backend of the masked op
specs (:mod:`grng.ops.specs`); the optimizers call them through the dispatch,
``grng.ops.fused_update_masked(..., backend=)`` and its siblings, so other backends can take over.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from grng.finite import finite_flag
from grng.ops.reference import combine, factor_update, kalman_posterior, symmetrize_from_upper


def fused_update_masked(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    directions: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor] | None,
    lr: float,
    momentum: float,
    weight_decay: float,
    rho: float,
    kl_clip: float | None,
    ok: Tensor,
) -> Tensor:
    """theta <- (1 - lr wd) theta - lr buf, buf = momentum buf + nu (d + rho g), where ``ok``.

    nu = min(1, sqrt(kl_clip / (lr^2 sum <d + rho g, g>))) as a device scalar (1 when the sum is
    not positive or ``kl_clip`` is None). Returns ``ok`` and-ed with the finiteness of every
    d + rho g; where that flag is False, parameters and buffers keep their values.
    """
    combined = combine(directions, grads, rho)
    flag = finite_flag(combined)
    ok = ok if flag is None else ok & flag
    nu: Tensor | float = 1.0
    if kl_clip is not None and lr > 0.0 and combined:
        vg = torch.stack([torch.sum(c.double() * g.double()) for c, g in zip(combined, grads)]).sum()
        lr2vg = vg * (lr * lr)
        clipped = torch.sqrt(kl_clip / lr2vg.clamp(min=torch.finfo(torch.float64).tiny)).clamp(max=1.0)
        nu = torch.where((vg > 0.0) & (lr2vg > 0.0), clipped, 1.0)
    for i, (p, c) in enumerate(zip(params, combined)):
        scaled = c * nu
        if momentum != 0.0:
            assert momentum_buffers is not None
            buf = momentum_buffers[i]
            buf.copy_(torch.where(ok, buf * momentum + scaled, buf))
            step = buf
        else:
            step = scaled
        new = p * (1.0 - lr * weight_decay) if weight_decay != 0.0 else p
        p.copy_(torch.where(ok, new - lr * step.to(p.dtype), p))
    return ok


def factor_update_masked(M: Tensor, X: Tensor, alpha: float, beta: float, ok: Tensor) -> Tensor:
    """M <- beta M + alpha X^T X in place where ``ok`` (:func:`grng.ops.factor_update`), M
    untouched otherwise, whatever X holds (the device gate's fold: no copy of M to select back)."""
    new = factor_update(M.clone(), X, alpha, beta)
    return M.copy_(torch.where(ok, new, M))


def adam_moments_masked(Vb: Tensor, m: Tensor, v: Tensor, beta1: float, beta2: float,
                        bias1: Tensor, bias2: Tensor, eps: float, ok: Tensor) -> Tensor:
    """N = (m / bias1) / (sqrt(v) / bias2 + eps) after m <- beta1 m + (1 - beta1) Vb,
    v <- beta2 v + (1 - beta2) Vb^2 in place where ``ok`` (m, v untouched otherwise, whatever Vb
    holds): Adam's step on the projected gradient Vb, EKFAC's in its eigenbasis. ``bias1`` =
    1 - beta1^t and ``bias2`` = sqrt(1 - beta2^t) are device tensors of a leading part of Vb's
    shape (one per block of a stack, or 0-dim), so the count t stays on the device."""
    m.copy_(torch.where(ok, m.mul(beta1).add(Vb, alpha=1.0 - beta1), m))
    v.copy_(torch.where(ok, v.mul(beta2).add(Vb * Vb, alpha=1.0 - beta2), v))
    b1, b2 = (b.reshape(b.shape + (1,) * (m.dim() - b.dim())) for b in (bias1, bias2))
    return ((m / b1) / (v.sqrt() / b2 + eps)).to(m.dtype)


def newton_schulz_fixed(M: Tensor, X0: Tensor, iterations: int, tol: float) -> tuple[Tensor, Tensor]:
    """(X, ok): ``iterations`` steps of X <- X (2I - M X) for SPD M (batched over leading dims).

    Starts from the previous inverse X0 where ||I - M X0||_F < 1 (it converges quadratically),
    else from X0 / ||M X0||_F: M X0 has positive eigenvalues (X0 SPD), at most ||M X0||_F, so
    this start always converges, as fast as M X0 is well conditioned, which a stale inverse
    keeps far better than the cold I / ||M||_F. ok says the RMS residual
    ||I - M X_{k-1}||_F / sqrt(d) of the last step is at most ``tol`` (so the returned X's
    residual is at most its square). X is exactly symmetric.
    """
    d = M.shape[-1]
    eye = torch.eye(d, dtype=M.dtype, device=M.device)
    X = newton_start(M, X0)
    rms = torch.full(M.shape[:-2], math.inf, dtype=M.dtype, device=M.device)
    for _ in range(iterations):
        R = eye - M @ X
        rms = torch.linalg.matrix_norm(R) / math.sqrt(d)
        X = X + X @ R
    return newton_result(X, rms, tol)


def newton_start(M: Tensor, X0: Tensor) -> Tensor:
    """X0 where ||I - M X0||_F < 1, else X0 / ||M X0||_F (a device-side select, batched)."""
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
    MX0 = M @ X0
    warm = (torch.linalg.matrix_norm(eye - MX0) < 1.0)[..., None, None]
    return torch.where(warm, X0, X0 / torch.linalg.matrix_norm(MX0)[..., None, None])


def newton_result(X: Tensor, rms: Tensor, tol: float) -> tuple[Tensor, Tensor]:
    """(sym(X), ok) after the fixed steps: ok says the last RMS residual ``rms`` <= tol and X is
    finite."""
    ok = (rms <= tol) & torch.isfinite(X).flatten(-2).all(-1)
    return 0.5 * (X + X.transpose(-2, -1)), ok


def cholesky_inverse_masked(M: Tensor) -> tuple[Tensor, Tensor]:
    """(M^-1, ok) for SPD M through M = L L^T; ok False (a non-positive pivot) leaves X unusable."""
    L, info = torch.linalg.cholesky_ex(M)
    return symmetrize_from_upper(torch.cholesky_inverse(L)), info == 0


def kalman_update_masked(P: Tensor, H: Tensor, r: float, beta: float, q: float) -> Tensor:
    """:func:`grng.ops.kalman_update` in place where its innovation Cholesky succeeds (P kept
    otherwise); returns that success flag."""
    Pn, info = kalman_posterior(P, H, r, beta, q)
    ok = (info == 0) & torch.isfinite(Pn).all()
    P.copy_(torch.where(ok, Pn, P))
    return ok


def select(ok: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """``new`` where ``ok``, else ``old`` (one device-side select, in ``new``'s dtype)."""
    return torch.where(ok, new, old.to(new.dtype))
