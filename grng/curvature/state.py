"""Typed per-layer optimizer state, with a read-only mapping view under checkpoint names.

Code reads and writes the fields (``block.A``, ``block.inverse``); the mapping view
(``block["A"]``, ``block["QG"]``, ``block.items()``) exposes the same tensors under the names
grng's checkpoints have always used (docs/algorithms.md notation), which is also how
:mod:`grng.optim.checkpoint` saves and loads them.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from torch import Tensor

from grng.curvature.inverse import InverseState


class StateView(Mapping):
    """Mapping protocol over :meth:`tensors` (name -> tensor of the fields that are set)."""

    #: the fields a fold writes (the running statistics, not what a refresh derives from them)
    FOLDED: tuple[str, ...] = ()
    #: the fields a preconditioner's per-step ``update`` phase writes (moments, step counts):
    #: the step's gate keeps them and restores them on a skipped step (none by default)
    PER_STEP: tuple[str, ...] = ()
    #: the FOLDED fields are folded on the communicator's verbs (``grng.distributed.plan``
    #: ``fold_factors``: Kronecker factors A, G), which under ``comm.masked_folds(ok)`` (a
    #: communicator that ``masks_folds``) writes them only where the device gate's flag says so:
    #: the gate keeps no copy of them then
    FOLDS_THROUGH_COMMUNICATOR = False

    def tensors(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def folded(self) -> dict[str, Tensor]:
        """Name -> tensor of the :attr:`FOLDED` fields that are set."""
        tensors = self.tensors()  # once: each ``self[f]`` would build it again
        return {f: tensors[f] for f in self.FOLDED if f in tensors}

    def per_step(self) -> dict[str, Tensor]:
        """Name -> tensor of the :attr:`PER_STEP` fields that are set."""
        tensors = self.tensors()
        return {f: tensors[f] for f in self.PER_STEP if f in tensors}

    def replace(self, name: str, tensor: Tensor) -> None:
        """Set the tensor kept under checkpoint name ``name`` (one that is set)."""
        setattr(self, name, tensor)

    def __getitem__(self, key: str) -> Tensor:
        return self.tensors()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors())

    def __len__(self) -> int:
        return len(self.tensors())

    __hash__ = object.__hash__  # a state object is identified by itself, never by its contents

    def __eq__(self, other: object) -> bool:
        return self is other


@dataclass(eq=False)
class KroneckerBlock(StateView):
    """A Kronecker block's state: running factors A, G and the inverse built from them."""

    FOLDED = ("A", "G")
    FOLDS_THROUGH_COMMUNICATOR = True

    A: Tensor | None = None
    G: Tensor | None = None
    inverse: InverseState | None = None

    def tensors(self) -> dict[str, Tensor]:
        out = {k: v for k, v in (("A", self.A), ("G", self.G)) if v is not None}
        if self.inverse is not None:
            out.update(self.inverse.tensors())
        return out

    def replace(self, name: str, tensor: Tensor) -> None:
        setattr(self if name in self.FOLDED else self.inverse, name, tensor)


@dataclass(eq=False)
class KalmanBlock(StateView):
    """R-Kalman's state of a Kronecker block: the covariance factors P_A ~ A^-1, P_G ~ G^-1."""

    FOLDED = ("PA", "PG")

    PA: Tensor | None = None
    PG: Tensor | None = None

    def tensors(self) -> dict[str, Tensor]:
        return {k: v for k, v in (("PA", self.PA), ("PG", self.PG)) if v is not None}


@dataclass(eq=False)
class DiagonalState(StateView):
    """A parameter without a Kronecker block: its diagonal curvature (Fisher EMA ``D``, or
    R-Kalman's variance ``PD``), under the name ``key``."""

    key: str
    value: Tensor | None = None

    def tensors(self) -> dict[str, Tensor]:
        return {} if self.value is None else {self.key: self.value}

    def folded(self) -> dict[str, Tensor]:
        return self.tensors()

    def replace(self, name: str, tensor: Tensor) -> None:
        self.value = tensor


@dataclass(eq=False)
class AdamMoments(StateView):
    """Adam's moments of a parameter without a Kronecker block (EKFAC's diagonal): the first
    moment ``exp_avg`` (EMA of g), the second ``exp_avg_sq`` (EMA of g * g) and the count
    ``step`` of updates (a 0-dim tensor), all written by the per-step ``update`` phase."""

    PER_STEP = ("exp_avg", "exp_avg_sq", "step")

    exp_avg: Tensor | None = None
    exp_avg_sq: Tensor | None = None
    step: Tensor | None = None

    def tensors(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in self.PER_STEP if getattr(self, k) is not None}


@dataclass(eq=False)
class EigenbasisBlock(StateView):
    """EKFAC's state of a Kronecker block: running factors A, G; their eigenbases Q_A, Q_G
    (refreshed; None for a diagonal side, whose basis is the identity); Adam's moments of the
    gradient matrix's projection Q_G^T V Q_A (both in the eigenbasis): the first
    ``exp_avg_basis``, the second ``exp_avg_sq``, and the update count ``step``. (grng 0.3.0
    kept the first moment in parameter space, as ``exp_avg``; its checkpoints are converted on
    load.)"""

    FOLDED = ("A", "G")
    FOLDS_THROUGH_COMMUNICATOR = True
    PER_STEP = ("exp_avg_basis", "exp_avg_sq", "step")

    A: Tensor | None = None
    G: Tensor | None = None
    QG: Tensor | None = None
    QA: Tensor | None = None
    exp_avg_basis: Tensor | None = None
    exp_avg_sq: Tensor | None = None
    step: Tensor | None = None

    def tensors(self) -> dict[str, Tensor]:
        names = ("A", "G", "QG", "QA", *self.PER_STEP)
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}
