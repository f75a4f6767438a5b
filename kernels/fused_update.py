"""Sync-free fused update over all parameters in two multi-tensor launches (no host read).

theta <- (1 - lr wd) theta - lr buf, buf = momentum buf + nu (d + rho g), written only where
``ok`` and every d + rho g is finite; nu = min(1, sqrt(kl_clip / (lr^2 sum <d + rho g, g>)))
(1 when the sum is not positive or there is no clip). The math of
:func:`grng.ops.masked.fused_update_masked`, its reference.

One kernel, launched twice over one table of all the call's tensors (a row per parameter:
the int64 addresses of theta, g, d and buf, the element count, the first chunk and a dtype
code per role, so fp32, bf16 and fp16 tensors share a launch):

1. ``PHASE = 0`` (reduce): each program walks its chunks of BLOCK elements (chunk c goes to
   program c mod P, P <= MAX_PROGRAMS programs) and writes two partials: sum <d + rho g, g> in
   float64, and whether any d + rho g (rounded to its dtype first, as the reference forms it)
   is not finite.
2. ``PHASE = 1`` (apply): every program sums the P partials in the same fixed order (so all
   agree on nu and on the flag, bit for bit, run after run: no atomics), ok = ok_in and no
   non-finite value, nu as above, and updates its chunks; every load and store is masked by
   the tensor's length and every store also by ok, so a skipped step writes nothing. Program 0
   stores ok (the op's result).

Element values are computed in fp32 and rounded once when stored. Tensors of one parameter are
walked in memory order, which requires them to share one dense layout: a tensor that does not
(a strided view, a gradient laid out unlike its parameter) goes through a copy in the
parameter's layout (copied back if written). Registered as the custom op
``grng_triton::fused_update_masked`` so that a compiled step can call it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _library, _tiles

#: dtype codes of the table (the kernel branches on them)
CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
#: columns of a table row: addresses of theta, g, d, buf; numel; first chunk; dtype codes of
#: theta, g, d, buf and of d + rho g
ROW = 11
#: elements per chunk and the most programs (partials) of a launch, powers of two; under the
#: interpreter small ones, so that the tests' odd sizes span several chunks and programs loop
_BLOCK, _MAX_PROGRAMS = (1024, 1024)
_BLOCK_INTERPRET, _MAX_PROGRAMS_INTERPRET = (64, 4)
_FP32_MAX = 3.4028234663852886e38


def launch_sizes() -> tuple[int, int]:
    """(BLOCK, MAX_PROGRAMS) of this process's launches."""
    return (_BLOCK_INTERPRET, _MAX_PROGRAMS_INTERPRET) if _tiles.interpreter_enabled() \
        else (_BLOCK, _MAX_PROGRAMS)


@triton.jit
def _load(addr, code, offs, mask):
    """fp32 values of the fp32 (code 0), bf16 (1) or fp16 (2) tensor at int64 address ``addr``."""
    if code == 0:
        x = tl.load(addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
    elif code == 1:
        x = tl.load(addr.to(tl.pointer_type(tl.bfloat16)) + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.load(addr.to(tl.pointer_type(tl.float16)) + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _store(addr, code, offs, x, mask):
    """Store fp32 ``x`` rounded to the tensor's dtype (code as in :func:`_load`)."""
    if code == 0:
        tl.store(addr.to(tl.pointer_type(tl.float32)) + offs, x, mask=mask)
    elif code == 1:
        tl.store(addr.to(tl.pointer_type(tl.bfloat16)) + offs, x.to(tl.bfloat16), mask=mask)
    else:
        tl.store(addr.to(tl.pointer_type(tl.float16)) + offs, x.to(tl.float16), mask=mask)


@triton.jit
def _rounded(x, code):
    """fp32 ``x`` rounded to the dtype of ``code`` (and back to fp32)."""
    if code == 1:
        y = x.to(tl.bfloat16).to(tl.float32)
    elif code == 2:
        y = x.to(tl.float16).to(tl.float32)
    else:
        y = x
    return y


@triton.jit
def _masked_update_kernel(table_ptr, n_tensors, dot_ptr, bad_ptr, ok_in_ptr, ok_out_ptr,
                          lr, momentum, decay, rho, clip_over_lr2,
                          PHASE: tl.constexpr, CLIP: tl.constexpr, HAS_RHO: tl.constexpr,
                          HAS_MOMENTUM: tl.constexpr, HAS_DECAY: tl.constexpr,
                          ROW_LEN: tl.constexpr, BLOCK: tl.constexpr,
                          MAX_PROGRAMS: tl.constexpr):
    """PHASE 0: partial sum <d + rho g, g> (fp64) and non-finite flag of this program's chunks.
    PHASE 1: theta, buf updated on this program's chunks where ok (module docstring)."""
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    if PHASE == 1:
        slots = tl.arange(0, MAX_PROGRAMS)
        used = slots < P
        vg = tl.sum(tl.load(dot_ptr + slots, mask=used, other=0.0), axis=0)
        bad = tl.max(tl.load(bad_ptr + slots, mask=used, other=0), axis=0)
        ok = (tl.load(ok_in_ptr) != 0) & (bad == 0)
        nu = 1.0
        if CLIP:
            ratio = tl.cast(clip_over_lr2, tl.float64) / vg
            nu = tl.where((vg > 0.0) & (ratio < 1.0), tl.sqrt(tl.maximum(ratio, 0.0)), 1.0)
            nu = nu.to(tl.float32)
        if pid == 0:
            tl.store(ok_out_ptr, ok.to(tl.int8))
    dot = tl.zeros([BLOCK], dtype=tl.float64)
    nonfinite = tl.zeros([BLOCK], dtype=tl.int32)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    for t in range(n_tensors):
        row = table_ptr + t * ROW_LEN
        p_addr = tl.load(row + 0)
        g_addr = tl.load(row + 1)
        d_addr = tl.load(row + 2)
        b_addr = tl.load(row + 3)
        numel = tl.load(row + 4)
        first = tl.load(row + 5)
        p_code = tl.load(row + 6)
        g_code = tl.load(row + 7)
        d_code = tl.load(row + 8)
        b_code = tl.load(row + 9)
        c_code = tl.load(row + 10)
        n_chunks = tl.cdiv(numel, BLOCK)
        j0 = (pid - first % P + P) % P  # this program's first chunk of the tensor
        for j in range(j0, n_chunks, P):
            offs = j * BLOCK + lanes
            mask = offs < numel
            g = _load(g_addr, g_code, offs, mask)
            c = _load(d_addr, d_code, offs, mask)
            if HAS_RHO:
                c = c + rho * g
            if PHASE == 0:
                finite = tl.abs(_rounded(c, c_code)) <= 3.4028234663852886e38
                nonfinite = tl.maximum(nonfinite, (mask & ~finite).to(tl.int32))
                dot += c.to(tl.float64) * g.to(tl.float64)
            else:
                write = mask & ok
                if CLIP:
                    c = c * nu
                if HAS_MOMENTUM:
                    c = _load(b_addr, b_code, offs, mask) * momentum + c
                    _store(b_addr, b_code, offs, c, write)
                p = _load(p_addr, p_code, offs, mask)
                if HAS_DECAY:
                    p = p * decay
                _store(p_addr, p_code, offs, p - lr * c, write)
    if PHASE == 0:
        tl.store(dot_ptr + pid, tl.sum(dot, axis=0))
        tl.store(bad_ptr + pid, tl.max(nonfinite, axis=0))


def _dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill one block of memory without gaps or overlaps (any order)."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _in_layout(t: Tensor, like: Tensor) -> Tensor:
    """``t`` itself when it is laid out as the dense ``like``, else a copy in that layout."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


def _promoted(a: Tensor, b: Tensor) -> int:
    """The dtype code of a + b."""
    return CODES[torch.promote_types(a.dtype, b.dtype)]


def _fused_update_masked(params: list[Tensor], grads: list[Tensor], directions: list[Tensor],
                         momentum_buffers: list[Tensor], lr: float, momentum: float,
                         weight_decay: float, rho: float, kl_clip: float | None,
                         ok: Tensor) -> Tensor:
    """The two launches (module docstring); returns a fresh 0-dim bool: ok and all finite."""
    device = ok.device
    block, max_programs = launch_sizes()
    has_momentum = momentum != 0.0
    rows: list[list[int]] = []
    # the table holds raw addresses: every tensor it points to is kept alive until the launches
    keep: list[Tensor] = []
    write_back: list[tuple[Tensor, Tensor]] = []  # (tensor, the copy the kernel writes)
    chunks = 0
    for i, (p, g, d) in enumerate(zip(params, grads, directions)):
        if p.numel() == 0:
            continue
        pw = p if _dense(p) else p.contiguous()
        if pw is not p:
            write_back.append((p, pw))
        gw, dw = _in_layout(g, pw), _in_layout(d, pw)
        b = bw = pw  # without momentum the buffer column is never read
        if has_momentum:
            b = momentum_buffers[i]
            bw = _in_layout(b, pw)
            if bw is not b:
                write_back.append((b, bw))
        keep += [pw, gw, dw, bw]
        rows.append([pw.data_ptr(), gw.data_ptr(), dw.data_ptr(), bw.data_ptr(), p.numel(), chunks,
                     CODES[p.dtype], CODES[g.dtype], CODES[d.dtype], CODES[b.dtype],
                     _promoted(d, g) if rho != 0.0 else CODES[d.dtype]])
        chunks += triton.cdiv(p.numel(), block)
    ok_out = torch.empty((), dtype=torch.uint8, device=device)
    if chunks == 0:
        return ok_out.copy_(ok).view(torch.bool)
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":  # pinned, asynchronous: the host never waits for the device
        table = table.pin_memory().to(device, non_blocking=True)
    programs = min(chunks, max_programs)
    dot = torch.empty(programs, dtype=torch.float64, device=device)
    bad = torch.empty(programs, dtype=torch.int32, device=device)
    # nu = min(1, sqrt(kl_clip / lr^2 / sum)), kl_clip / lr^2 formed on the host in float64
    # (an lr^2 that underflows to 0 leaves nu = 1, as in the reference)
    clip = kl_clip is not None and lr > 0.0 and lr * lr > 0.0
    clip_over_lr2 = min(kl_clip / (lr * lr), _FP32_MAX) if clip else 1.0
    for phase in (0, 1):
        _masked_update_kernel[(programs,)](
            table, len(rows), dot, bad, ok.view(torch.uint8), ok_out,
            float(lr), float(momentum), float(1.0 - lr * weight_decay), float(rho),
            clip_over_lr2, PHASE=phase, CLIP=clip, HAS_RHO=rho != 0.0, HAS_MOMENTUM=has_momentum,
            HAS_DECAY=weight_decay != 0.0, ROW_LEN=ROW, BLOCK=block, MAX_PROGRAMS=max_programs)
    for t, copy in write_back:
        t.copy_(copy)
    return ok_out.view(torch.bool)


def _fresh_flag(params: list[Tensor], grads: list[Tensor], directions: list[Tensor],
                momentum_buffers: list[Tensor], lr: float, momentum: float, weight_decay: float,
                rho: float, kl_clip: float | None, ok: Tensor) -> Tensor:
    """Fake implementation: a fresh 0-dim bool on ``ok``'s device."""
    return torch.empty((), dtype=torch.bool, device=ok.device)


# cudagraph_unsafe: each call copies a fresh host-built table of addresses to the device,
# which a captured CUDA graph would replay stale (torch.compile's cudagraphs run it outside)
fused_update_masked_op = _library.triton_op(
    "fused_update_masked", ("params", "momentum_buffers"), _fresh_flag,
    tags=(torch.Tag.cudagraph_unsafe,))(_fused_update_masked)


def fused_update_masked(params: Sequence[Tensor], grads: Sequence[Tensor],
                        directions: Sequence[Tensor], momentum_buffers: Sequence[Tensor] | None,
                        lr: float, momentum: float, weight_decay: float, rho: float,
                        kl_clip: float | None, ok: Tensor) -> Tensor:
    """theta <- (1 - lr wd) theta - lr buf, buf = momentum buf + nu (d + rho g), where ok and
    every d + rho g is finite (returned as a fresh device flag); two launches, no host read."""
    return fused_update_masked_op(list(params), list(grads), list(directions),
                                  [] if momentum_buffers is None else list(momentum_buffers),
                                  float(lr), float(momentum), float(weight_decay), float(rho),
                                  None if kl_clip is None else float(kl_clip), ok)


def supports(params: Sequence[Tensor], grads: Sequence[Tensor], directions: Sequence[Tensor],
             momentum_buffers: Sequence[Tensor] | None, lr: float, momentum: float,
             weight_decay: float, rho: float, kl_clip: float | None, ok: Tensor) -> bool:
    """True for fp32/bf16/fp16 tensors, a theta, g, d (and buf when momentum != 0) of one shape
    per parameter, and a 0-dim bool ``ok``, all on one device the kernel runs on."""
    bufs = list(momentum_buffers or ())
    if not (len(params) == len(grads) == len(directions)) or ok.dim() != 0 or ok.dtype != torch.bool:
        return False
    if momentum != 0.0 and len(bufs) != len(params):
        return False
    groups = [(p, g, d, *((bufs[i],) if momentum != 0.0 else ()))
              for i, (p, g, d) in enumerate(zip(params, grads, directions))]
    tensors = [t for group in groups for t in group]
    return (all(t.dtype in CODES and t.shape == group[0].shape for group in groups for t in group)
            and _tiles.device_ok(ok, *tensors))
