"""The communicator: everything an optimizer step needs from "the other ranks", behind one
interface with three implementations (docs/architecture.md, docs/distributed.md); the third,
FSDP2's :class:`~grng.distributed.sharded.ShardedCommunicator`, is in
:mod:`grng.distributed.sharded`. The parameter-layout verbs (``holds``, ``local``,
``bind_local``, ``gather_gradients``, ``update_arguments``, ``all_true_sharded``,
``any_rank``) default here to replicated parameters, where they are the identity.

- :class:`LocalCommunicator` (one process, world size 1): reductions are the identity, every
  block is owned here, directions are computed here. It runs the fused single-process ops
  (a factor EMA is one ``factor_update``), so one process computes exactly what it always did.
- :class:`ProcessGroupCommunicator` (torch.distributed): per step, on every rank, in the same
  order: batch factors n_r M_r are all-reduced with their row counts in buckets (upper
  triangles only, asynchronously) and blended as M <- beta M + (1 - beta) sum_r n_r M_r / sum_r n_r
  -- the factor of the global batch; R-Kalman's observations are the global batch's, planned by
  the Kalman preconditioner (:mod:`grng.precondition.kalman_observation`) and carried by the
  plain verbs ``all_gather``, ``sum_to_all`` and ``all_gather_rows``; each block has an owner
  rank (cost-balanced, :mod:`grng.distributed.assignment`) that refreshes
  its inverse; ``comm-opt`` broadcasts the inverses, ``mem-opt`` keeps them on the owner, which
  preconditions and broadcasts the block's direction. Gradient regularization's passes run
  under ``model.no_sync()`` and average their gradients here.

The optimizer always calls its communicator and never asks whether it is distributed.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
import torch.distributed as dist
from torch import Tensor

from grng import ops
from grng.curvature.pieces import Piece
from grng.curvature.stacks import Stacks
from grng.distributed.assignment import assign_layers
from grng.distributed.comm import FactorReducer, allreduce_mean, broadcast_packed

STRATEGIES: tuple[str, ...] = ("comm-opt", "mem-opt")


@dataclass
class FactorFold:
    """One factor to fold this step's rows into: ``result`` <- beta current + (1 - beta) M_batch
    (stored in ``storage``); ``result`` is ``current`` when no rank has rows."""

    structure: Any  # grng.curvature.factors.FactorStructure
    rows: Any  # grng.curvature.factors.Rows | None
    current: Tensor | None
    like: Tensor  # the layer's weight (device; dtype of a diagonal factor's counts)
    compute: torch.dtype
    storage: torch.dtype | None
    result: Tensor | None = None
    block: int = -1  # the index of the block the factor belongs to (its owner keeps it)


class Communicator:
    """The interface (see the module docstring); subclasses implement every method."""

    world_size = 1
    rank = 0
    strategy = "comm-opt"
    #: whether :meth:`fold_factors` honours :meth:`masked_folds` (else the device gate keeps a
    #: copy of the folded factors and selects it back)
    masks_folds = False
    #: parameters are sharded across ranks (FSDP2): checkpoints go through
    #: grng.distributed.checkpoint, not state_dict()
    shards_parameters = False
    #: None, or why a gradient cannot be differentiated again through this communicator's
    #: gradient path (then gradient regularization's "exact" mode falls back to "forward")
    no_double_backward: str | None = None

    def owns(self, index: int) -> bool:
        """Whether this rank refreshes block ``index``'s inverse."""
        raise NotImplementedError

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

    def fold_factors(self, folds: list[FactorFold], beta: float, backend: str) -> None:
        """Set every ``fold.result`` (the global batch's factor blended into ``current``)."""
        raise NotImplementedError

    def masked_folds(self, ok: Tensor) -> ContextManager[Any]:
        """Context of a sync-free step's folds: with :attr:`masks_folds`, each ``fold.result``
        of :meth:`fold_factors` is the fold where the device flag ``ok`` and ``current``
        unchanged where not; without, nothing changes (the gate keeps copies)."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ plain verbs
    def all_gather(self, table: list[tuple[float, ...]]) -> list[list[tuple[float, ...]]]:
        """Every rank's ``table`` (a few host numbers per row, rows of equal length on every
        rank), in rank order."""
        raise NotImplementedError

    def sum_to_all(self) -> Any:
        """A reducer (``add(piece, value, count, dtype, device)`` -> slot; ``finish()`` ->
        (sum over ranks, count) per slot) whose sums every rank receives; None values are
        zeros."""
        raise NotImplementedError

    def all_gather_rows(self, parts: list[tuple[Tensor | None, int, torch.dtype, list[int]]]
                        ) -> list[Tensor]:
        """Per part (this rank's rows (m_r x d) or None, d, dtype, rows of every rank): the
        rows of every rank, concatenated in rank order, on every rank."""
        raise NotImplementedError

    def refresh(self, due: list[int], refresh_owned: Callable[[list[int]], None],
                exchange: Callable[[int], list[tuple[str, Piece, Tensor | None, torch.dtype, torch.device]]],
                receive: Callable[[int, dict[str, Tensor]], None]) -> None:
        """Refresh the inverses of blocks ``due``: ``refresh_owned`` on this rank's share;
        then (comm-opt) each owner's fields ``exchange(i)`` travel to every rank (``receive``)."""
        raise NotImplementedError

    def directions(self, units: list[Any], compute: Callable[[list[int]], dict[int, Tensor]],
                   layout: Callable[[int], tuple[tuple[int, ...], torch.dtype, torch.device]],
                   split: Callable[[int, Tensor], list[Tensor]]) -> dict[int, list[Tensor]]:
        """Each block's direction per parameter of ``unit.layer.params`` (as this rank stores
        them), for the ``units`` (blocks) with a gradient: ``compute(indices)`` gives index ->
        direction matrix of those with a gradient, in one call so equal shapes batch, computed
        where the block's curvature lives; ``layout(i)`` = (shape, dtype, device) of block i's
        direction matrix; ``split(i, D)`` lays it out per parameter."""
        raise NotImplementedError

    # ------------------------------------------------- parameter layout (replicated here)
    def holds(self, index: int) -> bool:
        """Whether this rank keeps block ``index``'s curvature state (factors, inverse,
        moments): every rank where parameters are replicated; its owner only where they are
        sharded (:mod:`grng.distributed.sharded`)."""
        return True

    def sum_over_shards(self, t: Tensor) -> Tensor:
        """The sum over ranks of ``t`` computed on this rank's parameter shards (on the device,
        no host read); ``t`` itself where parameters are whole on every rank."""
        return t

    def keeps_inverse(self, index: int) -> bool:
        """Whether this rank keeps block ``index``'s inverse (or basis) between steps: every
        rank where inverses are broadcast (one process, comm-opt); the owner only under mem-opt
        and where parameters are sharded."""
        return self.holds(index)

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

    def gather_gradients(self, units: list[Any]) -> list[Any]:
        """Make each block's gradient matrix available where the block is preconditioned
        (``unit.gathered``); returns the units set (none where every rank has the whole
        gradient)."""
        return []

    def update_arguments(self, *args: Any) -> tuple:
        """The arguments of ``ops.fused_update`` (params, grads, directions, buffers, lr,
        momentum, weight_decay, rho, kl_clip) as this rank applies them: unchanged where
        parameters are replicated."""
        return args


#: dense factors whose rows have at most this many elements (m d) are folded in one batched
#: factor_update with the other blocks of the same shape; larger rows cost more to stack than
#: a call (2-core CPU: 6 x (32 x 33) rows 0.056 -> 0.036 ms, 2 x (2048 x 513) 30.6 -> 36.7 ms)
FOLD_BATCH_MAX_ELEMENTS = 1 << 16
#: the same bound on the CPU, where the freshly captured rows are copied into the stack from
#: memory: the demo transformer's 7 x (512 x 65) and 5 x (512 x 64) rows fold 0.56 ms faster per
#: step one factor at a time (5.05 -> 4.49 ms, one thread, interleaved in one process)
FOLD_BATCH_MAX_ELEMENTS_CPU = 1 << 14


class LocalCommunicator(Communicator):
    """One process: identity reductions, every block owned, fused single-process ops; the dense
    factors of equal-shape blocks with small rows are folded in one batched call; under
    :meth:`masked_folds` every fold writes only where the device flag says so (a dense factor in
    place, through ``factor_update_masked``)."""

    masks_folds = True

    def __init__(self) -> None:
        self.stacks = Stacks()
        self._fold_ok: Tensor | None = None

    @contextlib.contextmanager
    def masked_folds(self, ok):
        self._fold_ok = ok
        try:
            yield
        finally:
            self._fold_ok = None

    def owns(self, index: int) -> bool:
        return True

    def all_true(self, ok: bool) -> bool:
        return ok

    def all_true_flag(self, ok: Tensor) -> Tensor:
        return ok

    def sync_context(self) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def average(self, tensors, likes):
        return list(tensors)

    def fold_factors(self, folds, beta, backend):
        batches: dict[tuple, list[FactorFold]] = {}
        for f in folds:
            key = _fold_batch_key(f, beta)
            if key is None:
                f.result = self._fold_one(f, beta, backend)
            else:
                batches.setdefault(key, []).append(f)
        ok = self._fold_ok
        for key, fs in batches.items():
            if len(fs) == 1:
                fs[0].result = self._fold_one(fs[0], beta, backend)
                continue
            slot = ("fold", tuple((id(f.like), id(f.structure)) for f in fs))
            S, views = self.stacks.stack(slot, [f.current for f in fs])
            X = torch.stack([f.rows.X for f in fs])
            if ok is None:
                ops.factor_update(S, X, key[-1], beta, backend=backend)
            else:
                ops.factor_update_masked(S, X, key[-1], beta, ok, backend=backend)
            for f, view in zip(fs, views):
                f.result = view

    def _fold_one(self, f: FactorFold, beta: float, backend: str) -> Tensor | None:
        """One fold's result, written only where the masked folds' flag says so (when set)."""
        if f.rows is None:
            return f.current
        if self._fold_ok is None or f.current is None:
            return f.structure.fold(f.current, f.rows, beta, f.like, f.compute, f.storage, backend)
        return f.structure.fold_masked(f.current, f.rows, beta, f.like, f.compute, f.storage,
                                       backend, self._fold_ok)

    def all_gather(self, table):
        return [table]

    def sum_to_all(self):
        return _OwnSum()

    def all_gather_rows(self, parts):
        return [E for E, _, _, _ in parts]

    def refresh(self, due, refresh_owned, exchange, receive):
        refresh_owned(due)

    def directions(self, units, compute, layout, split):
        return {i: split(i, D) for i, D in compute([u.index for u in units]).items()}


class _OwnSum:
    """The one-process :meth:`Communicator.sum_to_all`: each value is its own sum."""

    def __init__(self) -> None:
        self._values: list[tuple[Tensor, float]] = []

    def add(self, piece: Piece, value: Tensor | None, count: float, dtype: torch.dtype,
            device: torch.device) -> int:
        self._values.append((torch.zeros(piece.shape, dtype=dtype, device=device)
                             if value is None else value.to(dtype), count))
        return len(self._values) - 1

    def finish(self) -> list[tuple[Tensor, float]]:
        out, self._values = self._values, []
        return out


def _fold_batch_key(f: FactorFold, beta: float) -> tuple | None:
    """What a fold must share with others to be batched (None: fold it alone): a dense factor
    kept in its accumulation dtype, with small rows of one shape and dtype, the same alpha."""
    if (f.rows is None or f.current is None or f.structure.diagonal
            or f.current.dtype != f.compute or f.storage not in (None, f.compute)):
        return None
    X = f.rows.X
    limit = FOLD_BATCH_MAX_ELEMENTS
    if X.is_cpu:
        limit = min(limit, FOLD_BATCH_MAX_ELEMENTS_CPU)
    if X.dim() != 2 or X.numel() > limit:
        return None
    alpha = (1.0 - beta) * f.rows.scale ** 2 / f.rows.n
    return (f.structure.dim, tuple(X.shape), X.dtype, f.compute, X.device, alpha)


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
        self.reducer = FactorReducer(group, bucket_cap_mb)
        self.model = model
        # mem-opt: ranks keep different inverses, so they agree on the sync-free gate over gloo
        # (a host collective, never a device read)
        self.host_group = (None if strategy == "comm-opt" else host_group(group))

    def owns(self, index: int) -> bool:
        return self.owner[index] == self.rank

    def keeps_inverse(self, index: int) -> bool:
        return self.strategy == "comm-opt" or self.owns(index)

    def any_rank(self, flag: bool) -> bool:
        if self.host_group is None:  # comm-opt: every rank holds the same state
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.host_group)
        return float(t) > 0.0

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

    # ---------------------------------------------------------------------- factors
    def fold_factors(self, folds, beta, backend):
        slots = []
        for f in folds:
            device = f.like.device
            total = f.structure.batch_sum(f.rows, f.compute, device, backend)
            slots.append(self.reducer.add(f.structure.piece(), total,
                                          0.0 if f.rows is None else f.rows.n, f.compute, device))
        results = self.reducer.finish()
        for f, slot in zip(folds, slots):
            total, n = results[slot]
            f.result = f.current if n <= 0 else f.structure.blend(f.current, total.div_(n), beta,
                                                                  f.storage)

    # ------------------------------------------------------------------ plain verbs
    def all_gather(self, table):
        local = _on_comm_device(torch.tensor(table, dtype=torch.float64), self.group)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local, group=self.group)
        return [[tuple(row) for row in part.tolist()] for part in parts]

    def sum_to_all(self):
        return self.reducer

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

    # ---------------------------------------------------------------------- inverses
    def refresh(self, due, refresh_owned, exchange, receive):
        refresh_owned([i for i in due if self.owns(i)])
        if self.strategy != "comm-opt":
            return
        entries = []  # (owner, piece, value on the owner, (block, field), dtype, device)
        for i in due:
            for name, piece, value, dtype, device in exchange(i):
                entries.append((self.owner[i], piece, value if self.owns(i) else None,
                                (i, name), dtype, device))
        # the owner too takes the unpacked copy: the same memory layout (an eigh Q is
        # column-major) makes every rank's later GEMMs round identically
        received: dict[int, dict[str, Tensor]] = {}
        for (i, name), v in self._exchange(entries):
            received.setdefault(i, {})[name] = v
        for i in due:
            receive(i, received.get(i, {}))

    def directions(self, units, compute, layout, split):
        if self.strategy == "comm-opt":
            return LocalCommunicator.directions(self, units, compute, layout, split)  # type: ignore[arg-type]
        indices = [u.index for u in units]
        owned = compute([i for i in indices if self.owns(i)])
        entries = []
        for i in indices:
            shape, dtype, device = layout(i)
            numel = 1
            for s in shape:
                numel *= s
            D = None
            if self.owns(i):
                d = owned.get(i)
                body = (torch.zeros(numel, dtype=dtype, device=device) if d is None
                        else d.to(dtype).reshape(-1))
                D = torch.cat([body, torch.full((1,), 0.0 if d is None else 1.0, dtype=dtype,
                                                device=device)])
            # a fixed layout: every block, its entries plus a "has a gradient" flag
            entries.append((self.owner[i], Piece("full", (numel + 1,)), D, i, dtype, device))
        out = {}
        for i, v in self._exchange(entries):
            if float(v[-1]) != 0.0:
                out[i] = split(i, v[:-1].view(layout(i)[0]))
        return out

    def _exchange(self, entries) -> list[tuple[Any, Tensor]]:
        """Broadcast each entry's value from its owner: one packed asynchronous broadcast per
        (dtype, device) and owner rank. Entries: (owner, piece, value or None, target, dtype,
        device); returns (target, value) for every entry, on every rank."""
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
