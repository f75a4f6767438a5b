"""The demo's optimizers: how each is built and stepped, and the learning rates it sweeps.

Every optimizer runs at its **defaults**: grng's own constructor defaults, torch's, or the
peer package's, plus only what makes the case (RENG's ``gr="forward"``, the GradReg mode and
its SGD base) and the peers' prescribed protocol (Sophia's Hessian estimate every 10 steps).
Only the learning rate is swept, over three values a user would try: ``base / 3``, ``base``,
``3 base`` rounded to the 1-3-10 grid, ``base`` being the default. Where a package's default
was chosen for another regime (Sophia's 1e-4 is its GPT-2 pre-training value), the base is
said in :attr:`OptimizerSpec.note`.

Every optimizer is driven through a :class:`Stepper`, which runs one training step on a
minibatch and hides the calling conventions: ``opt.step(closure)`` with torch.optim's closure
(it zeroes, runs forward and backward and returns the loss; RENG and GradReg call it twice),
and Sophia's periodic Hessian refresh. The peers come from the ``demo`` extra: ``sophia-opt``
(SophiaG) and ``heavyball`` (SOAP, PSGD-Kron). heavyball runs eager (``compile_mode=None``):
its default ``torch.compile`` with autotuning took about 100 s per optimizer on this 2-core CPU
before the first step (measured, docs/demo.md), longer than the whole demo, for no faster
steps on these sizes.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from grng import make_closure
from grng.curvature.layers import LinearLayer, helper_for
from grng.optim.cases import CASES


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer of the demo: ``lrs`` (the sweep, default in the middle) and ``fixed`` (what
    makes the case or the peer's protocol; everything else is the constructor's default)."""

    key: str
    label: str
    lrs: tuple[float, float, float]
    fixed: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    note: str = ""
    family: str = "grng"  # grng | torch | peer

    def candidates(self) -> list[dict[str, Any]]:
        """The sweep: the fixed values with each learning rate."""
        return [{**self.fixed, "lr": lr} for lr in self.lrs]

    def defaults(self) -> dict[str, Any]:
        """The fixed values with the default (middle) learning rate."""
        return {**self.fixed, "lr": self.lrs[1]}


def lr_sweep(base: float) -> tuple[float, float, float]:
    """(base / 3, base, 3 base) on the 1-3-10 grid: 0.01 -> (0.003, 0.01, 0.03)."""
    def snap(x: float) -> float:
        decade = 10.0 ** math.floor(math.log10(x))
        mantissa = min((1.0, 3.0, 10.0), key=lambda m: abs(math.log(x / (m * decade))))
        return float(f"{mantissa * decade:.0e}")

    return snap(base / 3.0), base, snap(base * 3.0)


def _default_lr(cls: type) -> float:
    return float(inspect.signature(cls.__init__).parameters["lr"].default)


def _grng_lr(case: str) -> float:
    return _default_lr(CASES[case].build)


SPECS: dict[str, OptimizerSpec] = {s.key: s for s in (
    OptimizerSpec("sgd", "SGD", lr_sweep(0.1), {"momentum": 0.9}, family="torch",
                  description="torch.optim.SGD, heavy-ball momentum 0.9 (torch has no default lr: "
                              "0.1 as in grng's case table)"),
    OptimizerSpec("adamw", "AdamW", lr_sweep(_default_lr(torch.optim.AdamW)), family="torch",
                  description="torch.optim.AdamW at torch's defaults"),
    OptimizerSpec("kfac", "K-FAC", lr_sweep(_grng_lr("kfac-eigen")),
                  description="grng.KFAC at its defaults"),
    OptimizerSpec("ring", "RING", lr_sweep(_grng_lr("ring")),
                  description="grng.RING at its defaults: d = P(g) + rho g"),
    OptimizerSpec("reng", "RENG (F-GR)", lr_sweep(_grng_lr("reng-forward")), {"gr": "forward"},
                  description="grng.RENG at its defaults with gr='forward': d = P(g + rho H g), "
                              "H g by forward finite difference"),
    OptimizerSpec("rkalman", "R-Kalman", lr_sweep(_grng_lr("rkalman")),
                  description="grng.RKalman at its defaults: Kalman-filtered Kronecker covariances"),
    OptimizerSpec("ekfac", "EKFAC", lr_sweep(_grng_lr("ekfac")),
                  description="grng.EKFAC at its defaults: Adam's moments in K-FAC's Kronecker "
                              "eigenbasis"),
    OptimizerSpec("fgr", "F-GR (SGD)", lr_sweep(0.1),
                  {"momentum": 0.9, "gamma": 0.05, "epsilon": 0.01},
                  description="grng.GradReg(SGD(momentum=0.9), mode='forward'), the case table's "
                              "gamma=0.05, epsilon=0.01"),
    OptimizerSpec("sam", "SAM (SGD)", lr_sweep(0.1), {"momentum": 0.9, "epsilon": 0.05},
                  description="grng.GradReg(SGD(momentum=0.9), mode='sam'): normalized SAM, "
                              "radius 0.05 (the case table's)"),
    OptimizerSpec("muon", "Muon", lr_sweep(3e-3), {"adjust_lr_fn": "match_rms_adamw"},
                  family="torch",
                  description="torch.optim.Muon at its defaults with adjust_lr_fn="
                              "'match_rms_adamw' on the 2-D weights of the Linear layers (GPT-2's "
                              "Conv1D counts as one) but the last (the head); torch.optim.AdamW at its defaults and the same lr "
                              "on every other parameter (embeddings, norms, biases, convolutions), "
                              "as Muon's documentation prescribes (the CNN has no hidden Linear: "
                              "AdamW alone there)",
                  note="base lr 3e-3, not Muon's 1e-3: with match_rms_adamw the lr is AdamW's, "
                       "whose best on the transformer is 1e-2 (issue 21)"),
    OptimizerSpec("sophia", "Sophia", lr_sweep(1e-3), {"hessian_every": 10}, family="peer",
                  description="SophiaG from sophia-opt at its defaults (rho=0.04, betas=(0.965, "
                              "0.99), weight_decay=0.1); GNB Hessian estimate every 10 steps as "
                              "its authors prescribe",
                  note="base lr 1e-3 (AdamW's default), not sophia-opt's 1e-4: that is its GPT-2 "
                       "pre-training value, and Sophia's clipped step moves each coordinate by "
                       "at most lr per step"),
    OptimizerSpec("soap", "SOAP", lr_sweep(3e-3), family="peer",
                  description="heavyball.SOAP at its defaults (eager)"),
    OptimizerSpec("psgd", "PSGD-Kron", lr_sweep(1e-3), family="peer",
                  description="heavyball.PSGDKron at its defaults (eager)"),
)}

OPTIMIZERS: tuple[str, ...] = tuple(SPECS)

# the demo's names -> cases of grng.optim.cases (the table the tests and the benchmarks use)
CASE_OF = {"sgd": "sgd", "adamw": "adamw", "kfac": "kfac-eigen", "ring": "ring",
           "reng": "reng-forward", "rkalman": "rkalman", "ekfac": "ekfac", "fgr": "fgr-sgd",
           "sam": "sam-sgd"}

# Where SophiaG may live in the sophia-opt distribution (module name, attribute).
_SOPHIA_LOCATIONS = (("sophia_opt", "SophiaG"), ("sophia", "SophiaG"),
                     ("sophia_opt.sophia", "SophiaG"), ("sophia.sophia", "SophiaG"))
_HEAVYBALL_CLASSES = {"soap": "SOAP", "psgd": "PSGDKron"}


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


def find_heavyball(key: str) -> type | None:
    """heavyball's optimizer class for ``key`` ("soap", "psgd"), set to run eager; None when
    heavyball is not importable."""
    try:
        heavyball = importlib.import_module("heavyball")
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    heavyball.utils.compile_mode = None  # eager: see the module docstring
    return getattr(heavyball, _HEAVYBALL_CLASSES[key], None)


def unavailable_reason(key: str) -> str | None:
    """Why optimizer ``key`` cannot run here (None when it can)."""
    if key not in SPECS:
        return f"unknown optimizer {key!r}"
    if key == "sophia" and find_sophia() is None:
        return "not installed (pip install sophia-opt, or make demo)"
    if key in _HEAVYBALL_CLASSES and find_heavyball(key) is None:
        return "not installed (pip install heavyball, or make demo)"
    return None


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over every target: (N, C) logits with (N,) labels, or (N, T, C)
    next-character logits with (N, T) targets."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return cross_entropy(model(x), y)


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
            cross_entropy(logits, sampled).backward()
            self.optimizer.update_hessian()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def linear_layers(model: nn.Module) -> list[nn.Module]:
    """``model``'s layers y = x W^T + b in module order: nn.Linear and what grng covers as one
    (transformers' Conv1D of GPT-2, y = x W + b)."""
    return [m for m in model.modules() if issubclass(helper_for(m) or object, LinearLayer)]


class MuonStepper(Stepper):
    """Muon on the hidden Linear layers' matrices (:func:`linear_layers` but the last, the
    head) and AdamW on the rest (both step). A model without a hidden Linear (the CNN: its
    convolutions are 4-D, which torch.optim.Muon does not take) is AdamW alone."""

    def __init__(self, model: nn.Module, hp: dict[str, Any]) -> None:
        linears = linear_layers(model)
        hidden = {id(m.weight) for m in linears[:-1]}
        matrices = [p for p in model.parameters() if id(p) in hidden]
        rest = [p for p in model.parameters() if id(p) not in hidden]
        adamw = torch.optim.AdamW(rest, lr=hp["lr"])
        super().__init__(torch.optim.Muon(matrices, **hp) if matrices else adamw, model)
        self.others = [adamw] if matrices else []

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        for opt in (self.optimizer, *self.others):
            opt.zero_grad(set_to_none=True)
        loss = _loss(self.model, x, y)
        loss.backward()
        for opt in (self.optimizer, *self.others):
            opt.step()
        return loss.detach()


def make_stepper(key: str, model: nn.Module, hp: dict[str, Any], *, seed: int = 0,
                 batch_size: int = 64) -> Stepper:
    """Build optimizer ``key`` for ``model`` with hyperparameters ``hp``. ``batch_size`` is the
    number of targets per minibatch Sophia's ``bs`` counts (characters for text)."""
    reason = unavailable_reason(key)
    if reason is not None:
        raise RuntimeError(reason)
    hp = dict(hp)
    if key == "sophia":
        cls = find_sophia()
        assert cls is not None
        every = int(hp.pop("hessian_every"))
        return SophiaStepper(cls(model.parameters(), **hp), model, every, batch_size)
    if key == "muon":
        return MuonStepper(model, hp)
    if key in _HEAVYBALL_CLASSES:
        cls = find_heavyball(key)
        assert cls is not None
        return Stepper(cls(model.parameters(), **hp), model)
    case = CASES[CASE_OF[key]]
    if key == "rkalman":
        hp["seed"] = seed
    return Stepper(case.make(model, **hp), model)


def iter_specs(keys: Iterable[str] | None = None) -> list[OptimizerSpec]:
    """Specs in table order."""
    keys = list(keys) if keys is not None else list(OPTIMIZERS)
    return [SPECS[k] for k in OPTIMIZERS if k in keys]
