"""The one non-finite check every step uses: a device-side flag, read on the host only when the
step is not sync-free."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def finite_flag(tensors: Iterable[Tensor], foldable: Iterable[Tensor] = ()) -> Tensor | None:
    """A 0-dim bool tensor, True when no tensor holds a NaN or Inf (None when there is no floating
    tensor): min and max of every floating tensor (a NaN or an infinity shows in them; one
    vectorized pass, no boolean copy of the data), reduced on the first tensor's device.

    ``foldable`` tensors (captured rows) must also be folded without overflow: max|x|^2 numel <=
    the largest value of their (at least float32) arithmetic, which bounds every entry of X^T X
    over rows drawn from them (issue: a finite batch of x * 1e19 overflowed a factor for good)."""
    parts: list[Tensor] = []
    bounds: list[Tensor] = []
    for t in tensors:
        if t.is_floating_point() and t.numel() > 0:
            lo, hi = torch.aminmax(t)
            parts += [lo.float(), hi.float()]
    for t in foldable:
        if t.is_floating_point() and t.numel() > 0:
            lo, hi = torch.aminmax(t)
            parts += [lo.float(), hi.float()]
            largest = torch.finfo(torch.float64 if t.dtype == torch.float64 else torch.float32).max
            peak = torch.maximum(lo.abs(), hi.abs()).double()
            bounds.append(peak * peak * t.numel() <= largest)
    if not parts:
        return None
    device = parts[0].device
    flag = torch.stack([p.to(device, non_blocking=True) for p in parts]).isfinite().all()
    if bounds:
        flag = flag & torch.stack([b.to(device, non_blocking=True) for b in bounds]).all()
    return flag


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """True when no tensor holds a NaN or Inf (:func:`finite_flag`, read: one host sync)."""
    flag = finite_flag(tensors)
    return True if flag is None else bool(flag)
