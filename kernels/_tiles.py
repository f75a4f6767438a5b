"""Pieces shared by grng's Triton kernels: the masked GEMM tile loop, autotune configs, helpers.

Every load and store is masked (the interpreter does no bounds checks), so any size runs the
same tiled path: the grid covers the sizes rounded up to whole tiles and the masks cut the edge
tiles. On a GPU the masks and strides also decide how operand tiles load: Triton vectorizes
(16-byte ``cp.async``, pipelined) only rows that start aligned and masks at multiples of 16,
so the launchers zero-pad operands whose sides are not multiples of 16 (a bias column's 769 or
3073) and run the product over the padded sizes, storing only the true ones
(:func:`padded_matrices`, :func:`aligned_rows`): 769 loads as 768 does.
Element offsets are 64-bit (:func:`block_range`, :func:`stride64`): index x stride products and
pointer steps exceed 2^31 past d = 46341 (a d x d matrix) and would wrap in 32-bit arithmetic.
Batched launches (stacked blocks of one shape) put the batch index on grid axis 1 and step each
operand's base pointer by batch x its batch stride, in int64 too; a batch longer than CUDA's
65535 programs on that axis is split into launches of at most that many (:func:`batch_chunks`).

Tile products accumulate in fp32; the launcher picks their input precision once per call
(:func:`dot_precision`, a ``PRECISION`` constexpr): bf16/fp16 operands go to the tensor cores
as they are ("native"); fp32 operands use TF32 tensor cores ("tf32") when torch allows TF32
matmuls, and exact fp32 ("ieee", as torch's default matmul) otherwise. Triton's interpreter
always gets "ieee": it stores bf16 as raw 16-bit integers, so its bf16 ``tl.dot`` would be
wrong, while the exact fp32 product of bf16 values is what the tensor cores compute (its
fp32 -> bf16 casts truncate, though, where compiled kernels round to nearest even).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from grng.ops.dispatch import interpreter_enabled

# Hopper (H100/H200) GEMM tiles; under the interpreter one small tile keeps the tests fast. Each
# is kept where it compiles for sm_90 without spills (:func:`sm90_pruner`): the first three
# on tensor cores, the last two at every precision (exact fp32 dots hold operands in registers).
_GEMM_HOPPER = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
]
_GEMM_INTERPRET = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)]

# Square tiles for the symmetric (one-triangle) kernels: 128 only on tensor cores without
# reading M in the epilogue (factor_update's pruning).
_SYM_HOPPER = [
    triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
]
_SYM_INTERPRET = [triton.Config({"BLOCK": 32, "BLOCK_K": 32}, num_warps=4)]


#: sm_90 (H100/H200): the most shared memory one block may use (227 KiB), and what a config
#: keeps of it free beyond its staged operand tiles (barriers, the epilogue's layout changes)
SM90_SHARED = 232448
SM90_SHARED_RESERVE = 8192


def operand_bytes(precision: str) -> int:
    """Bytes per staged operand element of a dot at ``precision``: 2 for "native" (bf16/fp16
    operands), 4 for fp32 operands ("ieee", "tf32")."""
    return 2 if precision == "native" else 4


def tile_sizes(config: triton.Config) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) of a GEMM config, or (BLOCK, BLOCK, BLOCK_K) of a square one."""
    kw = config.kwargs
    return kw.get("BLOCK_M", kw.get("BLOCK")), kw.get("BLOCK_N", kw.get("BLOCK")), kw["BLOCK_K"]


def staged_bytes(config: triton.Config, precision: str) -> int:
    """Shared memory of the pipelined operand tiles: stages x (BM BK + BK BN) x element size."""
    bm, bn, bk = tile_sizes(config)
    return config.num_stages * (bm * bk + bk * bn) * operand_bytes(precision)


def accumulator_registers(config: triton.Config) -> int:
    """fp32 accumulator elements per thread: BM BN / (32 num_warps)."""
    bm, bn, _ = tile_sizes(config)
    return bm * bn // (32 * config.num_warps)


def fits_sm90(config: triton.Config, precision: str, max_accumulator: int) -> bool:
    """Whether ``config`` fits an H100 at ``precision``: its staged tiles within the shared memory
    (less the reserve) and at most ``max_accumulator`` accumulator registers per thread (past
    it ptxas spills: tools/sm90_compile.py, bench/results/sm90_compile.md)."""
    return (staged_bytes(config, precision) <= SM90_SHARED - SM90_SHARED_RESERVE
            and accumulator_registers(config) <= max_accumulator)


def sm90_pruner(max_accumulator: Callable[[dict, dict], int],
                max_block_k: Callable[[dict, dict], int] | None = None):
    """An autotuner ``early_config_prune``: the configs that :func:`fits_sm90` at the launch's
    ``PRECISION`` with ``max_accumulator(arguments, keyword arguments)`` registers and, when
    ``max_block_k`` is given, at most that BLOCK_K (the config with the fewest staged bytes when
    none fits; every config under the interpreter)."""
    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        if interpreter_enabled():
            return configs
        precision = kwargs["PRECISION"]
        limit = max_accumulator(named_args, kwargs)
        depth = max_block_k(named_args, kwargs) if max_block_k else None
        kept = [c for c in configs if fits_sm90(c, precision, limit)
                and (depth is None or tile_sizes(c)[2] <= depth)]
        return kept or [min(configs, key=lambda c: staged_bytes(c, precision))]
    return prune


def multiples_of_16(*values: int) -> bool:
    """Whether every value (sizes, strides of a stored tensor) is 1 or a multiple of 16: then
    its tiles store in vectors; otherwise element by element, each store with its own address
    (what pushes the larger tiles into spills at 769)."""
    return all(int(v) == 1 or int(v) % 16 == 0 for v in values)


def gemm_pruner(*out_args: str) -> dict:
    """``prune_configs_by`` of a strided GEMM kernel (eigen apply, Newton-Schulz) whose output is
    described by the arguments ``out_args``: accumulator registers per thread at most 64 on
    tensor cores into an aligned output, else 32 (exact fp32 dots hold their operand tiles in
    registers too; an unaligned output stores element by element). Measured by
    tools/sm90_compile.py: past these limits ptxas spilled."""
    def limit(args: dict, kwargs: dict) -> int:
        aligned = multiples_of_16(*(args[a] for a in out_args))
        return 64 if kwargs["PRECISION"] != "ieee" and aligned else 32
    return {"early_config_prune": sm90_pruner(limit)}


def gemm_configs() -> list[triton.Config]:
    """Autotune configs for the GEMM kernels: Hopper tiles, or one 32x32x32 tile when interpreting."""
    return _GEMM_INTERPRET if interpreter_enabled() else _GEMM_HOPPER


def sym_configs() -> list[triton.Config]:
    """Autotune configs for the symmetric kernels: square Hopper tiles, or 32x32 when interpreting."""
    return _SYM_INTERPRET if interpreter_enabled() else _SYM_HOPPER


# CUDA's limit on the programs along grid axes 1 and 2 (axis 1 is the batch axis).
MAX_GRID_BATCH = 65535


def batch_chunks(B: int) -> list[slice]:
    """[0, B) cut into consecutive slices of at most MAX_GRID_BATCH batch entries (one launch each)."""
    return [slice(b, min(b + MAX_GRID_BATCH, B)) for b in range(0, B, MAX_GRID_BATCH)]


def device_ok(*tensors: Tensor) -> bool:
    """True when all tensors sit on one CUDA device, or on the CPU with the interpreter on."""
    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        return False
    return dev.type == "cuda" or (dev.type == "cpu" and interpreter_enabled())


def tf32_allowed() -> bool:
    """Whether torch lets fp32 matmuls use TF32: its ``fp32_precision`` (torch >= 2.9, which the
    legacy flags also set), else ``allow_tf32`` or a float32 matmul precision of high / medium."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # reading allow_tf32 raises once the new API was used
        precision = matmul.fp32_precision
        if precision == "none":  # inherit the global default
            precision = torch.backends.fp32_precision
        return precision == "tf32"
    return bool(matmul.allow_tf32) or torch.get_float32_matmul_precision() in ("high", "medium")


def dot_precision(dtype: torch.dtype) -> str:
    """``PRECISION`` of tile products on ``dtype`` operands: "native" for bf16/fp16, "tf32" for
    fp32 when torch allows TF32, else "ieee" (always "ieee" under the interpreter)."""
    if interpreter_enabled():
        return "ieee"
    if dtype in (torch.bfloat16, torch.float16):
        return "native"
    return "tf32" if tf32_allowed() else "ieee"


@triton.jit
def dot_acc(a, b, acc, PRECISION: tl.constexpr):
    """acc + a b with fp32 accumulation: a, b as they are ("native"), or as fp32 at PRECISION."""
    if PRECISION == "native":
        acc = tl.dot(a, b, acc)
    else:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    return acc


#: elements per 16 bytes' worth of alignment Triton specializes on: an int argument divisible
#: by 16 (and a 16-byte aligned pointer) lets a row-contiguous tile load in 16-byte vectors,
#: and on sm_90 through pipelined ``cp.async`` copies (bf16 rows otherwise load element by
#: element, unpipelined: tools/sm90_compile.py)
ALIGN = 16
#: whether the launchers zero-pad sides that are not multiples of ALIGN
#: (tests/test_triton_offsets.py turns it off: its far-strided views must reach the kernels)
PAD_ODD_SIDES = True


def aligned_rows(X: Tensor) -> tuple[Tensor, int]:
    """(X', width to load): X (..., m, d) itself and d when its rows start 16-element aligned
    (d, the row and batch strides multiples of :data:`ALIGN`, unit column stride, aligned data);
    else a copy whose rows are zero-padded to d rounded up to ALIGN, and that width. Loads
    masked at the padded width then take the vectorized, pipelined path of an aligned d (a
    bias-augmented 769 that of 768); the zero columns add nothing to a product over rows."""
    d = X.shape[-1]
    strides_ok = all(s % ALIGN == 0 for s in X.stride()[:-1]) and X.stride(-1) == 1
    if not PAD_ODD_SIDES or (d % ALIGN == 0 and strides_ok and X.data_ptr() % 16 == 0):
        return X, d
    width = padded(d)
    out = X.new_zeros((*X.shape[:-1], width))
    out[..., :d] = X
    return out, width


def padded(n: int) -> int:
    """n rounded up to a multiple of :data:`ALIGN` (n itself when padding is off)."""
    return triton.cdiv(n, ALIGN) * ALIGN if PAD_ODD_SIDES else n


def is_aligned(t: Tensor) -> bool:
    """Whether the matrices t (..., r, c) load in 16-byte vectors as they are: r and c multiples
    of :data:`ALIGN`, one of the last two strides 1 and every other stride a multiple of ALIGN,
    data 16-byte aligned."""
    r, c = t.shape[-2:]
    unit = -1 if t.stride(-1) == 1 else -2 if t.stride(-2) == 1 else None
    others = [s for i, s in enumerate(t.stride()) if unit is None or i != t.dim() + unit]
    return (r % ALIGN == 0 and c % ALIGN == 0 and unit is not None
            and all(s % ALIGN == 0 for s in others) and t.data_ptr() % 16 == 0)


def padded_matrices(t: Tensor) -> Tensor:
    """t itself when :func:`is_aligned`, else a contiguous copy with both matrix sides zero-padded
    to multiples of ALIGN: a GEMM over the padded sizes reads only aligned rows (the path of
    an aligned size) and its padded rows and columns are zero, never stored."""
    if is_aligned(t) or not PAD_ODD_SIDES:
        return t
    if t.stride(-2) == 1 and t.stride(-1) != 1:  # column-major (an eigh basis) stays so
        return padded_matrices(t.transpose(-2, -1)).transpose(-2, -1)
    r, c = t.shape[-2:]
    out = t.new_zeros((*t.shape[:-2], padded(r), padded(c)))
    out[..., :r, :c] = t
    return out


def padded_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                  column_major: bool = False) -> Tensor:
    """An intermediate (..., r, c) buffer with both sides padded to multiples of ALIGN, its padding
    zero (a kernel writes the r x c part; without padding a :func:`new_output`);
    ``column_major``: each matrix stored transposed (the layout in which a later product's B
    operand is K-major, as TF32 tensor cores load it)."""
    *batch, r, c = shape
    stored = (*batch, c, r) if column_major else tuple(shape)
    full = (*batch, padded(c), padded(r)) if column_major else (*batch, padded(r), padded(c))
    if full == stored:
        out = new_output(full, dtype, device)
    else:
        out = torch.zeros(full, dtype=dtype, device=device)
    return out.transpose(-2, -1) if column_major else out


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A fresh, uninitialized output buffer (tests replace this to poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def block_range(block, BLOCK: tl.constexpr):
    """block * BLOCK + [0, BLOCK) in int64, so index * stride never wraps at 2^31."""
    return tl.cast(block, tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)


@triton.jit
def stride64(stride):
    """A stride (a runtime int32, an int64, or a specialized constant 1) as an int64 scalar."""
    return tl.cast(stride, tl.int64)


@triton.jit
def gemm_tile(a_ptr, b_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, offs_m, offs_n,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """acc = A[offs_m, :] @ B[:, offs_n] for strided A (M x K), B (K x N), their tiles rounded to
    DOT_DTYPE, fp32 accumulation (offs_m, offs_n: int64 from :func:`block_range`)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = block_range(0, BLOCK_K)
    row_ok = offs_m[:, None] < M
    col_ok = offs_n[None, :] < N
    a_ptrs = a_ptr + offs_m[:, None] * s_am + offs_k[None, :] * s_ak
    b_ptrs = b_ptr + offs_k[:, None] * s_bk + offs_n[None, :] * s_bn
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=row_ok & k_ok[None, :], other=0.0).to(DOT_DTYPE)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok, other=0.0).to(DOT_DTYPE)
        acc = dot_acc(a, b, acc, PRECISION)
        a_ptrs += BLOCK_K * stride64(s_ak)
        b_ptrs += BLOCK_K * stride64(s_bk)
    return acc


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in GROUP_M-row bands (L2 reuse of the B tiles)."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


def gemm_grid(M: int, N: int, batch: int = 1):
    """Launch grid for a GEMM kernel: one program per BLOCK_M x BLOCK_N output tile (axis 0) and
    batch entry (axis 1)."""
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), batch)
