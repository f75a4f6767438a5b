"""Damped eigen-inverse application Q_G [(Q_G^T V Q_A) / (l_G l_A^T + damping)] Q_A^T.

Four strided GEMM launches of one kernel (transposes are stride swaps; a side that is not a
multiple of 16, such as a bias-augmented 769, is zero-padded in a copy so that every launch
loads aligned rows, the pipelined path of 768: :func:`_tiles.padded_matrices`):
T = Q_G^T V, S = (T Q_A) / D, U = Q_G S, out = U Q_A^T with D = max(l_G, 0) max(l_A, 0)^T +
damping. The divide by D is the second GEMM's epilogue, applied to its fp32 accumulator before
the store, so Q_G^T V Q_A is never written unscaled and read back. With ``QA is None`` (A
diagonal) it is S = (Q_G^T V) / D, out = Q_G S.

B stacked blocks of one shape (V: (B, d_G, d_A), Q_G: (B, d_G, d_G), l_G: (B, d_G), Q_A:
(B, d_A, d_A) or None, l_A: (B, d_A)) take the same four launches: the batch index is grid
axis 1 and each operand steps by its own batch stride (any strides, no copies). The autotune
key is the GEMM's sizes, never B: a new number of stacked blocks reuses the tuned tile.

Everything is computed in Q_G's dtype, as in the reference: V's tiles are rounded to it in the
kernel, and the intermediates and the output are stored in it. Precision of the dots: fp32
eigenvectors multiply in exact fp32 ("ieee"), or on TF32 tensor cores when torch allows TF32
matmuls; bf16/fp16 eigenvectors (``inverse_dtype=torch.bfloat16``) go to the tensor cores in
that dtype. The accumulators, l_G, l_A and the divide are fp32 in every case.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _library, _tiles


@triton.autotune(configs=_tiles.gemm_configs(),
                 key=["M", "N", "K", "M_out", "N_out", "SCALE", "PRECISION"],
                 prune_configs_by=_tiles.gemm_pruner("M_out", "N_out", "s_cm", "s_cn"))
@triton.jit
def _gemm_damped_kernel(a_ptr, b_ptr, c_ptr, lg_ptr, la_ptr, M, N, K, M_out, N_out,
                        s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_cb, s_cm, s_cn, s_lgb, s_lab,
                        damping, SCALE: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[b] = A[b] B[b], or (A[b] B[b]) / (max(lg[b], 0) max(la[b], 0)^T + damping) when SCALE,
    on one tile of batch entry b = program_id(1); the tiles of A and B are rounded to C's dtype.
    M, N, K: the operands' (padded) sizes the product runs over; M_out x N_out of C are stored."""
    batch = tl.program_id(1).to(tl.int64)
    a_ptr += batch * _tiles.stride64(s_ab)
    b_ptr += batch * _tiles.stride64(s_bb)
    c_ptr += batch * _tiles.stride64(s_cb)
    pid_m, pid_n = _tiles.grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, 8)
    offs_m = _tiles.block_range(pid_m, BLOCK_M)
    offs_n = _tiles.block_range(pid_n, BLOCK_N)
    acc = _tiles.gemm_tile(a_ptr, b_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, offs_m, offs_n,
                           BLOCK_M, BLOCK_N, BLOCK_K, c_ptr.dtype.element_ty, PRECISION)
    m_ok = offs_m < M_out
    n_ok = offs_n < N_out
    if SCALE:
        lg_ptr += batch * _tiles.stride64(s_lgb)
        la_ptr += batch * _tiles.stride64(s_lab)
        lg = tl.maximum(tl.load(lg_ptr + offs_m, mask=m_ok, other=1.0).to(tl.float32), 0.0)
        la = tl.maximum(tl.load(la_ptr + offs_n, mask=n_ok, other=1.0).to(tl.float32), 0.0)
        acc = acc / (lg[:, None] * la[None, :] + damping)
    tl.store(c_ptr + offs_m[:, None] * s_cm + offs_n[None, :] * s_cn,
             acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _gemm(A: Tensor, B: Tensor, C: Tensor, precision: str, lG: Tensor | None = None,
          lA: Tensor | None = None, damping: float = 0.0) -> Tensor:
    """C[..., :M, :N] = A B, or (A B) / (max(lG, 0) max(lA, 0)^T + damping) when lG (M), lA (N)
    (contiguous) are given, in C's dtype; A (..., M', K), B (..., K, N') with M' >= M, N' >= N
    zero-padded (the product runs over the padded sizes); 2-D, or batched over one leading
    dimension (one launch per batch_chunks slice). Returns C."""
    Mp, K = A.shape[-2:]
    Np = B.shape[-1]
    M, N = C.shape[-2:] if lG is None else (lG.shape[-1], lA.shape[-1])
    M, N = min(M, Mp), min(N, Np)
    if C.numel() == 0 or M == 0 or N == 0:
        return C
    scale = lG is not None
    A3, B3, C3 = (t if t.dim() == 3 else t.unsqueeze(0) for t in (A, B, C))
    # Without the epilogue the eigenvalue pointers are never read: C stands in for them.
    LG, LA = ((v if v.dim() == 2 else v.unsqueeze(0)) for v in (lG, lA)) if scale else (C3, C3)
    for part in _tiles.batch_chunks(C3.shape[0]):
        a, b, c, lg, la = A3[part], B3[part], C3[part], LG[part], LA[part]
        _gemm_damped_kernel[_tiles.gemm_grid(Mp, Np, c.shape[0])](
            a, b, c, lg, la, Mp, Np, K, M, N, a.stride(0), a.stride(1), a.stride(2),
            b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1), c.stride(2),
            lg.stride(0), la.stride(0), float(damping), SCALE=scale, PRECISION=precision)
    return C


def _eigen_apply(V: Tensor, QG: Tensor, lG: Tensor, QA: Tensor | None, lA: Tensor,
                 damping: float) -> Tensor:
    """Q_G [(Q_G^T V Q_A) / (l_G l_A^T + damping)] Q_A^T (the launcher behind the custom op).
    Operands whose sides are not multiples of 16 are copied zero-padded and the intermediates
    kept padded (:func:`_tiles.padded_matrices`), so that every launch loads aligned rows."""
    lG32 = lG.to(torch.float32).contiguous()
    lA32 = lA.to(torch.float32).contiguous()
    precision = _tiles.dot_precision(QG.dtype)
    out = _tiles.new_output(V.shape, QG.dtype, V.device)
    if out.numel() == 0:
        return out
    Vp, QGp = _tiles.padded_matrices(V), _tiles.padded_matrices(QG)
    QGt = QGp.transpose(-2, -1)

    def buffer(column_major: bool = False) -> Tensor:
        return _tiles.padded_buffer(tuple(V.shape), QG.dtype, V.device, column_major)

    # S is the B operand of Q_G S: stored column-major, TF32 loads it K-major in 16-byte copies
    if QA is None:
        S = _gemm(QGt, Vp, buffer(True), precision, lG32, lA32, damping)
        return _gemm(QGp, S, out, precision)
    QAp = _tiles.padded_matrices(QA)
    S = _gemm(_gemm(QGt, Vp, buffer(), precision), QAp, buffer(True), precision, lG32, lA32,
              damping)
    return _gemm(_gemm(QGp, S, buffer(), precision), QAp.transpose(-2, -1), out, precision)


def _output_like(V: Tensor, QG: Tensor, lG: Tensor, QA: Tensor | None, lA: Tensor,
                 damping: float) -> Tensor:
    """Fake implementation: an output of V's shape in Q_G's dtype."""
    return V.new_empty(V.shape, dtype=QG.dtype)


eigen_apply_op = _library.triton_op("eigen_apply", (), _output_like)(_eigen_apply)


def eigen_apply(V: Tensor, QG: Tensor, lG: Tensor, QA: Tensor | None, lA: Tensor,
                damping: float) -> Tensor:
    """Q_G [(Q_G^T V Q_A) / (l_G l_A^T + damping)] Q_A^T = (A (x) G + damping I)^-1 V; batched;
    through the custom op ``grng_triton::eigen_apply``."""
    return eigen_apply_op(V, QG, lG, QA, lA, damping)


def supports(V: Tensor, QG: Tensor, lG: Tensor, QA: Tensor | None, lA: Tensor,
             damping: float) -> bool:
    """True for fp32/bf16/fp16 V (d_G x d_A), Q_G (d_G x d_G), l_G (d_G), Q_A (d_A x d_A, Q_G's
    dtype) or None and l_A (d_A), or all of them with one leading batch dimension B, on a device
    the kernel runs on."""
    if V.dim() not in (2, 3):
        return False
    *batch, d_g, d_a = V.shape
    floats = (torch.float32, torch.bfloat16, torch.float16)
    qa_ok = QA is None or (QA.dtype == QG.dtype and QA.shape == (*batch, d_a, d_a))
    tensors = (V, QG, lG, lA) if QA is None else (V, QG, lG, lA, QA)
    return (QG.shape == (*batch, d_g, d_g) and qa_ok and all(t.dtype in floats for t in tensors)
            and lG.shape == (*batch, d_g) and lA.shape == (*batch, d_a)
            and _tiles.device_ok(*tensors))
