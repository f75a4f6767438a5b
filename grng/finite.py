"""The one non-finite check every step uses."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """True when no tensor holds a NaN or Inf: min and max of every floating tensor (a NaN or an
    infinity shows in them; one vectorized pass, no boolean copy of the data), one host
    synchronization for all of them."""
    parts: list[Tensor] = []
    for t in tensors:
        if t.is_floating_point() and t.numel() > 0:
            lo, hi = torch.aminmax(t)
            parts += [lo.float(), hi.to(lo.device).float()]
    if not parts:
        return True
    device = parts[0].device
    return bool(torch.stack([p.to(device) for p in parts]).isfinite().all())
