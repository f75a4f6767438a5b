"""One Newton-Schulz step X_next = X (2I - M X), returning ||I - M X||_F of the input X.

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


@triton.autotune(configs=_tiles.gemm_configs(), key=["d", "PRECISION"], reset_to_zero=["part_ptr"])
@triton.jit
def _residual_kernel(m_ptr, x_ptr, r_ptr, part_ptr, d,
                     s_mm, s_mk, s_xk, s_xn, s_rm, s_rn,
                     PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """R = I - M X on one tile; part[pid] = sum of R^2 over the tile's entries."""
    pid = tl.program_id(0)
    pid_m, pid_n = _tiles.grouped_tile(pid, d, d, BLOCK_M, BLOCK_N, 8)
    offs_m = _tiles.block_range(pid_m, BLOCK_M)
    offs_n = _tiles.block_range(pid_n, BLOCK_N)
    acc = _tiles.gemm_tile(m_ptr, x_ptr, d, d, d, s_mm, s_mk, s_xk, s_xn, offs_m, offs_n,
                           BLOCK_M, BLOCK_N, BLOCK_K, x_ptr.dtype.element_ty, PRECISION)
    valid = (offs_m[:, None] < d) & (offs_n[None, :] < d)
    eye = (offs_m[:, None] == offs_n[None, :]).to(tl.float32)
    res = tl.where(valid, eye - acc, 0.0)
    tl.store(part_ptr + pid, tl.sum(tl.sum(res * res, axis=1), axis=0))
    tl.store(r_ptr + offs_m[:, None] * s_rm + offs_n[None, :] * s_rn,
             res.to(r_ptr.dtype.element_ty), mask=valid)


@triton.autotune(configs=_tiles.gemm_configs(), key=["d", "PRECISION"])
@triton.jit
def _update_kernel(x_ptr, r_ptr, o_ptr, d, s_xm, s_xk, s_rk, s_rn, s_om, s_on,
                   PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out = X + X R = X (2I - M X) on one tile."""
    pid_m, pid_n = _tiles.grouped_tile(tl.program_id(0), d, d, BLOCK_M, BLOCK_N, 8)
    offs_m = _tiles.block_range(pid_m, BLOCK_M)
    offs_n = _tiles.block_range(pid_n, BLOCK_N)
    acc = _tiles.gemm_tile(x_ptr, r_ptr, d, d, d, s_xm, s_xk, s_rk, s_rn, offs_m, offs_n,
                           BLOCK_M, BLOCK_N, BLOCK_K, x_ptr.dtype.element_ty, PRECISION)
    valid = (offs_m[:, None] < d) & (offs_n[None, :] < d)
    x = tl.load(x_ptr + offs_m[:, None] * s_xm + offs_n[None, :] * s_xk, mask=valid, other=0.0)
    out = acc + x.to(tl.float32)
    tl.store(o_ptr + offs_m[:, None] * s_om + offs_n[None, :] * s_on,
             out.to(o_ptr.dtype.element_ty), mask=valid)


def _max_programs(d: int) -> int:
    """Most programs any GEMM config launches on a d x d output (size of the partials buffer)."""
    return max(triton.cdiv(d, c.kwargs["BLOCK_M"]) * triton.cdiv(d, c.kwargs["BLOCK_N"])
               for c in _tiles.gemm_configs())


def _newton_schulz_step(M: Tensor, X: Tensor) -> tuple[Tensor, Tensor]:
    """(X (2I - M X), ||I - M X||_F) for square M, X of one dtype (the launcher behind the op)."""
    d = M.shape[0]
    R = _tiles.new_output((d, d), X.dtype, X.device)
    X_next = _tiles.new_output((d, d), X.dtype, X.device)
    part = torch.zeros(_max_programs(d), dtype=torch.float32, device=X.device)
    if d > 0:
        precision = _tiles.dot_precision(X.dtype)
        _residual_kernel[_tiles.gemm_grid(d, d)](
            M, X, R, part, d, M.stride(0), M.stride(1), X.stride(0), X.stride(1),
            R.stride(0), R.stride(1), PRECISION=precision)
        _update_kernel[_tiles.gemm_grid(d, d)](
            X, R, X_next, d, X.stride(0), X.stride(1), R.stride(0), R.stride(1),
            X_next.stride(0), X_next.stride(1), PRECISION=precision)
    residual = part.to(torch.float64).sum().sqrt().to(X.dtype)
    return X_next, residual



def _step_outputs(M: Tensor, X: Tensor) -> tuple[Tensor, Tensor]:
    """Fake implementation: X_next of X's shape and dtype, a 0-dim residual."""
    return X.new_empty(X.shape), X.new_empty(())


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
    residual <= tol and X finite. Batched over leading dims (the steps run per matrix)."""
    d = M.shape[-1]
    X = masked.newton_start(M, X0)
    Ms, Xs = M.reshape(-1, d, d), X.reshape(-1, d, d)
    outs, rms = [], []
    for Mb, Xb in zip(Ms.unbind(0), Xs.unbind(0)):
        res = torch.full((), math.inf, dtype=M.dtype, device=M.device)
        for _ in range(iterations):
            Xb, res = newton_schulz_step(Mb, Xb)
        outs.append(Xb)
        rms.append(res / math.sqrt(d))
    return masked.newton_result(torch.stack(outs).reshape(M.shape),
                                torch.stack(rms).reshape(M.shape[:-2]), tol)


def supports_masked(M: Tensor, X0: Tensor, iterations: int, tol: float) -> bool:
    """True for square M (..., d, d) and X0 of its shape and dtype (fp32, bf16 or fp16) on a
    device the kernel runs on."""
    return (M.dim() >= 2 and M.shape[-1] == M.shape[-2] and X0.shape == M.shape
            and M.dtype == X0.dtype and M.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and _tiles.device_ok(M, X0))
