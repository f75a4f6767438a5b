"""The communicator of FSDP2 (``fully_shard``): parameters and gradients are DTensor row shards
(``Shard(0)`` on a 1-D mesh), and each Kronecker block's curvature lives on its owner only
(docs/distributed.md "FSDP2").

Per step, on every rank, in the same order:

- **factors**: each rank's unnormalized batch factor sums n_r M_r (upper triangles, with their
  counts) are *reduced* to the block's owner (SUM, one bucketed ``reduce`` per owner), which
  blends M <- beta M + (1 - beta) sum_r n_r M_r / sum_r n_r; the other ranks keep no factor,
  inverse or moment of a block they do not own;
- **R-Kalman observations**: the global batch's, as under DDP (a shared-seed sketch
  Omega E = sum_r Omega_r E_r, or the rows gathered); only the owner updates its P;
- **directions**: the gradient's row shards (FSDP's reduce-scatter has already averaged them
  over ranks) of every block are gathered to its owner, laid out as the d_G x d_A matrix,
  preconditioned there, split per parameter and the rows scattered back to the ranks that
  hold them (``torch.chunk`` of dim 0, FSDP's layout; shards padded to equal size in transit);
- **diagonal preconditioners** (the diagonal Fisher, R-Kalman's variances, EKFAC's Adam) act
  elementwise on each rank's own rows (``Unit.view``);
- **the update** runs on the local shards; the KL-clip dot sum <d + rho g, g> and the
  finiteness of d + rho g are all-reduced (one 2-element SUM per param group), so the scale
  nu is the global one and a non-finite value on any rank skips the step on every rank (nu is
  NaN there, which the fused update refuses); the finite flags of the inputs and directions
  are all-true reductions; which gate a sync-free step takes is agreed (``any_rank``, one
  host all-reduce over gloo);
- **gradient regularization**: its passes go through FSDP's own reduce-scatter, which averages
  already (``average`` is the identity, ``sync_context`` enters nothing).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from grng.distributed.assignment import assign_layers
from grng.distributed.comm import FactorReducer, gather_rows, scatter_rows
from grng.distributed.communicator import ProcessGroupCommunicator, host_group


def rows_of(p: Tensor, rank: int, world: int) -> tuple[int, int]:
    """(first row, row count) of ``p``'s dim-0 shard on ``rank``: ``torch.chunk``'s split, as
    FSDP2's ``Shard(0)`` lays it out (the last ranks may hold fewer rows, or none)."""
    n = p.shape[0]
    chunk = -(-n // world)
    start = min(n, rank * chunk)
    return start, min(n, start + chunk) - start


def shard_mesh(model: Any) -> Any:
    """The device mesh of ``model``'s DTensor parameters when all of them are FSDP2 row shards
    on one 1-D mesh; None when none is a DTensor. Raises NotImplementedError (naming the
    parameter) for any other layout."""
    mesh = None
    for name, p in model.named_parameters():
        if not isinstance(p, DTensor):
            if mesh is not None:
                raise NotImplementedError(f"parameter {name!r} is not sharded while others are")
            continue
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise NotImplementedError(
                f"parameter {name!r} is a DTensor with placements {tuple(p.placements)} on a "
                f"{p.device_mesh.ndim}-D mesh; grng supports FSDP2 row shards (Shard(0)) on a "
                "1-D mesh (not HSDP, tensor parallelism or 2-D meshes)")
        if mesh is not None and p.device_mesh != mesh:
            raise NotImplementedError(f"parameter {name!r} is on another device mesh")
        mesh = p.device_mesh
    return mesh


class ShardedCommunicator(ProcessGroupCommunicator):
    """FSDP2: factors reduced to each block's owner, gradients gathered there, directions
    scattered back (module docstring)."""

    shards_parameters = True
    no_double_backward = ("FSDP2 reduce-scatters the gradients outside autograd, so H g cannot "
                          "be differentiated through them")

    def __init__(self, mesh: Any, costs: Sequence[float], model: Any = None,
                 bucket_cap_mb: float = 25.0) -> None:
        self.group = mesh.get_group()
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.strategy = "mem-opt"  # a block's curvature stays on its owner
        self.owner = assign_layers(list(costs), self.world_size)
        self.model = model
        self.bucket_cap_mb = bucket_cap_mb
        self.reducer = FactorReducer(self.group, bucket_cap_mb)  # reduce_sum to every rank
        # host decisions (which gate a sync-free step takes) travel over gloo, never the device
        self.host_group = host_group(self.group)

    # --------------------------------------------------------------- parameter layout
    def holder(self, index: int) -> int | None:
        return self.owner[index]

    def sum_over_shards(self, t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t, group=self.group)
        return t

    def all_true_sharded(self, ok: bool) -> bool:
        return self.all_true(ok)

    def all_true_sharded_flag(self, ok: Tensor | None) -> Tensor | None:
        if ok is None:  # this rank has nothing to check; the others may
            ok = torch.ones((), dtype=torch.bool, device=self._device())
        return self.all_true_flag(ok)

    def local(self, t: Tensor) -> Tensor:
        if isinstance(t, DTensor):
            with torch.no_grad():
                return t.to_local()
        return t

    def bind_local(self, units: list[Any]) -> list[Any]:
        for unit in units:
            p = unit.params[0]
            view = self.local(p)
            view.grad = None if p.grad is None else self.local(p.grad)
            unit.view = view
        return list(units)

    def sync_context(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def average(self, tensors, likes):
        return list(tensors)  # FSDP's reduce-scatter has averaged them

    def _device(self) -> torch.device:
        return torch.device("cuda") if dist.get_backend(self.group) == "nccl" else torch.device("cpu")

    # -------------------------------------------------------------------- gradients
    def _per_owner(self, units: list[Any]) -> dict[int, list[Any]]:
        """The blocks with a gradient by owner (every rank lists the same)."""
        out: dict[int, list[Any]] = {}
        for u in units:
            if u.layer.weight.grad is not None:
                out.setdefault(self.owner[u.index], []).append(u)
        return out

    def _padded(self, p: Tensor, t: Tensor | None, dtype: torch.dtype) -> Tensor:
        """This rank's rows of ``p``-shaped ``t`` (None: zeros), padded to the chunk size."""
        chunk = -(-p.shape[0] // self.world_size)
        rest = tuple(p.shape[1:])
        out = torch.zeros((chunk, *rest), dtype=dtype, device=self._device())
        if t is not None:
            local = self.local(t)
            out[:local.shape[0]] = local
        return out.reshape(-1)

    def _assemble(self, p: Tensor, parts: list[Tensor]) -> Tensor:
        """The whole ``p``-shaped tensor from every rank's padded rows."""
        chunk = -(-p.shape[0] // self.world_size)
        rest = tuple(p.shape[1:])
        pieces = [part.view(chunk, *rest)[:rows_of(p, r, self.world_size)[1]]
                  for r, part in enumerate(parts)]
        return torch.cat(pieces)

    def gather_gradients(self, units):
        """Each block's gradient rows, gathered to its owner (one gather per owner and
        dtype), laid out as the gradient matrix: ``unit.gathered`` on the owner."""
        gathered = []
        for q, us in sorted(self._per_owner(units).items()):
            for dtype, group in _by_dtype(us).items():
                flat = torch.cat([self._padded(p, p.grad, dtype) for u in group
                                  for p in u.layer.params])
                parts = gather_rows(self.group, q, flat, self.world_size)
                if parts is None:
                    continue
                offsets = [0] * self.world_size
                for u in group:
                    full = []
                    for p in u.layer.params:
                        size = _padded_numel(p, self.world_size)
                        whole = self._assemble(p, [parts[r][offsets[r]:offsets[r] + size]
                                                   for r in range(self.world_size)])
                        offsets = [o + size for o in offsets]
                        full.append(whole.to(p.device) if p.grad is not None else None)
                    u.gathered = u.layer.to_matrix(full)
                    gathered.append(u)
        return gathered

    def scatter_directions(self, units, directions, layout, split):
        """Each parameter's direction rows go from the block's owner back to the rank holding
        them (one scatter per owner and dtype)."""
        per_owner = self._per_owner(units)
        out: dict[int, list[Tensor]] = {}
        for q, us in sorted(per_owner.items()):
            by_dtype: dict[torch.dtype, list[Any]] = {}
            for u in us:
                by_dtype.setdefault(layout(u.index)[1], []).append(u)
            for dtype in sorted(by_dtype, key=str):
                group = by_dtype[dtype]
                size = sum(_padded_numel(p, self.world_size) for u in group for p in u.layer.params)
                parts = None
                if q == self.rank:
                    per_rank: list[list[Tensor]] = [[] for _ in range(self.world_size)]
                    for u in group:
                        for p, d in zip(u.layer.params, split(u.index, directions[u.index])):
                            chunk = -(-p.shape[0] // self.world_size)
                            for r in range(self.world_size):
                                start, rows = rows_of(p, r, self.world_size)
                                piece = torch.zeros((chunk, *p.shape[1:]), dtype=dtype,
                                                    device=self._device())
                                piece[:rows] = d[start:start + rows]
                                per_rank[r].append(piece.reshape(-1))
                    parts = [torch.cat(ps) for ps in per_rank]
                like = torch.empty(size, dtype=dtype, device=self._device())
                received = scatter_rows(self.group, q, parts, like)
                offset = 0
                for u in group:
                    ds = []
                    for p in u.layer.params:
                        chunk = -(-p.shape[0] // self.world_size)
                        rows = rows_of(p, self.rank, self.world_size)[1]
                        numel = _padded_numel(p, self.world_size)
                        seg = received[offset:offset + numel].view(chunk, *p.shape[1:])
                        ds.append(seg[:rows].to(p.device))
                        offset += numel
                    out[u.index] = ds
        return out

    # -------------------------------------------------------------------------- update
    def update_arguments(self, params, grads, directions, bufs, lr, momentum, weight_decay, rho,
                         kl_clip):
        """Local shards; d + rho g scaled by the global KL-clip nu (NaN when any rank's
        d + rho g is not finite), so the fused update needs no reduction of its own."""
        P = [self.local(p) for p in params]
        G = [self.local(g) for g in grads]
        B = None if bufs is None else [self.local(b) for b in bufs]
        D = [self.local(d) for d in directions]
        if rho == 0.0 and kl_clip is None:  # d is finite on every rank (the gate agreed)
            return P, G, D, B, lr, momentum, weight_decay, 0.0, None
        C = [d.add(g, alpha=rho) if rho != 0.0 else d for d, g in zip(D, G)]
        sums = torch.zeros(2, dtype=torch.float64, device=self._device())
        for c, g in zip(C, G):
            if c.numel():
                sums[0] += torch.sum(c.double() * g.double()).to(sums.device)
                sums[1] += (~torch.isfinite(c)).sum().to(sums.device)
        dist.all_reduce(sums, group=self.group)
        vg, bad = sums[0], sums[1]
        nu = torch.ones((), dtype=torch.float64, device=sums.device)
        if kl_clip is not None and lr > 0.0:
            lr2vg = vg * (lr * lr)
            clipped = torch.sqrt(kl_clip / lr2vg.clamp(min=torch.finfo(torch.float64).tiny))
            nu = torch.where((vg > 0.0) & (lr2vg > 0.0), clipped.clamp(max=1.0), nu)
        nu = torch.where(bad > 0, torch.full_like(nu, math.nan), nu)
        C = [c * nu.to(c.device, c.dtype) for c in C]
        return P, G, C, B, lr, momentum, weight_decay, 0.0, None


def _padded_numel(p: Tensor, world: int) -> int:
    """Elements of one rank's padded rows of ``p``."""
    n = -(-p.shape[0] // world)
    for s in p.shape[1:]:
        n *= s
    return n


def _by_dtype(units: list[Any]) -> dict[torch.dtype, list[Any]]:
    """The units grouped by their weight's dtype (sorted by name: the same order on every rank)."""
    out: dict[torch.dtype, list[Any]] = {}
    for u in units:
        out.setdefault(u.layer.weight.dtype, []).append(u)
    return {k: out[k] for k in sorted(out, key=str)}
