"""The two ceilings a kernel is judged against, measured in the same run as the kernels.

* :func:`copy_bandwidth`: GB/s of ``dst.copy_(src)`` on a buffer far larger than the caches
  (bytes moved = 2 x buffer size: one read, one write);
* :func:`gemm_rate`: TFLOP/s of ``torch.matmul`` on two n x n matrices (2 n^3 FLOP).

Both return one :class:`~grng.benchmark.schema.Row` (suite ``ceilings``). A rate's p20 / p80
come from the time's p80 / p20 (the slower time is the lower rate).
"""
from __future__ import annotations

import torch

from grng.benchmark.schema import Row, environment
from grng.benchmark.timing import Stats, measure

# Copy buffer size per device type: on CUDA 4x an H100/H200 L2 (50 MB) and more; on the CPU
# beyond the L3 of common server parts.
COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 27}

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16, "float64": torch.float64}


def dtype_of(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its short name ("float32", "bfloat16", ...) or itself."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def dtype_name(dtype: str | torch.dtype) -> str:
    """The short name of a dtype ("float32", ...)."""
    return str(dtype_of(dtype)).removeprefix("torch.")


def rate_row(stats: Stats, work: float, *, scale: float, **fields: object) -> Row:
    """A Row of the rate work / time (times ``scale``), p20/p80 from the time's p80/p20."""
    return Row(p50=work / stats.p50 * scale, p20=work / stats.p80 * scale,
               p80=work / stats.p20 * scale, n=stats.n, **fields)  # type: ignore[arg-type]


def copy_bandwidth(device: str | torch.device, *, nbytes: int | None = None, reps: int = 20) -> Row:
    """Copy bandwidth 2 B / t of ``dst.copy_(src)`` for B-byte float32 buffers, in GB/s."""
    dev = torch.device(device)
    nbytes = COPY_BYTES.get(dev.type, 1 << 27) if nbytes is None else int(nbytes)
    if nbytes < 4:
        raise ValueError(f"nbytes must be >= 4, got {nbytes}")
    numel = nbytes // 4

    def make() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(numel, device=dev), torch.empty(numel, device=dev)

    stats = measure(lambda src, dst: dst.copy_(src), make, device=dev, warmup=2, reps=reps,
                    rotate=1)
    return rate_row(stats, 2.0 * numel * 4, scale=1e-9, suite="ceilings", name="copy",
                    provider="torch", metric="bandwidth", unit="GB/s", x_name="bytes",
                    x_value=str(numel * 4), dtype="float32",
                    config="dst.copy_(src); bytes moved = 2 x buffer", **environment(str(dev)))


def gemm_rate(device: str | torch.device, dtype: str | torch.dtype, n: int,
              tf32: bool = False, *, reps: int = 20) -> Row:
    """GEMM rate 2 n^3 / t of ``torch.matmul`` on random n x n matrices, in TFLOP/s.

    ``tf32=True`` allows TF32 tensor cores for float32 on CUDA for this measurement only.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    dev = torch.device(device)
    dt = dtype_of(dtype)

    def make() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.randn(n, n, device=dev).to(dt), torch.randn(n, n, device=dev).to(dt),
                torch.empty(n, n, device=dev, dtype=dt))

    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    try:
        stats = measure(lambda a, b, c: torch.matmul(a, b, out=c), make, device=dev, warmup=3,
                        reps=reps, rotate=2)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    return rate_row(stats, 2.0 * n ** 3, scale=1e-12, suite="ceilings", name="gemm",
                    provider="torch.matmul" + (" tf32" if tf32 else ""), metric="rate",
                    unit="TFLOP/s", x_name="n", x_value=str(n), dtype=dtype_name(dt),
                    config=f"C = A B, n x n, tf32={bool(tf32)}", **environment(str(dev)))


__all__ = ["COPY_BYTES", "DTYPES", "copy_bandwidth", "dtype_name", "dtype_of", "gemm_rate",
           "rate_row"]
