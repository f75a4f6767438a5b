"""The demo's optimizers: how each is built, stepped, and which hyperparameters are searched.

Every optimizer is driven through a :class:`Stepper`, which runs one training step on a
minibatch and hides the two calling conventions: ``opt.step(closure)`` with torch.optim's
closure (it zeroes, runs forward and backward and returns the loss; RENG and GradReg call it
twice), and Sophia's periodic Hessian refresh.

Search space (:data:`SPECS`): every optimizer searches 3 or 4 learning rates; the curvature
and regularized ones also search one more knob with 2 values (damping, rho, gamma or the SAM
radius), so at most 8 candidates each. RING and RENG reuse the damping chosen for K-FAC (they
are K-FAC plus a rho term). Everything else is fixed and listed in ``fixed``.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from grng import make_closure
from grng.optim.cases import CASES


@dataclass(frozen=True)
class OptimizerSpec:
    key: str
    label: str
    grid: dict[str, tuple[Any, ...]]
    fixed: dict[str, Any] = field(default_factory=dict)
    inherit: tuple[str, tuple[str, ...]] | None = None  # (spec key, hyperparameter names)
    description: str = ""

    def candidates(self, inherited: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Every point of the grid, merged with the fixed and inherited values."""
        names = list(self.grid)
        out = []
        for values in itertools.product(*(self.grid[n] for n in names)):
            hp = {**self.fixed, **(inherited or {}), **dict(zip(names, values))}
            out.append(hp)
        return out

    def defaults(self) -> dict[str, Any]:
        """The fallback when no searched value exists: the middle of each grid (inherited
        values from the parent's defaults)."""
        inherited = {}
        if self.inherit is not None:
            parent = SPECS[self.inherit[0]].defaults()
            inherited = {k: parent[k] for k in self.inherit[1]}
        return {**self.fixed, **inherited, **{n: v[len(v) // 2] for n, v in self.grid.items()}}


LRS_SGD = (0.01, 0.03, 0.1, 0.3)
LRS_KFAC = (0.003, 0.01, 0.03)

SPECS: dict[str, OptimizerSpec] = {s.key: s for s in (
    OptimizerSpec("sgd", "SGD", {"lr": LRS_SGD}, {"momentum": 0.9},
                  description="torch.optim.SGD with heavy-ball momentum"),
    OptimizerSpec("adamw", "AdamW", {"lr": (1e-3, 3e-3, 1e-2, 3e-2)}, {"weight_decay": 1e-2},
                  description="torch.optim.AdamW"),
    OptimizerSpec("kfac", "K-FAC", {"lr": LRS_KFAC, "damping": (0.1, 1.0)}, {"momentum": 0.9},
                  description="grng.KFAC (eigen inverse every 10 steps, factor decay 0.95)"),
    OptimizerSpec("ring", "RING", {"lr": LRS_KFAC, "rho": (0.01, 0.1)}, {"momentum": 0.9},
                  inherit=("kfac", ("damping",)),
                  description="grng.RING: d = P(g) + rho g"),
    OptimizerSpec("reng", "RENG (F-GR)", {"lr": LRS_KFAC, "rho": (0.01, 0.1)},
                  {"momentum": 0.9, "gr": "forward", "epsilon": 0.01},
                  inherit=("kfac", ("damping",)),
                  description="grng.RENG: d = P(g + rho H g), H g by forward finite difference"),
    OptimizerSpec("rkalman", "R-Kalman", {"lr": (0.03, 0.1, 0.3), "rho": (0.01, 0.1)}, {"momentum": 0.9},
                  description="grng.RKalman: Kalman-filtered Kronecker covariances"),
    OptimizerSpec("fgr", "F-GR (SGD)", {"lr": LRS_SGD, "gamma": (0.01, 0.05)},
                  {"momentum": 0.9, "epsilon": 0.01},
                  description="grng.GradReg(SGD, mode='forward')"),
    OptimizerSpec("sam", "SAM (SGD)", {"lr": LRS_SGD, "epsilon": (0.02, 0.1)}, {"momentum": 0.9},
                  description="grng.GradReg(SGD, mode='sam'): normalized SAM, radius epsilon"),
    OptimizerSpec("sophia", "Sophia", {"lr": (1e-3, 3e-3, 1e-2)},
                  {"rho": 0.04, "weight_decay": 0.1, "hessian_every": 10},
                  description="SophiaG from the optional sophia-opt package (GNB Hessian "
                              "estimate every 10 steps)"),
)}

OPTIMIZERS: tuple[str, ...] = tuple(SPECS)

# the demo's names -> cases of grng.optim.cases (the table the tests and the benchmarks use)
CASE_OF = {"sgd": "sgd", "adamw": "adamw", "kfac": "kfac-eigen", "ring": "ring",
           "reng": "reng-forward", "rkalman": "rkalman", "fgr": "fgr-sgd", "sam": "sam-sgd"}

# Where SophiaG may live in the sophia-opt distribution (module name, attribute).
_SOPHIA_LOCATIONS = (("sophia", "SophiaG"), ("sophia_opt", "SophiaG"),
                     ("sophia_opt.sophia", "SophiaG"), ("sophia.sophia", "SophiaG"))


def find_sophia() -> type | None:
    """SophiaG from sophia-opt, or None when the package is not importable."""
    for module, attr in _SOPHIA_LOCATIONS:
        try:
            mod = importlib.import_module(module)
        except Exception:  # noqa: BLE001 - any import failure means "not available"
            continue
        cls = getattr(mod, attr, None)
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
            return cls
    return None


def unavailable_reason(key: str) -> str | None:
    """Why optimizer ``key`` cannot run here (None when it can)."""
    if key not in SPECS:
        return f"unknown optimizer {key!r}"
    if key == "sophia" and find_sophia() is None:
        return "not installed (pip install sophia-opt)"
    return None


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y)


class Stepper:
    """One training step of ``optimizer`` on a minibatch; returns the detached loss."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        self.optimizer = optimizer
        self.model = model

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        loss = self.optimizer.step(make_closure(self.optimizer, lambda: _loss(self.model, x, y)))
        return loss.detach()

    @property
    def skipped_steps(self) -> int:
        """Steps a grng optimizer skipped (non-finite gradient or direction)."""
        opt = getattr(self.optimizer, "base_optimizer", self.optimizer)
        return int(getattr(opt, "skipped_steps", 0))

    def paused(self) -> contextlib.AbstractContextManager:
        """Curvature capture paused (for extra evaluations with gradients), where there is one."""
        opt = getattr(self.optimizer, "base_optimizer", self.optimizer)
        pause = getattr(opt, "curvature_paused", None)
        return pause() if pause is not None else contextlib.nullcontext()


class SophiaStepper(Stepper):
    """SophiaG: every ``hessian_every`` steps a Gauss-Newton-Bartlett estimate (labels sampled
    from the model's own predictions) refreshes the diagonal Hessian, as in the paper."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, hessian_every: int,
                 batch_size: int) -> None:
        super().__init__(optimizer, model)
        self.hessian_every = hessian_every
        self.batch_size = batch_size
        self._count = 0
        self._takes_bs = "bs" in inspect.signature(optimizer.step).parameters

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = _loss(self.model, x, y)
        loss.backward()
        if self._takes_bs:
            self.optimizer.step(bs=self.batch_size)
        else:
            self.optimizer.step()
        self._count += 1
        if self._count % self.hessian_every == 0 and hasattr(self.optimizer, "update_hessian"):
            self.optimizer.zero_grad(set_to_none=True)
            logits = self.model(x)
            with torch.no_grad():
                sampled = torch.distributions.Categorical(logits=logits).sample()
            F.cross_entropy(logits, sampled).backward()
            self.optimizer.update_hessian()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def make_stepper(key: str, model: nn.Module, hp: dict[str, Any], *, seed: int = 0,
                 batch_size: int = 64) -> Stepper:
    """Build optimizer ``key`` for ``model`` with hyperparameters ``hp``."""
    reason = unavailable_reason(key)
    if reason is not None:
        raise RuntimeError(reason)
    hp = dict(hp)
    if key == "sophia":
        cls = find_sophia()
        assert cls is not None
        opt = cls(model.parameters(), lr=hp["lr"], rho=hp["rho"], weight_decay=hp["weight_decay"])
        return SophiaStepper(opt, model, int(hp["hessian_every"]), batch_size)
    case = CASES[CASE_OF[key]]
    if key == "rkalman":
        hp["seed"] = seed
    return Stepper(case.make(model, **hp), model)


def iter_specs(keys: Iterable[str] | None = None) -> list[OptimizerSpec]:
    """Specs in search order (K-FAC before the optimizers that inherit from it)."""
    keys = list(keys) if keys is not None else list(OPTIMIZERS)
    return [SPECS[k] for k in OPTIMIZERS if k in keys]
