"""Timing one call of a function: CUDA events on a GPU, ``time.perf_counter`` on the CPU.

:func:`measure` builds ``rotate`` input sets with ``make_inputs`` (fresh random tensors, so a
benchmark never times zeros), runs ``warmup`` untimed calls, then ``reps`` timed calls that
cycle through the sets, so a set is reused only after the others have passed through the
caches. It returns the median and the 20th / 80th percentiles of the per-call times.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

# On the CPU a sample is the mean of a block of calls that together take at least this long:
# a single call of a few microseconds is below perf_counter's useful resolution.
MIN_CPU_SAMPLE_S = 2e-4


class Stats(NamedTuple):
    """Per-call time in seconds: median ``p50``, percentiles ``p20``/``p80``, ``n`` samples."""

    p50: float
    p20: float
    p80: float
    n: int


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile of sorted values, linear between order statistics (q in [0, 1])."""
    if not sorted_values:
        raise ValueError("quantile of an empty sample")
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


def stats_of(samples: Sequence[float]) -> Stats:
    """(median, p20, p80, n) of per-call times."""
    s = sorted(samples)
    return Stats(statistics.median(s), quantile(s, 0.2), quantile(s, 0.8), len(s))


def _device_type(device: str | torch.device) -> str:
    return torch.device(device).type


def measure(fn: Callable[..., object], make_inputs: Callable[[], tuple], *,
            device: str | torch.device, warmup: int = 3, reps: int = 25,
            rotate: int = 1) -> Stats:
    """Time ``fn(*inputs)``: t = median over ``reps`` calls after ``warmup`` calls.

    ``make_inputs()`` returns one argument tuple; ``rotate`` such tuples are built and the calls
    cycle through them (use several where one set would stay in cache between calls). In-place
    ops keep mutating their sets, so their inputs must keep the op bounded (e.g. an EMA with
    beta < 1). On CUDA each call is bracketed by CUDA events (device time, no host sync inside
    the loop); on the CPU a sample is the mean time of a block of calls lasting at least
    :data:`MIN_CPU_SAMPLE_S`, measured with ``time.perf_counter``.
    """
    for name, value, least in (("warmup", warmup, 0), ("reps", reps, 1), ("rotate", rotate, 1)):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    sets = [tuple(make_inputs()) for _ in range(rotate)]
    for i in range(warmup):
        fn(*sets[i % rotate])
    if _device_type(device) == "cuda":
        return _measure_cuda(fn, sets, reps)
    return _measure_cpu(fn, sets, reps)


def _measure_cuda(fn: Callable[..., object], sets: list[tuple], reps: int) -> Stats:
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        args = sets[i % len(sets)]
        starts[i].record()
        fn(*args)
        ends[i].record()
    torch.cuda.synchronize()
    return stats_of([s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)])


def _measure_cpu(fn: Callable[..., object], sets: list[tuple], reps: int) -> Stats:
    t0 = time.perf_counter()
    fn(*sets[0])
    once = time.perf_counter() - t0
    block = max(1, int(MIN_CPU_SAMPLE_S / max(once, 1e-9)))
    samples = []
    k = 1
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(block):
            fn(*sets[k % len(sets)])
            k += 1
        samples.append((time.perf_counter() - t0) / block)
    return stats_of(samples)


__all__ = ["MIN_CPU_SAMPLE_S", "Stats", "measure", "quantile", "stats_of"]
