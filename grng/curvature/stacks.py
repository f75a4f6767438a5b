"""Persistent stacks of equal-shape per-block tensors, so that one batched call can read and
write the tensors of several Kronecker blocks without copying them every step
(docs/performance.md "Batched blocks").

The first :meth:`Stacks.stack` of a list copies the tensors into one (L, ...) tensor and returns
its slices; the caller stores those slices as the blocks' state, so the next call finds them
and returns the same stack with no copy. A block whose tensor was replaced (a refresh, a
checkpoint load) has just that tensor copied into its slice.
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
        """(S, views) with S[j] the j-th tensor's values and views = S.unbind(0): this slot's
        stack when it has the same shape and dtype, with only the tensors that are not already
        its views copied in (one block refreshed: one copy), else a fresh stack."""
        cached = self._slots.get(slot)
        if cached is not None:
            views, S = cached
            if len(views) == len(tensors) and all(
                    t.shape == S.shape[1:] and t.dtype == S.dtype and t.device == S.device
                    for t in tensors):
                for view, t in zip(views, tensors):
                    if view is not t:
                        view.copy_(t)
                return S, views
        S = torch.stack(tensors)
        views = list(S.unbind(0))
        self._slots[slot] = (views, S)
        return S, views
