"""The mixed-precision hand-off between torch.amp.GradScaler and a curvature optimizer.

The captured output-gradient rows carry the loss scale S of the backward pass, so the
optimizer must know S: ``scaler.step(opt)`` sets ``opt.found_inf`` and ``opt.grad_scale`` (S,
or None when the user already called ``scaler.unscale_(opt)``) instead of unscaling itself;
gradients are then unscaled here exactly once. A closure evaluated with ``grad_scaler``
(or a gradient source that unscaled its evaluations) reports S through :meth:`set_closure_scale`.
A plain ``opt.step()`` with ``grad_scaler`` set expects ``scaler.unscale_(opt)`` first.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor


class AmpHandoff:
    """Holds the optional GradScaler and the loss scale of the last closure evaluation."""

    def __init__(self, grad_scaler: Any = None) -> None:
        self.grad_scaler = grad_scaler
        self.closure_scale: float | None = None
        self.active = False

    def scaler(self) -> Any:
        """The GradScaler when one is set and enabled, else None."""
        s = self.grad_scaler
        return s if s is not None and s.is_enabled() else None

    def set_closure_scale(self, scale: float | None) -> None:
        """The loss scale S of this step's (already unscaled) gradient evaluation."""
        self.closure_scale = scale

    def handoff(self, opt: Any, grads: list[Tensor]) -> tuple[bool, float]:
        """(proceed, S): apply GradScaler's hand-over to ``grads``; proceed is False when the
        scaler found inf/NaN gradients (the step is skipped without a warning)."""
        scale, self.closure_scale = self.closure_scale, None
        scaler = self.scaler()
        if scale is None:
            scale = 1.0 if scaler is None else float(scaler.get_scale())
        self.active = scale != 1.0 or scaler is not None
        found_inf = getattr(opt, "found_inf", None)
        if found_inf is not None:
            self.active = True
            if float(found_inf) > 0.0:
                return False, scale
            grad_scale = getattr(opt, "grad_scale", None)
            if grad_scale is not None:
                inv = grad_scale.double().reciprocal().float()
                for g in grads:
                    g.mul_(inv.to(g.device))
                scale = float(grad_scale)
            elif scaler is not None:
                scale = float(scaler.get_scale())
            else:
                raise RuntimeError(
                    f"scaler.unscale_(opt) was called before scaler.step(opt): pass "
                    f"grad_scaler=scaler to {type(opt).__name__} so that the captured output "
                    "gradients (which carry the loss scale) can be unscaled too")
        return True, scale
