"""Sharded training with FSDP2 and grng on CPU (gloo): ``torchrun --nproc_per_node=2 examples/fsdp_train.py``.

Every Linear and the root are wrapped by ``fully_shard``: each rank stores a row shard of every
parameter and of its gradient. The optimizer is built on the sharded model as on any other;
each Kronecker block has an owner rank that alone keeps its factors and inverse: the factor
sums are reduced to it, the gradient's row shards are gathered to it, it preconditions, and
the direction's rows go back to the ranks that hold them. The result is what one process
reaches on the global batch (docs/distributed.md "FSDP2"). ``--checkpoint DIR`` saves the
model and the optimizer with torch.distributed.checkpoint at the end and resumes from DIR at
the start when it holds one (at any world size).

Options: ``--optimizer kfac|ring|reng|rkalman|ekfac``. Runs as a single process too
(``python examples/fsdp_train.py``: a mesh of one rank).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import grng  # noqa: E402
from grng.distributed import checkpoint  # noqa: E402
from grng.optim.cases import make_optimizer  # noqa: E402

#: this example's hyperparameters per case of grng.optim.cases
CASE = {"kfac": ("kfac-eigen", dict(lr=0.05, damping=1e-1, kl_clip=1e-2)),
        "ring": ("ring", dict(lr=0.05, damping=1e-1, kl_clip=1e-2, rho=0.1)),
        "reng": ("reng-forward", dict(lr=0.05, damping=1e-1, kl_clip=1e-2, rho=0.1)),
        "rkalman": ("rkalman", dict(lr=0.05, rho=0.1)),
        "ekfac": ("ekfac", dict(lr=1e-2))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizer", default="kfac", choices=sorted(CASE))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=64, help="global batch size")
    ap.add_argument("--checkpoint", default=None, help="directory to resume from and save to")
    args = ap.parse_args()

    if "WORLD_SIZE" not in os.environ:  # plain `python`: a group of one rank
        os.environ.update(WORLD_SIZE="1", RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29512")
    dist.init_process_group("gloo")  # torchrun sets MASTER_ADDR/PORT, RANK, WORLD_SIZE
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    torch.manual_seed(0)  # the same initial model everywhere
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.LayerNorm(64),
                          nn.Tanh(), nn.Linear(64, 5))
    mesh = init_device_mesh("cpu", (world,))
    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)

    name, hp = CASE[args.optimizer]
    opt = make_optimizer(name, model, **hp)
    start = 0
    if args.checkpoint and os.path.exists(os.path.join(args.checkpoint, "optim", ".metadata")):
        sd = {"model": model.state_dict()}
        dcp.load(sd, checkpoint_id=os.path.join(args.checkpoint, "model"))
        model.load_state_dict(sd["model"])
        checkpoint.load(opt, os.path.join(args.checkpoint, "optim"))
        start = opt.steps
        if rank == 0:
            print(f"resumed at step {start} on {world} rank(s)")

    # a fixed random regression-to-classes task; every rank draws the same global batch
    W = torch.randn(20, 5, generator=torch.Generator().manual_seed(1))
    data = torch.Generator().manual_seed(2)
    local = args.batch // world
    for step in range(start + args.steps):
        x = torch.randn(args.batch, 20, generator=data)
        if step < start:
            continue  # the batches of the steps before the checkpoint
        y = (x @ W).argmax(1)
        x, y = x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]
        loss = opt.step(grng.make_closure(opt, lambda: F.cross_entropy(model(x), y)))
        if step % 10 == 0 or step == start + args.steps - 1:
            avg = loss.clone()
            dist.all_reduce(avg)
            if rank == 0:
                print(f"step {step:3d}  loss {float(avg) / world:.4f}")
    if args.checkpoint:
        dcp.save({"model": model.state_dict()}, checkpoint_id=os.path.join(args.checkpoint, "model"))
        checkpoint.save(opt, os.path.join(args.checkpoint, "optim"))
    held = sum(opt.comm.owns(u.index) for u in opt._blocks)
    print(f"rank {rank}: owns {held} of {len(opt.layers)} Kronecker blocks")
    del opt  # it holds the process group: release it before destroying it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
