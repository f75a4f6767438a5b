"""Batched inverses of many small SPD factors (B x d x d) in one call, through the op dispatch.

The reference here is plain batched PyTorch; the compiled extension (``grng.ops.ext``) registers
the ``ext`` backend (CPU: OpenMP over matrices; CUDA: one block per matrix in shared memory).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from grng.ops import default_newton_tol
from grng.ops.dispatch import call, register
from grng.ops.reference import symmetrize_from_upper

METHODS: tuple[str, ...] = ("cholesky", "newton")


def batched_spd_inverse_reference(Ms: Tensor, method: str, tol: float, max_iter: int) -> tuple[Tensor, Tensor]:
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


register("batched_spd_inverse", "reference", batched_spd_inverse_reference)


def batched_spd_inverse(Ms: Tensor, method: str = "cholesky", *, tol: float | None = None,
                        max_iter: int = 60, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(M_b^-1, ok_b) for a batch of SPD matrices Ms (B x d x d); ``method`` "cholesky" or "newton".

    ``tol`` (RMS residual ||I - M X||_F / sqrt(d); default by dtype) and ``max_iter`` apply to
    "newton" only. Failed (cholesky) or unconverged (newton) matrices come back as zeros.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if Ms.dim() != 3 or Ms.shape[1] != Ms.shape[2]:
        raise ValueError(f"Ms must be (B, d, d), got {tuple(Ms.shape)}")
    tol = default_newton_tol(Ms.dtype) if tol is None else tol
    return call("batched_spd_inverse", backend, Ms, method, float(tol), int(max_iter))
