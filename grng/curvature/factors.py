"""The structure of one Kronecker factor: dense (d x d) or diagonal (a length-d vector).

A layer helper (:mod:`grng.curvature.layers`) owns one structure per side (A and G); the
preconditioners and the communicator ask the structure, never the layer type, how to build,
blend, reduce and invert a factor (docs/algorithms.md section 1):

- dense:    M = (s^2 / n) X^T X, folded as M <- beta M + (1 - beta) M_batch (first update sets);
- diagonal: the rows are category indices (one-hot inputs), M = diag(counts / n), kept as a
  vector.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from grng import ops
from grng.distributed.comm import Piece


@dataclass
class Rows:
    """Observation rows of one factor: factor = (scale^2 / n) X^T X."""

    X: Tensor
    n: int
    scale: float = 1.0


class FactorStructure:
    """How one factor of size ``dim`` is stored, accumulated, communicated and costed."""

    diagonal = False

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def fold(self, current: Tensor | None, rows: Rows, beta: float, like: Tensor,
             compute: torch.dtype, storage: torch.dtype | None, backend: str) -> Tensor:
        """beta current + (1 - beta) M_batch (M_batch when ``current`` is None), stored in
        ``storage`` (default: the accumulation dtype)."""
        raise NotImplementedError

    def batch_sum(self, rows: Rows | None, compute: torch.dtype, device: torch.device,
                  backend: str) -> Tensor | None:
        """n M_batch (the unnormalized batch factor a rank contributes), None without rows."""
        raise NotImplementedError

    def piece(self) -> Piece:
        """How the factor travels in a packed collective (counted: a row count leads)."""
        raise NotImplementedError

    def identity(self, value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
        """value * I in this structure."""
        raise NotImplementedError

    def cost(self) -> float:
        """Factorization cost estimate (d^3 dense, d diagonal)."""
        raise NotImplementedError

    @staticmethod
    def blend(current: Tensor | None, M: Tensor, beta: float, storage: torch.dtype | None) -> Tensor:
        """beta current + (1 - beta) M (M when ``current`` is None), in M's dtype, stored in
        ``storage``."""
        if current is None:
            out = M
        elif current.dtype == M.dtype:
            out = current.mul_(beta).add_(M, alpha=1.0 - beta)
        else:
            out = current.to(M.dtype).mul_(beta).add_(M, alpha=1.0 - beta)
        return out if storage is None or out.dtype == storage else out.to(storage)


class DenseFactor(FactorStructure):
    """A symmetric d x d factor (s^2 / n) X^T X."""

    def fold(self, current, rows, beta, like, compute, storage, backend):
        first = current is None
        if first:
            work = torch.empty(self.dim, self.dim, dtype=compute, device=like.device)
        else:
            work = current if current.dtype == compute else current.to(compute)
        b = 0.0 if first else beta
        ops.factor_update(work, rows.X, (1.0 - b) * rows.scale ** 2 / rows.n, b, backend=backend)
        storage = storage or compute
        return work if work.dtype == storage else work.to(storage)

    def batch_sum(self, rows, compute, device, backend):
        if rows is None:
            return None
        M = torch.empty(self.dim, self.dim, dtype=compute, device=device)
        ops.factor_update(M, rows.X, rows.scale ** 2, 0.0, backend=backend)
        return M

    def piece(self) -> Piece:
        return Piece("sym", (self.dim, self.dim), True)

    def identity(self, value, dtype, device):
        return torch.eye(self.dim, dtype=dtype, device=device) * value

    def cost(self) -> float:
        return float(self.dim) ** 3


class DiagonalFactor(FactorStructure):
    """A diagonal factor of one-hot inputs: the rows are indices, diag(M) = counts / n."""

    diagonal = True

    def counts(self, rows: Rows, dtype: torch.dtype) -> Tensor:
        """How often each index occurs in the rows, as ``dtype``."""
        return torch.bincount(rows.X, minlength=self.dim).to(dtype)

    def mean(self, rows: Rows, dtype: torch.dtype) -> Tensor:
        """diag(M_batch) = counts / n."""
        return self.counts(rows, dtype) / rows.n

    def fold(self, current, rows, beta, like, compute, storage, backend):
        value = self.mean(rows, like.dtype)
        storage = storage or value.dtype
        if current is None:
            return value.clone() if value.dtype == storage else value.to(storage)
        if current.dtype == value.dtype:
            return current.mul_(beta).add_(value, alpha=1.0 - beta)
        return current.to(value.dtype).mul_(beta).add_(value, alpha=1.0 - beta).to(storage)

    def batch_sum(self, rows, compute, device, backend):
        return None if rows is None else self.counts(rows, compute)

    def piece(self) -> Piece:
        return Piece("vec", (self.dim,), True)

    def identity(self, value, dtype, device):
        return torch.full((self.dim,), value, dtype=dtype, device=device)

    def cost(self) -> float:
        return float(self.dim)
