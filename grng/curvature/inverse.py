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


class EigenInverse:
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


class _TikhonovInverse:
    """Factored Tikhonov damping, X ~ (M + damping_part I)^-1 per factor; P(V) = X_G V X_A."""

    name = ""
    keys: tuple[str, ...] = ("XG", "XA")

    def refresh(self, st: dict, damping: float, backend: str) -> None:
        da, dg = tikhonov_split(st["A"], st["G"], damping)
        for key, extra in (("A", da), ("G", dg)):
            M = st[key]
            if M.dim() == 1:
                st["X" + key] = 1.0 / (M.clamp(min=0) + extra)
                continue
            Md = M.clone()
            Md.diagonal().add_(extra)
            try:
                st["X" + key] = self._invert(Md, st.get("X" + key), backend)
            except ops.FactorizationError as err:
                _keep_previous(st, "X" + key, err)
                if "X" + key not in st:
                    st["X" + key] = torch.eye(M.shape[0], dtype=M.dtype, device=M.device) / extra

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


def make_inverse(name: str) -> EigenInverse | NewtonInverse | CholeskyInverse:
    """The strategy called ``name`` (one of :data:`INVERSES`)."""
    return {"eigen": EigenInverse, "newton": NewtonInverse, "cholesky": CholeskyInverse}[name]()


def _keep_previous(st: dict, key: str, err: Exception) -> None:
    kept = "keeping the previous inverse" if key in st else "no previous inverse: using damping only"
    warnings.warn(f"factorization failed ({err}); {kept}", RuntimeWarning, stacklevel=4)
