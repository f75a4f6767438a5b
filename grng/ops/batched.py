"""Batched inverses of many small SPD factors (B x d x d) in one call, through the op dispatch.

The reference is :func:`grng.ops.reference.batched_spd_inverse` (plain batched PyTorch); the
compiled extension (``grng.ops.ext``) implements the ``ext`` backend (CPU: OpenMP over
matrices; CUDA: one block per matrix in shared memory).
"""
from __future__ import annotations

from torch import Tensor

from grng.ops.dispatch import call
from grng.ops.reference import BATCHED_METHODS as METHODS
from grng.ops.reference import default_newton_tol

__all__ = ["METHODS", "batched_spd_inverse"]


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
