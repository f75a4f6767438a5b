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
    over rows drawn from them (issue: a finite batch of x * 1e19 overflowed a factor for good).

    The per-tensor minima and maxima are stacked per (dtype, device) and checked in a few
    vectorized ops (the same float32 finiteness test and float64 bound as one tensor at a time)."""
    # (dtype, device) -> [minima and maxima], and for foldable tensors also their sizes
    extremes: dict[tuple, list[Tensor]] = {}
    folds: dict[tuple, tuple[list[Tensor], list[int]]] = {}
    for t in tensors:
        if t.is_floating_point() and t.numel() > 0:
            extremes.setdefault((t.dtype, t.device), []).extend(torch.aminmax(t))
    for t in foldable:
        if t.is_floating_point() and t.numel() > 0:
            pair = torch.aminmax(t)
            extremes.setdefault((t.dtype, t.device), []).extend(pair)
            parts, sizes = folds.setdefault((t.dtype, t.device), ([], []))
            parts.extend(pair)
            sizes.append(t.numel())
    if not extremes:
        return None
    device = next(iter(extremes))[1]
    flags = [torch.stack(v).float().isfinite().all().to(device, non_blocking=True)
             for v in extremes.values()]
    for (dtype, dev), (parts, sizes) in folds.items():
        largest = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).max
        lo, hi = torch.stack(parts).view(-1, 2).unbind(1)
        peak = torch.maximum(lo.abs(), hi.abs()).double()
        numel = torch.tensor(sizes, dtype=torch.float64, device=dev)
        flags.append((peak * peak * numel <= largest).all().to(device, non_blocking=True))
    return flags[0] if len(flags) == 1 else torch.stack(flags).all()


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """True when no tensor holds a NaN or Inf (:func:`finite_flag`, read: one host sync)."""
    flag = finite_flag(tensors)
    return True if flag is None else bool(flag)
