"""A long-run smoke test: thousands of steps of every optimizer stay finite."""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from optimizer_helpers import (FACTORIES, _all_state_finite, _closure, _curv)

def test_long_run_smoke_all_optimizers_thousands_of_steps() -> None:
    """~3,200 small float32 steps over all optimizers (noisy data, dead inputs, a LayerNorm):
    no NaN, no skipped step, no warning."""
    steps = {"kfac-eigen": 500, "kfac-newton": 400, "kfac-cholesky": 400, "ring": 400,
             "reng-forward": 250, "reng-exact": 200, "rkalman": 500, "gradreg-kfac": 250,
             "gradreg-sgd": 250}
    g = torch.Generator().manual_seed(19)
    X = torch.randn(256, 4, generator=g)
    X[:, 3] = 0.0                                      # a dead input coordinate
    Y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, k in steps.items():
            torch.manual_seed(20)
            model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 3))
            opt = FACTORIES[name](model)
            first = last = None
            for i in range(k):
                idx = torch.randint(0, 256, (16,), generator=g)
                loss = float(opt.step(_closure(model, X[idx], Y[idx])))
                first = loss if first is None else first
                last = loss
            assert math.isfinite(last), name
            assert opt.skipped_steps == 0, name
            assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), name
            assert _all_state_finite(_curv(opt)), name
