"""grng's ops: one signature each, several backends, one dispatch (``backend=`` per call).

Optimizers call only these functions. Each op is declared once, in :mod:`grng.ops.specs`
(signature, reference, input generator, comparison, FLOP and byte counts; see
:mod:`grng.ops.registry`); the reference implementations are in :mod:`grng.ops.reference`; the
Triton kernels (``grng.kernels``) and the compiled extension (:mod:`grng.ops.ext`) implement
the specs as the ``triton`` and ``ext`` backends.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from grng.ops import specs  # noqa: F401 - defines every op (and registers the reference backend)
from grng.ops.batched import batched_spd_inverse
from grng.ops.dispatch import accepts, backends, call, validate_backend
from grng.ops.errors import BackendUnavailable, FactorizationError
from grng.ops.reference import default_newton_tol

__all__ = [
    "BackendUnavailable", "FactorizationError", "NewtonResult", "accepts", "adam_moments_masked",
    "backends",
    "batched_spd_inverse",
    "cholesky_inverse", "cholesky_inverse_masked", "default_newton_tol", "eigen_apply", "eigh",
    "factor_update", "factor_update_masked", "fused_update", "fused_update_masked", "kalman_update",
    "kalman_update_masked",
    "newton_schulz_inverse", "newton_schulz_masked", "newton_schulz_step", "validate_backend",
]


def factor_update(M: Tensor, X: Tensor, alpha: float, beta: float, *, backend: str = "auto") -> Tensor:
    """M <- beta * M + alpha * X^T X in place (symmetric; ``beta == 0`` never reads M)."""
    return call("factor_update", backend, M, X, float(alpha), float(beta))


def eigh(M: Tensor, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(l, Q) with M = Q diag(l) Q^T; float64 retry, then :class:`FactorizationError`."""
    return call("eigh", backend, M)


def eigen_apply(V: Tensor, QG: Tensor, lG: Tensor, QA: Tensor | None, lA: Tensor,
                damping: float, *, backend: str = "auto") -> Tensor:
    """Q_G [(Q_G^T V Q_A) / (l_G l_A^T + damping)] Q_A^T = (A (x) G + damping I)^-1 V."""
    return call("eigen_apply", backend, V, QG, lG, QA, lA, float(damping))


def newton_schulz_step(M: Tensor, X: Tensor, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(X (2I - M X), ||I - M X||_F)."""
    return call("newton_schulz_step", backend, M, X)


def cholesky_inverse(M: Tensor, *, backend: str = "auto") -> Tensor:
    """M^-1 for SPD M through Cholesky (float64 retry, then :class:`FactorizationError`)."""
    return call("cholesky_inverse", backend, M)


def kalman_update(P: Tensor, H: Tensor, r: float, beta: float, q: float, *,
                  backend: str = "auto") -> Tensor:
    """P <- P/beta + qI - W W^T, W = P- H^T L^-T, L L^T = r I + H P- H^T (in place)."""
    return call("kalman_update", backend, P, H, float(r), float(beta), float(q))


def fused_update(params: Sequence[Tensor], grads: Sequence[Tensor], directions: Sequence[Tensor],
                 momentum_buffers: Sequence[Tensor] | None, lr: float, momentum: float,
                 weight_decay: float, rho: float, kl_clip: float | None, *,
                 backend: str = "auto") -> bool:
    """theta <- (1 - lr wd) theta - lr buf, buf = m buf + nu (d + rho g); False = skipped (non-finite)."""
    return call("fused_update", backend, list(params), list(grads), list(directions),
                None if momentum_buffers is None else list(momentum_buffers),
                float(lr), float(momentum), float(weight_decay), float(rho),
                None if kl_clip is None else float(kl_clip))


# ----------------------------------------------------------------------------- sync-free (masked) ops
# Every decision is a device flag; where it is False nothing is written (no host read).

def fused_update_masked(params: Sequence[Tensor], grads: Sequence[Tensor],
                        directions: Sequence[Tensor], momentum_buffers: Sequence[Tensor] | None,
                        lr: float, momentum: float, weight_decay: float, rho: float,
                        kl_clip: float | None, ok: Tensor, *, backend: str = "auto") -> Tensor:
    """Where ok & finite(every d + rho g): theta <- (1 - lr wd) theta - lr buf,
    buf = m buf + nu (d + rho g), nu computed on the device; returns that flag (0-dim bool)."""
    return call("fused_update_masked", backend, list(params), list(grads), list(directions),
                None if momentum_buffers is None else list(momentum_buffers),
                float(lr), float(momentum), float(weight_decay), float(rho),
                None if kl_clip is None else float(kl_clip), ok)


def factor_update_masked(M: Tensor, X: Tensor, alpha: float, beta: float, ok: Tensor, *,
                         backend: str = "auto") -> Tensor:
    """M <- beta M + alpha X^T X in place where ``ok`` (a 0-dim bool on M's device), M untouched
    otherwise; batched over leading dims."""
    return call("factor_update_masked", backend, M, X, float(alpha), float(beta), ok)


def adam_moments_masked(Vb: Tensor, m: Tensor, v: Tensor, beta1: float, beta2: float,
                        bias1: Tensor, bias2: Tensor, eps: float, ok: Tensor, *,
                        backend: str = "auto") -> Tensor:
    """N = (m / bias1) / (sqrt(v) / bias2 + eps) after Adam's moment update
    m <- beta1 m + (1 - beta1) Vb, v <- beta2 v + (1 - beta2) Vb^2 in place where ``ok`` (a
    0-dim bool on Vb's device); ``bias1``, ``bias2``: 1 - beta1^t and sqrt(1 - beta2^t), device
    tensors of a leading part of Vb's shape."""
    return call("adam_moments_masked", backend, Vb, m, v, float(beta1), float(beta2), bias1,
                bias2, float(eps), ok)


def newton_schulz_masked(M: Tensor, X0: Tensor, iterations: int, tol: float, *,
                         backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(X, ok): ``iterations`` fixed steps of X <- X (2I - M X) from X0 (scaled when
    ||I - M X0||_F >= 1), batched over leading dims; ok: RMS residual <= tol and X finite."""
    return call("newton_schulz_masked", backend, M, X0, int(iterations), float(tol))


def cholesky_inverse_masked(M: Tensor, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(M^-1, ok) for SPD M through M = L L^T; where ok is False X is unusable."""
    return call("cholesky_inverse_masked", backend, M)


def kalman_update_masked(P: Tensor, H: Tensor, r: float, beta: float, q: float, *,
                         backend: str = "auto") -> Tensor:
    """P <- P/beta + qI - W W^T in place where the innovation Cholesky succeeds (P kept
    otherwise); returns that flag (0-dim bool)."""
    return call("kalman_update_masked", backend, P, H, float(r), float(beta), float(q))


class NewtonResult(NamedTuple):
    """Outcome of :func:`newton_schulz_inverse`."""

    inverse: Tensor
    converged: bool
    residual: float  # ||I - M X||_F / sqrt(d) of the returned X's predecessor (an upper bound)
    iterations: int


def newton_schulz_inverse(M: Tensor, X0: Tensor | None = None, *, tol: float | None = None,
                          max_iter: int = 60, backend: str = "auto") -> NewtonResult:
    """X ~ M^-1 for SPD M by X_{k+1} = X_k (2I - M X_k).

    Starts from ``X0`` (warm start, e.g. the previous inverse) when ||I - M X0||_F < 1, else from
    I / ||M||_F, whose residual has spectral radius < 1 for SPD M, so the iteration converges
    quadratically. Stops when ||I - M X_k||_F / sqrt(d) <= tol (returning X_{k+1}, whose residual
    is at most the square of that), after ``max_iter`` steps, or unconverged as soon as the
    residual stops falling (the rounding floor: more steps cannot help).
    """
    d = M.shape[-1]
    tol = default_newton_tol(M.dtype) if tol is None else tol
    scale = math.sqrt(d)
    X = X0
    iterations = 0
    if X is not None:
        X_next, res = newton_schulz_step(M, X, backend=backend)
        iterations = 1
        if float(res) >= 1.0:
            X = None
        else:
            if float(res) / scale <= tol:
                return NewtonResult(_sym(X_next), True, float(res) / scale, iterations)
            X = X_next
    if X is None:
        X = torch.eye(d, dtype=M.dtype, device=M.device) / torch.linalg.matrix_norm(M)
    rms = previous = math.inf
    while iterations < max_iter:
        X_next, res = newton_schulz_step(M, X, backend=backend)
        iterations += 1
        rms = float(res) / scale
        X = X_next
        if rms <= tol:
            return NewtonResult(_sym(X), True, rms, iterations)
        # the residual stopped falling: the rounding floor (or divergence); more steps cannot help
        if not math.isfinite(rms) or rms >= previous:
            break
        previous = rms
    return NewtonResult(_sym(X), False, rms, iterations)


def _sym(X: Tensor) -> Tensor:
    return 0.5 * (X + X.transpose(-2, -1))

