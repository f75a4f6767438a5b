"""Symmetric rank-m update M <- beta M + alpha X^T X (+ diag I), one triangle of tiles only.

Program p of a batch entry owns the upper tile (ti, tj), ti <= tj, of the T x T grid of square
BLOCK tiles (T(T+1)/2 programs: half the FLOPs of a full GEMM). It accumulates
X[:, ti]^T X[:, tj] in fp32, adds beta * M and the diagonal term on the tile's upper-triangle
elements (global row <= column; M's lower triangle is never read) and stores every such element
both at (r, c) and, through the transposed tile, at (c, r). Each entry is thus written from
one value, so the result is exactly symmetric, and no program reads what another writes. ``beta == 0`` compiles the read of
M away (it may hold NaN). The Kalman covariance update reuses this kernel with X = W^T,
alpha = -1, beta = 1 / beta_kalman and diag = q.

Precision of the dots: bf16/fp16 X goes to the tensor cores in its own dtype (the products of
bf16 values are exact in the fp32 accumulator, so this matches the reference, which upcasts X);
fp32 X multiplies in exact fp32 ("ieee"), or on TF32 tensor cores when torch allows TF32
matmuls. The autotune key holds d and the row count's class (:func:`rows_class`), never m
itself: a new batch size within a class reuses the tuned tile instead of re-tuning mid-run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _library, _tiles


def rows_class(m: int) -> int:
    """m rounded up to a power of two, clamped to [32, 512]: the row count as the autotuner sees it.

    Below 32 rows every config runs one k step; past 512 the k loop is long enough for every
    pipeline depth, so the best tile depends on d alone."""
    return min(max(triton.next_power_of_2(m), 32), 512)


def _max_accumulator(args: dict, kwargs: dict) -> int:
    """Accumulator registers per thread the kernel keeps without spilling on sm_90 (measured by
    tools/sm90_compile.py): 64 on tensor cores into an aligned M, else 32 (reading M in the
    epilogue holds a second tile of values and addresses, exact fp32 dots hold their operands
    in registers, an unaligned M stores element by element)."""
    aligned = _tiles.multiples_of_16(args["d"], args["s_mr"], args["s_mc"])
    return 64 if aligned and not kwargs["READ_M"] and kwargs["PRECISION"] != "ieee" else 32


def _max_block_k(args: dict, kwargs: dict) -> int:
    """The deepest k tile kept: 32 for an unaligned M read in the epilogue (the 64-deep tiles
    spilled at 769), else any."""
    aligned = _tiles.multiples_of_16(args["d"], args["s_mr"], args["s_mc"])
    return 1 << 30 if aligned or not kwargs["READ_M"] else 32


@triton.autotune(configs=_tiles.sym_configs(), key=["d", "m_class", "READ_M", "PRECISION"],
                 restore_value=["m_ptr"], prune_configs_by={
                     "early_config_prune": _tiles.sm90_pruner(_max_accumulator, _max_block_k)})
@triton.jit
def _sym_update_kernel(m_ptr, x_ptr, ok_ptr, d, d_load, m, m_class, s_mb, s_mr, s_mc, s_xb, s_xk, s_xc,
                       alpha, beta, diag,
                       READ_M: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """M[b] <- beta M[b] + alpha X[b]^T X[b] + diag I on the upper tile of program 0, mirrored
    (m_class = rows_class(m) is read by the autotuner's key only; X's columns are loaded up to
    d_load >= d, past d zeros or values that reach only rows / columns >= d, never stored);
    with MASKED, only where the device flag *ok_ptr (nothing stored where it is False)."""
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    # Program pid -> tile (ti, tj), 0 <= ti <= tj: tj = floor((sqrt(8 pid + 1) - 1) / 2), fixed up
    # by one in case float rounding lands on the neighbouring integer.
    tj = ((tl.sqrt(8.0 * pid.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    tj = tl.where(tj * (tj + 1) // 2 > pid, tj - 1, tj)
    tj = tl.where((tj + 1) * (tj + 2) // 2 <= pid, tj + 1, tj)
    ti = pid - tj * (tj + 1) // 2

    x_base = x_ptr + batch * s_xb
    offs_r = _tiles.block_range(ti, BLOCK)
    offs_c = _tiles.block_range(tj, BLOCK)
    offs_k = _tiles.block_range(0, BLOCK_K)
    r_ok = offs_r < d
    c_ok = offs_c < d
    r_load = offs_r < d_load
    c_load = offs_c < d_load
    xr_ptrs = x_base + offs_k[:, None] * s_xk + offs_r[None, :] * s_xc
    xc_ptrs = x_base + offs_k[:, None] * s_xk + offs_c[None, :] * s_xc
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, m, BLOCK_K):
        k_ok = (k0 + offs_k)[:, None] < m
        xr = tl.load(xr_ptrs, mask=k_ok & r_load[None, :], other=0.0)
        xc = tl.load(xc_ptrs, mask=k_ok & c_load[None, :], other=0.0)
        acc = _tiles.dot_acc(tl.trans(xr), xc, acc, PRECISION)
        xr_ptrs += BLOCK_K * _tiles.stride64(s_xk)
        xc_ptrs += BLOCK_K * _tiles.stride64(s_xk)

    rows = offs_r[:, None]
    cols = offs_c[None, :]
    upper = (rows <= cols) & r_ok[:, None] & c_ok[None, :]
    if MASKED:
        upper = upper & (tl.load(ok_ptr) != 0)
    m_base = m_ptr + batch * s_mb
    out = alpha * acc
    if READ_M:
        old = tl.load(m_base + rows * s_mr + cols * s_mc, mask=upper, other=0.0).to(tl.float32)
        out += beta * old
    out = tl.where(rows == cols, out + diag, out)
    out = out.to(m_ptr.dtype.element_ty)
    tl.store(m_base + rows * s_mr + cols * s_mc, out, mask=upper)
    # The mirror image, stored as the transposed tile so that the writes stay row-contiguous.
    lower = (offs_r[None, :] <= offs_c[:, None]) & r_ok[None, :] & c_ok[:, None]
    if MASKED:
        lower = lower & (tl.load(ok_ptr) != 0)
    tl.store(m_base + offs_c[:, None] * s_mr + offs_r[None, :] * s_mc, tl.trans(out), mask=lower)


def sym_update(M: Tensor, X: Tensor, alpha: float, beta: float, diag: float,
               ok: Tensor | None = None) -> None:
    """M[b] <- beta M[b] + alpha X[b]^T X[b] + diag I for M (B, d, d), X (B, m, d), mirrored
    (only where the 0-dim bool ``ok`` is True, when given); the batch index is grid axis 1 (one
    launch per :func:`_tiles.batch_chunks` slice)."""
    B, d, _ = M.shape
    m = X.shape[1]
    if B == 0 or d == 0:
        return

    precision = _tiles.dot_precision(X.dtype)
    d_load = d
    if X.stride(-1) == 1:  # rows of X loaded aligned: as they are, or zero-padded
        X, d_load = _tiles.aligned_rows(X)
    for part in _tiles.batch_chunks(B):
        Mp, Xp = M[part], X[part]

        def grid(meta: dict, batch: int = Mp.shape[0]) -> tuple[int, int]:
            """T (T + 1) / 2 upper tiles of the T x T tile grid, per batch entry."""
            tiles = triton.cdiv(d, meta["BLOCK"])
            return (tiles * (tiles + 1) // 2, batch)

        _sym_update_kernel[grid](
            Mp, Xp, Mp if ok is None else ok, d, d_load, m, rows_class(m), Mp.stride(0), Mp.stride(1), Mp.stride(2),
            Xp.stride(0), Xp.stride(1), Xp.stride(2),
            float(alpha), float(beta), float(diag),
            READ_M=beta != 0.0, MASKED=ok is not None, PRECISION=precision)


def _update_stack(M: Tensor, X: Tensor, alpha: float, beta: float, ok: Tensor | None) -> None:
    """M <- beta * M + alpha * X^T X in place (where ``ok``, when given); batched."""
    d, m = M.shape[-1], X.shape[-2]
    if M.dim() == 2:
        sym_update(M.unsqueeze(0), X.unsqueeze(0), alpha, beta, 0.0, ok)
        return
    X3 = X.reshape(-1, m, d)
    try:
        M3 = M.view(-1, d, d)
    except RuntimeError:  # batch dims that cannot be flattened in place: update a copy
        M3 = M.reshape(-1, d, d).contiguous()
        sym_update(M3, X3, alpha, beta, 0.0, ok)
        M.copy_(M3.view(M.shape))
        return
    sym_update(M3, X3, alpha, beta, 0.0, ok)


def _factor_update(M: Tensor, X: Tensor, alpha: float, beta: float) -> None:
    """M <- beta * M + alpha * X^T X in place (the launcher behind the custom op); batched."""
    _update_stack(M, X, alpha, beta, None)


def _factor_update_masked(M: Tensor, X: Tensor, alpha: float, beta: float, ok: Tensor) -> None:
    """:func:`_factor_update` where the device flag ``ok`` (the launcher behind the masked op)."""
    _update_stack(M, X, alpha, beta, ok)


def _no_output(M: Tensor, X: Tensor, alpha: float, beta: float) -> None:
    """Fake implementation: the op only writes M."""


def _no_output_masked(M: Tensor, X: Tensor, alpha: float, beta: float, ok: Tensor) -> None:
    """Fake implementation: the masked op only writes M."""


factor_update_op = _library.triton_op("factor_update", ("M",), _no_output)(_factor_update)
factor_update_masked_op = _library.triton_op("factor_update_masked", ("M",),
                                             _no_output_masked)(_factor_update_masked)


def factor_update(M: Tensor, X: Tensor, alpha: float, beta: float) -> Tensor:
    """M <- beta * M + alpha * X^T X in place (symmetric; ``beta == 0`` never reads M); batched;
    through the custom op ``grng_triton::factor_update``."""
    factor_update_op(M, X, alpha, beta)
    return M


def supports(M: Tensor, X: Tensor, alpha: float, beta: float) -> bool:
    """True for fp32 M (..., d, d) and fp32/bf16/fp16 X (..., m, d) on a device the kernel runs on."""
    return (M.dtype == torch.float32 and X.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and M.dim() >= 2 and X.dim() == M.dim() and M.shape[-1] == M.shape[-2]
            and X.shape[-1] == M.shape[-1] and X.shape[:-2] == M.shape[:-2]
            and _tiles.device_ok(M, X))


def factor_update_masked(M: Tensor, X: Tensor, alpha: float, beta: float, ok: Tensor) -> Tensor:
    """M <- beta * M + alpha * X^T X in place where ``ok`` (a 0-dim bool on M's device), M
    untouched otherwise; through the custom op ``grng_triton::factor_update_masked``."""
    factor_update_masked_op(M, X, alpha, beta, ok)
    return M


def supports_masked(M: Tensor, X: Tensor, alpha: float, beta: float, ok: Tensor) -> bool:
    """:func:`supports`, with ``ok`` a 0-dim bool tensor on M's device."""
    return (isinstance(ok, Tensor) and ok.dtype == torch.bool and ok.dim() == 0
            and ok.device == M.device and supports(M, X, alpha, beta))
