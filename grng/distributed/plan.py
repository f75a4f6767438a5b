"""The policy of a step's distributed phases, written once on the communicator's plain verbs
(docs/architecture.md "The communicator", docs/distributed.md): one process, DDP and FSDP2
run these same functions; what differs is what the verbs do and where the layout puts a
block's state.

- **fold** (:func:`fold_factors`): each factor's batch statistic of this rank (its rows,
  :class:`RowsStatistic`) is reduced (``comm.reduce_sum``) to the ranks that keep the block
  (``comm.holder``: every rank, or the owner), then blended into the running factor
  M <- beta M + (1 - beta) sum_r n_r M_r / sum_r n_r. A reduction over one rank hands the
  statistic back as it was, still rows, and rows fold in one fused op
  (``factor_update``: M <- beta M + alpha X^T X, equal-shape blocks batched); a sum from
  several ranks (:class:`SummedStatistic`) is divided by its count and blended. The statistic,
  not the policy, knows how it folds.
- **refresh** (:func:`refresh_inverses`): the owners refresh the blocks due; the inverses that
  every rank keeps but only the owner computes (``comm.shares_inverse``: DDP's comm-opt) are
  broadcast from their owners (``comm.broadcast_from``); the rest stay where they were made.
- **directions** (:func:`block_directions`): each block is preconditioned where its inverse is
  kept (``comm.keeps_inverse``; its gradient was gathered there, ``comm.gather_gradients``),
  and its direction is sent to the ranks that apply it, as they store the parameters
  (``comm.scatter_directions``).

Nothing here imports torch.distributed, names a communicator class or asks whether the run is
distributed.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from grng import ops
from grng.curvature.pieces import Piece
from grng.curvature.stacks import Stacks
from grng.distributed.communicator import Communicator

#: dense factors whose rows have at most this many elements (m d) are folded in one batched
#: factor_update with the other blocks of the same shape; larger rows cost more to stack than
#: a call (2-core CPU: 6 x (32 x 33) rows 0.056 -> 0.036 ms, 2 x (2048 x 513) 30.6 -> 36.7 ms)
FOLD_BATCH_MAX_ELEMENTS = 1 << 16
#: the same bound on the CPU, where the freshly captured rows are copied into the stack from
#: memory: the demo transformer's 7 x (512 x 65) and 5 x (512 x 64) rows fold 0.56 ms faster per
#: step one factor at a time (5.05 -> 4.49 ms, one thread, interleaved in one process)
FOLD_BATCH_MAX_ELEMENTS_CPU = 1 << 14


@dataclass
class FactorFold:
    """One factor to fold this step's rows into: ``result`` <- beta current + (1 - beta) M_batch
    (stored in ``storage``); ``result`` is ``current`` when no rank has rows, None on a rank
    that does not keep the block."""

    structure: Any  # grng.curvature.factors.FactorStructure
    rows: Any  # grng.curvature.factors.Rows | None
    current: Tensor | None
    like: Tensor  # the layer's weight (device; dtype of a diagonal factor's counts)
    compute: torch.dtype
    storage: torch.dtype | None
    result: Tensor | None = None
    block: int = -1  # the index of the block the factor belongs to (its owner keeps it)


@dataclass
class RowsStatistic:
    """This rank's batch statistic of one factor, n M_batch = sum_rows s^2 x x^T, kept as its
    rows until it must travel (:meth:`total` forms it). What ``comm.reduce_sum`` takes; ``ok``:
    the device flag under which a communicator that ``masks_folds`` has it folded (None: fold)."""

    fold: FactorFold
    backend: str
    ok: Tensor | None = None

    @property
    def piece(self) -> Piece:
        return self.fold.structure.piece()

    @property
    def count(self) -> float:
        return 0.0 if self.fold.rows is None else self.fold.rows.n

    @property
    def dtype(self) -> torch.dtype:
        return self.fold.compute

    @property
    def device(self) -> torch.device:
        return self.fold.like.device

    def total(self) -> Tensor | None:
        """n M_batch, formed (None without rows)."""
        f = self.fold
        return f.structure.batch_sum(f.rows, f.compute, self.device, self.backend)

    def summed(self, total: Tensor, count: float) -> SummedStatistic:
        """The statistic of every rank, from the sum of their totals and counts."""
        return SummedStatistic(self.fold, total, count)

    def fold_into(self, beta: float) -> Tensor | None:
        """The rows folded into the running factor in one fused op (only where ``ok``)."""
        f = self.fold
        if f.rows is None:
            return f.current
        if self.ok is None or f.current is None:
            return f.structure.fold(f.current, f.rows, beta, f.like, f.compute, f.storage,
                                    self.backend)
        return f.structure.fold_masked(f.current, f.rows, beta, f.like, f.compute, f.storage,
                                       self.backend, self.ok)

    def batch_key(self, beta: float) -> tuple | None:
        """What a fold must share with others to be batched (None: fold it alone): a dense
        factor kept in its accumulation dtype, with small rows of one shape and dtype, the
        same alpha."""
        f = self.fold
        if (f.rows is None or f.current is None or f.structure.diagonal
                or f.current.dtype != f.compute or f.storage not in (None, f.compute)):
            return None
        X = f.rows.X
        limit = FOLD_BATCH_MAX_ELEMENTS_CPU if X.is_cpu else FOLD_BATCH_MAX_ELEMENTS
        if X.dim() != 2 or X.numel() > limit:
            return None
        alpha = (1.0 - beta) * f.rows.scale ** 2 / f.rows.n
        return (f.structure.dim, tuple(X.shape), X.dtype, f.compute, X.device, alpha)


@dataclass
class SummedStatistic:
    """The statistic of every rank: sum_r n_r M_r and sum_r n_r."""

    fold: FactorFold
    total: Tensor
    count: float

    def fold_into(self, beta: float) -> Tensor | None:
        """beta current + (1 - beta) total / count; ``current`` when no rank had rows."""
        f = self.fold
        if self.count <= 0:
            return f.current
        return f.structure.blend(f.current, self.total.div_(self.count), beta, f.storage)

    def batch_key(self, beta: float) -> None:
        """A sum is blended alone."""
        return None


@dataclass
class TensorSum:
    """This rank's part of a sum that every rank (or ``comm.reduce_sum``'s destination)
    receives, already formed (None: zeros); :meth:`value` is the sum (the part itself where it
    is the only rank's)."""

    piece: Piece
    part: Tensor | None
    dtype: torch.dtype
    device: torch.device
    count: float = 0.0
    ok: Tensor | None = None

    def total(self) -> Tensor | None:
        return self.part

    def summed(self, total: Tensor, count: float) -> TensorSum:
        return TensorSum(self.piece, total, self.dtype, self.device, count)

    def value(self) -> Tensor:
        """The sum, in ``dtype``."""
        if self.part is None:
            return torch.zeros(self.piece.shape, dtype=self.dtype, device=self.device)
        return self.part.to(self.dtype)


def fold_factors(folds: list[FactorFold], comm: Communicator, beta: float, backend: str,
                 stacks: Stacks) -> None:
    """Set every ``fold.result``: this rank's statistic reduced to the ranks that keep the
    block, folded there (``stacks``: the persistent stacks of batched equal-shape folds)."""
    parts = [RowsStatistic(f, backend) for f in folds]
    reduced = comm.reduce_sum(parts, [comm.holder(f.block) for f in folds])
    batches: dict[tuple, list[RowsStatistic]] = {}
    for f, r in zip(folds, reduced):
        key = None if r is None else r.batch_key(beta)
        if key is None:  # r None: another rank keeps this block
            f.result = None if r is None else r.fold_into(beta)
        else:
            batches.setdefault(key, []).append(r)
    for key, rs in batches.items():
        if len(rs) == 1:
            rs[0].fold.result = rs[0].fold_into(beta)
            continue
        fs = [r.fold for r in rs]
        slot = ("fold", tuple((id(f.like), id(f.structure)) for f in fs))
        S, views = stacks.stack(slot, [f.current for f in fs])
        X = torch.stack([f.rows.X for f in fs])
        ok = rs[0].ok
        if ok is None:
            ops.factor_update(S, X, key[-1], beta, backend=backend)
        else:
            ops.factor_update_masked(S, X, key[-1], beta, ok, backend=backend)
        for f, view in zip(fs, views):
            f.result = view


#: (field name, how it travels, its value on the owner or None, dtype, device)
Exchanged = list[tuple[str, Piece, Tensor | None, torch.dtype, torch.device]]


def refresh_inverses(comm: Communicator, due: list[int], refresh_owned: Callable[[list[int]], None],
                     exchange: Callable[[int], Exchanged],
                     receive: Callable[[int, dict[str, Tensor]], None]) -> None:
    """Refresh the inverses of blocks ``due``: ``refresh_owned`` on this rank's share; then each
    owner's fields ``exchange(i)`` of the inverses every rank keeps (``comm.shares_inverse``)
    travel to every rank (``receive``; the owner too takes the received copy, so every rank's
    later GEMMs see the same memory layout and round alike)."""
    refresh_owned([i for i in due if comm.owns(i)])
    shared = [i for i in due if comm.shares_inverse(i)]
    entries = []  # (owner, piece, value on the owner, (block, field), dtype, device)
    for i in shared:
        for name, piece, value, dtype, device in exchange(i):
            entries.append((comm.owner_of(i), piece, value if comm.owns(i) else None,
                            (i, name), dtype, device))
    received: dict[int, dict[str, Tensor]] = {}
    for (i, name), v in comm.broadcast_from(entries):
        received.setdefault(i, {})[name] = v
    for i in shared:
        receive(i, received.get(i, {}))


def block_directions(comm: Communicator, units: list[Any],
                     compute: Callable[[list[int]], dict[int, Tensor]],
                     layout: Callable[[int], tuple[tuple[int, ...], torch.dtype, torch.device]],
                     split: Callable[[int, Tensor], list[Tensor]]) -> dict[int, list[Tensor]]:
    """Each block's direction per parameter of ``unit.layer.params`` (as this rank stores
    them), for the ``units`` (blocks): ``compute(indices)`` gives index -> direction matrix of
    those with a gradient, in one call so equal shapes batch, on the ranks that keep the
    block's inverse; ``layout(i)`` = (shape, dtype, device) of block i's direction matrix;
    ``split(i, D)`` lays it out per parameter."""
    here = compute([u.index for u in units if comm.keeps_inverse(u.index)])
    return comm.scatter_directions(units, here, layout, split)
