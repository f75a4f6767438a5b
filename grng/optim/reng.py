"""RENG, the explicit GRNG: d = P(g + rho H g) (docs/algorithms.md sections 3 and 4).

RENG is K-FAC whose gradient source is the regularized gradient: g + rho H g by double
backprop (``gr="exact"``) or by the forward/backward finite difference with step ``epsilon``
(:mod:`grng.optim.gradient_source`), then K-FAC preconditions it. The curvature factors come
only from the evaluation at theta: the probe and the Hessian-vector pass run with capture
paused, BatchNorm buffers are restored after the probe, and the probe replays the first pass's
random numbers (dropout masks). ``gr="exact"`` (the default) on a model without a double
backward (CPU flash attention: ``nn.TransformerEncoder(batch_first=True)``, Hugging Face models
with SDPA attention; a torch.compile'd model) falls back to ``gr="forward"`` with one warning
(docs/algorithms.md section 3).
"""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from grng.optim import validation as check
from grng.optim.gradient_source import GradientWatch, RegularizedGradient, closure_required
from grng.optim.kfac import KFAC

GR_MODES: tuple[str, ...] = ("exact", "forward", "backward")


class RENG(KFAC):
    """K-FAC's keywords plus ``rho`` (>= 0), ``gr`` and ``epsilon``; requires ``step(closure)``
    with a closure in torch.optim's convention (zero the gradients, forward, backward, return the
    loss), which RENG calls at theta and again at the probe point (``gr="exact"``: once, keeping
    the backward's graph). ``max_grad_norm`` clips g + rho H g, the gradient the step uses.
    ``step(closure)`` refuses gradients computed outside the closure since the last step
    (gradient accumulation outside it, e.g. Lightning's ``accumulate_grad_batches > 1``): the
    closure's gradient would replace them.

    Mixed precision: ``grad_scaler=scaler`` (K-FAC's keyword) and a closure that backpropagates
    ``scaler.scale(loss)``; each gradient evaluation is then unscaled once and the probe formed
    from the unscaled gradient; call ``scaler.update()`` after ``step(closure)``, never
    ``scaler.step(opt)`` (docs/numerics.md).
    """

    def __init__(self, model: nn.Module, lr: float = 0.01, damping: float = 1e-3,
                 rho: float = 0.1, gr: str = "exact", epsilon: float = 0.01, **kwargs) -> None:
        self.rho = check.non_negative("rho", rho)
        self.gr = check.choice("gr", gr, GR_MODES)
        self.epsilon = check.finite("epsilon", epsilon)
        if self.epsilon == 0.0:
            raise ValueError("epsilon must be non-zero")
        super().__init__(model, lr, damping, **kwargs)
        self.gradient_source = RegularizedGradient(self.rho, self.epsilon, self.gr,
                                                   label=f"RENG(gr={self.gr!r})")
        self._watch = GradientWatch()
        self._watch.remember(self._all_params())

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:
        """One RENG step; ``closure`` zeroes, runs forward and backward and returns the loss."""
        if closure is None:
            raise closure_required("RENG", "RENG evaluates the gradient again at a probe point "
                                           "or differentiates through it")
        self._watch.check(self._all_params(), "RENG")
        loss = super().step(closure)
        self.gr = self.gradient_source.mode  # "forward" after a fall-back from "exact"
        self._watch.remember(self._all_params())
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim's zero_grad; zeroed gradients are not gradients from outside a step."""
        super().zero_grad(set_to_none)
        self._watch.remember(self._all_params())

    def _evaluate(self, closure: Callable[[], Tensor]) -> Tensor:
        """Write g + rho H g into .grad; capture only at theta; params restored exactly."""
        scaler = self.amp.scaler()
        loss = self.gradient_source.evaluate(
            list(self._all_params()), closure, comm=self.comm, probe_context=self.curvature_paused,
            buffers=list(self.model.buffers()), grad_scaler=scaler, restart=self.capture.clear)
        if scaler is not None:  # each evaluation was unscaled once; the G rows still carry S
            self.set_loss_scale(float(scaler.get_scale()))
        return loss
