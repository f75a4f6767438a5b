"""Checkpoints written by grng 0.1.0 (before the communicator/preconditioner pipeline) still
load, and the resumed run continues as the 0.1.0 run did.

``tests/data/checkpoint_v0_1.pt`` was written by grng 0.1.0 (commit f7ed533) on an AMD EPYC:
per optimizer, the model and optimizer state after 3 steps and the parameters after 2 more
steps. The loaded state is compared bit for bit; the resumed steps to 1e-12 relative, since
float64 BLAS kernels round differently on another CPU (on an Intel Xeon the resumed
parameters differ from the EPYC's in the last bits, at most 1.2e-14 absolute, while a wrongly
restored tensor moves them by orders of magnitude more).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grng

DATA = Path(__file__).parent / "data" / "checkpoint_v0_1.pt"
# written by grng 0.1.0, whose defaults were factor_every=1 and R-Kalman prior_precision=1.0
FACTORIES = {
    "kfac": lambda m: grng.KFAC(m, lr=0.1, damping=1e-2, momentum=0.5, inverse_every=2,
                                factor_every=1),
    "kfac_newton": lambda m: grng.KFAC(m, lr=0.1, damping=1e-2, inverse="newton", inverse_every=2,
                                       factor_every=1),
    "rkalman": lambda m: grng.RKalman(m, lr=0.1, rho=0.1, kalman_rank=4, prior_precision=1.0,
                                      factor_every=1),
}


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3)).double()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(10, 6, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (10,), generator=g)) for _ in range(5)]


@pytest.mark.parametrize("name", list(FACTORIES))
def test_v0_1_checkpoint_resumes(name: str) -> None:
    saved = torch.load(DATA, weights_only=False)[name]
    model = _model()
    model.load_state_dict(saved["model"])
    opt = FACTORIES[name](model)
    opt.load_state_dict(saved["optimizer"])
    assert opt.steps == 3
    for p, entry in saved["optimizer"]["state"].items():  # every saved tensor restored exactly
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                assert torch.equal(opt.state_dict()["state"][p][key], value), (p, key)
    for x, y in _batches()[3:]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for p, expected in zip(model.parameters(), saved["final"]):
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-12)


def test_a_checkpoint_of_another_optimizer_is_refused_naming_the_state() -> None:
    saved = torch.load(DATA, weights_only=False)["kfac"]
    model = _model()
    opt = FACTORIES["rkalman"](model)
    with pytest.raises(ValueError, match="does not match the model"):
        opt.load_state_dict(saved["optimizer"])
