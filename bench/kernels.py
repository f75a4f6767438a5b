"""Time grng's ops for every available backend and append the rows to bench/results/kernels.csv.

Usage: python bench/kernels.py [--ops factor_update,...] [--sizes 1024,4096] [--dtypes float32,bfloat16]
       [--device cuda|cpu] [--csv PATH]

Providers are the dispatch backends (``reference``, ``triton``, ``ext``) that implement the op
and accept the inputs (:func:`grng.ops.dispatch.resolve`); a backend that lacks the op or
refuses the inputs is skipped. On the CPU the ``triton`` provider is always skipped: without
TRITON_INTERPRET=1 it has no CPU kernels, and with it the kernels run in Triton's Python
interpreter, whose timings say nothing about the kernels.

Timing: on CUDA ``triton.testing.do_bench`` (median, p20, p80 via quantiles); on the CPU
``torch.utils.benchmark.Timer.blocked_autorange`` (median; p20/p80 from its per-block times).
Inputs are random (never zeros). In-place ops run repeatedly on the same buffers with
coefficients that keep them bounded (factor EMA beta = 0.9; Kalman beta = 1, q = 0, r = 1e3).

Sizes (``size`` = n): factor_update M n x n, X n x n (m = n rows); eigen_apply V, Q_G, Q_A n x n;
newton_schulz_step M, X n x n; kalman_update P n x n, H k x n with k = min(64, n).
``dtype`` is the dtype of X / V / (M, X) / H respectively (factors, eigenvectors and P are fp32).

FLOP counts (useful work, the same count for every provider of an op, so TFLOP/s compare):
- factor_update: m d (d + 1) (one triangle of X^T X; an eager full GEMM does 2 m d^2)
- eigen_apply: 4 d_G d_A (d_G + d_A) + d_G d_A (four GEMMs and the divide; no Q_A: 4 d_G^2 d_A + d_G d_A)
- newton_schulz_step: 4 d^3 + 2 d^2 (two GEMMs, the 2I - and the residual)
- kalman_update: 2 d^2 k + 3 k^2 d + k d (d + 1) (P H^T, H U and the triangular solve, one
  triangle of W W^T)
``ratio_vs_reference`` = reference median / provider median (> 1: faster than the reference);
``gemm_fraction`` = the provider's TFLOP/s / the TFLOP/s of torch.matmul on two n x n matrices
of the row's dtype, measured in the same run.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grng.ops import dispatch, reference  # noqa: E402
from grng.ops.errors import BackendUnavailable  # noqa: E402

COLUMNS = ["op", "provider", "size", "dtype", "median_ms", "p20_ms", "p80_ms", "tflops",
           "ratio_vs_reference", "gemm_fraction", "device", "torch_version", "triton_version",
           "date"]
OPS = ("factor_update", "eigen_apply", "newton_schulz_step", "kalman_update")
PROVIDERS = ("reference", "triton", "ext")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_CSV = Path(__file__).resolve().parent / "results" / "kernels.csv"


def kalman_rank(n: int) -> int:
    """Rows k of the Kalman observation H at size n."""
    return min(64, n)


def flops(op: str, n: int) -> float:
    """Useful floating-point operations of one call of ``op`` at size n (see the module doc)."""
    if op == "factor_update":
        return n * n * (n + 1.0)
    if op == "eigen_apply":
        return 4.0 * n * n * (2 * n) + n * n
    if op == "newton_schulz_step":
        return 4.0 * n ** 3 + 2.0 * n * n
    k = kalman_rank(n)
    return 2.0 * n * n * k + 3.0 * k * k * n + k * n * (n + 1.0)


def make_args(op: str, n: int, dtype: torch.dtype, device: str) -> tuple:
    """Random inputs of ``op`` at size n (the in-place targets included)."""
    f32 = torch.float32
    if op == "factor_update":
        M = reference.symmetrize_from_upper(torch.randn(n, n, device=device))
        return (M, torch.randn(n, n, device=device).to(dtype), 0.1, 0.9)
    if op == "eigen_apply":
        QG = torch.linalg.qr(torch.randn(n, n, device=device))[0]
        QA = torch.linalg.qr(torch.randn(n, n, device=device))[0]
        return (torch.randn(n, n, device=device).to(dtype), QG, torch.rand(n, device=device), QA,
                torch.rand(n, device=device), 1e-3)
    if op == "newton_schulz_step":
        A = torch.randn(n, n, device=device)
        M = A @ A.T / n + torch.eye(n, device=device)
        X = torch.eye(n, device=device) / torch.linalg.matrix_norm(M)
        return (M.to(dtype), X.to(dtype))
    A = torch.randn(n, n, device=device)
    P = reference.symmetrize_from_upper(torch.linalg.inv(A @ A.T / n + torch.eye(n, device=device)))
    return (P.to(f32), torch.randn(kalman_rank(n), n, device=device).to(dtype), 1e3, 1.0, 0.0)


def time_ms(fn: Callable[[], object], device: str) -> tuple[float, float, float]:
    """(median, p20, p80) of one call of ``fn`` in milliseconds."""
    if device == "cuda":
        import triton.testing
        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return med, p20, p80
    from torch.utils.benchmark import Timer
    m = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=1.0)
    times = torch.tensor(m.times, dtype=torch.float64) * 1e3
    return m.median * 1e3, float(times.quantile(0.2)), float(times.quantile(0.8))


def provider_fn(op: str, provider: str, args: tuple, device: str) -> Callable | None:
    """The implementation ``provider`` runs for ``op`` on ``args``, or None (printing why)."""
    if provider == "triton" and device == "cpu":
        why = ("TRITON_INTERPRET=1 runs it in Triton's interpreter: timings are meaningless"
               if dispatch.interpreter_enabled() else "no CPU kernels without the interpreter")
        print(f"  skip {op}/triton on cpu: {why}")
        return None
    try:
        fn = dispatch.resolve(op, provider, *args)
    except BackendUnavailable as err:
        print(f"  skip {op}/{provider}: {err}")
        return None
    if provider != "reference" and fn is dispatch.resolve(op, "reference", *args):
        print(f"  skip {op}/{provider}: the backend has no own implementation of this op")
        return None
    return fn


def device_name(device: str) -> str:
    """A short name of the machine the rows were measured on."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def triton_version() -> str:
    """Triton's version, or '' when it is not installed."""
    try:
        import triton
    except ImportError:
        return ""
    return triton.__version__


def gemm_tflops(n: int, dtype: torch.dtype, device: str) -> float:
    """TFLOP/s of torch.matmul on two random n x n matrices of ``dtype``."""
    A = torch.randn(n, n, device=device).to(dtype)
    B = torch.randn(n, n, device=device).to(dtype)
    med, _, _ = time_ms(lambda: torch.matmul(A, B), device)
    return 2.0 * n ** 3 / (med * 1e-3) / 1e12


def run(ops: list[str], sizes: list[int], dtypes: list[str], device: str, csv_path: Path) -> list[dict]:
    """Time every (op, size, dtype, provider); append the rows to ``csv_path`` and return them."""
    rows = []
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    common = {"device": device_name(device), "torch_version": torch.__version__,
              "triton_version": triton_version(), "date": stamp}
    print("backends:", dispatch.backends())
    for n in sizes:
        for dname in dtypes:
            dtype = DTYPES[dname]
            gemm = gemm_tflops(n, dtype, device)
            print(f"size {n} {dname}: torch.matmul {gemm:.3f} TFLOP/s")
            for op in ops:
                ref_ms = None
                for provider in PROVIDERS:
                    args = make_args(op, n, dtype, device)
                    fn = provider_fn(op, provider, args, device)
                    if fn is None:
                        continue
                    med, p20, p80 = time_ms(lambda: fn(*args), device)
                    if provider == "reference":
                        ref_ms = med
                    tflops = flops(op, n) / (med * 1e-3) / 1e12
                    row = {"op": op, "provider": provider, "size": n, "dtype": dname,
                           "median_ms": f"{med:.6g}", "p20_ms": f"{p20:.6g}", "p80_ms": f"{p80:.6g}",
                           "tflops": f"{tflops:.6g}",
                           "ratio_vs_reference": f"{ref_ms / med:.4g}" if ref_ms else "",
                           "gemm_fraction": f"{tflops / gemm:.4g}", **common}
                    rows.append(row)
                    print(f"  {op:20s} {provider:9s} median {med:9.4f} ms  p20 {p20:9.4f}  "
                          f"p80 {p80:9.4f}  {tflops:8.4f} TFLOP/s  x{row['ratio_vs_reference'] or '-'} "
                          f"vs reference  {row['gemm_fraction']} of GEMM")
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not csv_path.exists() or csv_path.stat().st_size == 0
    with csv_path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    print(f"appended {len(rows)} rows to {csv_path}")
    return rows


def main(argv: list[str] | None = None) -> None:
    """Parse the flags and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=["cuda", "cpu"], default=default_device)
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated ops")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated n (default 1024,2048,4096,8192 on cuda; 128,256,512 on cpu)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes")
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    ns = parser.parse_args(argv)
    ops = [o for o in ns.ops.split(",") if o]
    unknown = set(ops) - set(OPS)
    if unknown:
        parser.error(f"unknown ops {sorted(unknown)}; choose from {OPS}")
    sizes = [int(s) for s in (ns.sizes or ("1024,2048,4096,8192" if ns.device == "cuda"
                                           else "128,256,512")).split(",")]
    dtypes = [d for d in ns.dtypes.split(",") if d]
    if not set(dtypes) <= set(DTYPES):
        parser.error(f"dtypes must be among {sorted(DTYPES)}")
    if ns.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device")
    if ns.device == "cuda" and dispatch.interpreter_enabled():
        parser.error("TRITON_INTERPRET=1 on a CUDA run: unset it to time the real kernels")
    dispatch.backends()  # imports the backends once, before any timing
    torch.manual_seed(0)
    run(ops, sizes, dtypes, ns.device, ns.csv)


if __name__ == "__main__":
    main()
