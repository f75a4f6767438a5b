"""Adam in the Kronecker eigenbasis (EKFAC with Adam's scaling; docs/algorithms.md "EKFAC").

fold:    A, G as K-FAC's (:func:`grng.precondition.kronecker.fold_factors`);
refresh: every ``inverse_every`` steps the eigenbases Q_A, Q_G (columns by decreasing
         eigenvalue): by eigh at a block's first refresh, then by one step of warm-started
         subspace iteration Q <- orth(M Q_prev) (a GEMM, then QR; eigh where the result is not
         finite, or on the device the previous basis); the second moment is carried into the
         new basis (``carry``: "reproject" v <- W_G v W_A^T with W = (Q_new^T Q_old)^2
         elementwise, or "keep" v as it is);
update:  t += 1, m <- beta1 m + (1 - beta1) V (parameter space),
         v <- beta2 v + (1 - beta2) (Q_G^T V Q_A)^2 (eigenbasis);
apply:   Q_G [ (Q_G^T m Q_A / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) ] Q_A^T.

A diagonal side (an embedding's A, a side above ``max_factor_dim``) has the identity as its
basis (no Q), so a block with both sides diagonal is plain Adam, as is a block before its first
basis.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from grng import ops
from grng.curvature.factors import FactorStructure
from grng.curvature.layers import KroneckerLayer
from grng.curvature.pieces import Piece
from grng.curvature.state import EigenbasisBlock
from grng.precondition.adam import AdamSettings
from grng.precondition.base import CurvatureConfig, Preconditioner, Unit, compute_dtype
from grng.precondition.kronecker import fold_factors

#: how a refresh computes the bases after the first (which is always eigh)
BASES: tuple[str, ...] = ("subspace", "eigh")
#: how the second moment follows a change of basis
CARRIES: tuple[str, ...] = ("reproject", "keep")


def to_basis(V: Tensor, QG: Tensor | None, QA: Tensor | None) -> Tensor:
    """Q_G^T V Q_A (a side without Q: the identity); batched over leading dimensions."""
    if QG is not None:
        V = QG.transpose(-2, -1) @ V
    if QA is not None:
        V = V @ QA
    return V


def from_basis(N: Tensor, QG: Tensor | None, QA: Tensor | None) -> Tensor:
    """Q_G N Q_A^T, the inverse of :func:`to_basis`."""
    if QG is not None:
        N = QG @ N
    if QA is not None:
        N = N @ QA.transpose(-2, -1)
    return N


def subspace_step(M: Tensor, Q: Tensor) -> Tensor:
    """One step of warm-started subspace (orthogonal) iteration: the columns of Q sorted by
    decreasing Rayleigh quotient q^T M q, then Q' R = M Q by QR; batched over a leading
    dimension. Q' spans M Q; for Q an eigenbasis of M, Q' = Q up to column signs."""
    MQ = M @ Q
    order = (Q * MQ).sum(-2).argsort(dim=-1, descending=True)
    MQ = MQ.gather(-1, order.unsqueeze(-2).expand_as(MQ))
    return torch.linalg.qr(MQ).Q


def first_basis(structure: FactorStructure, M: Tensor, previous: Tensor | None,
                backend: str) -> Tensor | None:
    """The factor's eigenvectors by decreasing eigenvalue (None: a diagonal factor, whose basis
    is the identity); where the eigensolver fails, the previous basis (or the identity),
    warned."""
    try:
        _, Q = structure.eig(M, backend)
    except ops.FactorizationError as err:
        kept = "keeping the previous basis" if previous is not None else "using the identity"
        warnings.warn(f"eigendecomposition failed ({err}); {kept}", RuntimeWarning, stacklevel=5)
        return previous if previous is not None else torch.eye(M.shape[0], dtype=M.dtype,
                                                               device=M.device)
    return None if Q is None else Q.flip(-1)


def carry_weights(new: Tensor | None, old: Tensor | None) -> Tensor | None:
    """W = (Q_new^T Q_old)^2 elementwise (None when the basis did not change from none)."""
    if new is None:
        return None
    R = new.transpose(-2, -1) if old is None else new.transpose(-2, -1) @ old.to(new.dtype)
    return R * R


class EigenbasisPreconditioner(Preconditioner):
    """Adam's moments in each block's Kronecker eigenbasis (module docstring)."""

    def __init__(self, config: CurvatureConfig, adam: AdamSettings, basis: str = "subspace",
                 carry: str = "reproject") -> None:
        super().__init__(config)
        self.adam = adam
        self.basis = basis
        self.carry = carry

    def new_state(self, unit_params, layer) -> EigenbasisBlock:
        return EigenbasisBlock()

    def fold(self, units, comm) -> None:
        fold_factors(units, comm, self.config)

    def needs_first_use(self, unit, folding) -> bool:
        """Rows into a block without factors, moments not yet set, or factors whose basis the
        refresh would create (eigh: a first use on the host)."""
        return super().needs_first_use(unit, folding) or (
            unit.state.A is not None and self._without_basis(unit))

    def refresh_synchronizes(self) -> bool:
        return self.basis == "eigh"

    @staticmethod
    def _sides(layer: KroneckerLayer) -> tuple[tuple[str, FactorStructure], ...]:
        return (("G", layer.g_factor), ("A", layer.a_factor))

    def _without_basis(self, unit: Unit) -> bool:
        return any(not s.diagonal and getattr(unit.state, "Q" + side) is None
                   for side, s in self._sides(unit.layer))

    def _pieces(self, layer: KroneckerLayer) -> list[tuple[str, Piece]]:
        """The bases of the dense sides and how each travels (comm-opt broadcast)."""
        return [("Q" + side, Piece("full", (s.dim, s.dim)))
                for side, s in self._sides(layer) if not s.diagonal]

    def _storage(self, unit: Unit) -> torch.dtype:
        return self.config.inverse_dtype or compute_dtype(unit.like)

    # ---------------------------------------------------------------------- refresh
    def refresh(self, units, comm, due, dampings) -> None:
        todo = {u.index: u for u, now in zip(units, due)
                if u.state.A is not None and u.state.G is not None
                and (now or self._without_basis(u))}
        old = {i: (u.state.QG, u.state.QA) for i, u in todo.items()}

        def refresh_owned(indices: list[int]) -> None:
            self._refresh_bases([todo[i] for i in indices])

        def exchange(i: int) -> list[tuple[str, Piece, Tensor | None, torch.dtype, torch.device]]:
            unit = todo[i]
            return [(name, piece, getattr(unit.state, name), self._storage(unit), unit.like.device)
                    for name, piece in self._pieces(unit.layer)]

        def receive(i: int, fields: dict[str, Tensor]) -> None:
            names = [n for n, _ in self._pieces(todo[i].layer)]
            if all(n in fields for n in names):
                for n in names:
                    setattr(todo[i].state, n, fields[n])

        comm.refresh(list(todo), refresh_owned, exchange, receive)
        if self.carry == "reproject":
            for i, unit in todo.items():
                self._reproject(unit, *old[i])

    def _refresh_bases(self, units: list[Unit]) -> None:
        """New bases of the dense sides: eigh for a side without one (or every time with
        ``basis="eigh"``), else one subspace step, batched over sides of one size."""
        batches: dict[tuple, list[tuple[Unit, str, FactorStructure, Tensor, Tensor]]] = {}
        for unit in units:
            compute = compute_dtype(unit.like)
            for side, structure in self._sides(unit.layer):
                if structure.diagonal:
                    continue
                M = getattr(unit.state, side).to(compute)
                Q = getattr(unit.state, "Q" + side)
                if Q is None or self.basis == "eigh":
                    self._set(unit, side, first_basis(structure, M, Q, self.config.backend))
                else:
                    batches.setdefault((M.shape[0], compute, M.device), []).append(
                        (unit, side, structure, M, Q.to(compute)))
        for entries in batches.values():
            prev = torch.stack([e[4] for e in entries])
            new = subspace_step(torch.stack([e[3] for e in entries]), prev)
            ok = torch.isfinite(new).flatten(1).all(1)
            if self.config.sync_free:  # no host read: a failed basis keeps the previous one
                new = torch.where(ok[:, None, None], new, prev)
            good = [True] * len(entries) if self.config.sync_free else ok.tolist()
            for k, (unit, side, structure, M, Q) in enumerate(entries):
                if good[k]:
                    self._set(unit, side, new[k].clone())
                else:  # the fallback: eigh
                    self._set(unit, side, first_basis(structure, M, Q, self.config.backend))

    def _set(self, unit: Unit, side: str, Q: Tensor | None) -> None:
        setattr(unit.state, "Q" + side, None if Q is None else Q.to(self._storage(unit)))

    def _reproject(self, unit: Unit, QG_old: Tensor | None, QA_old: Tensor | None) -> None:
        """v <- W_G v W_A^T, W = (Q_new^T Q_old)^2: the EMA of the squared projections as it
        would read in the new basis if the old coordinates were uncorrelated."""
        st = unit.state
        if st.exp_avg_sq is None:
            return
        v = st.exp_avg_sq
        WG = carry_weights(st.QG, QG_old)
        WA = carry_weights(st.QA, QA_old)
        if WG is not None:
            v = WG.to(v.dtype) @ v
        if WA is not None:
            v = v @ WA.to(v.dtype).transpose(-2, -1)
        st.exp_avg_sq = v

    # ------------------------------------------------------------------------ update
    def _bases(self, unit: Unit) -> tuple[Tensor | None, Tensor | None]:
        compute = compute_dtype(unit.like)
        return tuple(None if Q is None else Q.to(compute)  # type: ignore[return-value]
                     for Q in (unit.state.QG, unit.state.QA))

    def update(self, units) -> None:
        for unit in units:
            V = unit.grad_matrix().to(compute_dtype(unit.like))
            P = to_basis(V, *self._bases(unit))
            self.adam.update(unit.state, V, P * P)

    def apply(self, unit, V, group) -> Tensor:
        st = unit.state
        QG, QA = self._bases(unit)
        return from_basis(self.adam.ratio(to_basis(st.exp_avg, QG, QA), st.exp_avg_sq, st.step),
                          QG, QA)

    # ------------------------------------------------------------------- checkpoints
    def expected_shapes(self, unit) -> dict[str, tuple[int, ...]]:
        dims = tuple(unit.layer.dims())
        shapes = {"A": unit.layer.a_factor.shape, "G": unit.layer.g_factor.shape}
        shapes.update({name: piece.shape for name, piece in self._pieces(unit.layer)})
        shapes.update({"exp_avg": dims, "exp_avg_sq": dims, "step": ()})
        return shapes

    def storage_dtype(self, unit, name) -> torch.dtype:
        if name in ("A", "G") and self.config.factor_dtype is not None:
            return self.config.factor_dtype
        if name in ("QG", "QA"):
            return self._storage(unit)
        return compute_dtype(unit.like)

    def load(self, unit, tensors) -> None:
        st = unit.state
        for name in ("A", "G", "QG", "QA", *st.PER_STEP):
            setattr(st, name, tensors.get(name))
