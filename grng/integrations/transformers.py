"""grng in the Hugging Face ``transformers.Trainer`` (5.x): :class:`GRNGTrainer`.

K-FAC, RING and R-Kalman work in the plain Trainer: ``Trainer(model, args, train_dataset=...,
optimizers=(opt, scheduler))``; the Trainer's backward fills ``.grad`` (and grng's capture),
the Trainer clips and calls ``optimizer.step()``, and the optimizer's ``state_dict`` (factors,
inverses, step counters) is saved with each checkpoint and restored by
``train(resume_from_checkpoint=...)``.

RENG and GradReg evaluate the gradient a second time at a probe point, so their ``step`` needs
a closure, and the Trainer calls ``step()`` without one. :class:`GRNGTrainer` gives it one:

- each micro-batch of the optimizer step (``gradient_accumulation_steps`` of them) is kept and
  runs through the Trainer's ``training_step`` as usual, so the logged loss and ``grad_norm``
  are those at theta;
- at the step, the closure hands the optimizer that gradient (saved before the Trainer clips
  it) while the parameters are still at theta, and re-runs every kept micro-batch through
  ``training_step`` (forward and backward) at the probe point: two passes per step, no micro-
  batch dropped. For double backprop (``RENG(gr="exact")``, ``GradReg(mode="exact")``) the
  closure re-runs the micro-batches at theta with the graph kept instead; the Trainer's own
  pass then only logs (grng's curvature capture is paused during it);
- ``TrainingArguments.max_grad_norm`` is applied by the optimizer, as its ``max_grad_norm``,
  to the gradient the update uses (g + rho H g, or the regularized gradient), during
  ``train()``; the Trainer's own clipping of the gradient at theta does not reach the update.

With any other optimizer :class:`GRNGTrainer` is the plain Trainer.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.optimizer import AcceleratedOptimizer
from torch import Tensor, nn
from transformers import Trainer

from grng.integrations import needs_closure
from grng.optim.gradient_source import RngState

__all__ = ["GRNGTrainer"]


@dataclass
class _MicroBatch:
    """One micro-batch of the current optimizer step, as the Trainer passed it."""

    model: nn.Module
    inputs: dict[str, Any]
    num_items_in_batch: Tensor | int | None
    loss: Tensor
    rng: RngState


@dataclass
class _Theta:
    """The gradient at theta from the Trainer's own passes, the loss it reported, and the
    parameter versions it belongs to (it is valid only while the parameters are unchanged)."""

    grads: list[tuple[Tensor, Tensor]]
    loss: Tensor
    versions: list[tuple[Tensor, int]]

    def current(self) -> bool:
        """Whether the parameters are still the ones the gradient was computed at."""
        return all(p._version == v for p, v in self.versions)


def _unwrap(optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
    """The user's optimizer inside accelerate's wrapper."""
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _double_backprop(optimizer: torch.optim.Optimizer) -> bool:
    """RENG(gr="exact") or GradReg(mode="exact"): the gradient at theta needs its graph."""
    return getattr(optimizer, "gr", getattr(optimizer, "mode", None)) == "exact"


def _capture_paused(optimizer: torch.optim.Optimizer) -> contextlib.AbstractContextManager:
    """grng's curvature capture paused (GradReg: its base's), or nothing to pause."""
    target = getattr(optimizer, "base_optimizer", optimizer)
    return getattr(target, "curvature_paused", contextlib.nullcontext)()


class GRNGTrainer(Trainer):
    """``transformers.Trainer`` that gives a two-pass grng optimizer (RENG, GradReg) the
    closure its ``step`` needs (module docstring). Pass the optimizer as usual:
    ``GRNGTrainer(model, args, train_dataset=..., optimizers=(opt, scheduler))``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._window: list[_MicroBatch] = []
        self._theta: _Theta | None = None

    def _two_pass(self) -> torch.optim.Optimizer | None:
        """The user's optimizer when it needs a closure, else None."""
        optimizer = _unwrap(self.optimizer)
        return optimizer if optimizer is not None and needs_closure(optimizer) else None

    def _clip_norm(self, optimizer: torch.optim.Optimizer) -> float | None:
        """The max_grad_norm the two-pass optimizer applies during train()."""
        ours = self.args.max_grad_norm if (self.args.max_grad_norm or 0) > 0 else None
        own = optimizer.max_grad_norm
        if ours is None or own is None or own == ours:
            return own if ours is None else ours
        raise ValueError(f"TrainingArguments(max_grad_norm={ours}) and {type(optimizer).__name__}"
                         f"'s max_grad_norm={own} disagree; set one of them (the other to "
                         "0 / None)")

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """Trainer.train; with a two-pass optimizer its steps get a closure and
        ``args.max_grad_norm`` becomes its ``max_grad_norm`` while training."""
        optimizer = self._two_pass()
        if optimizer is None:
            return super().train(*args, **kwargs)
        own = optimizer.max_grad_norm
        optimizer.max_grad_norm = self._clip_norm(optimizer)
        handle = optimizer.register_step_pre_hook(self._give_closure)
        try:
            return super().train(*args, **kwargs)
        finally:
            handle.remove()
            optimizer.max_grad_norm = own
            self._window, self._theta = [], None

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Tensor | int | None = None) -> Tensor:
        """Trainer.training_step; with a two-pass optimizer the micro-batch is kept for the
        step's closure and, on the step's last micro-batch, the gradient at theta is saved."""
        optimizer = self._two_pass()
        if optimizer is None:
            return super().training_step(model, inputs, num_items_in_batch)
        exact = _double_backprop(optimizer)
        rng = RngState.capture(model.parameters())
        with _capture_paused(optimizer) if exact else contextlib.nullcontext():
            loss = super().training_step(model, inputs, num_items_in_batch)
        self._window.append(_MicroBatch(model, inputs, num_items_in_batch, loss, rng))
        if self.accelerator.sync_gradients and not exact:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            self._theta = _Theta([(p, p.grad.detach().clone()) for p in params
                                  if p.grad is not None],
                                 sum(mb.loss for mb in self._window),
                                 [(p, p._version) for p in params])
        return loss

    def _give_closure(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict
                      ) -> tuple[tuple, dict] | None:
        """Step pre-hook: a ``step()`` without a closure gets one over the kept micro-batches
        (torch passes the hook ``args = (optimizer, *step's arguments)``)."""
        given = args[1] if len(args) > 1 else kwargs.get("closure")
        if given is not None or not self._window:
            return None
        window, self._window = self._window, []
        theta, self._theta = self._theta, None
        # the Trainer's gradients are in ``theta`` (or recomputed by the closure): the step must
        # not take them for gradients accumulated outside its closure. Set to None directly:
        # the optimizer's own zero_grad would also drop the curvature rows the Trainer's pass
        # captured, which the step at theta folds
        for group in args[0].param_groups:
            for p in group["params"]:
                p.grad = None
        rest = {k: v for k, v in kwargs.items() if k != "closure"}
        return (args[0], self._closure(window, theta)), rest

    def _closure(self, window: list[_MicroBatch], theta: _Theta | None) -> Callable[[], Tensor]:
        """torch.optim's closure over ``window``: at theta, once, the Trainer's own gradient;
        otherwise zero the gradients and re-run every micro-batch's forward and backward, each
        with the random numbers (dropout masks) of its pass in the Trainer."""
        def closure() -> Tensor:
            nonlocal theta
            if theta is not None and theta.grads and theta.current():
                for p, grad in theta.grads:
                    p.grad = grad
                loss, theta = theta.loss, None
                return loss
            theta = None
            window[0].model.zero_grad(set_to_none=True)
            total = 0
            for mb in window:
                mb.rng.restore()
                total = total + Trainer.training_step(self, mb.model, mb.inputs,
                                                      mb.num_items_in_batch)
            return total
        return closure
