"""The one non-finite check every step uses."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """True when no tensor holds a NaN or Inf; one host synchronization for all of them."""
    flags = [torch.isfinite(t).all() for t in tensors]
    if not flags:
        return True
    device = flags[0].device
    return bool(torch.stack([f.to(device) for f in flags]).all())
