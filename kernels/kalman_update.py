"""Kalman covariance update P <- P/beta + q I - W W^T, with the d x d part in one Triton kernel.

The thin and small pieces run in torch, exactly as in the reference: U = P H^T / beta + q H^T
(d x k), S = r I + H U (k x k, float64, symmetrized), S = L L^T, W = U L^-T (d x k). The only
d x d work, P <- (1/beta) P + q I - W W^T, is the symmetric kernel of the factor update
(:func:`grng.kernels.factor_update.sym_update`) with X = W^T (a stride view, no copy),
alpha = -1, beta = 1/beta and diag = q: one triangle of tiles, mirrored, exactly symmetric.
W is in P's dtype (fp32), as in the reference, so that kernel's dots are exact fp32 ("ieee"), or
TF32 when torch allows TF32 matmuls (as the torch products P H^T here then are too).
"""
from __future__ import annotations

import torch
from torch import Tensor

from grng.ops.errors import FactorizationError

from . import _library, _tiles
from .factor_update import sym_update


def _innovation(P: Tensor, H: Tensor, r: float, beta: float, q: float) -> tuple[Tensor, Tensor]:
    """(W^T, info): W = P- H^T L^-T in P's dtype (k x d, transposed), L L^T = S = r I + H P- H^T
    in float64; ``info`` is the Cholesky's (0: success; W is not usable otherwise)."""
    Hc = H.to(P.dtype)
    U = (P @ Hc.transpose(0, 1)).div_(beta)
    if q != 0.0:
        U.add_(Hc.transpose(0, 1), alpha=q)
    U64 = U.to(torch.float64)
    S = Hc.to(torch.float64) @ U64
    S = 0.5 * (S + S.transpose(0, 1))
    S.diagonal().add_(r)
    L, info = torch.linalg.cholesky_ex(S)
    Wt = torch.linalg.solve_triangular(L, U64.transpose(0, 1), upper=False).to(P.dtype)  # k x d
    return Wt, info


def _kalman_update(P: Tensor, H: Tensor, r: float, beta: float, q: float) -> None:
    """P <- P- - W W^T with P- = P/beta + q I, S = r I + H P- H^T = L L^T, W = P- H^T L^-T
    (the launcher behind the custom op)."""
    Wt, info = _innovation(P, H, r, beta, q)
    if int(info) != 0:
        raise FactorizationError(f"innovation Cholesky failed: leading minor {int(info)}")
    sym_update(P.unsqueeze(0), Wt.unsqueeze(0), -1.0, 1.0 / beta, q)


def _no_output(P: Tensor, H: Tensor, r: float, beta: float, q: float) -> None:
    """Fake implementation: the op only writes P."""


kalman_update_op = _library.triton_op("kalman_update", ("P",), _no_output)(_kalman_update)


def kalman_update(P: Tensor, H: Tensor, r: float, beta: float, q: float) -> Tensor:
    """P <- P- - W W^T with P- = P/beta + q I, S = r I + H P- H^T = L L^T, W = P- H^T L^-T, in
    place; through the custom op ``grng_triton::kalman_update``."""
    kalman_update_op(P, H, r, beta, q)
    return P


def supports(P: Tensor, H: Tensor, r: float, beta: float, q: float) -> bool:
    """True for fp32 P (d x d) and fp32/bf16/fp16 H (k x d) on a device the kernel runs on."""
    return (P.dtype == torch.float32 and H.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and P.dim() == 2 and H.dim() == 2 and P.shape[0] == P.shape[1]
            and H.shape[1] == P.shape[0] and _tiles.device_ok(P, H))


def _kalman_update_masked(P: Tensor, H: Tensor, r: float, beta: float, q: float) -> Tensor:
    """P <- P- - W W^T where the innovation Cholesky succeeds and the result is finite (P kept
    otherwise, by the reference's device-side select); returns that flag. No host read."""
    Wt, info = _innovation(P, H, r, beta, q)
    Pn = P.clone()
    sym_update(Pn.unsqueeze(0), Wt.unsqueeze(0), -1.0, 1.0 / beta, q)
    ok = (info == 0) & torch.isfinite(Pn).all()
    P.copy_(torch.where(ok, Pn, P))
    return ok


def _fresh_flag(P: Tensor, H: Tensor, r: float, beta: float, q: float) -> Tensor:
    """Fake implementation: the op writes P and returns a fresh 0-dim bool."""
    return torch.empty((), dtype=torch.bool, device=P.device)


kalman_update_masked_op = _library.triton_op("kalman_update_masked", ("P",), _fresh_flag)(
    _kalman_update_masked)


def kalman_update_masked(P: Tensor, H: Tensor, r: float, beta: float, q: float) -> Tensor:
    """P <- P/beta + qI - W W^T in place where the innovation Cholesky succeeds (P kept
    otherwise); returns that device flag; through the custom op
    ``grng_triton::kalman_update_masked``."""
    return kalman_update_masked_op(P, H, r, beta, q)
