"""RING, the implicit GRNG: d = P(g) + rho g, one backward pass (docs/algorithms.md section 4).

With the Gauss-Newton/Fisher approximation H ~ F of the gradient-norm penalty
L + (rho/2)||g||^2, whose gradient is g + rho H g: F^-1 (g + rho F g) = F^-1 g + rho g.
The regularization is folded into the direction at the cost of one AXPY.
"""
from __future__ import annotations

from torch import nn

from grng.optim import validation as check
from grng.optim.kfac import KFAC


class RING(KFAC):
    """K-FAC's keywords plus ``rho`` (>= 0): direction P(g) + rho g; rho = 0 is K-FAC."""

    def __init__(self, model: nn.Module, lr: float = 0.01, damping: float = 1e-3,
                 rho: float = 0.1, **kwargs) -> None:
        super().__init__(model, lr, damping,
                         _group_defaults={"rho": check.non_negative("rho", rho)}, **kwargs)
        for group in self.param_groups:
            check.non_negative("rho", group["rho"])
