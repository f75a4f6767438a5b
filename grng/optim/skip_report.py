"""Hearing about steps the sync-free path skipped, without waiting for the device.

A skipped sync-free step is counted in a device tensor. Each step enqueues an asynchronous copy
of that count to host memory (pinned on CUDA) and records an event; a later step reads the copy
only once the event says it has landed (``Event.query`` does not block), and warns when the
count has grown. The warning so comes a step or two late, never at the price of a host sync.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor


class DeviceSkipReport:
    """The last skip count warned about and the copy of the count in flight to the host."""

    def __init__(self, reported: int = 0) -> None:
        self.reported = reported
        self._host: Tensor | None = None
        self._landed: torch.cuda.Event | None = None

    def poll(self, count: Tensor, owner: str) -> None:
        """Warn if a landed copy shows more skips than reported; then send ``count`` again."""
        if self._host is not None:
            if self._landed is not None and not self._landed.query():
                return  # the previous copy is still on its way: look again next step
            n = int(self._host.numpy())  # host memory that has landed: no device sync
            if n > self.reported:
                warnings.warn(f"{owner}: {n - self.reported} step(s) skipped on the device "
                              f"(non-finite gradient, loss, captured rows or direction; "
                              f"parameters and optimizer state unchanged; {n} so far)",
                              RuntimeWarning, stacklevel=4)
                self.reported = n
        on_cuda = count.device.type == "cuda"
        self._host = torch.empty((), dtype=count.dtype, pin_memory=on_cuda)
        self._host.copy_(count, non_blocking=on_cuda)
        self._landed = None
        if on_cuda:
            self._landed = torch.cuda.Event()
            self._landed.record()
