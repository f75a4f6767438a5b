"""The communicator: the plain collectives an optimizer step needs from "the other ranks" and
the parameter layout, behind one small interface with three implementations
(docs/architecture.md, docs/distributed.md); the third, FSDP2's
:class:`~grng.distributed.sharded.ShardedCommunicator`, is in :mod:`grng.distributed.sharded`.
The policy of a step's distributed phases (fold, refresh, directions) is written once on these
verbs, in :mod:`grng.distributed.plan`; a communicator defines only verbs and layout.

Verbs: ``reduce_sum`` (sums to an owner or to every rank, bucketed, upper triangles of
symmetric pieces), ``broadcast_from`` (owners' values to every rank), ``scatter_directions``
(directions from where they were computed to the ranks that apply them), ``gather_gradients``
(gradients to where they are preconditioned), ``all_true`` / ``all_true_flag``, ``average``
(gradients), ``all_gather`` (small host tables), ``all_gather_rows``.
Layout: ``owns``, ``owner_of``, ``holder``, ``holds``, ``keeps_inverse``, ``shares_inverse``,
``local``, ``bind_local``, ``update_arguments``, ``sum_over_shards``, ``any_rank``,
``all_true_sharded(_flag)``; the layout verbs default here to replicated parameters, where they
are the identity.

- :class:`LocalCommunicator` (one process, world size 1): every verb is the identity (a
  reduction hands back this rank's own contribution, whose rows then fold in one fused
  ``factor_update``: one process computes exactly what it always did), every block owned here.
- :class:`ProcessGroupCommunicator` (torch.distributed): reductions are bucketed asynchronous
  all-reduces of upper triangles with their counts; each block has an owner rank
  (cost-balanced, :mod:`grng.distributed.assignment`) that refreshes its inverse; ``comm-opt``
  shares the inverses (broadcast from the owners), ``mem-opt`` keeps them on the owner, which
  preconditions and broadcasts the block's direction. Gradient regularization's passes run
  under ``model.no_sync()`` and average their gradients here.

The optimizer always calls its communicator and never asks whether it is distributed.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, ContextManager, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from grng.curvature.pieces import Piece
from grng.distributed.assignment import assign_layers
from grng.distributed.comm import FactorReducer, allreduce_mean, broadcast_packed

STRATEGIES: tuple[str, ...] = ("comm-opt", "mem-opt")

#: (shape, dtype, device) of block i's direction matrix
Layout = Callable[[int], tuple[tuple[int, ...], torch.dtype, torch.device]]


class Contribution(Protocol):
    """What :meth:`Communicator.reduce_sum` takes (:mod:`grng.distributed.plan`'s
    ``RowsStatistic``, a factor's rows formed only if they travel, and ``TensorSum``): this
    rank's part of a sum; ``summed`` builds the sum over ranks from the reduced total and count,
    ``ok`` carries :meth:`Communicator.masked_folds`' flag."""

    piece: Piece
    count: float
    dtype: torch.dtype
    device: torch.device
    ok: Tensor | None

    def total(self) -> Tensor | None: ...

    def summed(self, total: Tensor, count: float) -> Any: ...


class Communicator:
    """The interface (see the module docstring): plain verbs, then the parameter layout;
    subclasses implement every verb."""

    world_size = 1
    rank = 0
    strategy = "comm-opt"
    #: whether :meth:`masked_folds` reaches the fold: the contributions :meth:`reduce_sum`
    #: hands back carry its device flag and are folded only where it is True (else the device
    #: gate keeps a copy of the folded factors and selects it back)
    masks_folds = False
    #: parameters are sharded across ranks (FSDP2): checkpoints go through
    #: grng.distributed.checkpoint, not state_dict()
    shards_parameters = False
    #: None, or why a gradient cannot be differentiated again through this communicator's
    #: gradient path (then gradient regularization's "exact" mode falls back to "forward")
    no_double_backward: str | None = None

    # ------------------------------------------------------------------ plain verbs
    def all_true(self, ok: bool) -> bool:
        """True on every rank iff ``ok`` on every rank."""
        raise NotImplementedError

    def all_true_flag(self, ok: Tensor) -> Tensor:
        """:meth:`all_true` of a 0-dim bool device tensor, kept on the device (no host read)."""
        raise NotImplementedError

    def sync_context(self) -> ContextManager[Any]:
        """Context for gradient passes whose average this communicator takes itself."""
        raise NotImplementedError

    def average(self, tensors: Sequence[Tensor | None], likes: Sequence[Tensor]) -> list[Tensor | None]:
        """The mean over ranks of each tensor (None = zeros; None where None on every rank)."""
        raise NotImplementedError

    def reduce_sum(self, parts: Sequence[Contribution], dests: Sequence[int | None]) -> list[Any]:
        """Per part, the sum over ranks at rank ``dests[k]`` (None: every rank), in order:
        ``part.summed(sum of totals, sum of counts)`` there, None on the other ranks; the part
        itself where it is the only rank's (one process). Symmetric pieces travel as upper
        triangles, bucketed and asynchronous."""
        raise NotImplementedError

    def masked_folds(self, ok: Tensor) -> ContextManager[Any]:
        """Context of a sync-free step's folds: with :attr:`masks_folds`, the contributions
        :meth:`reduce_sum` hands back carry the device flag ``ok`` (folded only where it is
        True); without, nothing changes (the gate keeps copies)."""
        return contextlib.nullcontext()

    def broadcast_from(self, entries: list[tuple[int, Piece, Tensor | None, Any, torch.dtype,
                                                 torch.device]]) -> list[tuple[Any, Tensor]]:
        """Each entry (owner rank, piece, value on the owner or None elsewhere, target, dtype,
        device) broadcast from its owner: (target, value) for every entry, on every rank (the
        owner too gets the received copy)."""
        raise NotImplementedError

    def scatter_directions(self, units: list[Any], directions: dict[int, Tensor],
                           layout: Layout,
                           split: Callable[[int, Tensor], list[Tensor]]) -> dict[int, list[Tensor]]:
        """Block index -> its direction per parameter of ``unit.layer.params`` as this rank
        stores them, from the ``directions`` (index -> matrix) computed on the ranks that keep
        the inverses (:meth:`keeps_inverse`), for the ``units`` with a gradient; ``layout(i)``
        = (shape, dtype, device) of block i's matrix, ``split(i, D)`` its parameters' parts."""
        raise NotImplementedError

    def gather_gradients(self, units: list[Any]) -> list[Any]:
        """Make each block's gradient matrix available where the block is preconditioned
        (``unit.gathered``); returns the units set (none where every rank has the whole
        gradient)."""
        return []

    def all_gather(self, table: list[tuple[float, ...]]) -> list[list[tuple[float, ...]]]:
        """Every rank's ``table`` (a few host numbers per row, rows of equal length on every
        rank), in rank order."""
        raise NotImplementedError

    def all_gather_rows(self, parts: list[tuple[Tensor | None, int, torch.dtype, list[int]]]
                        ) -> list[Tensor]:
        """Per part (this rank's rows (m_r x d) or None, d, dtype, rows of every rank): the
        rows of every rank, concatenated in rank order, on every rank."""
        raise NotImplementedError

    # ------------------------------------------------- parameter layout (replicated here)
    def owner_of(self, index: int) -> int:
        """The rank that refreshes block ``index``'s inverse."""
        raise NotImplementedError

    def owns(self, index: int) -> bool:
        """Whether this rank refreshes block ``index``'s inverse."""
        return self.owner_of(index) == self.rank

    def holder(self, index: int) -> int | None:
        """The one rank that keeps block ``index``'s curvature state (its factors), None where
        every rank keeps it (parameters replicated)."""
        return None

    def holds(self, index: int) -> bool:
        """Whether this rank keeps block ``index``'s curvature state (factors, inverse,
        moments): every rank where parameters are replicated; its owner only where they are
        sharded (:mod:`grng.distributed.sharded`)."""
        q = self.holder(index)
        return q is None or q == self.rank

    def keeps_inverse(self, index: int) -> bool:
        """Whether this rank keeps block ``index``'s inverse (or basis) between steps, and so
        preconditions it: every rank where inverses are shared (one process, comm-opt); the
        owner only under mem-opt and where parameters are sharded."""
        return self.holds(index)

    def shares_inverse(self, index: int) -> bool:
        """Whether block ``index``'s inverse, refreshed by its owner, is sent to every rank
        (comm-opt over a process group); False where it stays where it was made."""
        return False

    def sum_over_shards(self, t: Tensor) -> Tensor:
        """The sum over ranks of ``t`` computed on this rank's parameter shards (on the device,
        no host read); ``t`` itself where parameters are whole on every rank."""
        return t

    def any_rank(self, flag: bool) -> bool:
        """A host decision agreed by every rank (True iff ``flag`` on some rank) where ranks
        hold different state; ``flag`` itself where every rank holds the same."""
        return flag

    def all_true_sharded(self, ok: bool) -> bool:
        """:meth:`all_true` of a flag computed on this rank's parameter shards (directions):
        ``ok`` itself where parameters are replicated (every rank computed the same flag)."""
        return ok

    def all_true_sharded_flag(self, ok: Tensor | None) -> Tensor | None:
        """:meth:`all_true_sharded` of a 0-dim bool device tensor (no host read; None: no
        floating value to check on this rank)."""
        return ok

    def local(self, t: Tensor) -> Tensor:
        """This rank's part of a parameter, gradient or optimizer buffer (``t`` itself where
        parameters are replicated)."""
        return t

    def bind_local(self, units: list[Any]) -> list[Any]:
        """Point each diagonal unit at this rank's part of its parameter (``unit.view``, with
        the local gradient as its ``.grad``); returns the units bound (none where parameters
        are replicated: ``unit.like`` is the parameter)."""
        return []

    def update_arguments(self, *args: Any) -> tuple:
        """The arguments of ``ops.fused_update`` (params, grads, directions, buffers, lr,
        momentum, weight_decay, rho, kl_clip) as this rank applies them: unchanged where
        parameters are replicated."""
        return args


class LocalCommunicator(Communicator):
    """One process: every verb is the identity and every block is owned here; a reduction
    hands back this rank's contribution itself (its rows then fold in one fused op), carrying
    the device flag of :meth:`masked_folds` (a dense factor is then written only where it is
    True, in place, through ``factor_update_masked``)."""

    masks_folds = True

    def __init__(self) -> None:
        self._fold_ok: Tensor | None = None

    @contextlib.contextmanager
    def masked_folds(self, ok):
        self._fold_ok = ok
        try:
            yield
        finally:
            self._fold_ok = None

    def owner_of(self, index: int) -> int:
        return 0

    def all_true(self, ok: bool) -> bool:
        return ok

    def all_true_flag(self, ok: Tensor) -> Tensor:
        return ok

    def sync_context(self) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def average(self, tensors, likes):
        return list(tensors)

    def reduce_sum(self, parts, dests):
        for part in parts:
            part.ok = self._fold_ok
        return list(parts)

    def broadcast_from(self, entries):
        return [(e[3], e[2]) for e in entries]

    def scatter_directions(self, units, directions, layout, split):
        return {i: split(i, D) for i, D in directions.items()}

    def all_gather(self, table):
        return [table]

    def all_gather_rows(self, parts):
        return [E for E, _, _, _ in parts]


class ProcessGroupCommunicator(Communicator):
    """torch.distributed: bucketed upper-triangle all-reduce, KAISA assignment, comm-opt or
    mem-opt (module docstring)."""

    def __init__(self, group: Any, strategy: str, costs: Sequence[float], model: Any = None,
                 bucket_cap_mb: float = 25.0) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"distributed_strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.strategy = strategy
        self.owner = assign_layers(list(costs), self.world_size)
        self.bucket_cap_mb = bucket_cap_mb
        self.reducer = FactorReducer(group, bucket_cap_mb)
        self.model = model
        # mem-opt: ranks keep different inverses, so they agree on the sync-free gate over gloo
        # (a host collective, never a device read)
        self.host_group = (None if strategy == "comm-opt" else host_group(group))

    # --------------------------------------------------------------- parameter layout
    def owner_of(self, index: int) -> int:
        return self.owner[index]

    def keeps_inverse(self, index: int) -> bool:
        return self.strategy == "comm-opt" or self.owns(index)

    def shares_inverse(self, index: int) -> bool:
        return self.strategy == "comm-opt"

    def any_rank(self, flag: bool) -> bool:
        if self.host_group is None:  # comm-opt: every rank holds the same state
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.host_group)
        return float(t) > 0.0

    # ------------------------------------------------------------------ plain verbs
    def all_true(self, ok: bool) -> bool:
        flag = torch.tensor([0.0 if ok else 1.0])
        if dist.get_backend(self.group) == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, group=self.group)
        return float(flag) == 0.0

    def all_true_flag(self, ok: Tensor) -> Tensor:
        flag = _on_comm_device(ok.to(torch.float32).reshape(1), self.group)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return (flag[0] > 0.0).to(ok.device)

    def sync_context(self) -> ContextManager[Any]:
        no_sync = getattr(self.model, "no_sync", None)
        return no_sync() if no_sync is not None else contextlib.nullcontext()

    def average(self, tensors, likes):
        return allreduce_mean(list(tensors), list(likes), self.group, self.world_size)

    def reduce_sum(self, parts, dests):
        """One bucketed reducer per destination (an all-reduce for None, a reduce to the rank
        otherwise), each part formed (``total()``) as it is queued."""
        reducers: dict[int | None, FactorReducer] = {}
        slots = []
        for part, q in zip(parts, dests):
            if q not in reducers:
                reducers[q] = (self.reducer if q is None
                               else FactorReducer(self.group, self.bucket_cap_mb, dst=q))
            slots.append(reducers[q].add(part.piece, part.total(), part.count, part.dtype,
                                         part.device))
        results = {q: reducers[q].finish()
                   for q in sorted(reducers, key=lambda q: -1 if q is None else q)}
        out = []
        for part, q, slot in zip(parts, dests, slots):
            got = results[q][slot]
            out.append(None if got is None else part.summed(*got))
        return out

    def broadcast_from(self, entries):
        """One packed asynchronous broadcast per (dtype, device) and owner rank."""
        groups: dict[tuple[torch.dtype, torch.device], list] = {}
        for e in entries:
            groups.setdefault((e[4], torch.device(e[5])), []).append(e)
        out = []
        for (dtype, device) in sorted(groups, key=lambda k: (str(k[0]), str(k[1]))):
            es = groups[(dtype, device)]
            per_source = [[(e[1], e[2]) for e in es if e[0] == q] for q in range(self.world_size)]
            received = broadcast_packed(self.group, self.rank, per_source, dtype, device)
            for q in range(self.world_size):
                out.extend(zip([e[3] for e in es if e[0] == q], received[q]))
        return out

    def scatter_directions(self, units, directions, layout, split):
        """comm-opt: every rank computed every direction; mem-opt: each owner broadcasts its
        blocks' (a fixed layout: every block, its entries plus a "has a gradient" flag)."""
        if self.strategy == "comm-opt":
            return {i: split(i, D) for i, D in directions.items()}
        entries = []
        for u in units:
            i = u.index
            shape, dtype, device = layout(i)
            numel = 1
            for s in shape:
                numel *= s
            D = None
            if self.owns(i):
                d = directions.get(i)
                body = (torch.zeros(numel, dtype=dtype, device=device) if d is None
                        else d.to(dtype).reshape(-1))
                D = torch.cat([body, torch.full((1,), 0.0 if d is None else 1.0, dtype=dtype,
                                                device=device)])
            entries.append((self.owner[i], Piece("full", (numel + 1,)), D, i, dtype, device))
        out = {}
        for i, v in self.broadcast_from(entries):
            if float(v[-1]) != 0.0:
                out[i] = split(i, v[:-1].view(layout(i)[0]))
        return out

    def all_gather(self, table):
        local = _on_comm_device(torch.tensor(table, dtype=torch.float64), self.group)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local, group=self.group)
        return [[tuple(row) for row in part.tolist()] for part in parts]

    def all_gather_rows(self, parts):
        """One all-gather per dtype of every part's rows, padded to the largest rank's count."""
        out: list[Tensor | None] = [None] * len(parts)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for idx, part in enumerate(parts):
            by_dtype.setdefault(part[2], []).append(idx)
        for dtype in sorted(by_dtype, key=str):
            idxs = by_dtype[dtype]
            device = next((parts[k][0].device for k in idxs if parts[k][0] is not None), None)
            device = device if device is not None else torch.device("cpu")
            segs = []
            for idx in idxs:
                E, d, _, m_r = parts[idx]
                seg = torch.zeros(max(m_r), d, dtype=dtype, device=device)
                if E is not None:
                    seg[:E.shape[0]] = E
                segs.append(seg.reshape(-1))
            flat = _on_comm_device(torch.cat(segs), self.group)
            bufs = [torch.empty_like(flat) for _ in range(self.world_size)]
            dist.all_gather(bufs, flat, group=self.group, async_op=True).wait()
            offset = 0
            for idx in idxs:
                _, d, _, m_r = parts[idx]
                size = max(m_r) * d
                out[idx] = torch.cat([buf[offset:offset + size].view(max(m_r), d)[:m_r[r]]
                                      for r, buf in enumerate(bufs)]).to(device)
                offset += size
        return out  # type: ignore[return-value]


def _on_comm_device(t: Tensor, group: Any) -> Tensor:
    """NCCL needs CUDA tensors; gloo takes CPU ones (the counts are built on the CPU)."""
    if dist.get_backend(group) == "nccl" and not t.is_cuda:
        return t.cuda()
    return t


def host_group(group: Any) -> Any:
    """``group`` itself over gloo, else a gloo group of its ranks (host flags travel there)."""
    if dist.get_backend(group) == "gloo":
        return group
    return dist.new_group(dist.get_process_group_ranks(group), backend="gloo")
