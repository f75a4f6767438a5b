"""Is this CPU run oversubscribed? Timings taken with more threads than free cores are
artefacts (a 2-core machine shared by other jobs once timed the reference 1000x slow, with a
tight band, because every repetition was equally starved), so ``grng bench`` flags them.

Two signs, either enough: (1) more intra-op threads than the cores this process may run on,
or than the cores the load average leaves free; (2) a probe: a small ``torch.mm`` at the run's
thread count takes :data:`PROBE_RATIO` times or more as long as at one thread.
"""
from __future__ import annotations

import os
import time

import torch

#: the probe's slow-down (run's threads / one thread) from which the run is flagged
PROBE_RATIO = 4.0
PROBE_N = 128


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _probe_seconds(reps: int = 30) -> float:
    """Median time of one PROBE_N x PROBE_N float32 ``torch.mm`` at the current thread count."""
    a, b = torch.randn(PROBE_N, PROBE_N), torch.randn(PROBE_N, PROBE_N)
    for _ in range(3):
        torch.mm(a, b)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def probe_ratio(threads: int) -> float:
    """How many times longer the probe takes at ``threads`` intra-op threads than at one."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _probe_seconds()
        torch.set_num_threads(threads)
        multi = _probe_seconds()
    finally:
        torch.set_num_threads(before)
    return multi / max(single, 1e-9)


def warnings_for(threads: int, cores: int, load1: float | None, ratio: float | None) -> list[str]:
    """The oversubscription warnings for a CPU run (none: the timings can be trusted on that
    count). ``load1`` is the 1-minute load average (None where unknown); ``ratio`` the probe's."""
    out = []
    if threads > cores:
        out.append(f"{threads} threads on {cores} usable cores: threads wait for each other")
    elif load1 is not None and threads > 1 and load1 + threads > cores + 0.5:
        out.append(f"{threads} threads while the load average is {load1:.1f} on {cores} cores: "
                   f"other jobs hold the cores these threads need")
    if ratio is not None and ratio >= PROBE_RATIO:
        out.append(f"a {PROBE_N}x{PROBE_N} matmul took {ratio:.0f}x as long at {threads} threads "
                   f"as at 1")
    if out:
        out = [f"OVERSUBSCRIBED: {w}" for w in out]
        out.append("OVERSUBSCRIBED: these timings are artefacts of contention, however tight "
                   "their band; rerun with --threads 1 (or on an idle machine)")
    return out


def check(threads: int) -> list[str]:
    """:func:`warnings_for` this machine now (the probe runs only with more than one thread)."""
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    ratio = probe_ratio(threads) if threads > 1 else None
    return warnings_for(threads, usable_cores(), load1, ratio)


__all__ = ["PROBE_RATIO", "check", "probe_ratio", "usable_cores", "warnings_for"]
