"""Staggered inverse refresh: every block still refreshes every inverse_every steps, at
different phases, so a step refreshes about L / T blocks; off by default (unchanged steps)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import grng
from grng import make_closure
from grng.testing import classification_batches, compare_optimizers, small_mlp


def _deep() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(4, 6)]
    for _ in range(5):
        layers += [nn.Tanh(), nn.Linear(6, 6)]
    layers += [nn.Tanh(), nn.Linear(6, 3)]
    return nn.Sequential(*layers).double()


def _refresh_log(opt: grng.KFAC, steps: int) -> list[list[int]]:
    """Per step, the indices of the blocks whose inverse was refreshed."""
    model = opt.model
    log: list[list[int]] = []
    seen = {u.index: None for u in opt._blocks}
    for x, y in classification_batches(steps, n=8, features=4, classes=3):
        opt.step(make_closure(opt, lambda: nn.functional.cross_entropy(model(x), y)))
        now = []
        for u in opt._blocks:
            inv = u.state.inverse
            if inv is not None and inv is not seen[u.index]:
                now.append(u.index)
                seen[u.index] = inv
        log.append(now)
    return log


def test_every_block_refreshes_every_T_steps_at_its_own_phase() -> None:
    T = 3
    opt = grng.KFAC(_deep(), lr=0.05, damping=0.1, inverse_every=T, stagger_refresh=True)
    n = len(opt.layers)
    log = _refresh_log(opt, 13)
    assert sorted(log[0]) == list(range(n))          # step 0: every block gets its first inverse
    for i in range(n):
        later = [s for s, now in enumerate(log) if i in now and s > 0]
        assert all(b - a == T for a, b in zip(later, later[1:])), (i, later)
        assert later and later[0] <= T
    assert max(len(now) for now in log[1:]) <= -(-n // T)   # at most ceil(L / T) per step
    assert len({tuple(now) for now in log[1:] if now}) > 1  # the blocks take turns


def test_without_stagger_all_blocks_refresh_in_the_same_step() -> None:
    T = 3
    opt = grng.KFAC(_deep(), lr=0.05, damping=0.1, inverse_every=T)
    n = len(opt.layers)
    log = _refresh_log(opt, 7)
    assert [len(now) for now in log] == [n, 0, 0, n, 0, 0, n]


def test_stagger_with_one_block_per_phase_zero_equals_the_default() -> None:
    """Block 0 has phase 0: with a single block the staggered run is the default run."""
    model = nn.Sequential(nn.Linear(4, 3)).double()
    cmp = compare_optimizers(
        lambda m: grng.KFAC(m, lr=0.1, damping=0.05, inverse_every=2, stagger_refresh=True),
        lambda m: grng.KFAC(m, lr=0.1, damping=0.05, inverse_every=2),
        model, classification_batches(5))
    assert cmp.max_param_diff == 0.0


def test_stagger_refresh_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="stagger_refresh"):
        grng.KFAC(small_mlp(), stagger_refresh=1)
