"""The preconditioner interface (docs/architecture.md): fold this step's statistics in,
refresh when due, apply to a unit's gradient, save and load its state.

A *unit* is what one preconditioner instance acts on: a Kronecker block (a layer's [W b],
gradient laid out as the d_G x d_A matrix V) or one parameter without a block (diagonal). Each
unit's state is a typed structure (:mod:`grng.curvature.state`) owned by the optimizer and
handed to the preconditioner; the communicator (:mod:`grng.distributed.communicator`) makes the
statistics global and places the inverse work.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from grng.curvature.factors import Rows
from grng.curvature.layers import KroneckerLayer
from grng.curvature.state import StateView
from grng.distributed.communicator import Communicator


def compute_dtype(p: Tensor) -> torch.dtype:
    """Curvature arithmetic runs in the parameter's dtype, but at least float32."""
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


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
    unit), its ``params`` and its typed ``state``."""

    index: int
    layer: KroneckerLayer | None
    params: list[Tensor]
    state: StateView

    @property
    def like(self) -> Tensor:
        """The tensor whose device and dtype the unit's state follows (the weight)."""
        return self.params[0]


class Preconditioner:
    """One family of curvature (Kronecker eigen/newton/cholesky, Kalman, diagonal)."""

    def __init__(self, config: CurvatureConfig) -> None:
        self.config = config

    def new_state(self, unit_params: list[Tensor], layer: KroneckerLayer | None) -> StateView:
        """A fresh (empty) state for a unit."""
        raise NotImplementedError

    def fold(self, units: list[tuple[Unit, tuple[Rows, Rows] | None]], comm: Communicator) -> None:
        """Fold this step's statistics (captured rows, or the gradient of a diagonal unit)."""
        raise NotImplementedError

    def refresh_synchronizes(self) -> bool:
        """Whether a refresh reads a result on the host anyway (then a sync-free optimizer takes
        the host path on refresh steps); False by default."""
        return False

    def refresh(self, units: list[Unit], comm: Communicator, due: list[bool],
                dampings: list[float]) -> None:
        """Recompute the inverse of each unit that is ``due`` (or has none yet); no-op by
        default."""

    def apply(self, unit: Unit, V: Tensor, group: dict) -> Tensor:
        """The unit's direction from its gradient (V for a block, p.grad for a diagonal unit)."""
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
