"""The one table of optimizer cases shared by the tests, the benchmarks and the demo.

A case names an optimizer configuration and says how to build it: ``make_optimizer("ring",
model, lr=0.1)`` builds grng.RING with the case's hyperparameters, overridden by the keywords.
Torch's SGD and AdamW are here too (the usual baselines), and the gradient-regularization
wrappers (F-GR / B-GR / DB / SAM around SGD, SAM around AdamW, F-GR around K-FAC).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from grng.optim.ekfac import EKFAC
from grng.optim.gradreg import GradReg
from grng.optim.kfac import KFAC
from grng.optim.reng import RENG
from grng.optim.ring import RING
from grng.optim.rkalman import RKalman

__all__ = ["CASES", "OptimizerCase", "make_optimizer", "optimizer_factory"]

# GradReg's own keywords (GradReg clips the gradient it hands its base optimizer)
GR_KEYS = ("gamma", "epsilon", "mode", "grad_scaler", "process_group", "max_grad_norm")
# keywords that both GradReg and the curvature optimizer it wraps take
SHARED_KEYS = ("process_group",)


def _split_gr(hp: dict[str, Any], shared: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """(base optimizer's keywords, GradReg's keywords); the ``shared`` keys go to both."""
    return ({k: v for k, v in hp.items() if k not in GR_KEYS or k in shared},
            {k: v for k, v in hp.items() if k in GR_KEYS})


def _gradreg_sgd(model: nn.Module, **hp: Any) -> GradReg:
    base, gr = _split_gr(hp)
    return GradReg(torch.optim.SGD(model.parameters(), **base), model=model, **gr)


def _gradreg_adamw(model: nn.Module, **hp: Any) -> GradReg:
    base, gr = _split_gr(hp)
    return GradReg(torch.optim.AdamW(model.parameters(), **base), model=model, **gr)


def _gradreg_kfac(model: nn.Module, **hp: Any) -> GradReg:
    """GradReg around K-FAC; an explicit ``process_group`` is the group of both."""
    base, gr = _split_gr(hp, SHARED_KEYS)
    return GradReg(KFAC(model, **base), model=model, **gr)


@dataclass(frozen=True)
class OptimizerCase:
    """A named optimizer configuration: ``build(model, **hyperparameters)`` with ``defaults``.

    ``curvature``: a grng curvature optimizer (or a wrapper of one); ``two_pass``: evaluates
    the loss twice per step (needs a closure).
    """

    name: str
    label: str
    build: Callable[..., torch.optim.Optimizer]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    curvature: bool = False
    two_pass: bool = False

    def make(self, model: nn.Module, **overrides: Any) -> torch.optim.Optimizer:
        """The optimizer for ``model`` with the case's hyperparameters, updated by ``overrides``."""
        return self.build(model, **{**self.defaults, **overrides})


def _case(name: str, label: str, build: Callable[..., torch.optim.Optimizer], *,
          curvature: bool = False, two_pass: bool = False, **defaults: Any) -> OptimizerCase:
    return OptimizerCase(name, label, build, MappingProxyType(defaults), curvature, two_pass)


CASES: Mapping[str, OptimizerCase] = MappingProxyType({c.name: c for c in (
    _case("sgd", "SGD", lambda m, **hp: torch.optim.SGD(m.parameters(), **hp), lr=0.1, momentum=0.9),
    _case("adamw", "AdamW", lambda m, **hp: torch.optim.AdamW(m.parameters(), **hp), lr=1e-3),
    _case("kfac-eigen", "K-FAC (eigen)", KFAC, curvature=True),
    _case("kfac-newton", "K-FAC (newton)", KFAC, curvature=True, inverse="newton"),
    _case("kfac-cholesky", "K-FAC (cholesky)", KFAC, curvature=True, inverse="cholesky"),
    _case("ring", "RING", RING, curvature=True),
    _case("reng-forward", "RENG (F-GR)", RENG, curvature=True, two_pass=True, gr="forward",
          epsilon=0.01),
    _case("reng-exact", "RENG (DB)", RENG, curvature=True, two_pass=True, gr="exact"),
    _case("rkalman", "R-Kalman", RKalman, curvature=True),
    _case("ekfac", "EKFAC", EKFAC, curvature=True),
    _case("gradreg-kfac", "F-GR (K-FAC)", _gradreg_kfac, curvature=True, two_pass=True,
          gamma=0.05, epsilon=0.01, mode="forward"),
    _case("fgr-sgd", "F-GR (SGD)", _gradreg_sgd, two_pass=True, lr=0.1, momentum=0.9,
          gamma=0.05, epsilon=0.01, mode="forward"),
    _case("bgr-sgd", "B-GR (SGD)", _gradreg_sgd, two_pass=True, lr=0.1, momentum=0.9,
          gamma=0.05, epsilon=0.01, mode="backward"),
    _case("db-sgd", "DB (SGD)", _gradreg_sgd, two_pass=True, lr=0.1, momentum=0.9,
          gamma=0.05, epsilon=0.01, mode="exact"),
    _case("sam-sgd", "SAM (SGD)", _gradreg_sgd, two_pass=True, lr=0.1, momentum=0.9,
          gamma=0.0, epsilon=0.05, mode="sam"),
    _case("sam-adamw", "SAM (AdamW)", _gradreg_adamw, two_pass=True, lr=1e-3,
          gamma=0.0, epsilon=0.05, mode="sam"),
    _case("fgr-adamw", "F-GR (AdamW)", _gradreg_adamw, two_pass=True, lr=1e-3, mode="forward"),
)})
"""Each case's ``defaults`` say what makes it that case (the inverse, the GR mode); the
library's own defaults fill in the rest, and every consumer passes its hyperparameters."""


def make_optimizer(name: str, model: nn.Module, **overrides: Any) -> torch.optim.Optimizer:
    """``CASES[name].make(model, **overrides)``; a ValueError names the unknown case."""
    if name not in CASES:
        raise ValueError(f"name must be one of {tuple(CASES)}, got {name!r}")
    return CASES[name].make(model, **overrides)


def optimizer_factory(name: str, **hyperparameters: Any) -> Callable[..., torch.optim.Optimizer]:
    """``factory(model, **more)`` = ``make_optimizer(name, model, **hyperparameters, **more)``
    (``more`` wins): a consumer's configuration of a case, built later for each model."""
    if name not in CASES:
        raise ValueError(f"name must be one of {tuple(CASES)}, got {name!r}")
    case = CASES[name]

    def factory(model: nn.Module, **more: Any) -> torch.optim.Optimizer:
        return case.make(model, **{**hyperparameters, **more})
    return factory
