"""The kernel microbenchmark: every op spec x provider x size x dtype on one device.

Providers are the dispatch backends (``reference``, ``triton``, ``ext``) that have their own
implementation of the op and accept the inputs; the others are skipped with the reason. On the
CPU ``triton`` is always skipped: without TRITON_INTERPRET=1 it has no CPU kernels, and with it
the kernels run in Triton's Python interpreter, whose timings say nothing about the kernels.

Per (op, provider, size, dtype) :func:`run` returns rows (suite ``kernels``, x = the op's size
n, see :mod:`grng.ops.specs`) of the metrics

* ``time`` (ms; median, p20, p80 of :func:`grng.benchmark.timing.measure`),
* ``throughput`` (TFLOP/s of the op's useful FLOP count) and ``bandwidth`` (GB/s of its
  minimal byte count), whose ``config`` cell records both counts,
* ``gemm_fraction``: throughput / the TFLOP/s of ``torch.matmul`` on two n x n matrices of the
  row's dtype; ``copy_fraction``: bandwidth / the copy bandwidth (both ceilings measured in the
  same run, :mod:`grng.benchmark.ceilings`, and returned as rows too),
* ``speedup``: the reference's median / this provider's median (> 1: faster than the reference).

Inputs are the spec's random inputs (never zeros; in-place ops use the spec's bench variant,
whose coefficients keep repeated calls bounded). Input sets rotate so that the sets of one
measurement together exceed twice the cache (CUDA: the device's L2; CPU: 32 MiB), up to 8 sets.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from grng.benchmark.ceilings import copy_bandwidth, dtype_name, dtype_of, gemm_rate, rate_row
from grng.benchmark.schema import Row, environment
from grng.benchmark.timing import measure
from grng.ops import dispatch, registry

SUITE = "kernels"
CPU_CACHE_BYTES = 32 << 20
MAX_ROTATE = 8


def cache_bytes(device: torch.device) -> int:
    """The cache the rotation must overflow: the CUDA device's L2, or 32 MiB on the CPU."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    return CPU_CACHE_BYTES


def rotation(nbytes: float, device: torch.device) -> int:
    """Input sets to cycle through: ceil(2 cache / bytes of one set), between 1 and 8."""
    return max(1, min(MAX_ROTATE, math.ceil(2 * cache_bytes(device) / max(nbytes, 1.0))))


def provider_impl(op: str, provider: str, device: torch.device) -> tuple[Callable | None, str]:
    """(the function ``provider`` runs for ``op``, "") or (None, why it is skipped)."""
    if provider == "reference":
        return registry.spec(op).reference, ""
    if provider not in dispatch.BACKENDS[2:]:
        return None, f"unknown provider {provider!r} (choose from {dispatch.BACKENDS[1:]})"
    if provider == "triton" and device.type == "cpu":
        return None, ("Triton on the CPU runs in its interpreter: timings would say nothing"
                      if dispatch.interpreter_enabled() else "Triton has no CPU kernels")
    status = dispatch.backends()[provider]
    if not status.startswith("live"):
        return None, status
    impl = dispatch.implementation(op, provider)
    if impl is None:
        return None, "no own implementation of this op"
    return impl.fn, ""


def run(device: str | torch.device, providers: Sequence[str], sizes: Iterable[int],
        dtypes: Iterable[str | torch.dtype], ops: Sequence[str] | None = None,
        deadline: float | None = None, gemm_rates: Mapping[tuple[str, int], float] | None = None,
        *, warmup: int = 3, reps: int = 25, seed: int = 0,
        log: Callable[[str], None] | None = None) -> list[Row]:
    """Time every (op, provider, size, dtype); return the rows (metrics in the module doc).

    ``gemm_rates`` maps (dtype name, n) to an already measured torch.matmul TFLOP/s; missing
    entries are measured here (:func:`grng.benchmark.ceilings.gemm_rate`) and their rows
    returned too, as is the copy bandwidth row. ``deadline`` is a ``time.monotonic()`` value:
    once passed, the remaining measurements are skipped (``log`` says so). ``log`` receives one
    line per measurement or skip.
    """
    dev = torch.device(device)
    say = log or (lambda _line: None)
    names = list(registry.SPECS) if ops is None else list(ops)
    for op in names:
        registry.spec(op)
    if not providers:
        raise ValueError("providers must name at least one backend")
    providers = sorted(providers, key=lambda p: p != "reference")  # the reference first: speed-ups
    sizes = [int(n) for n in sizes]
    if any(n < 1 for n in sizes):
        raise ValueError(f"sizes must be positive, got {sizes}")
    dts = [dtype_of(d) for d in dtypes]
    env = environment(str(dev))
    rows: list[Row] = []
    copy = copy_bandwidth(dev)
    rows.append(copy)
    say(f"copy bandwidth {copy.p50:.4g} GB/s")
    rates = dict(gemm_rates or {})
    for n in sizes:
        for dt in dts:
            key = (dtype_name(dt), n)
            if key not in rates:
                gemm = gemm_rate(dev, dt, n)
                rows.append(gemm)
                rates[key] = float(gemm.p50)
                say(f"torch.matmul n={n} {key[0]}: {gemm.p50:.4g} TFLOP/s")
            for op in names:
                spec = registry.spec(op)
                if dt not in spec.dtypes:
                    continue
                ref_ms = None
                for provider in providers:
                    if deadline is not None and time.monotonic() > deadline:
                        say(f"deadline passed: skipping {op}/{provider} n={n} {key[0]} and the rest")
                        return rows
                    fn, why = provider_impl(op, provider, dev)
                    counter = iter(range(1 << 30))

                    def make(spec=spec, n=n, dt=dt, counter=counter) -> tuple:
                        return spec.inputs(n, dt, dev, seed * 1_000_003 + next(counter), spec.bench_variant)

                    if fn is not None and provider != "reference":
                        impl = dispatch.implementation(op, provider)
                        if impl is not None and not impl.supports(*make()):
                            fn, why = None, "does not accept these inputs"
                    if fn is None:
                        say(f"  skip {op}/{provider} n={n} {key[0]}: {why}")
                        continue
                    flops, nbytes = spec.flops(n), spec.bytes(n, dt)
                    stats = measure(fn, make, device=dev, warmup=warmup, reps=reps,
                                    rotate=rotation(nbytes, dev))
                    common = dict(suite=SUITE, name=op, provider=provider, x_name="n", x_value=str(n),
                                  dtype=key[0], **env,
                                  config=(f"{spec.shape(n)}; dtype = {spec.dtype_role}; "
                                          f"{flops:.6g} FLOP; {nbytes:.6g} B; "
                                          f"variant {spec.bench_variant}"))
                    ms = Row(metric="time", unit="ms", p50=stats.p50 * 1e3, p20=stats.p20 * 1e3,
                             p80=stats.p80 * 1e3, n=stats.n, **common)
                    tput = rate_row(stats, flops, scale=1e-12, metric="throughput", unit="TFLOP/s",
                                    **common)
                    bw = rate_row(stats, nbytes, scale=1e-9, metric="bandwidth", unit="GB/s", **common)
                    new = [ms, tput, bw,
                           Row(metric="gemm_fraction", unit="1", p50=tput.p50 / rates[key], **common),
                           Row(metric="copy_fraction", unit="1", p50=bw.p50 / copy.p50, **common)]
                    if provider == "reference":
                        ref_ms = ms.p50
                    if ref_ms is not None:
                        new.append(Row(metric="speedup", unit="x", p50=ref_ms / ms.p50, **common))
                    rows += new
                    say(f"  {op:20s} {provider:9s} n={n:<5d} {key[0]:8s} {ms.p50:10.4f} ms "
                        f"[{ms.p20:.4f}, {ms.p80:.4f}]  {tput.p50:8.4f} TFLOP/s  {bw.p50:8.3f} GB/s  "
                        f"{new[3].p50:6.3f} of GEMM  {new[4].p50:6.3f} of copy"
                        + (f"  x{new[5].p50:.3g} vs reference" if len(new) > 5 else ""))
    return rows


__all__ = ["SUITE", "cache_bytes", "provider_impl", "rotation", "run"]
