"""grng: fast second-order optimizers with gradient regularization.

K-FAC (the rho = 0 baseline), RING (d = P(g) + rho g), RENG (d = P(g + rho H g)), R-Kalman
(Kalman-filtered Kronecker covariances), EKFAC (Adam in the Kronecker eigenbasis) and GradReg (F-GR, B-GR, double backprop, SAM around
any torch optimizer). Every op has a plain PyTorch reference (:mod:`grng.ops.reference`) and
optional Triton / compiled backends chosen by one dispatch (:func:`grng.backends`).
"""
from __future__ import annotations

__version__ = "0.3.0"

from grng.curvature.layers import register_layer
from grng.ops.dispatch import backends
from grng.optim.ekfac import EKFAC
from grng.optim.gradient_source import make_closure
from grng.optim.gradreg import GradReg, flood, regularized_gradient
from grng.optim.kfac import KFAC
from grng.optim.reng import RENG
from grng.optim.ring import RING
from grng.optim.rkalman import RKalman

__all__ = ["EKFAC", "KFAC", "RENG", "RING", "GradReg", "RKalman", "__version__", "backends", "flood",
           "make_closure", "register_layer", "regularized_gradient"]
