"""A batch of huge but finite inputs (x * 1e19 in float32) would overflow X^T X in the factor
fold and leave K-FAC's running A inf/NaN for good; the step's check (grng.finite.finite_flag's
``foldable`` bound, max|x|^2 numel <= the dtype's largest value) skips such a step like a
non-finite one, on the host and the sync-free path, and training goes on finite."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grng.finite import finite_flag
from grng.optim.cases import make_optimizer

CASES = ["kfac-eigen", "ring", "reng-forward", "rkalman", "ekfac"]


def _train(case: str, sync_free: bool, huge_at: int | None) -> tuple[nn.Module, object, list[str]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    extra = {} if case == "rkalman" else {"inverse_every": 2}
    opt = make_optimizer(case, model, factor_every=1, sync_free=sync_free, **extra)
    gen = torch.Generator().manual_seed(1)
    said: list[str] = []
    for i in range(6):
        x, y = torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        if i == huge_at:
            x = x * 1e19

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step(closure)
        said += [str(w.message) for w in caught]
    return model, opt, said


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_a_fold_that_would_overflow_is_a_skipped_step(case: str, sync_free: bool) -> None:
    model, opt, said = _train(case, sync_free, huge_at=2)
    assert opt.skipped_steps == 1
    assert any("skipped" in s for s in said)
    if not sync_free:
        assert any("would overflow a factor" in s for s in said)
    for unit in opt._blocks:
        assert all(bool(torch.isfinite(t).all()) for t in unit.state.values())
    assert all(bool(p.isfinite().all()) for p in model.parameters())


def test_the_bound_is_what_x_transpose_x_needs() -> None:
    big = torch.full((4, 3), 1e18)  # max^2 numel = 1.2e37 < 3.4e38: folds without overflow
    assert bool(finite_flag([], foldable=[big]))
    assert torch.isfinite(big.T @ big).all()
    huge = torch.full((4, 3), 1e19)  # 1.2e39: X^T X overflows float32
    assert not bool(finite_flag([], foldable=[huge]))
    assert not torch.isfinite(huge.T @ huge).all()
    assert bool(finite_flag([], foldable=[huge.double()]))  # float64 has room
    assert finite_flag([torch.ones(2)], foldable=[]) is not None
