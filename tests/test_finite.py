"""grng.finite.finite_flag: the vectorized check equals the per-tensor definition (min and max
of each floating tensor finite in float32; a foldable tensor's max|x|^2 numel within its
arithmetic's largest value) on mixed dtypes, NaN, +-Inf, overflowing rows and empty tensors."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

from grng.finite import finite_flag


def _definition(tensors: list[Tensor], foldable: list[Tensor]) -> bool | None:
    """One tensor at a time, in plain torch."""
    seen, ok = False, True
    for t in [*tensors, *foldable]:
        if t.is_floating_point() and t.numel() > 0:
            seen = True
            lo, hi = torch.aminmax(t)
            ok &= bool(lo.float().isfinite()) and bool(hi.float().isfinite())
    for t in foldable:
        if t.is_floating_point() and t.numel() > 0:
            largest = torch.finfo(torch.float64 if t.dtype == torch.float64 else torch.float32).max
            lo, hi = torch.aminmax(t)
            peak = max(abs(float(lo)), abs(float(hi)))
            ok &= peak * peak * t.numel() <= largest
    return ok if seen else None


DTYPES = (torch.float32, torch.float64, torch.bfloat16)
POISON = (None, float("nan"), float("inf"), -float("inf"), 1e19, 1e39, 1e160)


@pytest.mark.parametrize("seed", range(40))
def test_vectorized_flag_equals_the_per_tensor_definition(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    shapes = [(), (1,), (17,), (5, 123), (0, 3)]

    def one() -> Tensor:
        dtype = DTYPES[int(torch.randint(0, 3, (1,), generator=g))]
        shape = shapes[int(torch.randint(0, len(shapes), (1,), generator=g))]
        t = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        poison = POISON[int(torch.randint(0, len(POISON), (1,), generator=g))]
        if poison is not None and t.numel() > 0 and float(torch.rand((), generator=g)) < 0.3:
            at = int(torch.randint(0, t.numel(), (1,), generator=g))
            t.view(-1)[at] = torch.tensor(poison, dtype=torch.float64).to(dtype)
        if float(torch.rand((), generator=g)) < 0.2:  # non-contiguous
            t = t.t() if t.dim() == 2 else t
        return t

    tensors = [one() for _ in range(int(torch.randint(0, 6, (1,), generator=g)))]
    foldable = [one() for _ in range(int(torch.randint(0, 4, (1,), generator=g)))]
    if seed % 7 == 0:
        tensors.append(torch.arange(3))  # not floating: ignored
    got = finite_flag(tensors, foldable=foldable)
    want = _definition(tensors, foldable)
    assert (got is None) == (want is None)
    if want is not None:
        assert got.dtype == torch.bool and got.dim() == 0 and bool(got) == want


def test_each_poison_is_caught() -> None:
    """Every poison value in a plain tensor, and the overflow bound in a foldable one."""
    for dtype, poison in itertools.product(DTYPES, (float("nan"), float("inf"), -float("inf"))):
        t = torch.ones(4, dtype=dtype)
        t[2] = poison
        assert not bool(finite_flag([torch.ones(3), t]))
    rows = torch.ones(4, 8)
    assert bool(finite_flag([], foldable=[rows]))
    rows[1, 1] = 1e19  # finite, but (1e19)^2 * 32 overflows float32
    assert bool(finite_flag([rows]))
    assert not bool(finite_flag([], foldable=[rows]))
    assert finite_flag([torch.arange(3)]) is None
