"""The preconditioner interface (docs/architecture.md "Phases and the gate"): per step, fold
this step's statistics in (on fold steps), refresh when due, ``update`` the per-step state, then
``apply`` (pure: reads the state, writes none) to a unit's gradient; save and load its state.

A *unit* is what one preconditioner instance acts on: a Kronecker block (a layer's [W b],
gradient laid out as the d_G x d_A matrix V) or one parameter without a block (diagonal). Each
unit's state is a typed structure (:mod:`grng.curvature.state`) owned by the optimizer and
handed to the preconditioner; the communicator's verbs (:mod:`grng.distributed.communicator`),
through the policy written on them (:mod:`grng.distributed.plan`), make the statistics global
and place the inverse work.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from grng.curvature.factors import Rows, compute_dtype
from grng.curvature.blocks import Block
from grng.curvature.state import StateView
from grng.distributed.communicator import Communicator


@dataclass(frozen=True)
class CurvatureConfig:
    """What every preconditioner of one optimizer shares: the EMA decay beta of the factors,
    the op backend, the storage dtypes of factors and inverses (None: ``compute_dtype``), and
    whether steps must not synchronize with the host, and whether an inverse kept in a low
    storage dtype is applied in that dtype (``precision="bf16"``; docs/performance.md)."""

    factor_decay: float
    backend: str
    factor_dtype: torch.dtype | None = None
    inverse_dtype: torch.dtype | None = None
    sync_free: bool = False
    apply_in_storage: bool = False


@dataclass
class Unit:
    """One unit: ``index`` in the optimizer's list, its ``layer`` helper (None for a diagonal
    unit), its ``params`` and its typed ``state``. Where parameters are sharded (FSDP2) the
    communicator sets, per step, a diagonal unit's ``view`` (this rank's part of its
    parameter, the local gradient as its ``.grad``) and a block's ``gathered`` gradient matrix
    on the rank that preconditions it."""

    index: int
    layer: Block | None
    params: list[Tensor]
    state: StateView
    view: Tensor | None = None
    gathered: Tensor | None = None

    @property
    def like(self) -> Tensor:
        """The tensor whose device and dtype (and, for a diagonal unit, shape and ``.grad``) the
        unit's state follows: the weight, or this rank's part of the parameter (``view``)."""
        return self.params[0] if self.view is None else self.view

    def grad_matrix(self) -> Tensor | None:
        """The block's gradient as the d_G x d_A matrix: the one gathered for this step, else
        the layer's (None without a gradient)."""
        return self.gathered if self.gathered is not None else self.layer.grad_matrix()


class Preconditioner:
    """One family of curvature (Kronecker eigen/newton/cholesky, Kalman, diagonal)."""

    #: whether ``update(units, ok)`` takes the device gate's flag and writes its per-step fields
    #: only where it is True (a masked op: the gate then keeps no copy of them); False: the
    #: pipeline calls ``update(units)`` and the gate copies and selects the fields back
    masks_per_step: bool = False

    def __init__(self, config: CurvatureConfig) -> None:
        self.config = config

    def new_state(self, unit_params: list[Tensor], layer: Block | None) -> StateView:
        """A fresh (empty) state for a unit."""
        raise NotImplementedError

    def fold(self, units: list[tuple[Unit, tuple[Rows, Rows] | None]], comm: Communicator) -> None:
        """Fold this step's statistics (captured rows, or the gradient of a diagonal unit)."""
        raise NotImplementedError

    def needs_first_use(self, unit: Unit, folding: bool) -> bool:
        """Whether this step would create state of ``unit`` that has no previous value for a
        sync-free step to select on a skip (then the step takes the host path): by default its
        first statistics (``folding``: this step folds statistics into the unit) or a per-step
        field its ``update`` sets for the first time (a unit with a gradient)."""
        state = unit.state
        if folding and not state.folded():
            return True
        return (bool(state.PER_STEP) and unit.like.grad is not None
                and len(state.per_step()) < len(state.PER_STEP))

    def refresh_synchronizes(self) -> bool:
        """Whether a refresh reads a result on the host anyway (then a sync-free optimizer takes
        the host path on refresh steps); False by default."""
        return False

    def refresh(self, units: list[Unit], comm: Communicator, due: list[bool],
                dampings: list[float]) -> None:
        """Recompute the inverse of each unit that is ``due`` (or has none yet); no-op by
        default."""

    def update(self, units: list[Unit]) -> None:
        """The per-step phase: run every step whose inputs are finite, after fold and refresh
        and before :meth:`apply`, on the units with a gradient (it may read ``p.grad`` or a
        layer's ``grad_matrix()``); it writes only the fields its state type declares in
        ``PER_STEP``, which a skipped step restores (or, with :attr:`masks_per_step`, that it
        writes only where its ``ok`` argument says). No-op by default."""

    def gradient_matrix(self, unit: Unit) -> Tensor | None:
        """The block's gradient matrix V that :meth:`apply` is given this step: by default
        ``unit.grad_matrix()`` (None without a gradient); a preconditioner whose update phase
        already laid V out may return that."""
        return unit.grad_matrix()

    def apply(self, unit: Unit, V: Tensor, group: dict) -> Tensor:
        """The unit's direction from its gradient (V for a block, p.grad for a diagonal unit);
        pure: reads the unit's state, writes none."""
        raise NotImplementedError

    def apply_many(self, items: list[tuple[Unit, Tensor, dict]]) -> list[Tensor]:
        """:meth:`apply` for several (unit, V, group) at once (batched where a family can)."""
        return [self.apply(unit, V, group) for unit, V, group in items]

    def expected_shapes(self, unit: Unit) -> dict[str, tuple[int, ...]]:
        """Checkpoint name -> the shape a saved tensor must have for this unit."""
        raise NotImplementedError

    def storage_dtype(self, unit: Unit, name: str) -> torch.dtype:
        """The dtype a state tensor is kept in (a restored checkpoint is cast to it)."""
        return compute_dtype(unit.like)

    def load(self, unit: Unit, tensors: dict[str, Tensor]) -> None:
        """Set the unit's state from checkpoint tensors (names as in ``expected_shapes``)."""
        raise NotImplementedError
