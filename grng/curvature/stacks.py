"""Persistent stacks of equal-shape per-block tensors, so that one batched call can read and
write the tensors of several Kronecker blocks without copying them every step
(docs/performance.md "Batched blocks").

The first :meth:`Stacks.stack` of a list copies the tensors into one (L, ...) tensor and returns
its slices; the caller stores those slices as the blocks' state, so the next call finds them
and returns the same stack with no copy. Anything that replaces a block's tensor (a refresh, a
checkpoint load) makes the next call stack again, once.
"""
from __future__ import annotations

from collections.abc import Hashable

import torch
from torch import Tensor


class Stacks:
    """Stacks kept per caller-chosen slot (e.g. which blocks and which field)."""

    def __init__(self) -> None:
        self._slots: dict[Hashable, tuple[list[Tensor], Tensor]] = {}

    def stack(self, slot: Hashable, tensors: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """(S, views) with S[j] the j-th tensor's values and views = S.unbind(0): S itself when
        ``tensors`` are already the views of this slot's stack, else a fresh copy."""
        cached = self._slots.get(slot)
        if cached is not None and len(cached[0]) == len(tensors) and all(
                a is b for a, b in zip(cached[0], tensors)):
            return cached[1], cached[0]
        S = torch.stack(tensors)
        views = list(S.unbind(0))
        self._slots[slot] = (views, S)
        return S, views
