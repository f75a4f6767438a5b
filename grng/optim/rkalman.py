"""R-Kalman: a Kalman filter over Kronecker covariance factors (docs/algorithms.md section 5).

Per layer it keeps P_A ~ A^-1 and P_G ~ G^-1 directly, starting at I / prior_precision, and
each step first folds the batch in (predict P- = P/beta + q I; innovation
S = r I + H P- H^T with r = n / ((1 - beta) s^2); rank-k downdate P = P- - W W^T with
W = P- H^T L^-T, S = L L^T), then steps along d = P_G g P_A + rho g. No d x d factor is ever
inverted, solved with or eigendecomposed: only the k x k innovation is factorized. When a
factor has more than ``kalman_rank`` rows, H = Omega X with a Gaussian sketch Omega (k x m,
entries N(0, 1/k)), so E[H^T H] = X^T X.

Numerical soundness in float32 over long runs (documented choices):
- the downdate is computed on one triangle and mirrored, so P is exactly symmetric;
- the innovation is formed and factorized in float64 (it is only k x k);
- process noise q > 0 by default (1e-4 / prior_precision): every predict adds q I, which keeps
  P's smallest eigenvalue away from the rounding level of the downdate;
- a variance cap (``max_variance``, default 1 / prior_precision): a direction the data never
  excite (a constant-zero input pixel, a dead unit) would otherwise grow as beta^-t until it
  overflows ("covariance windup"); each row/column i with P_ii above the cap is scaled by
  sqrt(cap / P_ii), a congruence D P D that keeps P positive definite. ``max_variance=None``
  disables it (then, with q = 0 and all rows, P equals the inverse of the running factor
  M_t = beta M_{t-1} + (1 - beta) M_batch started at prior_precision I, exactly as the spec).
An innovation Cholesky that fails anyway skips that factor's update for the step (counted in
``kalman_failures``, with a warning); the direction then uses the previous P.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from grng.curvature.options import MAX_FACTOR_DIM
from grng.optim import validation as check
from grng.optim.arguments import optimizer_classes, reject_unknown
from grng.optim.base import CurvatureOptimizer
from grng.precondition import DiagonalKalman, KalmanConfig, KalmanPreconditioner


class RKalman(CurvatureOptimizer):
    """Bayesian GRNG: Kalman-filtered Kronecker covariances, direction P_G g P_A + rho g.

    The plain gradient, the Kalman preconditioner (:mod:`grng.precondition.kalman`) and its
    elementwise variant for parameters without a block. ``grad_scaler``: as for KFAC
    (docs/numerics.md). The covariances have no low-precision storage option: the downdate's
    accuracy is the storage precision. The defaults (prior_precision=1e-2, so process noise
    1e-2 and variance cap 100, and kl_clip=1e-3 as for KFAC) were chosen by
    ``bench/defaults.py`` (docs/defaults.md). ``sync_free``: as for KFAC (a failed innovation
    factorization then keeps P on the device, counted lazily in ``kalman_failures``).
    ``precision``: "fp32" (default) or "tf32" (TF32 matmuls on CUDA), as for KFAC.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.01,
        rho: float = 0.1,
        factor_decay: float = 0.95,
        process_noise: float | None = None,
        kalman_rank: int = 64,
        prior_precision: float = 1e-2,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        kl_clip: float | None = 1e-3,
        backend: str = "auto",
        *,
        factor_every: int = 2,
        max_variance: float | None = -1.0,
        seed: int = 0,
        param_groups: Iterable[dict] | None = None,
        process_group: object = None,
        distributed_strategy: str = "comm-opt",
        grad_scaler: object = None,
        max_grad_norm: float | None = None,
        max_factor_dim: int | None = MAX_FACTOR_DIM,
        sync_free: bool | None = None,
        precision: str = "fp32",
        **unknown: object,
    ) -> None:
        reject_unknown(type(self), unknown, optimizer_classes())
        if precision == "bf16":
            raise ValueError("RKalman(precision='bf16'): the covariance downdate's accuracy is its "
                             "storage precision, so R-Kalman keeps float32; use 'fp32' or 'tf32'")
        check.finite("factor_decay", factor_decay)
        if not 0.0 < factor_decay < 1.0:
            raise ValueError(f"factor_decay must be in (0, 1) for R-Kalman, got {factor_decay!r}")
        self.prior_precision = check.positive("prior_precision", prior_precision)
        self.kalman_rank = check.positive_int("kalman_rank", kalman_rank)
        self.process_noise = (1e-4 / self.prior_precision if process_noise is None
                              else check.non_negative("process_noise", process_noise))
        if max_variance == -1.0:
            max_variance = 1.0 / self.prior_precision
        self.max_variance = check.optional_positive("max_variance", max_variance)
        kalman = KalmanConfig(self.prior_precision, self.process_noise, self.kalman_rank,
                              self.max_variance, check.integer("seed", seed))
        defaults = dict(lr=lr, rho=check.non_negative("rho", rho), momentum=momentum,
                        weight_decay=weight_decay, kl_clip=kl_clip)
        super().__init__(model, defaults, factor_decay=factor_decay, factor_every=factor_every,
                         backend=backend, param_groups=param_groups, process_group=process_group,
                         distributed_strategy=distributed_strategy, grad_scaler=grad_scaler,
                         max_grad_norm=max_grad_norm, max_factor_dim=max_factor_dim,
                         sync_free=sync_free, precision=precision)
        block = KalmanPreconditioner(self.config, kalman)
        self._bind(block, DiagonalKalman(block))

    @property
    def kalman_failures(self) -> int:
        """Innovation factorizations that failed (each kept the previous covariance)."""
        return self.block.failures

    def _extra_state(self) -> dict[str, Any]:
        return self.block.extra_state()

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self.block.load_extra_state(extra)
