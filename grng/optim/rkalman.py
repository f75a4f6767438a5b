"""R-Kalman: a Kalman filter over Kronecker covariance factors (ALGORITHMS.md section 5).

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

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from grng import ops
from grng.curvature.layers import KroneckerLayer, Rows
from grng.ops.reference import symmetrize_from_upper
from grng.optim import validation as check
from grng.optim.base import CurvatureOptimizer


class RKalman(CurvatureOptimizer):
    """Bayesian GRNG: Kalman-filtered Kronecker covariances, direction P_G g P_A + rho g.

    ``grad_scaler``: as for KFAC (docs/numerics.md). The covariances have no low-precision
    storage option: the downdate's accuracy is the storage precision.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.01,
        rho: float = 0.1,
        factor_decay: float = 0.95,
        process_noise: float | None = None,
        kalman_rank: int = 64,
        prior_precision: float = 1.0,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        kl_clip: float | None = None,
        backend: str = "auto",
        *,
        factor_every: int = 1,
        max_variance: float | None = -1.0,
        seed: int = 0,
        param_groups: Iterable[dict] | None = None,
        process_group: object = None,
        distributed_strategy: str = "comm-opt",
        grad_scaler: object = None,
    ) -> None:
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
        self.kalman_failures = 0
        self._seed = check.integer("seed", seed)
        self._generators: dict[torch.device, torch.Generator] = {}
        defaults = dict(lr=lr, rho=check.non_negative("rho", rho), momentum=momentum,
                        weight_decay=weight_decay, kl_clip=kl_clip)
        super().__init__(model, defaults, factor_decay=factor_decay, factor_every=factor_every,
                         backend=backend, param_groups=param_groups, process_group=process_group,
                         distributed_strategy=distributed_strategy, grad_scaler=grad_scaler)
        for group in self.param_groups:
            check.non_negative("rho", group["rho"])

    # ------------------------------------------------------------------ curvature hooks
    def _update_curvature(self, factors_due: bool) -> None:
        """Predict and update every P with this batch's rows (elementwise for diagonals)."""
        if self._dist is not None:  # the global batch's observations, identical updates
            return self._dist.kalman_update(self, factors_due)
        if not factors_due:
            return
        for layer in self.layers:
            captured = self.capture.rows(layer)
            if captured is None:
                continue
            st = self.layer_state(layer)
            self._init_covariances(layer, st)
            a_rows, g_rows = captured
            if layer.diagonal_a:
                self._diagonal_update(st, "PA", layer.a_diagonal(a_rows))
            else:
                self._kalman(st, "PA", a_rows)
            self._kalman(st, "PG", g_rows)
        self._update_diagonal_params()

    def _update_diagonal_params(self) -> None:
        """Scalar Kalman update of every parameter without a Kronecker block, from g * g."""
        for p in self._diagonal_params():
            if p.grad is not None:
                st = self.state[p]
                if "PD" not in st:
                    st["PD"] = torch.full_like(p, 1.0 / self.prior_precision,
                                               dtype=self._factor_dtype(p))
                self._diagonal_update(st, "PD", p.grad.to(st["PD"].dtype).square())

    def _precondition_layer(self, layer: KroneckerLayer, st: dict, V: Tensor, group: dict) -> Tensor:
        """P_G V P_A (rho g is added by the shared update)."""
        self._init_covariances(layer, st)
        PA = st["PA"]
        out = st["PG"] @ V.to(PA.dtype)
        return out * PA if PA.dim() == 1 else out @ PA

    def _precondition_diagonal(self, p: Tensor, st: dict, group: dict) -> Tensor:
        """p_D * g (the prior variance before the first update)."""
        if "PD" not in st:
            return p.grad / self.prior_precision
        return st["PD"] * p.grad

    # ------------------------------------------------------------------------ internals
    def _init_covariances(self, layer: KroneckerLayer, st: dict) -> None:
        """P_A = P_G = I / prior_precision on first use."""
        if "PA" in st:
            return
        d_g, d_a = layer.dims()
        kw = dict(dtype=self._factor_dtype(layer.weight), device=layer.weight.device)
        v = 1.0 / self.prior_precision
        st["PA"] = torch.full((d_a,), v, **kw) if layer.diagonal_a else torch.eye(d_a, **kw) * v
        st["PG"] = torch.eye(d_g, **kw) * v

    def _kalman(self, st: dict, key: str, rows: Rows) -> None:
        """Kalman update of st[key] with observation rows (sketched beyond kalman_rank)."""
        beta = self.factor_decay
        P = st[key]
        H = rows.X.to(P.dtype)
        if H.shape[0] > self.kalman_rank:
            H = self._sketch(H.shape[0], P) @ H
        r = rows.n / ((1.0 - beta) * rows.scale ** 2)
        self._kalman_apply(st, key, H, r)

    def _kalman_apply(self, st: dict, key: str, H: Tensor, r: float) -> None:
        """Kalman update of st[key] with observation matrix H and noise r (then the cap)."""
        beta = self.factor_decay
        P = st[key]
        try:  # the op leaves P untouched when it raises
            ops.kalman_update(P, H, r, beta, self.process_noise, backend=self.backend)
        except ops.FactorizationError as err:
            self.kalman_failures += 1
            warnings.warn(f"R-Kalman: innovation factorization failed ({err}); keeping the "
                          f"previous covariance ({self.kalman_failures} failures)", RuntimeWarning,
                          stacklevel=4)
            return
        self._cap(P)

    def _diagonal_update(self, st: dict, key: str, observed: Tensor) -> None:
        """p <- p- / (1 + p- (1 - beta) m), p- = p / beta + q: the scalar Kalman update."""
        beta = self.factor_decay
        p_minus = st[key].div_(beta).add_(self.process_noise)
        p_minus.div_(1.0 + p_minus * observed.to(p_minus.dtype) * (1.0 - beta))
        if self.max_variance is not None:
            p_minus.clamp_(max=self.max_variance)

    def _cap(self, P: Tensor) -> None:
        """P <- D P D, D_ii = min(1, sqrt(max_variance / P_ii)): bounds the variances."""
        if self.max_variance is None:
            return
        diag = P.diagonal()
        if bool((diag <= self.max_variance).all()):
            return
        s = (self.max_variance / diag.clamp(min=self.max_variance)).sqrt()
        P.mul_(s[:, None]).mul_(s[None, :])
        P.copy_(symmetrize_from_upper(P))

    def _sketch(self, m: int, like: Tensor) -> Tensor:
        """Omega (k x m) with N(0, 1/k) entries from the optimizer's own generator."""
        gen = self._generator(like.device)
        k = self.kalman_rank
        omega = torch.randn(k, m, generator=gen, dtype=like.dtype, device=like.device)
        return omega.mul_(1.0 / math.sqrt(k))

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._seed)
            self._generators[device] = gen
        return self._generators[device]

    def _extra_state(self) -> dict[str, Any]:
        return {"kalman_failures": self.kalman_failures,
                "rng": {str(d): g.get_state() for d, g in self._generators.items()}}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self.kalman_failures = int(extra.get("kalman_failures", 0))
        for dev, state in extra.get("rng", {}).items():
            device = torch.device(dev)
            if device.type == "cuda" and not torch.cuda.is_available():
                # a CUDA generator's state does not fit a CPU generator: on a machine without
                # CUDA the sketches continue from the CPU generator (its saved state or the seed)
                continue
            self._generator(device).set_state(state.cpu())
