"""grng in PyTorch Lightning (2.x): :class:`GRNGModule`, a LightningModule base whose gradient
clipping is applied by grng's optimizers themselves.

Every grng optimizer runs in Lightning as it is. In automatic optimization Lightning passes
``step`` a closure in torch.optim's convention (training_step, zero_grad, backward, return the
loss); the two-pass optimizers (RENG, GradReg) call it a second time at their probe point. In
manual optimization ``self.manual_backward(loss); opt.step()`` steps K-FAC, RING and R-Kalman
on the gradients present; RENG and GradReg need ``opt.step(closure)`` with a closure that
zeroes, runs forward and ``self.manual_backward`` and returns the loss.

What :class:`GRNGModule` changes is gradient clipping. Lightning clips inside the closure,
after each backward (``Precision._wrap_closure``): a two-pass optimizer would get the gradient
at theta clipped (which moves its probe point) and the probe gradient clipped separately, and
the finite difference of two differently clipped gradients is no longer g + gamma H g (where
both are clipped by similar factors the component of H g along g is lost). Under
``precision="bf16-mixed"`` / ``"16-mixed"`` Lightning refuses clipping outright for optimizers
that unscale in their own ``step``, as grng's do. :class:`GRNGModule` hands
``Trainer(gradient_clip_val=...)`` to the grng optimizer's ``max_grad_norm`` instead: the
gradient the update uses (g + rho H g for RENG, the regularized gradient for GradReg, g for
K-FAC/RING/R-Kalman) is clipped once per step, after unscaling. Other optimizers are clipped by
Lightning as usual.

``Trainer(accumulate_grad_batches=k > 1)`` with a two-pass optimizer is refused by the optimizer
itself (with or without :class:`GRNGModule`): Lightning runs the earlier micro-batches outside
``step`` and gives ``step`` a closure over the last one only, so the gradient the two-pass step
recomputes would silently drop k - 1 micro-batches; ``step(closure)`` finds their gradients
(:class:`grng.optim.gradient_source.GradientWatch`) and raises.
"""
from __future__ import annotations

from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.enums import GradClipAlgorithmType
from torch.optim import Optimizer

from grng.integrations import clips_itself

__all__ = ["GRNGModule"]


class GRNGModule(LightningModule):
    """A LightningModule whose ``gradient_clip_val`` becomes the grng optimizer's
    ``max_grad_norm`` (module docstring). Subclass it instead of ``LightningModule``, or list it
    first among the bases (``class Model(GRNGModule, MyBaseModule)``)."""

    def configure_gradient_clipping(self, optimizer: Optimizer,
                                    gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's hook, called after every backward of a step's closure: for a grng
        optimizer set its ``max_grad_norm`` to ``gradient_clip_val`` (norm clipping only) and
        clip nothing here; any other optimizer is clipped by Lightning."""
        if not clips_itself(optimizer):
            super().configure_gradient_clipping(optimizer, gradient_clip_val,
                                                gradient_clip_algorithm)
            return
        name = type(optimizer).__name__
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm not in (None, GradClipAlgorithmType.NORM):
            raise ValueError(f"{name} clips by norm only (its max_grad_norm); use "
                             "Trainer(gradient_clip_algorithm='norm')")
        own = optimizer.max_grad_norm
        if own is None:
            optimizer.max_grad_norm = float(gradient_clip_val)
        elif own != gradient_clip_val:
            raise ValueError(f"Trainer(gradient_clip_val={gradient_clip_val}) and {name}'s "
                             f"max_grad_norm={own} disagree; set one of them")
