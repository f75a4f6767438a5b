"""Kronecker-factored preconditioning, K-FAC style (docs/algorithms.md sections 1 and 2).

fold:    A <- beta A + (1 - beta) A_batch, G likewise (the first update sets them), through the
         communicator, so under data parallelism the batch factors are the global batch's;
refresh: every ``inverse_every`` steps (and once a block has factors) its inverse is rebuilt by
         the inverse strategy (eigen, newton, cholesky) on the rank that owns the block;
apply:   P(V), the damped inverse applied to the block's gradient matrix (V itself until the
         block has an inverse).

Factors and inverses are kept in ``compute_dtype(W)`` unless ``factor_dtype`` /
``inverse_dtype`` ask for a storage dtype; arithmetic always runs in ``compute_dtype(W)``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from grng.curvature.blocks import Block
from grng.curvature.inverse import EigenBasis, InverseStrategy, RefreshItem
from grng.curvature.stacks import Stacks
from grng.curvature.factors import Rows
from grng.curvature.state import KroneckerBlock, StateView
from grng.curvature.pieces import Piece
from grng.distributed.communicator import Communicator
from grng.distributed.plan import FactorFold, refresh_inverses
from grng.distributed.plan import fold_factors as fold_on_verbs
from grng.precondition.base import CurvatureConfig, Preconditioner, Unit, compute_dtype


def fold_factors(units: list[tuple[Unit, tuple[Rows, Rows] | None]], comm: Communicator,
                 config: CurvatureConfig, stacks: Stacks, decay: float | None = None) -> None:
    """A <- beta A + (1 - beta) A_batch and G likewise for each unit's state (fields ``A``,
    ``G``; the first fold sets them), all units in one fold on the communicator's verbs
    (:func:`grng.distributed.plan.fold_factors`; ``stacks``: those of batched folds); beta =
    ``decay``, or the config's ``factor_decay`` when None."""
    folds: list[tuple[StateView, str, FactorFold]] = []
    for unit, rows in units:
        block = unit.state
        a_rows, g_rows = rows if rows is not None else (None, None)
        compute = compute_dtype(unit.like)
        for side, structure, r in (("A", unit.layer.a_factor, a_rows),
                                   ("G", unit.layer.g_factor, g_rows)):
            folds.append((block, side, FactorFold(structure, r, getattr(block, side), unit.like,
                                                  compute, config.factor_dtype, block=unit.index)))
    beta = config.factor_decay if decay is None else decay
    fold_on_verbs([f for _, _, f in folds], comm, beta, config.backend, stacks)
    for block, side, f in folds:
        setattr(block, side, f.result)


class KroneckerPreconditioner(Preconditioner):
    """(A (x) G + damping)^-1 per block, by the inverse strategy ``inverse``."""

    def __init__(self, config: CurvatureConfig, inverse: InverseStrategy) -> None:
        super().__init__(config)
        self.inverse = inverse
        self.stacks = Stacks()

    def new_state(self, unit_params, layer) -> KroneckerBlock:
        return KroneckerBlock()

    # ------------------------------------------------------------------------- fold
    def fold(self, units, comm: Communicator) -> None:
        fold_factors(units, comm, self.config, self.stacks)

    def needs_first_use(self, unit, folding) -> bool:
        """Rows folded into a block without factors, or factors without an inverse yet (the
        refresh would create the first one)."""
        return super().needs_first_use(unit, folding) or (
            unit.state.inverse is None and bool(unit.state.folded()))

    # ---------------------------------------------------------------------- refresh
    def refresh_synchronizes(self) -> bool:
        return self.inverse.refresh_synchronizes

    def refresh(self, units, comm, due, dampings) -> None:
        todo = {u.index: (u, damping) for u, damping, now in zip(units, dampings, due)
                if u.state.A is not None and u.state.G is not None
                and (now or u.state.inverse is None)}
        order = list(todo)

        def refresh_owned(indices: list[int]) -> None:
            items, targets = [], []
            for i in indices:
                unit, damping = todo[i]
                block, compute = unit.state, compute_dtype(unit.like)
                prev = None if block.inverse is None else block.inverse.cast(compute)
                items.append(RefreshItem(block.A.to(compute), block.G.to(compute),
                                         unit.layer.a_factor, unit.layer.g_factor, damping, prev))
                targets.append(unit)
            for unit, inv in zip(targets, self.inverse.refresh_many(
                    items, self.config.backend, on_device=self.config.sync_free)):
                unit.state.inverse = inv.cast(self._inverse_storage(unit))

        def exchange(i: int) -> list[tuple[str, Piece, Tensor | None, torch.dtype, torch.device]]:
            unit = todo[i][0]
            inv = unit.state.inverse
            dtype, device = self._inverse_storage(unit), unit.like.device
            return [(name, piece, None if inv is None else getattr(inv, name), dtype, device)
                    for name, piece in self._pieces(unit.layer)]

        def receive(i: int, fields: dict[str, Tensor]) -> None:
            names = {n for n, _ in self._pieces(todo[i][0].layer)}
            kwargs = {n: fields.get(n) for n in self._field_names()}
            if names <= set(fields):
                todo[i][0].state.inverse = self.inverse.state_type(**kwargs)

        refresh_inverses(comm, order, refresh_owned, exchange, receive)

    def _field_names(self) -> tuple[str, ...]:
        return ("QG", "lG", "QA", "lA") if self.inverse.state_type is EigenBasis else ("XG", "XA")

    def _pieces(self, layer: Block) -> list[tuple[str, Piece]]:
        """The inverse representation's fields and how each travels (comm-opt broadcast); a
        diagonal factor has no eigenvectors and a vector inverse."""
        pieces = []
        for side, structure in (("G", layer.g_factor), ("A", layer.a_factor)):
            if self.inverse.state_type is EigenBasis:
                pieces.append(("l" + side, structure.eigenvalues_piece()))
                Q = structure.eigenvectors_piece()
                if Q is not None:
                    pieces.append(("Q" + side, Q))
            else:
                pieces.append(("X" + side, structure.inverse_piece()))
        return pieces

    def _inverse_storage(self, unit: Unit) -> torch.dtype:
        return self.config.inverse_dtype or compute_dtype(unit.like)

    # ------------------------------------------------------------------------ apply
    def apply(self, unit, V, group) -> Tensor:
        """P(V); V itself until the block has an inverse."""
        inv = unit.state.inverse
        if inv is None:
            return V
        compute = compute_dtype(unit.like)
        g, a = unit.layer.g_factor, unit.layer.a_factor
        if self.config.apply_in_storage:  # bf16 operands, float32 accumulation; D in float32
            return self.inverse.apply(inv, V, group["damping"], self.config.backend, g, a
                                      ).to(compute)
        if self.config.inverse_dtype is not None:  # applied in >= float32
            inv = inv.cast(compute)
        return self.inverse.apply(inv, V, group["damping"], self.config.backend, g, a)

    def apply_many(self, items) -> list[Tensor]:
        """P(V) of each item; blocks of the same shape (gradient, inverse fields, damping) in
        one batched application over their stacked inverses (kept stacked between steps)."""
        out: list[Tensor | None] = [None] * len(items)
        batches: dict[tuple, list[int]] = {}
        for k, (unit, V, group) in enumerate(items):
            key = self._batch_key(unit, V, group["damping"])
            if key is None:
                out[k] = self.apply(unit, V, group)
            else:
                batches.setdefault(key, []).append(k)
        for ks in batches.values():
            units = [items[k][0] for k in ks]
            if len(ks) > 1:
                fields = {}
                for name in units[0].state.inverse.tensors():
                    slot = (name, tuple(u.index for u in units))
                    S, views = self.stacks.stack(slot, [getattr(u.state.inverse, name) for u in units])
                    for u, view in zip(units, views):
                        setattr(u.state.inverse, name, view)
                    fields[name] = S
                inv = self.inverse.state_type(**fields)
                V = torch.stack([items[k][1] for k in ks])
                damping = items[ks[0]][2]["damping"]
                g, a = units[0].layer.g_factor, units[0].layer.a_factor  # one key: one shape
                if self.inverse.accepts(inv, V, damping, self.config.backend, g, a):
                    D = self.inverse.apply(inv, V, damping, self.config.backend, g, a)
                    D = D.to(compute_dtype(units[0].like))  # float32 after a bf16 application
                    for k, d in zip(ks, D.unbind(0)):
                        out[k] = d
                    continue
            for k in ks:  # one block, or a backend that takes no batched inputs
                out[k] = self.apply(*items[k])
        return out  # type: ignore[return-value]

    def _batch_key(self, unit: Unit, V: Tensor, damping: float) -> tuple | None:
        """What a block must share with others to be applied in one batch (None: alone): an
        inverse applied in the dtype it is kept in (no cast per step) of two dense factors
        (every field set), the gradient (one d_G x d_A block) with its dtype, the damping."""
        inv = unit.state.inverse
        cast = self.config.inverse_dtype is not None and not self.config.apply_in_storage
        g, a = unit.layer.g_factor, unit.layer.a_factor
        if inv is None or cast or tuple(V.shape) != (g.dim, a.dim):
            return None
        fields = inv.tensors()
        if g.diagonal or a.diagonal or len(fields) != len(self._field_names()):
            return None
        return (tuple(V.shape), V.dtype, V.device, float(damping),
                tuple((name, tuple(t.shape), t.dtype) for name, t in fields.items()))

    # ------------------------------------------------------------------- checkpoints
    def expected_shapes(self, unit) -> dict[str, tuple[int, ...]]:
        shapes = {"A": unit.layer.a_factor.shape, "G": unit.layer.g_factor.shape}
        for name, piece in self._pieces(unit.layer):
            shapes[name] = piece.shape
        return shapes

    def storage_dtype(self, unit, name) -> torch.dtype:
        if name in ("A", "G") and self.config.factor_dtype is not None:
            return self.config.factor_dtype
        if name not in ("A", "G") and self.config.inverse_dtype is not None:
            return self.config.inverse_dtype
        return compute_dtype(unit.like)

    def load(self, unit, tensors) -> None:
        block = unit.state
        block.A, block.G = tensors.get("A"), tensors.get("G")
        names = self._field_names()
        present = {n: tensors.get(n) for n in names}
        required = {n for n, _ in self._pieces(unit.layer)}
        block.inverse = (self.inverse.state_type(**present)
                         if all(present[n] is not None for n in required) else None)
