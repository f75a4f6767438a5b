"""How a Kronecker block's damped inverse is kept and applied (docs/algorithms.md section 2).

- ``eigen``:    P(V) = Q_G [(Q_G^T V Q_A) / (l_G l_A^T + damping)] Q_A^T = (A (x) G + damping I)^-1 V.
- ``newton``:   P(V) = X_G V X_A, X ~ (factor + pi-split Tikhonov damping)^-1 by Newton-Schulz;
                an unconverged iteration falls back to Cholesky.
- ``cholesky``: the same factored-Tikhonov inverses by Cholesky (the reference for ``newton``).

A strategy turns the running factors (A, G) into a typed inverse representation
(:class:`EigenBasis` or :class:`TikhonovInverses`) and applies it. A failed factorization keeps
the previous inverse (with a warning); with no previous one, the factor is treated as 0. The
strategies receive each factor with its structure (:mod:`grng.curvature.factors`), which does the
per-side algebra: a diagonal factor (a vector: an embedding's A, or a side above
``max_factor_dim``) is its own eigenbasis and is inverted elementwise, and X_G V X_A is
:func:`~grng.curvature.factors.sandwich`.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from grng import ops
from grng.curvature.factors import DenseFactor, FactorStructure, sandwich

INVERSES: tuple[str, ...] = ("eigen", "newton", "cholesky")


def _per_group(a_factor: FactorStructure, g_factor: FactorStructure) -> bool:
    """Whether both sides are block-diagonal over the same groups (a grouped convolution): the
    block is then g independent Kronecker blocks A_j (x) G_j, each split with its own pi_j."""
    return a_factor.batched and g_factor.batched and a_factor.shape[0] == g_factor.shape[0]


def tikhonov_split(A: Tensor, G: Tensor, damping: float, a_factor: FactorStructure,
                   g_factor: FactorStructure) -> tuple[float | Tensor, float | Tensor]:
    """(pi sqrt(damping), sqrt(damping) / pi) with pi = sqrt((tr A / dim A) / (tr G / dim G));
    for a block-diagonal block (both sides over the same groups) one pi_j per group from A_j and
    G_j, as (groups,) float64 tensors on A's device (:func:`tikhonov_split_on_device`)."""
    if _per_group(a_factor, g_factor):
        return tikhonov_split_on_device(A, G, damping, a_factor, g_factor)
    tr_a = a_factor.trace_mean(A)
    tr_g = g_factor.trace_mean(G)
    pi = math.sqrt(tr_a / tr_g) if tr_a > 0.0 and tr_g > 0.0 else 1.0
    root = math.sqrt(damping)
    return pi * root, root / pi


def tikhonov_split_on_device(A: Tensor, G: Tensor, damping: float, a_factor: FactorStructure,
                             g_factor: FactorStructure) -> tuple[Tensor, Tensor]:
    """:func:`tikhonov_split` as float64 device tensors (no host read): 0-dim, or (groups,) with
    pi_j^2 = (tr A_j / b_A) / (tr G_j / b_G) for a block-diagonal block."""
    if _per_group(a_factor, g_factor):
        tr_a, tr_g = a_factor.block_trace_means(A), g_factor.block_trace_means(G)
    else:
        tr_a = a_factor.trace_mean_on_device(A)
        tr_g = g_factor.trace_mean_on_device(G)
    pi = torch.where((tr_a > 0.0) & (tr_g > 0.0), (tr_a / tr_g.clamp(min=1e-300)).sqrt(), 1.0)
    root = math.sqrt(damping)
    return pi * root, root / pi


class InverseState:
    """Base of the typed inverse representations; each field belongs to the A or G side
    (its name ends with the side, as in docs/algorithms.md: Q_G, l_A, X_G, ...)."""

    def tensors(self) -> dict[str, Tensor]:
        """Field name -> tensor (fields that are None omitted)."""
        return {f.name: getattr(self, f.name) for f in fields(self)  # type: ignore[arg-type]
                if getattr(self, f.name) is not None}

    def cast(self, dtype: torch.dtype) -> InverseState:
        """A copy with every tensor in ``dtype``."""
        return type(self)(**{f.name: None if getattr(self, f.name) is None
                             else getattr(self, f.name).to(dtype)
                             for f in fields(self)})  # type: ignore[arg-type]


@dataclass
class EigenBasis(InverseState):
    """Eigenpairs of G and A (Q is None for a diagonal factor, whose eigenvalues are itself)."""

    QG: Tensor | None
    lG: Tensor
    QA: Tensor | None
    lA: Tensor


@dataclass
class TikhonovInverses(InverseState):
    """X_G ~ (G + damping_G I)^-1 and X_A ~ (A + damping_A I)^-1 (vectors for diagonal factors)."""

    XG: Tensor
    XA: Tensor


@dataclass
class RefreshItem:
    """One block to refresh: the running factors A and G (in the compute dtype) with their
    structures, the damping and the previous inverse (None: none yet)."""

    A: Tensor
    G: Tensor
    a_factor: FactorStructure
    g_factor: FactorStructure
    damping: float
    previous: InverseState | None

    def structure(self, side: str) -> FactorStructure:
        """The structure of side "A" or "G"."""
        return self.a_factor if side == "A" else self.g_factor

    def split(self) -> tuple[float | Tensor, float | Tensor]:
        """:func:`tikhonov_split` of this block."""
        return tikhonov_split(self.A, self.G, self.damping, self.a_factor, self.g_factor)

    def split_on_device(self) -> tuple[Tensor, Tensor]:
        """:func:`tikhonov_split_on_device` of this block."""
        return tikhonov_split_on_device(self.A, self.G, self.damping, self.a_factor,
                                        self.g_factor)


class _Blocked:
    """Splits a batched (block-diagonal) factor into its blocks, so that they are factorized
    alongside other blocks' dense factors of their size, and stacks the results back."""

    @staticmethod
    def parts(structure: FactorStructure, M: Tensor) -> list[tuple[int | None, Tensor]]:
        """[(None, M)], or [(j, M_j)] over the blocks of a batched structure."""
        if not structure.batched:
            return [(None, M)]
        return list(enumerate(structure.blocks(M)))

    @staticmethod
    def put(out: dict, j: int | None, *fields: tuple[str, Tensor | None]) -> None:
        """out[name] = value (j None), or value as block j of out[name]."""
        for name, value in fields:
            if j is None:
                out[name] = value
            else:
                out.setdefault(name, {})[j] = value

    @staticmethod
    def previous(state: InverseState | None, j: int | None, side: str) -> InverseState | None:
        """Block j of side ``side`` of a previous inverse (the other side's fields None; the
        state itself when j is None)."""
        if state is None or j is None:
            return state
        return type(state)(**{f.name: None if getattr(state, f.name) is None
                              or not f.name.endswith(side) else getattr(state, f.name)[j]
                              for f in fields(state)})

    @staticmethod
    def stacked(out: dict) -> dict:
        """Each blockwise field stacked in block order."""
        return {name: torch.stack([v[j] for j in sorted(v)]) if isinstance(v, dict) else v
                for name, v in out.items()}


class InverseStrategy:
    """How one inverse mode refreshes (from the factors) and applies a block's inverse."""

    name = ""
    state_type: type[InverseState] = InverseState
    #: whether a refresh must read a result on the host (eigh reports its errors there)
    refresh_synchronizes = False

    def __init__(self) -> None:
        self._kept_on_device: Tensor | None = None

    def refresh(self, item: RefreshItem, backend: str) -> InverseState:
        """The block's inverse representation from its factors."""
        raise NotImplementedError

    def refresh_many(self, items: list[RefreshItem], backend: str, on_device: bool = False
                     ) -> list[InverseState]:
        """:meth:`refresh` for several blocks at once. ``on_device`` asks for no host read
        where a strategy can (newton, cholesky: a failed factor keeps its previous inverse,
        counted in :attr:`kept_previous`); eigen cannot and ignores it."""
        return [self.refresh(item, backend) for item in items]

    @property
    def kept_previous(self) -> int:
        """Factors whose sync-free refresh failed and kept the previous inverse (read lazily:
        one host sync)."""
        return 0 if self._kept_on_device is None else int(self._kept_on_device)

    def _count_kept(self, ok: Tensor) -> None:
        kept = (~ok).sum()
        self._kept_on_device = kept if self._kept_on_device is None else self._kept_on_device + kept

    def apply(self, inv: InverseState, V: Tensor, damping: float, backend: str,
              g: FactorStructure, a: FactorStructure) -> Tensor:
        """P(V) for a block whose factors have structures ``g`` and ``a``; batched over a
        leading dimension when every field of ``inv`` is stacked."""
        raise NotImplementedError

    def accepts(self, inv: InverseState, V: Tensor, damping: float, backend: str,
                g: FactorStructure, a: FactorStructure) -> bool:
        """Whether :meth:`apply` runs on these (e.g. stacked) inputs with ``backend``."""
        return True


class EigenInverse(InverseStrategy):
    """Damped eigen-inverse application; the damping is applied at apply time."""

    name = "eigen"
    state_type = EigenBasis
    refresh_synchronizes = True

    def refresh(self, item, backend) -> EigenBasis:
        """Q, l of each factor (a diagonal factor is its own eigenvalues)."""
        lG, QG = self._eig(item.g_factor, item.G, item.previous, "G", backend)
        lA, QA = self._eig(item.a_factor, item.A, item.previous, "A", backend)
        return EigenBasis(QG=QG, lG=lG, QA=QA, lA=lA)

    def refresh_many(self, items: list[RefreshItem], backend: str, on_device: bool = False
                     ) -> list[InverseState]:
        """Dense factors of equal size (over blocks and sides) in one batched eigh; when it
        fails, each factor alone (float64 retry, keep previous)."""
        out: list[dict[str, Tensor | None]] = [{} for _ in items]
        batches: dict[tuple, list[tuple[int, str, int | None, Tensor]]] = {}
        blocked = _Blocked()
        for i, item in enumerate(items):
            for side, structure, M in (("G", item.g_factor, item.G), ("A", item.a_factor, item.A)):
                if structure.diagonal:  # its own eigenbasis: nothing to batch
                    out[i]["l" + side], out[i]["Q" + side] = structure.eig(M, backend)
                    continue
                for j, Mj in blocked.parts(structure, M):
                    batches.setdefault((Mj.shape[0], Mj.dtype, Mj.device), []).append(
                        (i, side, j, Mj))
        for entries in batches.values():
            if len(entries) > 1:
                try:
                    ls, Qs = ops.eigh(torch.stack([M for *_, M in entries]), backend=backend)
                except ops.FactorizationError:
                    pass
                else:
                    for (i, side, j, _), l, Q in zip(entries, ls.unbind(0), Qs.unbind(0)):
                        blocked.put(out[i], j, ("l" + side, l), ("Q" + side, Q))
                    continue
            for i, side, j, M in entries:
                previous = blocked.previous(items[i].previous, j, side)
                l, Q = self._eig(DenseFactor(M.shape[0]), M, previous, side, backend)
                blocked.put(out[i], j, ("l" + side, l), ("Q" + side, Q))
        return [EigenBasis(**blocked.stacked(o)) for o in out]  # type: ignore[arg-type]

    @staticmethod
    def _eig(structure: FactorStructure, M: Tensor, previous: EigenBasis | None, side: str,
             backend: str) -> tuple[Tensor, Tensor | None]:
        """The structure's (l, Q); where the eigensolver fails, the previous pair (warned),
        else l = 0, Q = I."""
        try:
            return structure.eig(M, backend)
        except ops.FactorizationError as err:
            _warn_kept(err, previous is not None)
            if previous is not None:
                return getattr(previous, "l" + side), getattr(previous, "Q" + side)
            return (torch.zeros_like(M.diagonal(dim1=-2, dim2=-1)),
                    structure.identity(1.0, M.dtype, M.device))

    def apply(self, inv, V, damping, backend, g, a) -> Tensor:
        """Q_G [(Q_G^T V Q_A) / (l_G l_A^T + damping)] Q_A^T (the op takes Q_A = None for a
        diagonal A); a diagonal G (Q_G = I) is the transposed problem with a diagonal A; both
        diagonal, V / (l_G l_A^T + damping) elementwise."""
        if not g.diagonal:
            return ops.eigen_apply(V, inv.QG, inv.lG, inv.QA, inv.lA, damping, backend=backend)
        if not a.diagonal:
            return ops.eigen_apply(V.transpose(0, 1), inv.QA, inv.lA, None, inv.lG, damping,
                                   backend=backend).transpose(0, 1)
        denom = torch.outer(inv.lG.clamp(min=0), inv.lA.clamp(min=0)) + damping
        return V.to(inv.lG.dtype) / denom

    def accepts(self, inv, V, damping, backend, g, a) -> bool:
        if g.diagonal or a.diagonal:  # the transposed and elementwise forms take one block's V
            return tuple(V.shape) == (g.dim, a.dim)
        return ops.accepts("eigen_apply", backend, V, inv.QG, inv.lG, inv.QA, inv.lA,
                           float(damping))


class _TikhonovInverse(InverseStrategy):
    """Factored Tikhonov damping, X ~ (M + damping_part I)^-1 per factor; P(V) = X_G V X_A."""

    state_type = TikhonovInverses

    def refresh(self, item, backend) -> TikhonovInverses:
        out: dict[str, Tensor] = {}
        blocked = _Blocked()
        for side, Md, extra in self._damped(item, out):
            for j, Mj in blocked.parts(item.structure(side), Md):
                previous = blocked.previous(item.previous, j, side)
                blocked.put(out, j, ("X" + side, self._invert_or_keep(
                    Mj, item.structure(side).block_extra(extra, j), previous, side, backend)))
        return TikhonovInverses(**blocked.stacked(out))

    @staticmethod
    def _damped(item: RefreshItem, out: dict[str, Tensor]
                ) -> list[tuple[str, Tensor, float | Tensor]]:
        """(side, M + damping_part I, damping_part) for each factor to factorize (dense); a
        factor whose structure inverts it elementwise (diagonal) goes into ``out`` on the spot."""
        da, dg = item.split()
        todo = []
        for side, structure, M, extra in (("A", item.a_factor, item.A, da),
                                          ("G", item.g_factor, item.G, dg)):
            X = structure.damped_inverse(M, extra)
            if X is not None:
                out["X" + side] = X
            else:
                todo.append((side, structure.damped(M, extra), extra))
        return todo

    def _invert_or_keep(self, Md: Tensor, extra: float | Tensor, previous: TikhonovInverses | None,
                        side: str, backend: str) -> Tensor:
        """Md^-1; on failure the previous inverse, else I / damping_part."""
        prev = None if previous is None else getattr(previous, "X" + side)
        try:
            return self._invert(Md, prev, backend)
        except ops.FactorizationError as err:
            _warn_kept(err, prev is not None)
            if prev is not None:
                return prev
            return torch.eye(Md.shape[0], dtype=Md.dtype, device=Md.device) / extra

    def _invert(self, M: Tensor, previous: Tensor | None, backend: str) -> Tensor:
        raise NotImplementedError

    def refresh_many(self, items: list[RefreshItem], backend: str, on_device: bool = False
                     ) -> list[InverseState]:
        """As the base class; with ``on_device`` the blocks that have a previous inverse are
        refreshed together: dense factors of one size in one batched inversion."""
        if not on_device:
            return super().refresh_many(items, backend)
        warm = [i for i, item in enumerate(items) if item.previous is not None]
        out: list[InverseState | None] = [None] * len(items)
        for i, inv in zip(warm, self._refresh_all_on_device([items[i] for i in warm], backend)):
            out[i] = inv
        for i, item in enumerate(items):
            if out[i] is None:
                out[i] = self.refresh(item, backend)
        return out  # type: ignore[return-value]

    def _refresh_all_on_device(self, items: list[RefreshItem], backend: str
                               ) -> list[TikhonovInverses]:
        """Per block, X ~ (M + damping_part I)^-1 of each dense factor by
        :meth:`_invert_on_device` (the previous X where it fails), the damping split without a
        host read; dense factors of one size (over blocks and sides) stacked in one call."""
        outs: list[dict[str, Tensor]] = [{} for _ in items]
        batches: dict[tuple, list[tuple[int, str, int | None, Tensor, Tensor]]] = {}
        blocked = _Blocked()
        for i, item in enumerate(items):
            da, dg = item.split_on_device()
            for side, structure, M, extra in (("A", item.a_factor, item.A, da),
                                              ("G", item.g_factor, item.G, dg)):
                extra = extra.to(M.dtype)
                X = structure.damped_inverse(M, extra)
                if X is not None:
                    outs[i]["X" + side] = X
                    continue
                Md = structure.damped(M, extra)
                prev = getattr(item.previous, "X" + side).to(M.dtype)
                for (j, Mj), (_, pj) in zip(blocked.parts(structure, Md),
                                            blocked.parts(structure, prev)):
                    batches.setdefault((Mj.shape[0], M.dtype, M.device), []).append(
                        (i, side, j, Mj, pj))
        for entries in batches.values():
            Ms = torch.stack([e[3] for e in entries])
            prevs = torch.stack([e[4] for e in entries])
            X, ok = self._invert_on_device(Ms, prevs, backend)
            self._count_kept(ok)
            X = torch.where(ok[:, None, None], X, prevs)
            for (i, side, j, _, _), x in zip(entries, X.unbind(0)):
                blocked.put(outs[i], j, ("X" + side, x))
        return [TikhonovInverses(**blocked.stacked(o)) for o in outs]

    def _invert_on_device(self, M: Tensor, previous: Tensor, backend: str
                          ) -> tuple[Tensor, Tensor]:
        """(X ~ M^-1, ok) of stacked SPD M without a host read (X unusable where not ok)."""
        raise NotImplementedError

    def apply(self, inv, V, damping, backend, g, a) -> Tensor:
        """X_G V X_A."""
        return sandwich(g, inv.XG, V, inv.XA, a)


class CholeskyInverse(_TikhonovInverse):
    name = "cholesky"

    #: factors up to this size are inverted together, one batched call per (size, dtype, device)
    BATCH_MAX_DIM = 128

    def refresh_many(self, items: list[RefreshItem], backend: str, on_device: bool = False
                     ) -> list[InverseState]:
        """Small factors of all blocks in batched Cholesky calls; a failure, and every large
        factor, goes through the one-at-a-time path (float64 retry, keep previous). With
        ``on_device``, blocks with a previous inverse refresh without a host read."""
        if on_device:
            return super().refresh_many(items, backend, on_device=True)
        outs: list[dict[str, Tensor]] = [{} for _ in items]
        batches: dict[tuple, list[tuple[int, str, int | None, Tensor, float | Tensor]]] = {}
        blocked = _Blocked()
        for i, item in enumerate(items):
            for side, Md, extra in self._damped(item, outs[i]):
                structure = item.structure(side)
                for j, Mj in blocked.parts(structure, Md):
                    if Mj.shape[0] <= self.BATCH_MAX_DIM:
                        batches.setdefault((Mj.shape[0], Mj.dtype, Mj.device), []).append(
                            (i, side, j, Mj, structure.block_extra(extra, j)))
                    else:
                        blocked.put(outs[i], j, ("X" + side, self._invert_or_keep(
                            Mj, structure.block_extra(extra, j),
                            blocked.previous(item.previous, j, side), side, backend)))
        for entries in batches.values():
            inverses, ok = ops.batched_spd_inverse(torch.stack([e[3] for e in entries]),
                                                   "cholesky", backend=backend)
            for (i, side, j, Md, extra), X, good in zip(entries, inverses, ok.tolist()):
                blocked.put(outs[i], j, ("X" + side, X if good else self._invert_or_keep(
                    Md, extra, blocked.previous(items[i].previous, j, side), side, backend)))
        return [TikhonovInverses(**blocked.stacked(o)) for o in outs]

    def _invert(self, M: Tensor, previous: Tensor | None, backend: str) -> Tensor:
        return ops.cholesky_inverse(M, backend=backend)

    def _invert_on_device(self, M: Tensor, previous: Tensor, backend: str) -> tuple[Tensor, Tensor]:
        return ops.cholesky_inverse_masked(M, backend=backend)


class NewtonInverse(_TikhonovInverse):
    name = "newton"

    def _invert(self, M: Tensor, previous: Tensor | None, backend: str) -> Tensor:
        result = ops.newton_schulz_inverse(M, previous, backend=backend)
        if result.converged:
            return result.inverse
        warnings.warn(f"Newton-Schulz did not converge (RMS residual {result.residual:.3g} after "
                      f"{result.iterations} iterations); using Cholesky for this factor",
                      RuntimeWarning, stacklevel=4)
        return ops.cholesky_inverse(M, backend=backend)

    #: Newton-Schulz steps of a sync-free refresh: a warm start (residual r < 1) needs ~5, the
    #: scaled start X0 / ||M X0||_F about log2(sqrt(d) kappa(M X0)) + 4, so 20 covers
    #: kappa(M X0) sqrt(d) up to ~2^16; an unconverged factor keeps its previous inverse
    #: (counted in kept_previous) and starts from it again at the next refresh
    ITERATIONS_ON_DEVICE = 20

    def _invert_on_device(self, M: Tensor, previous: Tensor, backend: str) -> tuple[Tensor, Tensor]:
        return ops.newton_schulz_masked(M, previous.to(M.dtype), self.ITERATIONS_ON_DEVICE,
                                        ops.default_newton_tol(M.dtype), backend=backend)


def make_inverse(name: str) -> InverseStrategy:
    """The strategy called ``name`` (one of :data:`INVERSES`)."""
    return {"eigen": EigenInverse, "newton": NewtonInverse, "cholesky": CholeskyInverse}[name]()


def _warn_kept(err: Exception, had_previous: bool) -> None:
    kept = "keeping the previous inverse" if had_previous else "no previous inverse: using damping only"
    warnings.warn(f"factorization failed ({err}); {kept}", RuntimeWarning, stacklevel=4)
