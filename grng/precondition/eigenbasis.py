"""Adam in the Kronecker eigenbasis (EKFAC with Adam's scaling; docs/algorithms.md "EKFAC").

fold:    A, G as K-FAC's (:func:`grng.precondition.kronecker.fold_factors`);
refresh: every ``inverse_every`` steps the eigenbases Q_A, Q_G (columns by decreasing
         eigenvalue): by eigh at a block's first refresh, then by one step of warm-started
         subspace iteration Q <- orth(M Q_prev) (a GEMM, then Householder QR or CholeskyQR3;
         eigh where the result is not finite, or on the device the previous basis); the first
         moment is rotated into the new basis exactly, m_b <- R_G m_b R_A^T with
         R = Q_new^T Q_old, and the second is carried (``carry``: "reproject"
         v <- W_G v W_A^T with W = R * R elementwise, or "keep" v as it is);
update:  t += 1, P = Q_G^T V Q_A, m_b <- beta1 m_b + (1 - beta1) P,
         v <- beta2 v + (1 - beta2) P^2 (both moments in the eigenbasis);
apply:   Q_G [ (m_b / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) ] Q_A^T.

m_b = Q_G^T m Q_A for m the parameter-space EMA of V (the bases are orthogonal, so the rotation
is exact): two GEMMs per block and step fewer than projecting m every step. A checkpoint of grng
0.3.0, whose ``exp_avg`` is m, is converted on load.

``scaling="fisher"`` is EKFAC's original scaling (George et al. 2018): v is the EMA of the
Fisher's eigenvalue correction, the per-row squared projections (Q_G^T g_r)^2 (Q_A^T a_r)^T^2
summed over the captured rows (one GEMM of the squared projected rows,
:func:`eigenvalue_correction`), and apply divides by (v / (1 - beta2^t) + damping). Equal-shape
blocks are updated and applied in one batched call over persistent stacks of their bases and
moments (:class:`~grng.curvature.stacks.Stacks`).

A diagonal side (an embedding's A, a side above ``max_factor_dim``) has the identity as its
basis (no Q), so a block with both sides diagonal is plain Adam, as is a block before its first
basis.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from grng import ops
from grng.curvature.factors import FactorStructure, Rows
from grng.curvature.layers import KroneckerLayer
from grng.curvature.pieces import Piece
from grng.curvature.stacks import Stacks
from grng.curvature.state import EigenbasisBlock
from grng.distributed.communicator import Communicator
from grng.distributed.plan import refresh_inverses
from grng.precondition.adam import (AdamSettings, StepRatios, batches, stack_of, stacked,
                                   with_relative_gr)
from grng.precondition.base import CurvatureConfig, Preconditioner, Unit, compute_dtype
from grng.precondition.kronecker import fold_factors

#: how a refresh computes the bases after the first (which is always eigh)
BASES: tuple[str, ...] = ("subspace", "eigh")
#: how the second moment follows a change of basis
CARRIES: tuple[str, ...] = ("reproject", "keep")
#: the per-direction scaling in the eigenbasis: Adam's, or EKFAC's original (the Fisher's)
SCALINGS: tuple[str, ...] = ("adam", "fisher")
#: how the subspace step orthonormalizes M Q: Householder QR, or shifted CholeskyQR3 (GEMMs)
QRS: tuple[str, ...] = ("householder", "cholesky")


def _mm(X: Tensor, Y: Tensor) -> Tensor:
    """X @ Y; two stacks of matrices by bmm itself (matmul would add expand and view ops)."""
    return torch.bmm(X, Y) if X.dim() == 3 and Y.dim() == 3 else X @ Y


def to_basis(V: Tensor, QG: Tensor | None, QA: Tensor | None) -> Tensor:
    """Q_G^T V Q_A (a side without Q: the identity); batched over leading dimensions."""
    if QG is not None:
        V = _mm(QG.transpose(-2, -1), V)
    if QA is not None:
        V = _mm(V, QA)
    return V


def from_basis(N: Tensor, QG: Tensor | None, QA: Tensor | None) -> Tensor:
    """Q_G N Q_A^T, the inverse of :func:`to_basis`."""
    if QG is not None:
        N = _mm(QG, N)
    if QA is not None:
        N = _mm(N, QA.transpose(-2, -1))
    return N


def subspace_step(M: Tensor, Q: Tensor, qr: str = "householder") -> Tensor:
    """One step of warm-started subspace (orthogonal) iteration: the columns of Q sorted by
    decreasing Rayleigh quotient q^T M q, then Q' R = M Q by QR (``qr``: Householder, or
    :func:`cholesky_qr3`, non-finite where a Cholesky fails); batched over a leading
    dimension. Q' spans M Q; for Q an eigenbasis of M, Q' = Q up to column signs."""
    MQ = M @ Q
    order = (Q * MQ).sum(-2).argsort(dim=-1, descending=True)
    MQ = MQ.gather(-1, order.unsqueeze(-2).expand_as(MQ))
    return cholesky_qr3(MQ) if qr == "cholesky" else householder_q(MQ)


def householder_q(Y: Tensor) -> Tensor:
    """Q of Y = Q R by Householder reflections (batched): on the CPU LAPACK's geqrf and then its
    orgqr, the two calls of ``torch.linalg.qr`` (the same Q, bit for bit) without forming R (R's
    triu of the column-major factor was 1.3 of a refresh's 20 ms on the demo transformer);
    elsewhere ``torch.linalg.qr``."""
    if not Y.is_cpu:
        return torch.linalg.qr(Y).Q
    factors, tau = torch.geqrf(Y)
    return torch.linalg.householder_product(factors, tau)


def cholesky_qr3(Y: Tensor) -> Tensor:
    """Q of Y = Q R by shifted CholeskyQR3 (three passes of R^T R = Y^T Y, Y <- Y R^-1, the
    first on Y^T Y + n eps I so that it factors even where Y is numerically rank-deficient;
    GEMMs and triangular solves, no Householder reflections), in float64 whatever Y's dtype
    (a TF32 Gram matrix would lose the orthogonality), after scaling Y's columns to unit norm
    (the same Q: Y D^-1 = Q (R D^-1)); batched; NaN where a Cholesky fails (the caller's
    non-finite fallback)."""
    X = Y.double()
    X = X / torch.linalg.vector_norm(X, dim=-2, keepdim=True).clamp_min(torch.finfo(X.dtype).tiny)
    n = X.shape[-1]
    shift = n * torch.finfo(X.dtype).eps * torch.eye(n, dtype=X.dtype, device=X.device)
    failed = torch.zeros(X.shape[:-2], dtype=torch.bool, device=X.device)
    for k in range(3):
        gram = X.transpose(-2, -1) @ X
        L, info = torch.linalg.cholesky_ex(gram + shift if k == 0 else gram)
        failed = failed | (info != 0)
        X = torch.linalg.solve_triangular(L, X.transpose(-2, -1), upper=False).transpose(-2, -1)
    return torch.where(failed[..., None, None], math.nan, X).to(Y.dtype)


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
        if previous is not None:
            return previous
        return torch.eye(M.shape[-1], dtype=M.dtype, device=M.device).expand_as(M).clone()
    return None if Q is None else Q.flip(-1)


def squared_rows(rows: Rows, Q: Tensor | None, dtype: torch.dtype) -> Tensor:
    """(X Q)^2 elementwise, the squared projections of the rows X (R x d, or a (g, R, b)
    stack) onto the basis Q (None: the identity)."""
    P = rows.X.to(dtype)
    if Q is not None:
        P = P @ Q
    return P * P


def eigenvalue_correction(rows: tuple[Rows, Rows], QG: Tensor | None, QA: Tensor | None,
                          dim_a: int, dtype: torch.dtype) -> Tensor | None:
    """s = (s_G^2 s_A^2 R / (n_G n_A)) sum_r (Q_G^T g_r)^2 [(Q_A^T a_r)^2]^T over the R paired
    rows (a_r, g_r) of one step, batched over a group dimension: the EMA target of EKFAC's
    original scaling. With one row per example (a Linear on 2-D inputs) it is the mean over
    examples of the squared per-example gradient in the eigenbasis (per-example gradient
    g_i a_i^T, projected (Q_G^T g_i)(Q_A^T a_i)^T; no per-example gradient is formed); rows per
    position (sequences, convolutions) count each position as an example, scaled so that if a
    row's a and g were independent, s would be K-FAC's l_G l_A^T. Index rows (an embedding's
    one-hot A) add their G term to their category's column. None where the A and G rows do not
    pair (different counts)."""
    a, g = rows
    count = a.X.shape[0] if a.X.dim() == 1 else a.X.shape[-2]
    if g.X.shape[-2] != count:
        return None
    PG = squared_rows(g, QG, dtype)
    if a.X.is_floating_point():
        S = PG.transpose(-2, -1) @ squared_rows(a, QA, dtype)
    else:  # one-hot rows, identity basis: (Q_A^T a_r)^2 is the one-hot itself
        S = PG.new_zeros(PG.shape[-1], dim_a).index_add_(1, a.X, PG.transpose(0, 1))
    return S.mul_((g.scale * a.scale) ** 2 * count / (g.n * a.n))


def kronecker_eigenvalues(G: Tensor, A: Tensor, QG: Tensor | None, QA: Tensor | None
                          ) -> Tensor:
    """l_G l_A^T, the factors' Rayleigh quotients diag(Q^T M Q) (a diagonal factor: itself)
    in the current bases, clamped at 0: K-FAC's eigenvalues, the original scaling's value for
    a block whose rows do not pair."""
    def rayleigh(M: Tensor, Q: Tensor | None) -> Tensor:
        return (M if Q is None else (Q * (M.to(Q.dtype) @ Q)).sum(-2)).clamp_min(0.0)

    lG, lA = rayleigh(G, QG), rayleigh(A, QA)
    return lG.unsqueeze(-1) * lA.to(lG.dtype).unsqueeze(-2)


def rotation(new: Tensor | None, old: Tensor | None) -> Tensor | None:
    """R = Q_new^T Q_old, which takes coordinates in the old basis to the new one (None when
    the side has no basis, or kept the same tensor: the identity); batched."""
    if new is None or new is old:
        return None
    return new.transpose(-2, -1) if old is None else new.transpose(-2, -1) @ old.to(new.dtype)


class EigenbasisPreconditioner(Preconditioner):
    """Adam's moments in each block's Kronecker eigenbasis (module docstring)."""

    def __init__(self, config: CurvatureConfig, adam: AdamSettings, basis: str = "subspace",
                 carry: str = "reproject", scaling: str = "adam", qr: str = "householder") -> None:
        super().__init__(config)
        self.adam = adam
        self.basis = basis
        self.qr = qr
        self.carry = carry
        self.scaling = scaling
        # Adam's scaling updates the moments by adam_moments_masked: only where the device
        # gate's flag says (no copies), its ratios kept for apply; the fisher ratio is copied
        self.masks_per_step = scaling == "adam"
        self.ratios = StepRatios()
        self.stacks = Stacks()
        # the fisher scaling's rows of this step (from fold to update) and the communicator
        self._rows: dict[int, tuple[Rows, Rows]] = {}
        self._comm: Communicator | None = None

    def new_state(self, unit_params, layer) -> EigenbasisBlock:
        return EigenbasisBlock()

    def fold(self, units, comm, decay: float | None = None) -> None:
        """K-FAC's fold of the factors, at EMA decay ``decay`` (None: the config's)."""
        fold_factors(units, comm, self.config, self.stacks, decay)
        if self.scaling == "fisher":  # kept for this step's update (then dropped)
            self._rows = {u.index: rows for u, rows in units if rows is not None}
            self._comm = comm

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
        """The bases of the dense sides (a block-diagonal side: one per group) and how each
        travels (comm-opt broadcast)."""
        return [("Q" + side, Piece("full", tuple(s.shape)))
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

        refresh_inverses(comm, list(todo), refresh_owned, exchange, receive)
        for i, unit in todo.items():
            self._carry(unit, *old[i])

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
                    batches.setdefault((tuple(M.shape), compute, M.device), []).append(
                        (unit, side, structure, M, Q.to(compute)))
        for entries in batches.values():
            prev = torch.stack([e[4] for e in entries])
            new = subspace_step(torch.stack([e[3] for e in entries]), prev, self.qr)
            # finite where every entry is: a basis's entries are at most 1 in magnitude, so
            # their sum cannot overflow (one reduction, no boolean copy of the stack)
            ok = new.flatten(1).sum(1).isfinite()
            if self.config.sync_free:  # no host read: a failed basis keeps the previous one
                new = torch.where(ok.view(-1, *[1] * (new.dim() - 1)), new, prev)
            good = [True] * len(entries) if self.config.sync_free else ok.tolist()
            for k, (unit, side, structure, M, Q) in enumerate(entries):
                if good[k]:
                    self._set(unit, side, new[k].clone())
                else:  # the fallback: eigh
                    self._set(unit, side, first_basis(structure, M, Q, self.config.backend))

    def _set(self, unit: Unit, side: str, Q: Tensor | None) -> None:
        setattr(unit.state, "Q" + side, None if Q is None else Q.to(self._storage(unit)))

    def _carry(self, unit: Unit, QG_old: Tensor | None, QA_old: Tensor | None) -> None:
        """The moments into the new bases: m_b <- R_G m_b R_A^T (exact), and with
        ``carry="reproject"`` v <- W_G v W_A^T, W = R * R: the EMA of the squared projections
        as it would read in the new basis if the old coordinates were uncorrelated."""
        st = unit.state
        if st.step is None:
            return
        RG, RA = rotation(st.QG, QG_old), rotation(st.QA, QA_old)
        m, v = st.exp_avg_basis, st.exp_avg_sq
        if RG is not None:
            m = _mm(RG.to(m.dtype), m)
        if RA is not None:
            m = _mm(m, RA.to(m.dtype).transpose(-2, -1))
        st.exp_avg_basis = m
        if self.carry != "reproject":
            return
        if RG is not None:
            v = (RG * RG).to(v.dtype) @ v
        if RA is not None:
            v = v @ (RA * RA).to(v.dtype).transpose(-2, -1)
        st.exp_avg_sq = v

    # ------------------------------------------------------------------------ update
    def _bases(self, unit: Unit) -> tuple[Tensor | None, Tensor | None]:
        compute = compute_dtype(unit.like)
        return tuple(None if Q is None else Q.to(compute)  # type: ignore[return-value]
                     for Q in (unit.state.QG, unit.state.QA))

    def _layout(self, unit: Unit) -> tuple | None:
        """What blocks must share to be updated and applied in one batch (None: alone): the
        gradient matrix's shape, dtype and device, started moments, and bases kept in that
        dtype (no cast per step) of equal shapes (None for a side without one)."""
        st, compute = unit.state, compute_dtype(unit.like)
        if st.step is None or any(Q is not None and Q.dtype != compute for Q in (st.QG, st.QA)):
            return None
        return (tuple(unit.layer.matrix_shape()), compute, unit.like.device,
                *(None if Q is None else tuple(Q.shape) for Q in (st.QG, st.QA)))

    def _stacked(self, batch: list[Unit]) -> tuple[EigenbasisBlock, Tensor | None, Tensor | None]:
        """(moments, Q_G, Q_A) of one block, or of a batch as (L, ...) stacks kept between
        steps (:func:`~grng.precondition.adam.stacked`)."""
        if len(batch) == 1:
            return batch[0].state, *self._bases(batch[0])
        out = stacked(self.stacks, batch, ("QG", "QA", *EigenbasisBlock.PER_STEP),
                      EigenbasisBlock())
        return out, out.QG, out.QA

    def _corrections(self, units: list[Unit], grads: dict[int, Tensor]) -> dict[int, Tensor]:
        """The fisher scaling's s per unit (:func:`eigenvalue_correction` from this step's
        rows, else :func:`kronecker_eigenvalues`), averaged over ranks."""
        rows, self._rows = self._rows, {}
        out = []
        for unit in units:
            V, (QG, QA) = grads[unit.index], self._bases(unit)
            r = rows.get(unit.index)
            s = None if r is None else eigenvalue_correction(r, QG, QA, unit.layer.a_factor.dim,
                                                             V.dtype)
            if s is None:
                s = kronecker_eigenvalues(unit.state.G.to(V.dtype), unit.state.A.to(V.dtype),
                                          QG, QA)
            out.append(s)
        if self._comm is not None:  # shaped as s (d_G x d_A), not as the weight
            out = self._comm.average(out, out)
        return {u.index: s for u, s in zip(units, out)}

    def update(self, units, ok: Tensor | None = None) -> None:
        """P = Q_G^T V Q_A and the moments of each block (batched by layout); with Adam's
        scaling one ``adam_moments_masked`` call per batch, written only where ``ok``, whose
        ratios :meth:`apply_many` takes."""
        grads = {u.index: u.grad_matrix().to(compute_dtype(u.like)) for u in units}
        fisher = self._corrections(units, grads) if self.scaling == "fisher" else None
        for unit in units:
            if unit.state.step is None:
                V = grads[unit.index]
                self.adam.start(unit.state, V, V, first="exp_avg_basis")
        self.ratios.clear()
        for batch in batches(units, self._layout):
            state, QG, QA = self._stacked(batch)
            V = stack_of([grads[u.index] for u in batch])
            P = to_basis(V, QG, QA)
            if fisher is not None:
                s = stack_of([fisher[u.index] for u in batch])
                self.adam.advance(state.step, state.exp_avg_basis, state.exp_avg_sq, P, s)
            else:
                self.ratios.put([u.index for u in batch], self.adam.masked_step(
                    state.step, state.exp_avg_basis, state.exp_avg_sq, P, ok,
                    self.config.backend), V)

    def gradient_matrix(self, unit: Unit) -> Tensor | None:
        """The V this step's update laid out (and its ratio was formed from; :meth:`_direction`
        reads it from there), else the layer's: no second copy of the gradient matrix."""
        kept = self.ratios.get(unit.index, 1) if self.masks_per_step else None
        return unit.grad_matrix() if kept is None else kept

    def _direction(self, batch: list[Unit], vs: list[Tensor], group: dict) -> Tensor:
        """Q_G [ratio(m_b, v)] Q_A^T + the relative GR term for a batch of one layout (``vs``:
        its gradient matrices; a stack out where several): Adam's ratio of this step's update
        with the update's own stack of V when it ran, else the fisher (or Adam's) ratio of the
        stored moments."""
        state, QG, QA = self._stacked(batch)
        kept = self.ratios.take([u.index for u in batch]) if self.masks_per_step else None
        if kept is not None:
            N, V = kept
        else:
            N, V = self._stored_ratio(state, group), stack_of(vs)
        return with_relative_gr(from_basis(N, QG, QA), V, group.get("rho_rel", 0.0),
                                dims=None if len(batch) == 1 else V.dim() - 1)

    def _stored_ratio(self, state: EigenbasisBlock, group: dict) -> Tensor:
        """Adam's or the fisher ratio of the stored moments."""
        M, v = state.exp_avg_basis, state.exp_avg_sq
        if self.scaling == "fisher":
            return self.adam.fisher_ratio(M, v, state.step, group["damping"])
        return self.adam.ratio(M, v, state.step)

    def apply(self, unit, V, group) -> Tensor:
        return self._direction([unit], [V], group)

    def apply_many(self, items) -> list[Tensor]:
        """The direction of each (unit, V, group); blocks of one layout and one group's
        damping and rho_rel in one batched call over their stacks."""
        at = {id(unit): k for k, (unit, _, _) in enumerate(items)}
        out: list[Tensor | None] = [None] * len(items)

        def hyper(unit: Unit) -> tuple:
            group = items[at[id(unit)]][2]
            return (group.get("damping"), group.get("rho_rel", 0.0))

        for batch in batches([unit for unit, _, _ in items], self._layout, hyper):
            ks = [at[id(u)] for u in batch]
            if len(batch) == 1:
                out[ks[0]] = self.apply(*items[ks[0]])
                continue
            D = self._direction(batch, [items[k][1] for k in ks], items[ks[0]][2])
            for k, d in zip(ks, D.unbind(0)):
                out[k] = d
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------- checkpoints
    def expected_shapes(self, unit) -> dict[str, tuple[int, ...]]:
        dims = tuple(unit.layer.matrix_shape())  # the moments' (grouped: per group)
        shapes = {"A": unit.layer.a_factor.shape, "G": unit.layer.g_factor.shape}
        shapes.update({name: piece.shape for name, piece in self._pieces(unit.layer)})
        shapes.update({"exp_avg_basis": dims, "exp_avg_sq": dims, "step": ()})
        shapes["exp_avg"] = dims  # grng 0.3.0's first moment (parameter space), read by load
        return shapes

    def storage_dtype(self, unit, name) -> torch.dtype:
        if name in ("A", "G") and self.config.factor_dtype is not None:
            return self.config.factor_dtype
        if name in ("QG", "QA"):
            return self._storage(unit)
        return compute_dtype(unit.like)

    def load(self, unit, tensors) -> None:
        """The saved fields; a grng 0.3.0 first moment m (``exp_avg``, parameter space) as
        m_b = Q_G^T m Q_A in the saved bases."""
        st = unit.state
        for name in ("A", "G", "QG", "QA", *st.PER_STEP):
            setattr(st, name, tensors.get(name))
        m = tensors.get("exp_avg")
        if st.exp_avg_basis is None and m is not None:
            st.exp_avg_basis = to_basis(m, *(None if Q is None else Q.to(m.dtype)
                                             for Q in (st.QG, st.QA)))
