"""Settings that must reduce to another optimizer, checked step by step with
``grng.testing.compare_optimizers`` (parameters and losses after every step)."""
from __future__ import annotations

import pytest
import torch

from grng.optim.cases import optimizer_factory
from grng.testing import classification_batches, compare_optimizers, small_mlp

KFAC_HP = dict(lr=0.1, damping=0.05, momentum=0.9, inverse_every=2)

PAIRS = {  # cases of grng.optim.cases
    # RING's direction P(g) + rho g is K-FAC's at rho = 0
    "ring(rho=0) = kfac": (optimizer_factory("ring", rho=0.0, **KFAC_HP),
                           optimizer_factory("kfac-eigen", **KFAC_HP)),
    # RENG's regularized gradient g + rho H g is g at rho = 0 (one pass, no probe)
    "reng(rho=0) = kfac": (optimizer_factory("reng-forward", rho=0.0, **KFAC_HP),
                           optimizer_factory("kfac-eigen", **KFAC_HP)),
    # GradReg with gamma = 0 is its base optimizer
    "gradreg(gamma=0, sgd) = sgd": (
        optimizer_factory("fgr-sgd", lr=0.1, momentum=0.9, gamma=0.0, epsilon=0.01),
        optimizer_factory("sgd", lr=0.1, momentum=0.9)),
    "gradreg(gamma=0, kfac) = kfac": (
        optimizer_factory("gradreg-kfac", gamma=0.0, epsilon=0.01, **KFAC_HP),
        optimizer_factory("kfac-eigen", **KFAC_HP)),
    # RENG = GradReg around K-FAC with the same gamma (rho) and finite difference
    "reng = gradreg(kfac)": (
        optimizer_factory("reng-forward", rho=0.1, epsilon=0.01, **KFAC_HP),
        optimizer_factory("gradreg-kfac", gamma=0.1, epsilon=0.01, mode="forward", **KFAC_HP)),
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
    cmp = compare_optimizers(optimizer_factory("ring", rho=0.5, **KFAC_HP),
                             optimizer_factory("kfac-eigen", **KFAC_HP), small_mlp(),
                             classification_batches(3))
    assert cmp.param_diff[0] > 0 and cmp.loss_a[0] == cmp.loss_b[0]
