"""Benchmark the compiled ``ext`` backend against the reference ops (and a foreach baseline).

Ops: ``fused_update`` on a 12-layer transformer-MLP-like set of 120 parameter tensors (ext vs
reference vs a Python chain of ``torch._foreach_*`` ops implementing the same math),
``factor_update``, ``kalman_update`` and ``batched_spd_inverse`` at a few sizes.

Timing: ``torch.utils.benchmark.Timer.blocked_autorange``; median, p20 and p80 over its blocks.
Rows of grng's benchmark schema (:mod:`grng.benchmark.schema`, suite ``ext``) are appended to
``bench/results/ext.csv``: per (op, provider, size, dtype) the ``time`` (ms) and
``time_vs_reference``, this provider's median time over the reference's median time at the same
op, size and dtype (< 1: faster). ``x_name``/``x_value`` is the swept dimension (h, d), the
``config`` cell the rest of the shape.

Usage: ``python bench/ext_update.py [--quick] [--device cpu|cuda]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable

import torch
from torch.utils import benchmark

import grng.ops.ext  # noqa: F401 - the ext backend must be live; fail loudly if it is not
from grng import ops
from grng.benchmark.schema import Row, append_rows, environment
from grng.ops import batched

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "ext.csv")
SUITE = "ext"


def measure(fn: Callable[[], object], min_run_time: float) -> tuple[float, float, float, int]:
    """(median, p20, p80) in milliseconds of ``fn()`` over the blocks of blocked_autorange, and
    the number of blocks."""
    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    times = sorted(m.times)
    n = len(times)
    if n == 1:
        times = times * 2
    q = statistics.quantiles(times, n=10, method="inclusive")
    return 1e3 * statistics.median(times), 1e3 * q[1], 1e3 * q[7], n


def mlp12(h: int, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    """The parameter shapes of 12 transformer blocks of width h: 10 tensors each, 120 in all."""
    shapes = []
    for _ in range(12):
        shapes += [(3 * h, h), (3 * h,), (h, h), (h,), (4 * h, h), (4 * h,), (h, 4 * h), (h,), (h,), (h,)]
    return [torch.randn(s, device=device).to(dtype) for s in shapes]


def foreach_update(params, grads, directions, bufs, lr, momentum, weight_decay, rho, kl_clip) -> bool:
    """The fused update's math as a chain of torch._foreach_* ops (the usual PyTorch optimizer way)."""
    combined = torch._foreach_add(directions, grads, alpha=rho)
    if not bool(torch.stack(torch._foreach_norm(combined)).isfinite().all()):
        return False
    nu = 1.0
    if kl_clip is not None and lr > 0.0:
        prods = torch._foreach_mul(combined, grads)
        vg = float(torch.stack([p.sum(dtype=torch.float64) for p in prods]).sum())
        if vg > 0.0:
            nu = min(1.0, (kl_clip / (lr * lr * vg)) ** 0.5)
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, combined, alpha=nu)
    torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_add_(params, bufs, alpha=-lr)
    return True


def bench_fused(device: str, quick: bool, t: float) -> list[Row]:
    rows = []
    scalars = (1e-3, 0.9, 0.01, 0.3, 1e-3)  # lr, momentum, weight_decay, rho, kl_clip
    for h in (64,) if quick else (64, 256):
        for dtype in (torch.float32, torch.bfloat16):
            p, g, d, b = (mlp12(h, dtype, device) for _ in range(4))
            numel = sum(x.numel() for x in p)
            size = ("h", h, f"12 blocks h={h}: {len(p)} tensors, {numel / 1e6:.2f}M")
            runs = {
                "reference": lambda: ops.fused_update(p, g, d, b, *scalars, backend="reference"),
                "foreach": lambda: foreach_update(p, g, d, b, *scalars),
                "ext": lambda: ops.fused_update(p, g, d, b, *scalars, backend="ext"),
            }
            rows += timed_rows("fused_update", size, dtype, runs, t)
    return rows


def bench_factor(device: str, quick: bool, t: float) -> list[Row]:
    rows = []
    sizes = [(128, 256)] if quick else [(128, 256), (512, 512), (1024, 512), (2048, 256)]
    cases = [(d, m, torch.float32) for d, m in sizes] + [(512, 512, torch.bfloat16)]
    for d, m, xdtype in cases:
        M = torch.eye(d, device=device)
        X = torch.randn(m, d, device=device).to(xdtype)
        runs = {name: (lambda name=name: ops.factor_update(M, X, 0.05, 0.95, backend=name))
                for name in ("reference", "ext")}
        rows += timed_rows("factor_update", ("d", d, f"rows={m}"), xdtype, runs, t)
    return rows


def bench_kalman(device: str, quick: bool, t: float) -> list[Row]:
    rows = []
    for d, k in [(128, 16)] if quick else [(128, 16), (512, 32), (1024, 64), (2048, 64)]:
        P = torch.eye(d, device=device)
        H = torch.randn(k, d, device=device)
        runs = {name: (lambda name=name: ops.kalman_update(P, H, 100.0, 0.9995, 1e-5, backend=name))
                for name in ("reference", "ext")}
        rows += timed_rows("kalman_update", ("d", d, f"k={k}"), torch.float32, runs, t)
    return rows


def bench_batched(device: str, quick: bool, t: float) -> list[Row]:
    rows = []
    methods = ("cholesky",) if device == "cuda" else ("cholesky", "newton")
    for B, d in [(64, 16)] if quick else [(256, 16), (64, 64), (16, 128)]:
        A = torch.randn(B, d, d, dtype=torch.float64, device=device)
        Ms = (A @ A.transpose(-2, -1) / d + torch.eye(d, dtype=torch.float64, device=device)).float()
        for method in methods:
            runs = {name: (lambda name=name: batched.batched_spd_inverse(Ms, method, backend=name))
                    for name in ("reference", "ext")}
            rows += timed_rows(f"batched_spd_inverse[{method}]", ("d", d, f"B={B}"), torch.float32, runs, t)
    return rows


def timed_rows(op: str, size: tuple[str, int, str], dtype: torch.dtype, runs: dict[str, Callable],
               t: float) -> list[Row]:
    """Rows (time, time_vs_reference) per provider; the reference first, so ratios can refer to it.

    ``size`` is (x_name, x_value, the rest of the shape as text).
    """
    x_name, x_value, shape = size
    rows, ref = [], None
    dname = str(dtype).replace("torch.", "")
    for provider, fn in runs.items():
        fn()  # warm-up (first-call allocations, MKL/OpenMP start-up)
        med, p20, p80, n = measure(fn, t)
        ref = med if provider == "reference" else ref
        common = dict(suite=SUITE, name=op, provider=provider, x_name=x_name, x_value=str(x_value),
                      dtype=dname, config=shape)
        rows += [Row(metric="time", unit="ms", p50=med, p20=p20, p80=p80, n=n, **common),
                 Row(metric="time_vs_reference", unit="x", p50=med / ref, **common)]
        print(f"{op:32s} {provider:10s} {x_name}={x_value:<6} {shape:34s} {dname:9s} median {med:9.3f} ms "
              f"[p20 {p20:9.3f}, p80 {p80:9.3f}]  x{med / ref:.3f} of reference", flush=True)
    return rows


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or 'cpu')."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small size per op")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for bench in (bench_fused, bench_factor, bench_kalman, bench_batched):
        rows += bench(args.device, args.quick, args.min_run_time)
    env = environment(args.device)
    if args.device == "cpu":
        env["device"] = (f"{cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads, "
                         f"load {os.getloadavg()[0]:.1f})")
    for row in rows:
        row.device, row.torch, row.triton, row.grng = (env["device"], env["torch"], env["triton"],
                                                       env["grng"])
    print(f"appended {append_rows(args.out, rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
