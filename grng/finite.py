"""The one non-finite check every step uses."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """True when no tensor holds a NaN or Inf: max |t| of every floating tensor, one
    multi-tensor reduction per device, one host synchronization for all of them."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        if t.is_floating_point() and t.numel() > 0:
            by_device.setdefault(t.device, []).append(t)
    if not by_device:
        return True
    flags = [torch.stack(torch._foreach_norm(ts, float("inf"))).isfinite().all()
             for ts in by_device.values()]
    first = flags[0].device
    return bool(torch.stack([f.to(first) for f in flags]).all())
