"""RENG, the explicit GRNG: d = P(g + rho H g) (ALGORITHMS.md sections 3 and 4).

RENG is gradient regularization feeding K-FAC: :func:`regularized_gradient` writes
g + rho H g into ``.grad`` (H g by double backprop, ``gr="exact"``, or by the forward/backward
finite difference with step ``epsilon``), then K-FAC preconditions it. The curvature factors
come only from the evaluation at theta: the probe and the Hessian-vector pass run with capture
paused, and BatchNorm buffers are restored after the probe.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from grng.distributed.gradreg import regularized_gradient as ddp_regularized_gradient
from grng.optim import validation as check
from grng.optim.gradreg import regularized_gradient
from grng.optim.kfac import KFAC

GR_MODES: tuple[str, ...] = ("exact", "forward", "backward")


class RENG(KFAC):
    """K-FAC's keywords plus ``rho`` (>= 0), ``gr`` and ``epsilon``; requires ``step(closure)``.

    Mixed precision: ``grad_scaler=scaler`` (K-FAC's keyword); each gradient evaluation is then
    unscaled once and the probe formed from the unscaled gradient; call ``scaler.update()``
    after ``step(closure)``, never ``scaler.step(opt)`` (docs/numerics.md).
    """

    def __init__(self, model: nn.Module, lr: float = 0.01, damping: float = 1e-3,
                 rho: float = 0.1, gr: str = "exact", epsilon: float = 0.01, **kwargs) -> None:
        self.rho = check.non_negative("rho", rho)
        self.gr = check.choice("gr", gr, GR_MODES)
        self.epsilon = check.finite("epsilon", epsilon)
        if self.epsilon == 0.0:
            raise ValueError("epsilon must be non-zero")
        super().__init__(model, lr, damping, **kwargs)
        if self._dist is not None and self.grad_scaler is not None:
            raise ValueError("grad_scaler is not supported with a process group (single process only)")

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:
        """One RENG step; ``closure`` runs the forward pass and returns the loss."""
        if closure is None:
            raise ValueError("RENG.step needs a closure (it evaluates the gradient at a probe "
                             "point or differentiates through it)")
        return super().step(closure)

    def _evaluate(self, closure: Callable[[], Tensor]) -> Tensor:
        """Write g + rho H g into .grad; capture only at theta; params restored exactly."""
        params = list(self._all_params())
        buffers = [b for b in self.model.buffers()]
        if self._dist is not None:  # under DDP: no_sync passes, grng all-reduces (distributed/gradreg.py)
            return ddp_regularized_gradient(params, closure, self.rho, self.epsilon, self.gr,
                                            group=self._dist.group, model=self.model,
                                            probe_context=self.curvature_paused, buffers=buffers)
        scaler = self._active_scaler()
        loss = regularized_gradient(params, closure, self.rho, self.epsilon, self.gr,
                                    probe_context=self.curvature_paused, buffers=buffers,
                                    grad_scaler=scaler)
        if scaler is not None:  # each evaluation was unscaled once; the G rows still carry S
            self._closure_scale = float(scaler.get_scale())
        return loss
