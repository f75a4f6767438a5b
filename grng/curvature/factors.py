"""The structure of one Kronecker factor: dense (d x d), diagonal (a length-d vector) or
block-diagonal (groups equal dense blocks, kept as a (groups, b, b) stack).

A layer helper (:mod:`grng.curvature.layers`) owns one structure per side (A and G); the
preconditioners, the inverse strategies and the communicator ask the structure, never the layer
type or the tensor's rank, how to build, blend, reduce and invert a factor and how to multiply
by it (docs/algorithms.md sections 1 and 2):

- dense:    M = (s^2 / n) X^T X, folded as M <- beta M + (1 - beta) M_batch (first update sets);
- diagonal: diag(M) = (s^2 / n) sum_rows x * x, kept as a vector. The rows are dense (a factor
  side above ``max_factor_dim``, docs/algorithms.md "Factor size limit") or the category indices
  of one-hot rows (an embedding's A: x * x is the one-hot itself, so diag(M) = counts / n);
- block-diagonal: M_j = (s^2 / n) X_j^T X_j per group j (a grouped convolution: the rows are
  (groups, rows, b), the gradient matrix (groups, d_G / groups, d_A / groups)), every op batched
  over the group dimension.

Per-side algebra: eigendecomposition (a diagonal factor is its own eigenvalues, no Q), the
damped matrix M + extra I and its inverse (elementwise for a diagonal), tr(M) / dim (the
Tikhonov pi-split; tr(M_j) / b per group of a block-diagonal factor), X V and V X (row / column
scaling by a diagonal X); :func:`sandwich` is the
Kronecker application X_G V X_A of both sides.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from grng import ops
from grng.curvature.pieces import Piece
from grng.ops import masked


def compute_dtype(p: Tensor) -> torch.dtype:
    """Curvature arithmetic runs in the tensor's dtype, but at least float32."""
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


@dataclass
class Rows:
    """Observation rows of one factor: factor = (scale^2 / n) X^T X."""

    X: Tensor
    n: int
    scale: float = 1.0


class FactorStructure:
    """How one factor of size ``dim`` is stored, accumulated, communicated and costed."""

    diagonal = False
    #: the factor is itself a stack of blocks (eigendecomposed and inverted in its own batched
    #: call, never stacked with other blocks' factors)
    batched = False

    def __init__(self, dim: int) -> None:
        self.dim = dim

    @property
    def shape(self) -> tuple[int, ...]:
        """The stored factor's shape: (d, d) dense, (d,) diagonal."""
        return (self.dim,) if self.diagonal else (self.dim, self.dim)

    def fold(self, current: Tensor | None, rows: Rows, beta: float, like: Tensor,
             compute: torch.dtype, storage: torch.dtype | None, backend: str) -> Tensor:
        """beta current + (1 - beta) M_batch (M_batch when ``current`` is None), stored in
        ``storage`` (default: the accumulation dtype)."""
        raise NotImplementedError

    def fold_masked(self, current: Tensor, rows: Rows, beta: float, like: Tensor,
                    compute: torch.dtype, storage: torch.dtype | None, backend: str,
                    ok: Tensor) -> Tensor:
        """:meth:`fold` where the device flag ``ok``, ``current`` as it was where not (the device
        gate's fold, no host read): here a fold of a copy and a select; a structure that can
        write only where ``ok`` (a dense factor) updates ``current`` in place instead."""
        return masked.select(ok, self.fold(current.clone(), rows, beta, like, compute, storage,
                                           backend), current)

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

    def blocks(self, M: Tensor) -> list[Tensor]:
        """The independent blocks of M (or of a tensor laid out per block, such as its rows):
        [M], or the group slices (views) of a batched structure."""
        return [M]

    def block_structure(self) -> FactorStructure:
        """The structure of each of :meth:`blocks` (itself, or one group's dense block)."""
        return self

    def eigenvalues_piece(self) -> Piece:
        """How the eigenvalues l travel (comm-opt broadcast of an eigen inverse)."""
        return Piece("vec", (self.dim,))

    def eigenvectors_piece(self) -> Piece | None:
        """How the eigenvectors Q travel; None for a diagonal factor (Q = I is not kept)."""
        return None if self.diagonal else Piece("full", (self.dim, self.dim))

    def inverse_piece(self) -> Piece:
        """How a Tikhonov inverse X ~ (M + extra I)^-1 travels."""
        return Piece("vec", (self.dim,)) if self.diagonal else Piece("sym", (self.dim, self.dim))

    def cost(self) -> float:
        """Factorization cost estimate (d^3 dense, d diagonal)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- algebra
    def eig(self, M: Tensor, backend: str) -> tuple[Tensor, Tensor | None]:
        """(l, Q) with M = Q diag(l) Q^T; Q is None for a diagonal factor (l = M). A dense
        factor's eigensolver raises :class:`grng.ops.FactorizationError`."""
        raise NotImplementedError

    def damped(self, M: Tensor, extra: float | Tensor) -> Tensor:
        """M + extra I as a new tensor (``extra`` a float or a 0-dim device tensor)."""
        raise NotImplementedError

    def damped_inverse(self, M: Tensor, extra: float | Tensor) -> Tensor | None:
        """(M + extra I)^-1 where it is elementwise (a diagonal factor); None for a dense
        factor, whose :meth:`damped` matrix an inverse strategy factorizes."""
        raise NotImplementedError

    def trace(self, M: Tensor) -> Tensor:
        """tr(M) as a 0-dim tensor in M's dtype."""
        raise NotImplementedError

    def trace_mean(self, M: Tensor) -> float:
        """tr(M) / dim on the host (one read)."""
        return float(self.trace(M)) / self.dim

    def trace_mean_on_device(self, M: Tensor) -> Tensor:
        """tr(M) / dim as a float64 0-dim tensor on M's device (no host read)."""
        return self.trace(M).double() / self.dim

    def block_extra(self, extra: float | Tensor, j: int | None) -> float | Tensor:
        """The damping part of block j of :meth:`blocks` (``extra`` as the Tikhonov split gave
        it): here ``extra`` itself."""
        return extra

    def block_trace_means(self, M: Tensor) -> Tensor:
        """tr(M_j) / b of each of :meth:`blocks`, float64 on M's device (no host read): here
        the one block's tr(M) / dim, 0-dim."""
        return self.trace_mean_on_device(M)

    def left(self, X: Tensor, V: Tensor) -> Tensor:
        """X V (X on the rows of V; batched over a leading dimension of stacked X and V)."""
        raise NotImplementedError

    def right(self, V: Tensor, X: Tensor) -> Tensor:
        """V X (X on the columns of V; batched over a leading dimension of stacked X and V)."""
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
            work = torch.empty(self.shape, dtype=compute, device=like.device)
        else:
            work = current if current.dtype == compute else current.to(compute)
        b = 0.0 if first else beta
        ops.factor_update(work, rows.X, (1.0 - b) * rows.scale ** 2 / rows.n, b, backend=backend)
        storage = storage or compute
        return work if work.dtype == storage else work.to(storage)

    def fold_masked(self, current, rows, beta, like, compute, storage, backend, ok):
        """In place through ``factor_update_masked`` when ``current`` is kept in the accumulation
        dtype (no copy of the factor), else a fold of a copy and a select."""
        if current.dtype != compute or (storage or compute) != compute:
            return super().fold_masked(current, rows, beta, like, compute, storage, backend, ok)
        ops.factor_update_masked(current, rows.X, (1.0 - beta) * rows.scale ** 2 / rows.n, beta,
                                 ok, backend=backend)
        return current

    def batch_sum(self, rows, compute, device, backend):
        if rows is None:
            return None
        M = torch.empty(self.shape, dtype=compute, device=device)
        ops.factor_update(M, rows.X, rows.scale ** 2, 0.0, backend=backend)
        return M

    def piece(self) -> Piece:
        return Piece("sym", (self.dim, self.dim), True)

    def identity(self, value, dtype, device):
        return torch.eye(self.dim, dtype=dtype, device=device) * value

    def cost(self) -> float:
        return float(self.dim) ** 3

    def eig(self, M, backend):
        return ops.eigh(M, backend=backend)

    def damped(self, M, extra):
        Md = M.clone()
        Md.diagonal().add_(extra)
        return Md

    def damped_inverse(self, M, extra):
        return None

    def trace(self, M):
        return M.diagonal().sum()

    def left(self, X, V):
        return X @ V

    def right(self, V, X):
        return V @ X


class DiagonalFactor(FactorStructure):
    """A diagonal factor kept as a vector: diag(M) = (s^2 / n) sum_rows x * x.

    Floating rows are dense rows (the diagonal of a factor too large to keep dense); integer
    rows are the category indices of one-hot rows, for which x * x is the one-hot itself, so
    diag(M) = counts / n (docs/algorithms.md section 1).
    """

    diagonal = True

    def diag_sum(self, rows: Rows, dtype: torch.dtype) -> Tensor:
        """n diag(M_batch) = s^2 sum_rows x * x in ``dtype`` (index rows: s^2 times the counts)."""
        if rows.X.is_floating_point():
            X = rows.X.to(dtype)
            total = (X * X).sum(0)
        else:
            total = torch.bincount(rows.X, minlength=self.dim).to(dtype)
        return total.mul_(rows.scale ** 2)

    def mean(self, rows: Rows, dtype: torch.dtype) -> Tensor:
        """diag(M_batch) = diag_sum / n."""
        return self.diag_sum(rows, dtype) / rows.n

    def fold(self, current, rows, beta, like, compute, storage, backend):
        return self.blend(current, self.mean(rows, compute), beta, storage)

    def batch_sum(self, rows, compute, device, backend):
        return None if rows is None else self.diag_sum(rows, compute)

    def piece(self) -> Piece:
        return Piece("vec", (self.dim,), True)

    def identity(self, value, dtype, device):
        return torch.full((self.dim,), value, dtype=dtype, device=device)

    def cost(self) -> float:
        return float(self.dim)

    def eig(self, M, backend):
        return M.clone(), None

    def damped(self, M, extra):
        """max(M, 0) + extra, elementwise (a rounding-negative entry counts as 0)."""
        return M.clamp(min=0) + extra

    def damped_inverse(self, M, extra):
        """1 / (max(M, 0) + extra), elementwise."""
        return 1.0 / self.damped(M, extra)

    def trace(self, M):
        return M.sum()

    def left(self, X, V):
        return X.unsqueeze(-1) * V

    def right(self, V, X):
        return V * X.unsqueeze(-2)


class BlockDiagonalFactor(FactorStructure):
    """A block-diagonal factor of ``groups`` dense b x b blocks (dim = groups b), kept as a
    (groups, b, b) stack: M_j = (s^2 / n) X_j^T X_j from rows (groups, rows, b). Each op is the
    dense one batched over the group dimension; the gradient matrix it multiplies is
    (groups, d_G / groups, d_A / groups)."""

    batched = True

    def __init__(self, groups: int, block: int) -> None:
        super().__init__(groups * block)
        self.groups = groups
        self.block = block

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.groups, self.block, self.block)

    # the Gram fold of a dense factor, over the leading group dimension (ops.factor_update
    # takes stacked matrices)
    fold = DenseFactor.fold
    fold_masked = DenseFactor.fold_masked
    batch_sum = DenseFactor.batch_sum

    def piece(self) -> Piece:
        return Piece("full", self.shape, True)

    def identity(self, value, dtype, device):
        eye = torch.eye(self.block, dtype=dtype, device=device) * value
        return eye.expand(self.shape).clone()

    def blocks(self, M: Tensor) -> list[Tensor]:
        return list(M.unbind(0))

    def block_structure(self) -> FactorStructure:
        return DenseFactor(self.block)

    def eigenvalues_piece(self) -> Piece:
        return Piece("full", (self.groups, self.block))

    def eigenvectors_piece(self) -> Piece:
        return Piece("full", self.shape)

    def inverse_piece(self) -> Piece:
        return Piece("full", self.shape)

    def cost(self) -> float:
        return float(self.groups) * float(self.block) ** 3

    def eig(self, M, backend):
        return ops.eigh(M, backend=backend)

    def damped(self, M, extra):
        """M_j + extra_j I per group (``extra`` a float, a 0-dim tensor, or one per group: the
        per-group Tikhonov split)."""
        Md = M.clone()
        if isinstance(extra, Tensor) and extra.dim() == 1:
            extra = extra.to(M.dtype).unsqueeze(-1)
        Md.diagonal(dim1=-2, dim2=-1).add_(extra)
        return Md

    def damped_inverse(self, M, extra):
        return None

    def trace(self, M):
        return M.diagonal(dim1=-2, dim2=-1).sum()

    def block_extra(self, extra, j):
        """extra_j of a per-group split (a (groups,) tensor), else ``extra``."""
        return extra[j] if isinstance(extra, Tensor) and extra.dim() == 1 else extra

    def block_trace_means(self, M: Tensor) -> Tensor:
        """tr(M_j) / b per group, a (groups,) float64 tensor on M's device."""
        return M.diagonal(dim1=-2, dim2=-1).sum(-1).double() / self.block

    def left(self, X, V):
        return X @ V

    def right(self, V, X):
        return V @ X


def sandwich(g: FactorStructure, XG: Tensor, V: Tensor, XA: Tensor, a: FactorStructure) -> Tensor:
    """X_G V X_A in X_A's dtype: the Kronecker product (X_A (x) X_G) applied to vec(V), each
    side by its structure (a diagonal X scales rows or columns); batched over a leading
    dimension of stacked X_G, V, X_A."""
    return a.right(g.left(XG, V.to(XA.dtype)), XA)
