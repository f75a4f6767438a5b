"""How a tensor is laid out in a packed collective buffer (:mod:`grng.distributed.comm`).

A factor structure (:mod:`grng.curvature.factors`) says how its factor travels and the
Kronecker preconditioner how its inverse's fields travel; the collectives pack and unpack by
this description. It sits below both so that curvature never imports the distributed layer.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Piece:
    """One item of a packed buffer: ``kind`` is "sym" (d x d, upper triangle travels),
    "full" (any shape, all entries) or "vec"; ``counted`` adds one leading count entry."""

    kind: str
    shape: tuple[int, ...]
    counted: bool = False

    @property
    def numel(self) -> int:
        """Entries in the buffer: d (d + 1) / 2 for "sym", else the product of the shape
        (plus one for the count)."""
        if self.kind == "sym":
            d = self.shape[0]
            n = d * (d + 1) // 2
        else:
            n = 1
            for s in self.shape:
                n *= s
        return n + int(self.counted)
