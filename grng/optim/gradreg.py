"""Gradient regularization (Karakida et al., ICML 2023) around any optimizer, SAM and flooding.

:class:`GradReg` descends on L_GR = L + (gamma/2) ||grad L||^2: its gradient source
(:class:`grng.optim.gradient_source.RegularizedGradient`: F-GR, B-GR, double backprop, SAM)
writes g + gamma H g into ``.grad``, then the wrapped optimizer steps. ``flood``
(Ishida et al. 2020) is the loss transform |L - b| + b; near the flood level two consecutive
steps perform an F-GR step implicitly.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from grng.distributed import make_communicator, refuse_sharded
from grng.optim.base import CurvatureOptimizer
from grng.optim.gradient_source import (MODES, GradientWatch, RegularizedGradient,
                                        check_gr_hyperparameters, closure_required,
                                        regularized_gradient)
from grng.optim.validation import grad_scaler as _check_scaler
from grng.optim.validation import optional_positive

__all__ = ["DEFAULT_EPSILON", "DEFAULT_GAMMA", "MODES", "GradReg", "flood",
           "regularized_gradient"]

#: the defaults, measured by bench/gradreg_defaults.py (bench/results/gradreg_defaults.md)
DEFAULT_GAMMA = 0.01
DEFAULT_EPSILON = 0.05


class GradReg(torch.optim.Optimizer):
    """Descend on L_GR = L + (gamma/2)||grad L||^2: regularized gradient, then ``base_optimizer.step()``.

    Wraps any ``torch.optim.Optimizer`` (SGD, AdamW, grng's K-FAC family). The wrapper shares the
    base's ``param_groups``, ``state`` and ``defaults``, so LR schedulers and ``zero_grad`` act on
    the base through it. ``step(closure)`` needs a closure in torch.optim's convention (it zeroes
    the gradients, runs forward and backward and returns the loss, as for LBFGS); it is called at
    theta and again at the probe point. ``max_grad_norm`` clips the regularized gradient before
    the base steps. If the base exposes ``curvature_paused()`` (a context
    manager), the probe evaluation runs inside it so curvature is captured only at theta.

    Pass ``model=`` to protect BatchNorm statistics: every buffer of the model is restored after
    the probe forward, so running statistics are updated once per step. Without it the probe
    forward of ``"forward"``, ``"backward"`` and ``"sam"`` updates them a second time.

    Mixed precision: pass ``grad_scaler=`` (a ``torch.amp.GradScaler``) and backpropagate
    ``scaler.scale(loss)`` in the closure; ``step(closure)`` then unscales each gradient
    evaluation once (the probe point is formed from
    the unscaled gradient), skips the base step on inf/NaN, and the caller runs
    ``scaler.update()`` after ``step`` (never ``scaler.step(opt)``). A non-finite loss or
    regularized gradient skips the step (parameters and state unchanged; counted in
    ``skipped_steps``; warned unless it is a GradScaler overflow).
    For mode ``"sam"`` gamma is unused (normalized SAM with radius |epsilon|); unnormalized SAM is
    ``mode="forward"`` with gamma == epsilon.

    The defaults ``gamma=DEFAULT_GAMMA``, ``epsilon=DEFAULT_EPSILON`` are the best cell of
    ``bench/gradreg_defaults.py`` around AdamW (bench/results/gradreg_defaults.md). The probe
    pass replays the first pass's random numbers (dropout masks); ``mode="exact"`` on a model
    without a double backward falls back to ``"forward"`` with one warning. ``step(closure)``
    refuses gradients computed outside the closure since the last step (gradient accumulation
    outside it, e.g. Lightning's ``accumulate_grad_batches > 1``), which it would drop.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        gamma: float = DEFAULT_GAMMA,
        epsilon: float = DEFAULT_EPSILON,
        mode: str = "forward",
        *,
        model: torch.nn.Module | None = None,
        process_group: Any = None,
        grad_scaler: Any = None,
        max_grad_norm: float | None = None,
    ) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}"
            )
        check_gr_hyperparameters(gamma, epsilon, mode)
        if model is not None and not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be None or a torch.nn.Module, got {type(model).__name__}")
        self.grad_scaler = _check_scaler("grad_scaler", grad_scaler)
        self.max_grad_norm = optional_positive("max_grad_norm", max_grad_norm)
        self._own_skipped = 0
        if model is not None:
            refuse_sharded(model, "GradReg")
        self.process_group = process_group  # data parallel: docs/distributed.md
        self.base_optimizer = base_optimizer
        self.gamma = gamma
        self.epsilon = epsilon
        self.mode = mode
        self.model = model
        self._share_base()
        self._gradient_watch().remember(p for g in self.param_groups for p in g["params"])

    def _share_base(self) -> None:
        """Alias param_groups, state and defaults to the base optimizer's.

        Optimizer.__init__ would build param groups of its own; Optimizer.__setstate__ (its
        unpickling path) instead adopts the given containers and installs the hook registries
        and step profiling.
        """
        base = self.base_optimizer
        shared = {"defaults": base.defaults, "state": base.state, "param_groups": base.param_groups}
        super().__setstate__(shared)

    def __getstate__(self) -> dict[str, Any]:
        """Optimizer's state plus the base optimizer and GradReg's settings (pickle, deepcopy)."""
        own = {name: getattr(self, name, None)
               for name in ("base_optimizer", "gamma", "epsilon", "mode", "model", "grad_scaler",
                            "max_grad_norm")}
        own["_own_skipped"] = getattr(self, "_own_skipped", 0)
        return {**super().__getstate__(), **own}

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """theta <- base step on grad L_GR = g + gamma H g; returns L(theta) before the step."""
        if closure is None:
            raise closure_required("GradReg", "the regularized gradient evaluates the loss twice")
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        params = list({id(p): p for group in self.param_groups for p in group["params"]}.values())
        self._gradient_watch().check(params, "GradReg")
        comm = make_communicator(self.model, getattr(self, "process_group", None))
        scaler = getattr(self, "grad_scaler", None)
        amp = scaler is not None and scaler.is_enabled()
        base = self.base_optimizer
        curvature = isinstance(base, CurvatureOptimizer)
        source = RegularizedGradient(self.gamma, self.epsilon, self.mode,
                                     label=f"GradReg(mode={self.mode!r})")
        try:
            loss = source.evaluate(
                params, closure, comm=comm,
                probe_context=getattr(base, "curvature_paused", contextlib.nullcontext),
                buffers=list(self.model.buffers()) if self.model is not None else (),
                grad_scaler=scaler, restart=base.capture.clear if curvature else lambda: None)
        finally:
            self.mode = source.mode  # "forward" after a fall-back from "exact"
            self._gradient_watch().remember(params)
        finite = bool(torch.isfinite(loss).all()) and all(
            bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)
        if not finite:  # parameters and optimizer state unchanged
            if curvature:
                base.skip_step("non-finite loss or regularized gradient", warn=not amp)
            else:
                self._own_skipped = getattr(self, "_own_skipped", 0) + 1
                if not amp:
                    warnings.warn(f"GradReg: step skipped (non-finite loss or regularized gradient); "
                                  f"parameters and optimizer state unchanged "
                                  f"({self._own_skipped} skipped so far)", RuntimeWarning, stacklevel=2)
            return loss
        if getattr(self, "max_grad_norm", None) is not None:  # clip what the update uses
            used = [p for p in params if p.grad is not None]
            if used:
                torch.nn.utils.clip_grad_norm_(used, self.max_grad_norm)
        if amp and curvature:  # the base's captured G rows carry S
            base.set_loss_scale(float(scaler.get_scale()))
        base.step()
        self._gradient_watch().remember(params)
        return loss

    def _gradient_watch(self) -> GradientWatch:
        """The gradients the last step left (made on first use: an unpickled copy has none)."""
        if getattr(self, "_watch", None) is None:
            self._watch = GradientWatch()
        return self._watch

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite loss or gradient (the base's count for grng bases)."""
        base_count = getattr(self.base_optimizer, "skipped_steps", None)
        return base_count if isinstance(base_count, int) else getattr(self, "_own_skipped", 0)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Delegate to the base optimizer: .grad <- None (or 0)."""
        self.base_optimizer.zero_grad(set_to_none)
        self._gradient_watch().remember(p for g in self.param_groups for p in g["params"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Delegate to the base optimizer (the group list is shared)."""
        self.base_optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """Base optimizer's state dict plus {"gradreg": {gamma, epsilon, mode}}."""
        state = self.base_optimizer.state_dict()
        state["gradreg"] = {"gamma": self.gamma, "epsilon": self.epsilon, "mode": self.mode}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of state_dict: GradReg hyperparameters, then the base's state."""
        state_dict = dict(state_dict)
        own = state_dict.pop("gradreg", None)
        if own is not None:
            check_gr_hyperparameters(own["gamma"], own["epsilon"], own["mode"])
            self.gamma, self.epsilon, self.mode = own["gamma"], own["epsilon"], own["mode"]
        self.base_optimizer.load_state_dict(state_dict)
        self._share_base()


def flood(loss: Tensor, b: float) -> Tensor:
    """Flooding: |L - b| + b, so the gradient is -grad L while L < b (Ishida et al. 2020)."""
    if not math.isfinite(b) or b < 0:
        raise ValueError(f"flood level b must be a finite number >= 0, got {b!r}")
    return (loss - b).abs() + b
