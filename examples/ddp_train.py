"""Data-parallel training with grng on CPU (gloo): ``torchrun --nproc_per_node=2 examples/ddp_train.py``.

Each rank takes its slice of every global batch; the optimizer is built on the DDP-wrapped
model and finds the layers inside the wrapper. Kronecker factors are all-reduced (upper
triangles, bucketed, asynchronous), each layer's inverse is computed by one rank and
broadcast (``distributed_strategy="comm-opt"``), so every rank ends every step with the same
parameters -- the ones a single process would reach on the global batch.

Options: ``--optimizer kfac|ring|reng|rkalman|gradreg-sgd``, ``--strategy comm-opt|mem-opt``.
Runs as a single process too (``python examples/ddp_train.py``).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import grng  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizer", default="kfac", choices=["kfac", "ring", "reng", "rkalman", "gradreg-sgd"])
    ap.add_argument("--strategy", default="comm-opt", choices=["comm-opt", "mem-opt"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=64, help="global batch size")
    args = ap.parse_args()

    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        dist.init_process_group("gloo")  # torchrun sets MASTER_ADDR/PORT, RANK, WORLD_SIZE
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    torch.manual_seed(0)  # the same initial model everywhere (DDP also broadcasts rank 0's)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 5))
    net = nn.parallel.DistributedDataParallel(model) if distributed else model

    if args.optimizer == "kfac":
        opt = grng.KFAC(net, lr=0.05, damping=1e-1, kl_clip=1e-2, distributed_strategy=args.strategy)
    elif args.optimizer == "ring":
        opt = grng.RING(net, lr=0.05, damping=1e-1, kl_clip=1e-2, rho=0.1, distributed_strategy=args.strategy)
    elif args.optimizer == "reng":
        opt = grng.RENG(net, lr=0.05, damping=1e-1, kl_clip=1e-2, rho=0.1, gr="forward", distributed_strategy=args.strategy)
    elif args.optimizer == "rkalman":
        opt = grng.RKalman(net, lr=0.05, rho=0.1)
    else:
        opt = grng.GradReg(torch.optim.SGD(net.parameters(), lr=0.05), gamma=0.05, epsilon=1e-2,
                           mode="forward", model=net)

    # a fixed random regression-to-classes task; every rank draws the same global batch
    teacher = torch.Generator().manual_seed(1)
    W = torch.randn(20, 5, generator=teacher)
    data = torch.Generator().manual_seed(2)
    local = args.batch // world
    for step in range(args.steps):
        x = torch.randn(args.batch, 20, generator=data)
        y = (x @ W).argmax(1)
        x, y = x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]
        loss = opt.step(grng.make_closure(opt, lambda: F.cross_entropy(net(x), y)))
        if step % 10 == 0 or step == args.steps - 1:
            avg = loss.clone()
            if distributed:
                dist.all_reduce(avg)
                avg /= world
            if rank == 0:
                print(f"step {step:3d}  loss {float(avg):.4f}")
    if distributed:
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        copies = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(copies, flat)
        if rank == 0:
            print("parameters identical on all ranks:", all(torch.equal(c, flat) for c in copies))
        del opt, net  # they hold the process group: release them before destroying it
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
