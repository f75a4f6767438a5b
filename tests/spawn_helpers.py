"""Real multi-process runs for the distributed tests (gloo on 127.0.0.1): a free port,
``spawn_ranks``, which starts ``world`` processes and collects each rank's JSON report, and
``rank_report``, the process group and report of one such process."""
from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port nothing listens on now (for the process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(fn: Callable[..., None], world: int, *args: Any, timeout_s: float) -> list[dict]:
    """Run ``fn(rank, world, port, *args, out_dir)`` in ``world`` spawned processes; each writes
    ``out_dir/rank{rank}.json``; returns those reports in rank order. Processes still running
    after ``timeout_s`` (a collective hangs) are killed and the test fails."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(fn, args=(world, free_port(), *args, out_dir), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=2):
                if time.monotonic() > deadline:
                    pytest.fail(f"world size {world}: processes still running after "
                                f"{timeout_s} s (a collective hangs)")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        reports = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as fh:
                reports.append(json.load(fh))
        return reports


@contextlib.contextmanager
def rank_report(rank: int, world: int, port: int, out_dir: str) -> Iterator[dict]:
    """One spawned rank: one torch thread, the gloo group joined, and a report dict that is
    written to ``out_dir/rank{rank}.json`` however the body ends (then the group destroyed)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    report: dict = {}
    try:
        yield report
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(report, fh)
        # the DDP / FSDP wrappers and optimizers (now out of scope) hold the process group:
        # release them before destroying it, or the group's threads outlive it and abort the exit
        gc.collect()
        dist.destroy_process_group()
