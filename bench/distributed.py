"""Data-parallel grng: communication volume per step and step time at world size 2 (gloo, CPU).

Two processes on 127.0.0.1 train an MLP under DistributedDataParallel with each optimizer. The
optimizer's collectives are counted by wrapping ``torch.distributed.all_reduce``, ``broadcast``
and ``all_gather`` (payload bytes sent by one rank, as passed to the call); DDP's own gradient
all-reduce (C++ reducer, the same for every optimizer) is not included. ``naive_bytes_per_step``
is the naive scheme: a full d x d all-reduce of every Kronecker factor every step (and for
GradReg and RENG, DDP's gradient all-reduce at both passes -- what grng sends too -- is
added). ``bytes_per_step`` is
the mean over the timed steps, which include inverse-refresh steps (inverse_every = 10).

``--world-size 1`` gives the single-process baseline (the distributed path is then inactive,
the strategy column is moot, bytes are 0).

Rows of grng's benchmark schema (:mod:`grng.benchmark.schema`, suite ``distributed``: name = the
optimizer, provider = the strategy, x = world_size; metrics ``bytes_per_step`` and
``naive_bytes_per_step`` in B, ``step_time`` in ms, the median of the slowest rank) append to
``bench/results/distributed.csv``.

    python bench/distributed.py [--steps 30] [--width 256]
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
import grng  # noqa: E402
from grng.benchmark.schema import Row, append_rows, environment  # noqa: E402
from grng.optim.cases import make_optimizer  # noqa: E402

SUITE = "distributed"
CONFIGS = [("kfac", "comm-opt"), ("kfac", "mem-opt"), ("ring", "comm-opt"), ("reng-fd", "comm-opt"),
           ("rkalman", "replicated"), ("rkalman-sketch", "replicated"), ("fgr-sgd", "-")]

_COUNT = {"bytes": 0, "calls": 0}


def _counting(fn):
    def wrapper(tensor_or_list, *args, **kwargs):
        # all_gather(list, tensor): the payload is the second argument
        t = args[0] if isinstance(tensor_or_list, list) else tensor_or_list
        _COUNT["bytes"] += t.numel() * t.element_size()
        _COUNT["calls"] += 1
        return fn(tensor_or_list, *args, **kwargs)
    return wrapper


def _model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, 10))


_CURV = dict(lr=0.01, damping=1e-2, inverse_every=10)
# benchmark name -> (its case of grng.optim.cases, the benchmark's hyperparameters)
OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "kfac": ("kfac-eigen", _CURV),
    "ring": ("ring", {**_CURV, "rho": 0.1}),
    "reng-fd": ("reng-forward", {**_CURV, "rho": 0.1}),
    "rkalman": ("rkalman", dict(lr=0.01, kalman_rank=256)),        # rows all-gathered (64 per rank)
    "rkalman-sketch": ("rkalman", dict(lr=0.01, kalman_rank=32)),  # k x d sketch all-reduced
    "fgr-sgd": ("fgr-sgd", dict(lr=0.01, momentum=0, gamma=0.05, epsilon=1e-2)),
}


def _optimizer(name: str, strategy: str, ddp: nn.Module):
    kw = {} if strategy in ("replicated", "-") else {"distributed_strategy": strategy}
    case, hp = OPTIMIZERS[name]
    return make_optimizer(case, ddp, **hp, **kw)


def _naive_bytes(name: str, model: nn.Module) -> int:
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    if name == "fgr-sgd":
        return 2 * grads
    total = 2 * grads if name == "reng-fd" else 0  # RENG: the two gradient all-reduces of GR
    for m in model.modules():
        if isinstance(m, nn.Linear):
            d_a = m.in_features + (m.bias is not None)
            total += (d_a * d_a + m.out_features ** 2) * m.weight.element_size()
    return total


def _worker(rank: int, world: int, port: int, steps: int, width: int, batch: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    for name in ("all_reduce", "broadcast", "all_gather"):
        setattr(dist, name, _counting(getattr(dist, name)))
    rows: list[Row] = []
    env = environment("cpu")
    env["device"] = f"cpu ({platform.processor() or platform.machine()}, gloo, 1 thread/rank)"
    g = torch.Generator().manual_seed(rank)
    local = batch // world
    for opt_name, strategy in CONFIGS:
        model = _model(width)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = _optimizer(opt_name, strategy, ddp)
        times, sent = [], []
        for step in range(steps + 3):
            x = torch.randn(local, width, generator=g)
            y = torch.randint(0, 10, (local,), generator=g)
            dist.barrier()
            before = _COUNT["bytes"]
            t0 = time.perf_counter()
            opt.step(grng.make_closure(opt, lambda: F.cross_entropy(ddp(x), y)))
            elapsed = time.perf_counter() - t0
            if step >= 3:  # warm-up
                times.append(elapsed)
                sent.append(_COUNT["bytes"] - before)
        # the slowest rank sets the step time
        t = torch.tensor([statistics.median(times)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        common = dict(suite=SUITE, name=opt_name, provider=strategy, x_name="world_size",
                      x_value=str(world), dtype="float32", **env,
                      config=f"MLP width {width}, global batch {batch}, {steps} timed steps, gloo, "
                             f"1 thread/rank")
        rows += [Row(metric="bytes_per_step", unit="B", p50=round(statistics.mean(sent)), **common),
                 Row(metric="naive_bytes_per_step", unit="B", p50=_naive_bytes(opt_name, model), **common),
                 Row(metric="step_time", unit="ms", p50=round(float(t) * 1e3, 2), n=len(times), **common)]
    if rank == 0:
        append_rows(out, rows)
        for r in rows:
            print(f"{r.name:15s} {r.provider:11s} world {r.x_value}: {r.metric} {r.p50} {r.unit}")
    dist.barrier()
    opt = ddp = None  # they hold the process group: release them before destroying it
    gc.collect()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128, help="global batch")
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "results" / "distributed.csv"))
    args = ap.parse_args()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(args.world_size, port, args.steps, args.width, args.batch, args.out),
             nprocs=args.world_size)


if __name__ == "__main__":
    main()
