"""K-FAC: d = P(g), P the damped Kronecker-factored inverse (docs/algorithms.md sections 1,
2, 4): the plain gradient, the Kronecker preconditioner, the diagonal Fisher."""
from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from grng.curvature.inverse import INVERSES, make_inverse
from grng.curvature.options import MAX_FACTOR_DIM
from grng.curvature.recurrent import recurrent_block_names
from grng.optim import device_defaults
from grng.optim import validation as check
from grng.optim.arguments import optimizer_classes, reject_unknown
from grng.optim.base import CurvatureOptimizer
from grng.precondition import DiagonalFisher, KroneckerPreconditioner


class KFAC(CurvatureOptimizer):
    """Kronecker-factored natural gradient (the rho = 0 member of the GRNG family).

    ``KFAC(model, lr, damping)`` then ``loss.backward(); opt.step()``, or ``opt.step(closure)``
    with a closure in torch.optim's convention (it zeroes the gradients, runs forward and
    backward and returns the loss, as for LBFGS). Factors A, G are updated every
    ``factor_every`` steps as M <- factor_decay M + (1 - factor_decay) M_batch (the first
    update sets M); inverses are refreshed every ``inverse_every`` steps with ``inverse`` =
    "eigen" (exact damping, (A (x) G + damping I)^-1), "newton" (Newton-Schulz, factored
    Tikhonov damping) or "cholesky" (the same damping by Cholesky). Unset, ``inverse``,
    ``inverse_every``, ``precision`` and ``factor_every`` take the defaults of the model's
    device: "eigen", 10, "fp32", 2 on the CPU (measured), "cholesky", 20, "tf32", 4 on CUDA
    (chosen from the cost model: :mod:`grng.optim.device_defaults`, docs/defaults.md).

    ``factor_dtype`` / ``inverse_dtype`` (None, torch.bfloat16, float32, float64) store the
    factors / inverses in that dtype (bf16 halves the curvature memory; arithmetic stays in
    float32 or wider). ``grad_scaler`` (a torch.amp.GradScaler) is needed only for the closure
    recipe or when ``scaler.unscale_(opt)`` precedes ``scaler.step(opt)``; ``scaler.step(opt)``
    alone works without it. ``max_grad_norm`` clips the gradient the step uses to that
    Euclidean norm (all parameters together). See docs/numerics.md. ``stagger_refresh=True``
    spreads the refreshes: each block still refreshes every ``inverse_every`` steps, but the
    blocks take turns, so a step refreshes about 1/``inverse_every`` of them instead of all of
    them every ``inverse_every``-th step (docs/performance.md). ``sync_free`` (default: True for
    a model on CUDA) takes steps that never read a tensor on the host: a non-finite step is
    skipped by device-side selects, counted in ``skipped_steps`` and warned a step late, "newton"/"cholesky"
    refreshes keep a failed factor's previous inverse on the device ("eigen" refreshes still
    synchronize: the eigensolver reports errors to the host); see docs/performance.md.
    ``precision`` ("fp32", "tf32", "bf16"): the arithmetic of the optimizer's own
    matmuls (TF32 tensor cores on CUDA; bf16 factors, inverses and application with float32
    accumulation); see :mod:`grng.optim.precision`.

    ``kl_clip`` (default 1e-3) scales the step so that lr^2 <d, g> <= kl_clip, a trust region
    in the curvature's norm; ``kl_clip=None`` turns it off. The default values were chosen by
    ``bench/defaults.py`` (docs/defaults.md).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.01,
        damping: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        factor_decay: float = 0.95,
        factor_every: int | None = None,
        inverse_every: int | None = None,
        inverse: str | None = None,
        kl_clip: float | None = 1e-3,
        backend: str = "auto",
        *,
        param_groups: Iterable[dict] | None = None,
        process_group: object = None,
        distributed_strategy: str = "comm-opt",
        factor_dtype: torch.dtype | None = None,
        inverse_dtype: torch.dtype | None = None,
        grad_scaler: object = None,
        max_grad_norm: float | None = None,
        max_factor_dim: int | None = MAX_FACTOR_DIM,
        stagger_refresh: bool = False,
        sync_free: bool | None = None,
        precision: str | None = None,
        _group_defaults: dict[str, float] | None = None,
        **unknown: object,
    ) -> None:
        reject_unknown(type(self), unknown, optimizer_classes())
        # None: the default of the model's device (grng.optim.device_defaults)
        chosen = (device_defaults.for_model(model) if isinstance(model, nn.Module)
                  else device_defaults.CPU)  # not a model: the base class says what to pass
        inverse = chosen.inverse if inverse is None else inverse
        inverse_every = chosen.inverse_every if inverse_every is None else inverse_every
        precision = chosen.precision if precision is None else precision
        factor_every = chosen.factor_every if factor_every is None else factor_every
        self.inverse_every = check.positive_int("inverse_every", inverse_every)
        self.stagger_refresh = check.boolean("stagger_refresh", stagger_refresh)
        strategy = make_inverse(check.choice("inverse", inverse, INVERSES))
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay,
                        kl_clip=kl_clip, **(_group_defaults or {}))
        super().__init__(model, defaults, factor_decay=factor_decay, factor_every=factor_every,
                         backend=backend, param_groups=param_groups, process_group=process_group,
                         distributed_strategy=distributed_strategy, factor_dtype=factor_dtype,
                         inverse_dtype=inverse_dtype, grad_scaler=grad_scaler,
                         max_grad_norm=max_grad_norm, max_factor_dim=max_factor_dim,
                         sync_free=sync_free, precision=precision)
        self._bind(KroneckerPreconditioner(self.config, strategy), DiagonalFisher(self.config))
        self._warn_unclipped_recurrent()

    def _warn_unclipped_recurrent(self) -> None:
        """One warning when a recurrent block's parameter group has ``kl_clip=None``: its G
        grows ~10^3 in the first steps, faster than the factors follow, and the unclipped step
        (lr / damping) g overshoots (docs/algorithms.md "Early training and the KL clip")."""
        unclipped = {id(p) for g in self.param_groups if g["kl_clip"] is None for p in g["params"]}
        names = recurrent_block_names([u.layer for u in self._blocks], unclipped)
        if names:
            warnings.warn(f"{type(self).__name__}: kl_clip=None for the recurrent blocks "
                          f"{', '.join(names)}: their first steps overshoot without the KL clip "
                          "(LSTM/GRU runs that diverge: docs/algorithms.md 'Early training and "
                          "the KL clip'); keep it on (the default kl_clip=1e-3)", stacklevel=3)

    @property
    def inverse(self):
        """The inverse strategy (eigen, newton or cholesky)."""
        return self.block.inverse

    def _inverse_due(self) -> list[bool]:
        """Block i every ``inverse_every`` steps, at phase 0 (all blocks in the same step) or,
        with ``stagger_refresh``, at phase floor(i T / L): about L / T blocks per step."""
        T, n = self.inverse_every, len(self._blocks)
        if not self.stagger_refresh:
            return [self._steps % T == 0] * n
        return [(self._steps + (i * T) // n) % T == 0 for i in range(n)]
