"""Settings that must reduce to another optimizer, checked step by step with
``grng.testing.compare_optimizers`` (parameters and losses after every step)."""
from __future__ import annotations

import pytest
import torch

import grng
from grng.testing import classification_batches, compare_optimizers, small_mlp

KFAC_HP = dict(lr=0.1, damping=0.05, momentum=0.9, inverse_every=2)

PAIRS = {
    # RING's direction P(g) + rho g is K-FAC's at rho = 0
    "ring(rho=0) = kfac": (lambda m: grng.RING(m, rho=0.0, **KFAC_HP),
                           lambda m: grng.KFAC(m, **KFAC_HP)),
    # RENG's regularized gradient g + rho H g is g at rho = 0 (one pass, no probe)
    "reng(rho=0) = kfac": (lambda m: grng.RENG(m, rho=0.0, gr="forward", **KFAC_HP),
                           lambda m: grng.KFAC(m, **KFAC_HP)),
    # GradReg with gamma = 0 is its base optimizer
    "gradreg(gamma=0, sgd) = sgd": (
        lambda m: grng.GradReg(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), 0.0, 0.01,
                               model=m),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)),
    "gradreg(gamma=0, kfac) = kfac": (
        lambda m: grng.GradReg(grng.KFAC(m, **KFAC_HP), 0.0, 0.01, model=m),
        lambda m: grng.KFAC(m, **KFAC_HP)),
    # RENG = GradReg around K-FAC with the same gamma (rho) and finite difference
    "reng = gradreg(kfac)": (
        lambda m: grng.RENG(m, rho=0.1, gr="forward", epsilon=0.01, **KFAC_HP),
        lambda m: grng.GradReg(grng.KFAC(m, **KFAC_HP), 0.1, 0.01, mode="forward", model=m)),
}


@pytest.mark.parametrize("name", list(PAIRS))
def test_setting_reduces_to_the_other_optimizer(name: str) -> None:
    torch.manual_seed(0)
    make_a, make_b = PAIRS[name]
    cmp = compare_optimizers(make_a, make_b, small_mlp(), classification_batches(6))
    assert cmp.max_param_diff == 0.0, cmp.param_diff
    assert cmp.loss_a == cmp.loss_b


def test_compare_optimizers_sees_a_difference() -> None:
    """The helper is not blind: K-FAC and RING with rho > 0 differ from the first step on."""
    torch.manual_seed(0)
    cmp = compare_optimizers(lambda m: grng.RING(m, rho=0.5, **KFAC_HP),
                             lambda m: grng.KFAC(m, **KFAC_HP), small_mlp(),
                             classification_batches(3))
    assert cmp.param_diff[0] > 0 and cmp.loss_a[0] == cmp.loss_b[0]
