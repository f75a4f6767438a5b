"""Which rank does a layer's expensive curvature work (KAISA-style greedy assignment).

The cost of a Kronecker block is estimated as the cost of its factorizations, which its layer
helper reports (``KroneckerLayer.cost()``: d^3 per dense factor -- eigendecomposition,
Newton-Schulz and Cholesky are all O(d^3) -- and d per diagonal factor).
Layers are taken from the most to the least expensive (longest processing time first) and each
goes to the rank with the least assigned cost so far (the lowest rank on a tie). The result is
a pure function of the costs and the world size, so every rank computes the same assignment
without communicating; greedy LPT is within 4/3 of the optimal makespan.
"""
from __future__ import annotations

from collections.abc import Sequence

__all__ = ["assign_layers", "rank_loads"]


def assign_layers(costs: Sequence[float], world_size: int) -> list[int]:
    """owner[i] in range(world_size) for each layer i: greedy, least-loaded rank first.

    Every layer gets exactly one owner; ties are broken by layer index, then by rank, so the
    result is deterministic. Raises ValueError for world_size < 1 or a negative/NaN cost.
    """
    if int(world_size) != world_size or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    for c in costs:
        if not c >= 0.0:  # also rejects NaN
            raise ValueError(f"costs must be >= 0, got {c!r}")
    loads = [0.0] * int(world_size)
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda j: (-float(costs[j]), j)):
        r = min(range(len(loads)), key=lambda q: (loads[q], q))
        owner[i] = r
        loads[r] += float(costs[i])
    return owner


def rank_loads(costs: Sequence[float], owner: Sequence[int], world_size: int) -> list[float]:
    """Total assigned cost per rank."""
    loads = [0.0] * world_size
    for c, r in zip(costs, owner):
        loads[r] += float(c)
    return loads
