"""grng in the frameworks people train with (README "Using grng with Lightning / Hugging Face /
accelerate").

- :mod:`grng.integrations.transformers`: :class:`~grng.integrations.transformers.GRNGTrainer`,
  a ``transformers.Trainer`` that gives the two-pass optimizers (RENG, GradReg) the closure
  their step needs (the Trainer calls ``optimizer.step()`` without one).
- :mod:`grng.integrations.lightning`: :class:`~grng.integrations.lightning.GRNGModule`, a
  LightningModule that turns ``Trainer(gradient_clip_val=...)`` into the grng optimizer's
  ``max_grad_norm`` (the gradient its update uses, clipped once per step).

K-FAC, RING and R-Kalman step on the gradients present, as any torch.optim optimizer, and
need neither; in Lightning every grng optimizer runs without them (Lightning passes a closure).
The submodules import their framework; ``import grng`` imports none.
"""
from __future__ import annotations

import torch

from grng.optim.base import CurvatureOptimizer
from grng.optim.gradreg import GradReg
from grng.optim.reng import RENG

__all__ = ["clips_itself", "needs_closure"]


def needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """True for the two-pass optimizers (RENG, GradReg): their ``step`` calls the closure again
    at a probe point (or differentiates through it), so it cannot step on gradients present."""
    return isinstance(optimizer, (RENG, GradReg))


def clips_itself(optimizer: torch.optim.Optimizer) -> bool:
    """True for grng's optimizers, which clip the gradient their update uses themselves when
    their ``max_grad_norm`` is set."""
    return isinstance(optimizer, (CurvatureOptimizer, GradReg))
