"""One Newton-Schulz step X_next = X (2I - M X), returning ||I - M X||_F of the input X.

Batched: a stack of B matrices (B, d, d) takes the two launches of one, the batch index on grid
axis 1 and each operand stepped by its batch stride in int64 (never in the autotune key); the
sync-free variant (:func:`newton_schulz_masked`) runs a fixed number of such steps.

Two strided GEMM kernels. The first computes M X per tile and, in its epilogue, R = I - M X
(the "I -" on the fp32 accumulator) and the tile's sum of squares of R over its valid entries,
stored to one slot per program; the residual is sqrt of the sum of those partials (a tiny
reduction, no extra pass over R). The second computes X + X R = X (2I - M X) with the "+ X" in
its epilogue (the same form as the reference, which keeps the correction X R separate from X
instead of rounding 2I - M X near 2I). R is stored in X's dtype.

Precision of the dots: bf16/fp16 M and X go to the tensor cores in their own dtype; fp32 ones
multiply in exact fp32 ("ieee"), or on TF32 tensor cores when torch allows TF32 matmuls (as
torch's own M @ X then would). Accumulation, the residual and the "+ X" are fp32.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from grng.ops import masked

from . import _library, _tiles


@triton.autotune(configs=_tiles.gemm_configs(), key=["d", "d_out", "PRECISION"],
                 reset_to_zero=["part_ptr"],
                 prune_configs_by=_tiles.gemm_pruner("d_out", "s_rm", "s_rn"))
@triton.jit
def _residual_kernel(m_ptr, x_ptr, r_ptr, part_ptr, d, d_out,
                     s_mb, s_mm, s_mk, s_xb, s_xk, s_xn, s_rb, s_rm, s_rn, s_pb,
                     PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """R[b] = I - M[b] X[b] on one tile of batch entry b = program_id(1); part[b, pid] = sum of
    R[b]^2 over the tile's entries (M, X zero-padded to d >= d_out: R is stored d_out x d_out)."""
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    m_ptr += batch * _tiles.stride64(s_mb)
    x_ptr += batch * _tiles.stride64(s_xb)
    r_ptr += batch * _tiles.stride64(s_rb)
    part_ptr += batch * _tiles.stride64(s_pb)
    pid_m, pid_n = _tiles.grouped_tile(pid, d, d, BLOCK_M, BLOCK_N, 8)
    offs_m = _tiles.block_range(pid_m, BLOCK_M)
    offs_n = _tiles.block_range(pid_n, BLOCK_N)
    acc = _tiles.gemm_tile(m_ptr, x_ptr, d, d, d, s_mm, s_mk, s_xk, s_xn, offs_m, offs_n,
                           BLOCK_M, BLOCK_N, BLOCK_K, x_ptr.dtype.element_ty, PRECISION)
    valid = (offs_m[:, None] < d_out) & (offs_n[None, :] < d_out)
    eye = (offs_m[:, None] == offs_n[None, :]).to(tl.float32)
    res = tl.where(valid, eye - acc, 0.0)
    tl.store(part_ptr + pid, tl.sum(tl.sum(res * res, axis=1), axis=0))
    tl.store(r_ptr + offs_m[:, None] * s_rm + offs_n[None, :] * s_rn,
             res.to(r_ptr.dtype.element_ty), mask=valid)


@triton.autotune(configs=_tiles.gemm_configs(), key=["d", "d_out", "PRECISION"],
                 prune_configs_by=_tiles.gemm_pruner("d_out", "s_om", "s_on"))
@triton.jit
def _update_kernel(x_ptr, r_ptr, o_ptr, d, d_out, s_xb, s_xm, s_xk, s_rb, s_rk, s_rn, s_ob, s_om,
                   s_on, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[b] = X[b] + X[b] R[b] = X[b] (2I - M[b] X[b]) on one tile of batch entry
    b = program_id(1) (X, R zero-padded to d >= d_out: out is stored d_out x d_out)."""
    batch = tl.program_id(1).to(tl.int64)
    x_ptr += batch * _tiles.stride64(s_xb)
    r_ptr += batch * _tiles.stride64(s_rb)
    o_ptr += batch * _tiles.stride64(s_ob)
    pid_m, pid_n = _tiles.grouped_tile(tl.program_id(0), d, d, BLOCK_M, BLOCK_N, 8)
    offs_m = _tiles.block_range(pid_m, BLOCK_M)
    offs_n = _tiles.block_range(pid_n, BLOCK_N)
    acc = _tiles.gemm_tile(x_ptr, r_ptr, d, d, d, s_xm, s_xk, s_rk, s_rn, offs_m, offs_n,
                           BLOCK_M, BLOCK_N, BLOCK_K, x_ptr.dtype.element_ty, PRECISION)
    valid = (offs_m[:, None] < d_out) & (offs_n[None, :] < d_out)
    x = tl.load(x_ptr + offs_m[:, None] * s_xm + offs_n[None, :] * s_xk, mask=valid, other=0.0)
    out = acc + x.to(tl.float32)
    tl.store(o_ptr + offs_m[:, None] * s_om + offs_n[None, :] * s_on,
             out.to(o_ptr.dtype.element_ty), mask=valid)


def _max_programs(d: int) -> int:
    """Most programs any GEMM config launches on a d x d output (size of the partials buffer)."""
    return max(triton.cdiv(d, c.kwargs["BLOCK_M"]) * triton.cdiv(d, c.kwargs["BLOCK_N"])
               for c in _tiles.gemm_configs())


def _newton_schulz_step(M: Tensor, X: Tensor) -> tuple[Tensor, Tensor]:
    """(X (2I - M X), ||I - M X||_F) for square M, X of one dtype, batched over leading dims
    (residuals of shape M.shape[:-2]); the launcher behind the op: two launches per
    :func:`_tiles.batch_chunks` slice, the batch index on grid axis 1. A side that is not a
    multiple of 16 runs on zero-padded copies of M and X and a padded R (aligned rows: the
    pipelined path of a multiple of 16)."""
    d = M.shape[-1]
    M3, X3 = M.reshape(-1, d, d), X.reshape(-1, d, d)
    B = M3.shape[0]
    X_next = _tiles.new_output(tuple(X.shape), X.dtype, X.device)
    O3 = X_next.view(-1, d, d)
    dp = _tiles.padded(d)
    part = torch.zeros(B, _max_programs(dp), dtype=torch.float32, device=X.device)
    if d > 0 and B > 0:
        M3, X3 = _tiles.padded_matrices(M3), _tiles.padded_matrices(X3)
        R3 = _tiles.padded_buffer(tuple(X.shape), X.dtype, X.device).view(-1, dp, dp)
        precision = _tiles.dot_precision(X.dtype)
        for c in _tiles.batch_chunks(B):
            m, x, r, o, p = M3[c], X3[c], R3[c], O3[c], part[c]
            grid = _tiles.gemm_grid(dp, dp, m.shape[0])
            _residual_kernel[grid](
                m, x, r, p, dp, d, m.stride(0), m.stride(1), m.stride(2), x.stride(0),
                x.stride(1), x.stride(2), r.stride(0), r.stride(1), r.stride(2), p.stride(0),
                PRECISION=precision)
            _update_kernel[grid](
                x, r, o, dp, d, x.stride(0), x.stride(1), x.stride(2), r.stride(0), r.stride(1),
                r.stride(2), o.stride(0), o.stride(1), o.stride(2), PRECISION=precision)
    residual = part.to(torch.float64).sum(-1).sqrt().to(X.dtype)
    return X_next, residual.view(X.shape[:-2])


def _step_outputs(M: Tensor, X: Tensor) -> tuple[Tensor, Tensor]:
    """Fake implementation: X_next of X's shape and dtype, a residual per matrix."""
    return X.new_empty(X.shape), X.new_empty(X.shape[:-2])


newton_schulz_step_op = _library.triton_op("newton_schulz_step", (), _step_outputs)(
    _newton_schulz_step)


def newton_schulz_step(M: Tensor, X: Tensor) -> tuple[Tensor, Tensor]:
    """(X (2I - M X), ||I - M X||_F) for square M, X of one dtype; through the custom op
    ``grng_triton::newton_schulz_step``."""
    X_next, residual = newton_schulz_step_op(M, X)
    return X_next, residual


def supports(M: Tensor, X: Tensor) -> bool:
    """True for square M, X of one dtype (fp32, bf16 or fp16) on a device the kernel runs on."""
    return (M.dim() == 2 and M.shape[0] == M.shape[1] and X.shape == M.shape
            and M.dtype == X.dtype and M.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and _tiles.device_ok(M, X))


def newton_schulz_masked(M: Tensor, X0: Tensor, iterations: int, tol: float) -> tuple[Tensor, Tensor]:
    """(X, ok): ``iterations`` steps X <- X (2I - M X) of the Triton step from the reference's
    device-side start (X0, or X0 / ||M X0||_F where ||I - M X0||_F >= 1); ok: the last RMS
    residual <= tol and X finite. Batched over leading dims: a stack takes the launches of one
    matrix (2 per step)."""
    d = M.shape[-1]
    X = masked.newton_start(M, X0)
    residual = torch.full(M.shape[:-2], math.inf, dtype=M.dtype, device=M.device)
    for _ in range(iterations):
        X, residual = newton_schulz_step_op(M, X)
    return masked.newton_result(X, residual / math.sqrt(d), tol)


def supports_masked(M: Tensor, X0: Tensor, iterations: int, tol: float) -> bool:
    """True for square M (..., d, d) and X0 of its shape and dtype (fp32, bf16 or fp16) on a
    device the kernel runs on."""
    return (M.dim() >= 2 and M.shape[-1] == M.shape[-2] and X0.shape == M.shape
            and M.dtype == X0.dtype and M.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and _tiles.device_ok(M, X0))
