"""How a model's layers become Kronecker blocks: the options the block source and every layer
helper read, one value instead of each setting threaded through their signatures.

Today the one setting is the factor size limit (docs/algorithms.md "Factor size limit"): a dense
factor side of size d holds d^2 entries, so a side above ``max_factor_dim`` is kept diagonal
(a length-d vector), and a grouped convolution whose per-group block side is above it gets the
diagonal fallback instead (the limit bounds each dense block).
"""
from __future__ import annotations

from dataclasses import dataclass

from grng.curvature.factors import DenseFactor, DiagonalFactor, FactorStructure

__all__ = ["MAX_FACTOR_DIM", "BlockOptions"]

#: the optimizers' default largest dense factor side: a d x d float32 factor of this size is
#: 256 MiB, its eigenbasis as much again
MAX_FACTOR_DIM = 8192


@dataclass(frozen=True)
class BlockOptions:
    """How blocks are built. ``max_factor_dim``: the largest dense factor side (None: no
    limit; the optimizers pass their ``max_factor_dim`` keyword, validated there, default
    :data:`MAX_FACTOR_DIM`)."""

    max_factor_dim: int | None = None

    def above_limit(self, size: int) -> bool:
        """Whether a dense factor side of ``size`` exceeds ``max_factor_dim``."""
        return self.max_factor_dim is not None and size > self.max_factor_dim

    def side(self, structure: type[FactorStructure], dim: int) -> FactorStructure:
        """The structure of a factor side of size ``dim`` whose layer asks for ``structure``:
        a dense side above the limit is kept diagonal."""
        if structure is DenseFactor and self.above_limit(dim):
            return DiagonalFactor(dim)
        return structure(dim)
