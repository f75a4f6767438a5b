"""How a Kronecker block's damped inverse is kept and applied (ALGORITHMS.md section 2).

- ``eigen``:    P(V) = Q_G [(Q_G^T V Q_A) / (l_G l_A^T + damping)] Q_A^T = (A (x) G + damping I)^-1 V.
- ``newton``:   P(V) = X_G V X_A, X ~ (factor + pi-split Tikhonov damping)^-1 by Newton-Schulz;
                an unconverged iteration falls back to Cholesky.
- ``cholesky``: the same factored-Tikhonov inverses by Cholesky (the reference for ``newton``).

Each strategy reads the running factors ``A``/``G`` from a layer's optimizer state and writes its
inverse representation into the same dict, so ``state_dict`` carries it. A failed factorization
keeps the previous inverse (with a warning); with no previous one, the factor is treated as 0.
A diagonal A (embeddings) is a vector and is inverted elementwise.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from grng import ops

INVERSES: tuple[str, ...] = ("eigen", "newton", "cholesky")


def tikhonov_split(A: Tensor, G: Tensor, damping: float) -> tuple[float, float]:
    """(pi sqrt(damping), sqrt(damping) / pi) with pi = sqrt((tr A / dim A) / (tr G / dim G))."""
    tr_a = float(A.sum() if A.dim() == 1 else A.diagonal().sum()) / A.shape[0]
    tr_g = float(G.diagonal().sum()) / G.shape[0]
    pi = math.sqrt(tr_a / tr_g) if tr_a > 0.0 and tr_g > 0.0 else 1.0
    root = math.sqrt(damping)
    return pi * root, root / pi


class InverseStrategy:
    """How one inverse mode refreshes (from the factors) and applies a block's inverse."""

    name = ""
    keys: tuple[str, ...] = ()  # what refresh writes into a layer's state

    def refresh(self, st: dict, damping: float, backend: str) -> None:
        raise NotImplementedError

    def refresh_many(self, items: list[tuple[dict, float]], backend: str) -> None:
        """:meth:`refresh` for several layers' (state, damping) at once."""
        for st, damping in items:
            self.refresh(st, damping, backend)

    def ready(self, st: dict) -> bool:
        raise NotImplementedError

    def apply(self, st: dict, V: Tensor, damping: float, backend: str) -> Tensor:
        raise NotImplementedError


class EigenInverse(InverseStrategy):
    """Damped eigen-inverse application; the damping is applied at apply time."""

    name = "eigen"
    keys: tuple[str, ...] = ("QG", "lG", "QA", "lA")  # what refresh writes into the state

    def refresh(self, st: dict, damping: float, backend: str) -> None:
        """Q, l of each factor (a diagonal A is its own eigenvalues)."""
        for key in ("G", "A"):
            M = st[key]
            if M.dim() == 1:
                st["l" + key] = M.clone()
                continue
            try:
                st["l" + key], st["Q" + key] = ops.eigh(M, backend=backend)
            except ops.FactorizationError as err:
                _keep_previous(st, "Q" + key, err)
                if "Q" + key not in st:
                    st["l" + key] = torch.zeros_like(M[0])
                    st["Q" + key] = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)

    def ready(self, st: dict) -> bool:
        return "lG" in st and "lA" in st

    def apply(self, st: dict, V: Tensor, damping: float, backend: str) -> Tensor:
        return ops.eigen_apply(V, st["QG"], st["lG"], st.get("QA"), st["lA"], damping,
                               backend=backend)


class _TikhonovInverse(InverseStrategy):
    """Factored Tikhonov damping, X ~ (M + damping_part I)^-1 per factor; P(V) = X_G V X_A."""

    keys: tuple[str, ...] = ("XG", "XA")

    def refresh(self, st: dict, damping: float, backend: str) -> None:
        for key, Md, extra in self._damped(st, damping):
            self._invert_or_keep(st, key, Md, extra, backend)

    @staticmethod
    def _damped(st: dict, damping: float) -> list[tuple[str, Tensor, float]]:
        """(key, M + damping_part I, damping_part) for each full factor; a diagonal factor is
        inverted elementwise on the spot."""
        da, dg = tikhonov_split(st["A"], st["G"], damping)
        out = []
        for key, extra in (("A", da), ("G", dg)):
            M = st[key]
            if M.dim() == 1:
                st["X" + key] = 1.0 / (M.clamp(min=0) + extra)
                continue
            Md = M.clone()
            Md.diagonal().add_(extra)
            out.append((key, Md, extra))
        return out

    def _invert_or_keep(self, st: dict, key: str, Md: Tensor, extra: float, backend: str) -> None:
        """st["X" + key] <- Md^-1; on failure the previous inverse, else I / damping_part."""
        try:
            st["X" + key] = self._invert(Md, st.get("X" + key), backend)
        except ops.FactorizationError as err:
            _keep_previous(st, "X" + key, err)
            if "X" + key not in st:
                st["X" + key] = torch.eye(Md.shape[0], dtype=Md.dtype, device=Md.device) / extra

    def _invert(self, M: Tensor, previous: Tensor | None, backend: str) -> Tensor:
        raise NotImplementedError

    def ready(self, st: dict) -> bool:
        return "XG" in st and "XA" in st

    def apply(self, st: dict, V: Tensor, damping: float, backend: str) -> Tensor:
        XA = st["XA"]
        out = st["XG"] @ V.to(XA.dtype)
        return out * XA if XA.dim() == 1 else out @ XA


class CholeskyInverse(_TikhonovInverse):
    name = "cholesky"

    #: factors up to this size are inverted together, one batched call per (size, dtype, device)
    BATCH_MAX_DIM = 128

    def refresh_many(self, items: list[tuple[dict, float]], backend: str) -> None:
        """Small factors of all layers in batched Cholesky calls; a failure, and every large
        factor, goes through the one-at-a-time path (float64 retry, keep previous)."""
        batches: dict[tuple, list[tuple[dict, str, Tensor, float]]] = {}
        for st, damping in items:
            for key, Md, extra in self._damped(st, damping):
                if Md.shape[0] <= self.BATCH_MAX_DIM:
                    batches.setdefault((Md.shape[0], Md.dtype, Md.device), []).append(
                        (st, key, Md, extra))
                else:
                    self._invert_or_keep(st, key, Md, extra, backend)
        for entries in batches.values():
            inverses, ok = ops.batched_spd_inverse(torch.stack([e[2] for e in entries]),
                                                   "cholesky", backend=backend)
            for (st, key, Md, extra), X, good in zip(entries, inverses, ok.tolist()):
                if good:
                    st["X" + key] = X
                else:
                    self._invert_or_keep(st, key, Md, extra, backend)

    def _invert(self, M: Tensor, previous: Tensor | None, backend: str) -> Tensor:
        return ops.cholesky_inverse(M, backend=backend)


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


def make_inverse(name: str) -> InverseStrategy:
    """The strategy called ``name`` (one of :data:`INVERSES`)."""
    return {"eigen": EigenInverse, "newton": NewtonInverse, "cholesky": CholeskyInverse}[name]()


def _keep_previous(st: dict, key: str, err: Exception) -> None:
    kept = "keeping the previous inverse" if key in st else "no previous inverse: using damping only"
    warnings.warn(f"factorization failed ({err}); {kept}", RuntimeWarning, stacklevel=4)
