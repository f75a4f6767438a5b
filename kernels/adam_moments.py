"""Adam's masked moment step, elementwise in one launch (no host read): EKFAC's per-step phase in
its eigenbasis (:func:`grng.ops.masked.adam_moments_masked`, the reference).

Where the device flag ``ok``: m <- beta1 m + (1 - beta1) Vb, v <- beta2 v + (1 - beta2) Vb^2 in
place; everywhere N = (m / bias1) / (sqrt(v) / bias2 + eps) from the moments as they end up.
``bias1`` and ``bias2`` hold one value per leading index (a block of a stack; one value for a
single block), so element e reads entry e // per, per = numel / len(bias). Each program takes
BLOCK consecutive elements; every load and store is masked by the length, and the stores of m
and v also by the flag, so a skipped step writes nothing there whatever Vb holds. Values are
computed in fp32 (fp64 for fp64 tensors) and rounded once when stored. Tensors not laid out
densely in memory order (a strided view) go through contiguous copies (m, v copied back).
Registered as the custom op ``grng_triton::adam_moments_masked``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _library, _tiles

#: elements per program (under the interpreter a small block, so the tests' odd sizes span
#: several programs and a partial last one)
_BLOCK, _BLOCK_INTERPRET = 1024, 64
_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


@triton.jit
def _adam_moments_kernel(v_ptr, m_ptr, s_ptr, n_ptr, bias1_ptr, bias2_ptr, ok_ptr, numel, per,
                         beta1, beta2, eps, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    """One BLOCK of elements: the masked moment update and the ratio (module docstring)."""
    offs = _tiles.block_range(tl.program_id(0), BLOCK)
    inside = offs < numel
    ok = tl.load(ok_ptr) != 0
    g = tl.load(v_ptr + offs, mask=inside, other=0.0).to(WIDE)
    m = tl.load(m_ptr + offs, mask=inside, other=0.0).to(WIDE)
    s = tl.load(s_ptr + offs, mask=inside, other=1.0).to(WIDE)
    row = offs // per
    b1 = tl.load(bias1_ptr + row, mask=inside, other=1.0).to(WIDE)
    b2 = tl.load(bias2_ptr + row, mask=inside, other=1.0).to(WIDE)
    m = tl.where(ok, m * beta1 + (1.0 - beta1) * g, m)
    s = tl.where(ok, s * beta2 + (1.0 - beta2) * (g * g), s)
    write = inside & ok
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=write)
    tl.store(s_ptr + offs, s.to(s_ptr.dtype.element_ty), mask=write)
    n = (m / b1) / (tl.sqrt(s) / b2 + eps)
    tl.store(n_ptr + offs, n.to(n_ptr.dtype.element_ty), mask=inside)


def _adam_moments_masked(Vb: Tensor, m: Tensor, v: Tensor, beta1: float, beta2: float,
                         bias1: Tensor, bias2: Tensor, eps: float, ok: Tensor) -> Tensor:
    """The launch (the function behind the custom op); returns N, fresh and contiguous."""
    N = _tiles.new_output(tuple(Vb.shape), Vb.dtype, Vb.device)
    numel = Vb.numel()
    if numel == 0:
        return N
    mc, vc = m.contiguous(), v.contiguous()  # views of m, v where they are dense already
    wide = tl.float64 if Vb.dtype == torch.float64 else tl.float32
    dtype = torch.float64 if Vb.dtype == torch.float64 else torch.float32
    block = _BLOCK_INTERPRET if _tiles.interpreter_enabled() else _BLOCK
    _adam_moments_kernel[(triton.cdiv(numel, block),)](
        Vb.contiguous(), mc, vc, N, bias1.to(dtype).contiguous(), bias2.to(dtype).contiguous(),
        ok.view(torch.uint8), numel, numel // bias1.numel(), float(beta1), float(beta2),
        float(eps), WIDE=wide, BLOCK=block)
    if mc.data_ptr() != m.data_ptr():
        m.copy_(mc)
    if vc.data_ptr() != v.data_ptr():
        v.copy_(vc)
    return N


def _fake(Vb: Tensor, m: Tensor, v: Tensor, beta1: float, beta2: float, bias1: Tensor,
          bias2: Tensor, eps: float, ok: Tensor) -> Tensor:
    """Fake implementation: N, shaped as Vb."""
    return torch.empty(Vb.shape, dtype=Vb.dtype, device=Vb.device)


adam_moments_masked_op = _library.triton_op("adam_moments_masked", ("m", "v"),
                                            _fake)(_adam_moments_masked)


def adam_moments_masked(Vb: Tensor, m: Tensor, v: Tensor, beta1: float, beta2: float,
                        bias1: Tensor, bias2: Tensor, eps: float, ok: Tensor) -> Tensor:
    """Adam's moment update in place where ``ok`` and the ratio N (module docstring); through
    the custom op ``grng_triton::adam_moments_masked``."""
    return adam_moments_masked_op(Vb, m, v, beta1, beta2, bias1, bias2, eps, ok)


def supports(Vb: Tensor, m: Tensor, v: Tensor, beta1: float, beta2: float, bias1: Tensor,
             bias2: Tensor, eps: float, ok: Tensor) -> bool:
    """Vb, m, v of one shape and dtype (fp32, bf16, fp64); bias1, bias2 floating, shaped as a
    leading part of Vb's shape; ok a 0-dim bool; all on one device the kernel runs on."""
    lead = tuple(bias1.shape)
    return (Vb.dtype in _DTYPES and m.dtype == v.dtype == Vb.dtype
            and m.shape == v.shape == Vb.shape and bias1.shape == bias2.shape
            and bias1.is_floating_point() and bias2.is_floating_point()
            and tuple(Vb.shape[:len(lead)]) == lead
            and isinstance(ok, Tensor) and ok.dtype == torch.bool and ok.dim() == 0
            and _tiles.device_ok(Vb, m, v, bias1, bias2, ok))
