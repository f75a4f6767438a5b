"""FSDP2 against DDP: K-FAC's optimizer-state bytes per rank and bytes communicated per step, for
a GPT-2-small-shaped model (gloo, CPU; docs/distributed.md "FSDP2").

The model: token embedding 50257 x 768, position embedding 1024 x 768, ``--layers`` blocks of
LayerNorm, Linear 768 -> 2304 (qkv), causal attention, Linear 768 -> 768, LayerNorm, Linear
768 -> 3072, GELU, Linear 3072 -> 768, a final LayerNorm and an untied head Linear 768 -> 50257
(no bias); float32, K-FAC (eigen, momentum 0.9, the library defaults otherwise: the head's
50257-wide G and the embeddings' A are diagonal).

**Measured** (real runs of 1 layer at world 2 and 4, two steps with ``factor_every=1``: the
first folds and refreshes every inverse, the second folds): the bytes of every tensor each
rank's optimizer holds after the steps (block factors A, G; inverses Q, l; the diagonal Fisher
of the norms; momentum), and the payload bytes one rank passes to grng's collectives
(``all_reduce``, ``reduce``, ``gather``, ``scatter``, ``broadcast``, ``all_gather``), counted
by wrapping the torch.distributed functions.

**Computed** (12 layers, GPT-2 small): state bytes per rank from the shapes every block's state
has once set (``opt.block.expected_shapes`` on a meta-device model, the owners from the same
cost-balanced assignment), and grng's bytes per step from the pieces each collective carries
(:func:`predicted_comm_bytes`); the script asserts both equal the 1-layer measurements before
writing the 12-layer rows. FSDP's own traffic (its parameter all-gathers in forward and
backward, its gradient reduce-scatter) and DDP's gradient all-reduce are not grng's and are
computed from the parameter count only. "replicated factors" is FSDP2 with the factors
all-reduced to every rank instead of reduced to their owner (each rank holds every factor,
its own inverses, its shards of the rest): computed only.

    python bench/fsdp_memory.py            # writes bench/results/fsdp_memory.{csv,md}
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from grng.benchmark.schema import Row, append_rows  # noqa: E402
from grng.distributed.assignment import assign_layers  # noqa: E402
from grng.optim.cases import make_optimizer  # noqa: E402

VOCAB, CTX, WIDTH, HEADS = 50257, 1024, 768, 12
MODES = ("fsdp", "ddp-comm-opt", "ddp-mem-opt")
GRNG_CALLS = ("all_reduce", "reduce", "gather", "scatter", "broadcast", "all_gather")
HP = dict(lr=0.01, damping=1e-2, momentum=0.9, factor_every=1)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.ln2 = nn.LayerNorm(WIDTH)
        self.fc = nn.Linear(WIDTH, 4 * WIDTH)
        self.out = nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
        x = x + self.proj(a)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT2Shaped(nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, WIDTH)
        self.wpe = nn.Embedding(CTX, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(layers))
        self.ln = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def state_bytes(opt) -> dict[str, int]:
    """Bytes of the tensors ``opt`` holds on this rank, by kind."""
    out = {"factors": 0, "inverses": 0, "diagonal": 0, "momentum": 0}
    for unit in opt._blocks:
        for name, t in unit.state.tensors().items():
            out["factors" if name in ("A", "G") else "inverses"] += _nbytes(t)
    for p in opt._diagonal_params():
        out["diagonal"] += sum(_nbytes(opt.comm.local(t))
                               for t in opt._diagonal_unit(p).state.tensors().values())
    for p in opt._all_params():
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            out["momentum"] += _nbytes(opt.comm.local(buf))
    return out


def predicted_state_bytes(layers: int, world: int, mode: str, rank: int,
                          replicated_factors: bool = False) -> dict[str, int]:
    """What :func:`state_bytes` must say, from the state shapes of a meta-device model."""
    with torch.device("meta"):
        model = GPT2Shaped(layers)
    opt = make_optimizer("kfac-eigen", model, **HP)
    owner = assign_layers([layer.cost() for layer in opt.layers], world)
    out = {"factors": 0, "inverses": 0, "diagonal": 0, "momentum": 0}
    size = 4  # float32
    for unit, q in zip(opt._blocks, owner):
        shapes = opt.block.expected_shapes(unit)
        for name, shape in shapes.items():
            n = size
            for s in shape:
                n *= s
            if name in ("A", "G"):
                out["factors"] += n if (mode != "fsdp" or q == rank or replicated_factors) else 0
            else:
                out["inverses"] += n if (mode == "ddp-comm-opt" or q == rank) else 0

    def rows(p):  # this rank's rows of p under FSDP (torch.chunk), all of them under DDP
        if mode != "fsdp":
            return p.shape[0]
        chunk = -(-p.shape[0] // world)
        return max(0, min(p.shape[0], (rank + 1) * chunk) - rank * chunk)

    for p in opt._all_params():
        per_row = p[0].numel() if p.dim() > 1 else 1
        out["momentum"] += rows(p) * per_row * size
    for p in opt._diagonal_params():
        out["diagonal"] += rows(p) * (p[0].numel() if p.dim() > 1 else 1) * size
    opt.close()
    return out


def predicted_comm_bytes(layers: int, world: int, mode: str) -> dict[str, int]:
    """grng's payload bytes per rank: on a fold step (the factor triangles with their counts:
    reduced to the owner under FSDP2, all-reduced under DDP), on a refresh step (comm-opt: the
    eigenbases and eigenvalues broadcast), on every step (FSDP2: each block's padded gradient
    rows gathered and its direction rows scattered; mem-opt: each block's direction and a flag
    broadcast). The few bytes of finite flags and KL-clip sums are left out."""
    with torch.device("meta"):
        model = GPT2Shaped(layers)
    opt = make_optimizer("kfac-eigen", model, **HP)
    size = 4
    fold = sum(s.piece().numel for layer in opt.layers for s in (layer.a_factor, layer.g_factor))
    refresh = every = 0
    for unit in opt._blocks:
        layer = unit.layer
        if mode == "fsdp":
            for p in layer.params:
                every += 2 * (-(-p.shape[0] // world)) * (p[0].numel() if p.dim() > 1 else 1)
        elif mode == "ddp-comm-opt":
            refresh += sum(piece.numel for _, piece in opt.block._pieces(layer))
        else:
            g, a = layer.dims()
            every += g * a + 1
    opt.close()
    return {"fold": fold * size, "refresh": refresh * size, "every": every * size}


# ------------------------------------------------------------------------- the runs
def _wrap_collectives(counts: dict[str, int]) -> None:
    for name in GRNG_CALLS:
        fn = getattr(dist, name)

        def counted(*args, __fn=fn, __name=name, **kwargs):
            if counts.get("on"):
                t = args[0] if args else kwargs.get("tensor")
                if __name == "all_gather":
                    t = args[1] if len(args) > 1 else kwargs.get("tensor")
                if isinstance(t, torch.Tensor) and t.numel() > 2:  # flags, KL-clip sums left out
                    counts["grng"] = counts.get("grng", 0) + _nbytes(t)
                    counts[__name] = counts.get(__name, 0) + _nbytes(t)
            return __fn(*args, **kwargs)

        setattr(dist, name, counted)


def _worker(rank: int, world: int, port: int, layers: int, mode: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    counts: dict[str, int] = {}
    _wrap_collectives(counts)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    torch.manual_seed(0)
    model = GPT2Shaped(layers)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        net = fully_shard(model, mesh=mesh)
        opt = make_optimizer("kfac-eigen", net, **HP)
    else:
        net = nn.parallel.DistributedDataParallel(model)
        opt = make_optimizer("kfac-eigen", net, **HP,
                             distributed_strategy=mode.removeprefix("ddp-"))
    g = torch.Generator().manual_seed(rank)
    per_step = []
    for _ in range(2):
        idx = torch.randint(0, VOCAB, (2, 16), generator=g)
        counts.clear()
        counts["on"] = 1
        t0 = time.perf_counter()
        opt.step(lambda: _closure(opt, net, idx))
        counts.pop("on")
        per_step.append({**counts, "seconds": time.perf_counter() - t0})
    report = {"state": state_bytes(opt), "steps": per_step,
              "params_bytes": sum(_nbytes(p) for p in model.parameters())
              if mode != "fsdp" else sum(p.numel() * 4 for p in model.parameters())}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(report, fh)
    del opt, net
    dist.destroy_process_group()


def _closure(opt, net, idx):
    opt.zero_grad()
    logits = net(idx[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), idx[:, 1:].reshape(-1))
    loss.backward()
    return loss


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, layers: int, mode: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world, _free_port(), layers, mode, out_dir),
                           nprocs=world, start_method="spawn")
        return [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--target-layers", type=int, default=12)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fsdp_memory.csv"))
    args = ap.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    L = args.target_layers
    common = dict(suite="fsdp_memory", name="kfac-eigen", dtype="float32", x_name="world",
                  device="cpu (gloo), shared 2-core VM")
    rows = []
    for world in worlds:
        for mode in MODES:
            t0 = time.perf_counter()
            measured = run(world, 1, mode)
            print(f"world {world} {mode}: {time.perf_counter() - t0:.0f} s", flush=True)
            comm1 = predicted_comm_bytes(1, world, mode)
            for rank, rep in enumerate(measured):  # the counts equal the measurement
                pred = predicted_state_bytes(1, world, mode, rank)
                assert pred == rep["state"], (world, mode, rank, pred, rep["state"])
                step0 = rep["steps"][0].get("grng", 0)
                step1 = rep["steps"][1].get("grng", 0)
                assert step1 == comm1["fold"] + comm1["every"], (world, mode, rep["steps"], comm1)
                assert step0 == step1 + comm1["refresh"], (world, mode, rep["steps"], comm1)
                rows.append(Row(provider=mode, metric="state_bytes_per_rank", unit="B",
                                p50=float(sum(rep["state"].values())), x_value=str(world),
                                config=f"measured, 1 layer, rank {rank}, "
                                + json.dumps(rep["state"]), **common))
                rows.append(Row(provider=mode, metric="grng_bytes_per_step", unit="B",
                                p50=float(step1), x_value=str(world),
                                config=f"measured, 1 layer, rank {rank}, fold step (refresh step "
                                f"{step0}); step seconds {rep['steps'][1]['seconds']:.1f}",
                                **common))
            providers = [(mode, False)] + ([("fsdp-replicated-factors", True)]
                                           if mode == "fsdp" else [])
            for provider, replicated in providers:
                for rank in range(world):
                    st = predicted_state_bytes(L, world, mode, rank, replicated_factors=replicated)
                    rows.append(Row(provider=provider, metric="state_bytes_per_rank", unit="B",
                                    p50=float(sum(st.values())), x_value=str(world),
                                    config=f"computed, {L} layers, rank {rank}, " + json.dumps(st),
                                    **common))
            comm = predicted_comm_bytes(L, world, mode)
            with torch.device("meta"):
                params = sum(p.numel() for p in GPT2Shaped(L).parameters()) * 4
            # payloads as passed: FSDP2 two all-gathers of a shard and a reduce-scatter of the
            # whole gradient; DDP an all-reduce of the whole gradient
            others = 2 * params // world + params if mode == "fsdp" else params
            for metric, value, what in (
                    ("grng_bytes_per_step", comm["fold"] + comm["every"], "fold step"),
                    ("grng_bytes_refresh_extra", comm["refresh"], "added on a refresh step"),
                    ("data_parallel_bytes_per_step", others,
                     "FSDP2: param all-gather in forward and backward + grad reduce-scatter "
                     "(shard payloads); DDP: gradient all-reduce")):
                rows.append(Row(provider=mode, metric=metric, unit="B", p50=float(value),
                                x_value=str(world), config=f"computed, {L} layers, {what}, "
                                + json.dumps(comm), **common))
    append_rows(args.out, rows)
    for r in rows:
        print(r.provider, r.metric, r.x_value, int(r.p50), r.config[:60])


if __name__ == "__main__":
    main()
