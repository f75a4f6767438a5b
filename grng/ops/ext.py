"""The ``ext`` backend: grng's compiled ops (``grng.ops._C``, namespace ``torch.ops.grng_ext``).

Importing this module loads the extension once through :mod:`grng.ops.ext_loader` (the installed
build, else the packaged sources compiled on first use), registers fake implementations so
``torch.compile`` can trace the ops, and implements each op's spec
(:func:`grng.ops.registry.implement`) under the reference signatures. An ImportError says the
extension's state and what to do; the dispatch reports it in ``grng.backends()``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from grng.ops import ext_loader
from grng.ops.errors import FactorizationError
from grng.ops.reference import BATCHED_METHODS
from grng.ops.registry import SPECS, implement

# how the extension was found ("" for the installed build); raises ImportError saying its state
LIVE_NOTE = ext_loader.load()

_ops = torch.ops.grng_ext
_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_FACTOR_DTYPES = (torch.float32, torch.float64)
_X_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Largest matrix side batched_spd_inverse takes (the CUDA kernel holds a matrix in shared memory).
MAX_BATCHED_DIM = 128


def _kernels() -> frozenset[tuple[str, str]]:
    """(op, device type) of every kernel the built extension has for a registered op (asked
    once, at import; an op of the registry that the build does not define has none)."""
    return frozenset((op, device) for op in SPECS if hasattr(_ops, op)
                     for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                     if torch._C._dispatch_has_kernel_for_dispatch_key(f"grng_ext::{op}", key))


_KERNELS = _kernels()


def _has_kernel(op: str, device_type: str) -> bool:
    """Whether the extension has a kernel of ``op`` for the device type (a set lookup, which
    torch.compile traces as a constant)."""
    return (op, device_type) in _KERNELS


# ----------------------------------------------------------------------------- fake kernels

@torch.library.register_fake("grng_ext::fused_update")
def _fused_update_fake(params, grads, directions, momentum_buffers, lr, momentum, weight_decay, rho,
                       kl_clip):
    device = params[0].device if params else torch.device("cpu")
    return torch.empty((), dtype=torch.bool, device=device)


@torch.library.register_fake("grng_ext::fused_update_masked")
def _fused_update_masked_fake(params, grads, directions, momentum_buffers, lr, momentum, weight_decay,
                              rho, kl_clip, ok):
    return torch.empty((), dtype=torch.bool, device=ok.device)


@torch.library.register_fake("grng_ext::factor_update")
def _factor_update_fake(M, X, alpha, beta):
    return None


@torch.library.register_fake("grng_ext::factor_update_masked")
def _factor_update_masked_fake(M, X, alpha, beta, ok):
    return None


@torch.library.register_fake("grng_ext::kalman_update")
def _kalman_update_fake(P, H, r, beta, q):
    return None


@torch.library.register_fake("grng_ext::kalman_update_masked")
def _kalman_update_masked_fake(P, H, r, beta, q):
    return torch.empty((), dtype=torch.bool, device=P.device)


@torch.library.register_fake("grng_ext::adam_moments_masked")
def _adam_moments_masked_fake(Vb, m, v, beta1, beta2, bias1, bias2, eps, ok):
    return Vb.new_empty(Vb.shape)


@torch.library.register_fake("grng_ext::batched_spd_inverse")
def _batched_spd_inverse_fake(Ms, method, tol, max_iter):
    return Ms.new_empty(Ms.shape), Ms.new_empty((Ms.shape[0],), dtype=torch.bool)


# ----------------------------------------------------------------------------- ops

def fused_update(params: Sequence[Tensor], grads: Sequence[Tensor], directions: Sequence[Tensor],
                 momentum_buffers: Sequence[Tensor] | None, lr: float, momentum: float,
                 weight_decay: float, rho: float, kl_clip: float | None) -> bool:
    """theta <- (1 - lr wd) theta - lr buf, buf = m buf + nu (d + rho g); False = skipped (non-finite)."""
    bufs = list(momentum_buffers) if momentum != 0.0 and momentum_buffers is not None else []
    ok = _ops.fused_update(list(params), list(grads), list(directions), bufs, float(lr), float(momentum),
                           float(weight_decay), float(rho), None if kl_clip is None else float(kl_clip))
    return bool(ok)


def _fused_supports(params, grads, directions, momentum_buffers, lr, momentum, weight_decay, rho,
                    kl_clip, op: str = "fused_update") -> bool:
    if not params or not _has_kernel(op, params[0].device.type):
        return False
    if momentum != 0.0 and (momentum_buffers is None or len(momentum_buffers) != len(params)):
        return False
    if not len(params) == len(grads) == len(directions):
        return False
    device = params[0].device
    if device.type == "cuda" and any(t.dtype != params[0].dtype for t in params):
        return False  # the CUDA launch takes one dtype per group
    groups = zip(params, grads, directions, momentum_buffers if momentum != 0.0 else [None] * len(params))
    for group in groups:
        p = group[0]
        if p.dtype not in _FUSED_DTYPES:
            return False
        for t in group:
            if t is not None and (t.device != device or t.dtype != p.dtype or t.numel() != p.numel()):
                return False
    return True


def fused_update_masked(params: Sequence[Tensor], grads: Sequence[Tensor], directions: Sequence[Tensor],
                        momentum_buffers: Sequence[Tensor] | None, lr: float, momentum: float,
                        weight_decay: float, rho: float, kl_clip: float | None, ok: Tensor) -> Tensor:
    """Where ok & finite(every d + rho g): theta <- (1 - lr wd) theta - lr buf,
    buf = m buf + nu (d + rho g), nu computed in the kernel; returns that flag (no host read on CUDA)."""
    bufs = list(momentum_buffers) if momentum != 0.0 and momentum_buffers is not None else []
    return _ops.fused_update_masked(list(params), list(grads), list(directions), bufs, float(lr),
                                    float(momentum), float(weight_decay), float(rho),
                                    None if kl_clip is None else float(kl_clip), ok)


def _fused_masked_supports(params, grads, directions, momentum_buffers, lr, momentum, weight_decay,
                           rho, kl_clip, ok) -> bool:
    return (isinstance(ok, Tensor) and ok.dtype == torch.bool and ok.numel() == 1
            and bool(params) and ok.device == params[0].device
            and _fused_supports(params, grads, directions, momentum_buffers, lr, momentum,
                                weight_decay, rho, kl_clip, op="fused_update_masked"))


def factor_update(M: Tensor, X: Tensor, alpha: float, beta: float) -> Tensor:
    """M <- beta * M + alpha * X^T X in place (exactly symmetric; ``beta == 0`` never reads M)."""
    _ops.factor_update(M, X, float(alpha), float(beta))
    return M


def _factor_supports(M: Tensor, X: Tensor, alpha: float, beta: float) -> bool:
    return (_has_kernel("factor_update", M.device.type) and X.device == M.device
            and M.dtype in _FACTOR_DTYPES and X.dtype in _X_DTYPES and M.dim() >= 2 and X.dim() == M.dim()
            and M.shape[-1] == M.shape[-2] == X.shape[-1] and M.shape[:-2] == X.shape[:-2])


def factor_update_masked(M: Tensor, X: Tensor, alpha: float, beta: float, ok: Tensor) -> Tensor:
    """M <- beta * M + alpha * X^T X in place where ``ok``, M untouched otherwise (no host read on
    CUDA; on the CPU factor_update's result bit for bit)."""
    _ops.factor_update_masked(M, X, float(alpha), float(beta), ok)
    return M


def _factor_masked_supports(M: Tensor, X: Tensor, alpha: float, beta: float, ok: Tensor) -> bool:
    return (isinstance(ok, Tensor) and ok.dtype == torch.bool and ok.numel() == 1
            and ok.device == M.device and _has_kernel("factor_update_masked", M.device.type)
            and _factor_supports(M, X, alpha, beta))


def kalman_update(P: Tensor, H: Tensor, r: float, beta: float, q: float) -> Tensor:
    """P <- P/beta + q I - W W^T, W = P- H^T L^-T, L L^T = r I + H P- H^T (in place)."""
    try:
        _ops.kalman_update(P, H, float(r), float(beta), float(q))
    except RuntimeError as err:
        if "innovation Cholesky failed" in str(err):
            raise FactorizationError(str(err).splitlines()[0]) from err
        raise
    return P


def _kalman_supports(P: Tensor, H: Tensor, r: float, beta: float, q: float,
                     op: str = "kalman_update") -> bool:
    return (_has_kernel(op, P.device.type) and H.device == P.device and beta != 0.0
            and P.dtype in _FACTOR_DTYPES and H.dtype in _X_DTYPES and P.dim() == 2 and H.dim() == 2
            and P.shape[0] == P.shape[1] == H.shape[1])


def kalman_update_masked(P: Tensor, H: Tensor, r: float, beta: float, q: float) -> Tensor:
    """P <- P/beta + q I - W W^T in place where the innovation Cholesky succeeds and the result is
    finite (P kept otherwise, no host read); returns that flag."""
    return _ops.kalman_update_masked(P, H, float(r), float(beta), float(q))


def _kalman_masked_supports(P: Tensor, H: Tensor, r: float, beta: float, q: float) -> bool:
    return _kalman_supports(P, H, r, beta, q, op="kalman_update_masked")


def adam_moments_masked(Vb: Tensor, m: Tensor, v: Tensor, beta1: float, beta2: float,
                        bias1: Tensor, bias2: Tensor, eps: float, ok: Tensor) -> Tensor:
    """N = (m / bias1) / (sqrt(v) / bias2 + eps) after m <- beta1 m + (1 - beta1) Vb,
    v <- beta2 v + (1 - beta2) Vb^2 in place where ``ok`` (no host read on CUDA)."""
    return _ops.adam_moments_masked(Vb, m, v, float(beta1), float(beta2), bias1, bias2, float(eps),
                                    ok)


def _adam_masked_supports(Vb: Tensor, m: Tensor, v: Tensor, beta1: float, beta2: float,
                          bias1: Tensor, bias2: Tensor, eps: float, ok: Tensor) -> bool:
    lead = tuple(bias1.shape)
    return (_has_kernel("adam_moments_masked", Vb.device.type) and Vb.dtype in _FUSED_DTYPES
            and m.dtype == v.dtype == Vb.dtype and m.shape == v.shape == Vb.shape
            and bias1.shape == bias2.shape and tuple(Vb.shape[:len(lead)]) == lead
            and bias1.is_floating_point() and bias2.is_floating_point()
            and isinstance(ok, Tensor) and ok.dtype == torch.bool and ok.numel() == 1
            and all(t.device == Vb.device for t in (m, v, bias1, bias2, ok)))


def batched_spd_inverse(Ms: Tensor, method: str, tol: float, max_iter: int) -> tuple[Tensor, Tensor]:
    """(M_b^-1, ok_b) for SPD M_b (B x d x d); see :func:`grng.ops.batched.batched_spd_inverse`."""
    return tuple(_ops.batched_spd_inverse(Ms, method, float(tol), int(max_iter)))


def _batched_supports(Ms: Tensor, method: str, tol: float, max_iter: int) -> bool:
    return (_has_kernel("batched_spd_inverse", Ms.device.type) and Ms.dtype in _FACTOR_DTYPES
            and Ms.dim() == 3 and Ms.shape[1] == Ms.shape[2] <= MAX_BATCHED_DIM
            and (method == "cholesky" if Ms.device.type == "cuda" else method in BATCHED_METHODS))


implement("fused_update", "ext", fused_update, _fused_supports)
implement("fused_update_masked", "ext", fused_update_masked, _fused_masked_supports)
implement("factor_update", "ext", factor_update, _factor_supports)
implement("factor_update_masked", "ext", factor_update_masked, _factor_masked_supports)
implement("kalman_update", "ext", kalman_update, _kalman_supports)
implement("kalman_update_masked", "ext", kalman_update_masked, _kalman_masked_supports)
implement("batched_spd_inverse", "ext", batched_spd_inverse, _batched_supports)
implement("adam_moments_masked", "ext", adam_moments_masked, _adam_masked_supports)
