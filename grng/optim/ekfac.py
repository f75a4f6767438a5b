"""EKFAC: Adam in K-FAC's Kronecker eigenbasis (docs/algorithms.md "EKFAC"): the plain
gradient, the eigenbasis preconditioner, Adam for the parameters without a block."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from grng.curvature.factors import Rows
from grng.curvature.options import MAX_FACTOR_DIM
from grng.optim import device_defaults
from grng.optim import validation as check
from grng.optim.arguments import optimizer_classes, reject_unknown
from grng.optim.base import CurvatureOptimizer
from grng.precondition.adam import AdamSettings, DiagonalAdam
from grng.precondition.base import Unit
from grng.precondition.eigenbasis import BASES, CARRIES, QRS, SCALINGS, EigenbasisPreconditioner


def _betas(betas: tuple[float, float]) -> tuple[float, float]:
    """ValueError naming ``betas`` unless it is a pair in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(
            isinstance(b, (int, float)) and 0.0 <= float(b) < 1.0 for b in betas):
        raise ValueError(f"betas must be a pair (beta1, beta2) in [0, 1), got {betas!r}")
    return float(betas[0]), float(betas[1])


#: the refresh warmup's schedules: a refresh at every warmup step, or geometric gaps
WARMUP_SCHEDULES = ("every", "geometric")
#: the geometric schedule's growth rate r when ``refresh_warmup_growth`` is None (the default
#: schedule: 19 refreshes in a 30-step warmup; bench/results/ekfac_growth_screen.md,
#: ekfac_time_growth.md)
GEOMETRIC_GROWTH = 0.1


def warmup_refresh_due(step: int, warmup: int, schedule: str,
                       growth: float | None = None) -> bool:
    """Whether step ``step`` < ``warmup`` refreshes the bases: every such step (``"every"``), or
    (``"geometric"``) s_0 = 0, s_(k+1) = s_k + max(1, ceil(r s_k)) with r = ``growth`` (None:
    :data:`GEOMETRIC_GROWTH`; in float64, as ``math.ceil(r * s)``): 0, 1, ..., 11, 13, 15, 17,
    19, 21, 24, 27 below 30 at r = 0.1; 0, 1, 2, 3, 4, 6, 8, 11, 15, 20, 26 at r = 0.3. The
    sequence is walked one gap size at a time (a run of equal gaps is one arithmetic jump), so
    the work is O(log step) for a fixed r; nothing is stored."""
    if step >= warmup:
        return False
    if schedule == "every":
        return True
    growth = GEOMETRIC_GROWTH if growth is None else growth
    s = 0
    while s < step:
        gap = max(1, math.ceil(growth * s))
        # s + j gap keeps this gap while growth (s + j gap) <= gap, which is monotone in j
        ahead = -(-(step - s) // gap)  # the first j with s + j gap >= step
        if growth * (s + (ahead - 1) * gap) <= gap:
            return (step - s) % gap == 0
        last = min(ahead - 2, max(0, int((gap / growth - s) // gap)))  # the run's last j
        while last > 0 and growth * (s + last * gap) > gap:
            last -= 1
        while growth * (s + (last + 1) * gap) <= gap:
            last += 1
        s += (last + 1) * gap  # the first point with a larger gap
    return s == step


def _warmup_growth(growth: float | None, schedule: str) -> float | None:
    """``refresh_warmup_growth`` checked: None or a finite number > 0, and None unless the
    schedule is "geometric" (under "every" it would be ignored: a ValueError naming both)."""
    growth = check.optional_positive("refresh_warmup_growth", growth)
    if growth is not None and schedule != "geometric":
        raise ValueError(f"refresh_warmup_growth={growth!r} sets the gaps of "
                         "refresh_warmup_schedule='geometric'; it has no effect with "
                         f"refresh_warmup_schedule={schedule!r}")
    return growth


class EKFAC(CurvatureOptimizer):
    """Adam whose second moment lives in each block's Kronecker eigenbasis (eigenvalue-
    corrected K-FAC with Adam's scaling, as SOAP does with Shampoo's factors).

    ``EKFAC(model, lr)`` then ``loss.backward(); opt.step()`` (or ``opt.step(closure)``).
    Per step, for a block with gradient matrix V and factor eigenbases Q_G, Q_A:
    P = Q_G^T V Q_A, m_b <- beta1 m_b + (1 - beta1) P, v <- beta2 v + (1 - beta2) P^2 and
    d = Q_G [(m_b / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)] Q_A^T,
    d' = d + rho_rel (||d|| / ||V||) V (below); then theta <- (1 - lr weight_decay) theta - lr d'
    (AdamW's decoupled decay). Both moments live in the eigenbasis; a change of basis rotates
    the first exactly, m_b <- (Q_G,new^T Q_G,old) m_b (Q_A,old^T Q_A,new), so m_b is always
    Q_G^T m Q_A for m the EMA of V (grng 0.3.0 kept m itself; its checkpoints load). Parameters
    without a Kronecker block (norms, lone biases) take AdamW with the same betas and eps.

    Factors A, G are K-FAC's, folded at every step of the refresh warmup (below) and then every
    ``factor_every`` steps (F; the default per device below; every step with
    ``scaling="fisher"``); ``factor_decay`` is per step, so a fold k steps after the previous one
    decays by factor_decay^k: A <- beta^k A + (1 - beta^k) A_batch, and the EMA spans the same
    steps at any F (:meth:`fold_gap`; a fold every F steps at decay 0.95 instead lost steps to
    target, bench/results/ekfac_intervals5.md).
    The bases are refreshed densely in the first ``refresh_warmup`` steps (default 30: the
    factors, and so the bases, move most there; bench/results/hf_lm_diagnosis.md): with
    ``refresh_warmup_schedule="geometric"`` (the default) at s_0 = 0,
    s_(k+1) = s_k + max(1, ceil(r s_k)), r = ``refresh_warmup_growth`` (default None: 0.1, so
    steps 0-11, 13, 15, 17, 19, 21, 24, 27; 0.3 gives 0, 1, 2, 3, 4, 6, 8, 11, 15, 20, 26), or at
    each of them with "every" (the default before; 11 more refreshes in the first 125 steps,
    more time to 3.7 bpc on the demo transformer for the same steps:
    bench/results/ekfac_growth_screen.md, ekfac_time_growth.md, ekfac_warmup_screen.md), then
    every ``inverse_every`` steps: by eigh at a block's first refresh, then
    (``basis="subspace"``, the default) by one step of warm-started subspace iteration
    Q <- orth(M Q_prev) (a GEMM and a QR; eigh only where that is not finite), or by eigh every
    time (``basis="eigh"``); ``qr`` says how the step orthonormalizes: "householder" (default)
    or "cholesky" (shifted CholeskyQR3 of the column-normalized M Q_prev in float64: GEMMs and
    triangular solves; where a Cholesky fails, the QR's fallback). ``carry`` says how the
    second moment follows a new basis: "reproject" (default: v <- (Q_new^T Q_old)^2 v
    ((Q_A,new^T Q_A,old)^2)^T) or "keep" (v as it is: fewer steps on the recurrent LMs,
    bench/results/recurrent_ekfac_keep.md; more on the Hugging Face models at step 100 and the
    digits CNN, hf_lm.md and ekfac_carry.md).
    ``scaling="fisher"`` is EKFAC's original scaling (George et al. 2018): v is the EMA of the
    Fisher's eigenvalue correction (the per-row squared projections (Q_G^T g_r)^2 (Q_A^T a_r)^2
    of the captured rows; it needs ``factor_every=1``, and under a process group the comm-opt
    strategy) and the ratio is m_hat / (v / (1 - beta2^t) + ``damping``), no square root
    (``damping`` is unused with Adam's scaling). ``rho_rel`` (default 0.2) is the GRNG term relative to the step:
    d + rho_rel (||d|| / ||g||) g per block (per parameter without one), a GR term whose norm
    is the fraction rho_rel of the step's (0: plain Adam in the eigenbasis). ``kl_clip``
    (default None, Adam has none) is the shared update's.
    The default lr (1e-2) is the one the defaults sweep picked on the demo's three tasks
    (bench/results/defaults_ekfac.csv); betas (0.9, 0.95), rho_rel 0.2 and Adam's scaling are
    what bench/results/ekfac_scaling.md and ekfac_gr.md picked (docs/algorithms.md "EKFAC") for
    the language models; on small vision models (the digits MLP and CNN) ``scaling="fisher"``
    reaches a target accuracy in fewer steps (bench/results/ekfac_fisher.md; README's table).
    ``factor_every``, ``inverse_every``, ``precision`` and ``qr`` default per device
    (:mod:`grng.optim.device_defaults`): on the CPU F = 3, T = 10, fp32 and Householder (as
    measured: F = 3 kept F = 1's steps to target and losses on the demo's tasks and the Hugging
    Face models, bench/results/ekfac_factor_every.md); on CUDA the cost model's choice (TF32,
    CholeskyQR3, F = 4, T = 100: docs/performance.md "EKFAC's CUDA defaults").
    The other keywords (``factor_dtype``, ``inverse_dtype`` for the bases, ``grad_scaler``,
    ``max_grad_norm``, ``max_factor_dim``, ``sync_free``, ``precision``, ``process_group``,
    ``distributed_strategy``) are K-FAC's.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        factor_decay: float = 0.95,
        factor_every: int | None = None,
        inverse_every: int | None = None,
        basis: str = "subspace",
        carry: str = "reproject",
        kl_clip: float | None = None,
        backend: str = "auto",
        *,
        refresh_warmup: int = 30,
        refresh_warmup_schedule: str = "geometric",
        refresh_warmup_growth: float | None = None,
        scaling: str = "adam",
        qr: str | None = None,
        damping: float = 1e-3,
        rho_rel: float = 0.2,
        param_groups: Iterable[dict] | None = None,
        process_group: object = None,
        distributed_strategy: str = "comm-opt",
        factor_dtype: torch.dtype | None = None,
        inverse_dtype: torch.dtype | None = None,
        grad_scaler: object = None,
        max_grad_norm: float | None = None,
        max_factor_dim: int | None = MAX_FACTOR_DIM,
        sync_free: bool | None = None,
        precision: str | None = None,
        **unknown: object,
    ) -> None:
        reject_unknown(type(self), unknown, optimizer_classes())
        # None: the default of the model's device (grng.optim.device_defaults)
        chosen = (device_defaults.ekfac_for_model(model) if isinstance(model, nn.Module)
                  else device_defaults.EKFAC_CPU)
        if factor_every is None:  # the fisher scaling reads the rows every step
            factor_every = 1 if scaling == "fisher" else chosen.factor_every
        inverse_every = chosen.inverse_every if inverse_every is None else inverse_every
        precision = chosen.precision if precision is None else precision
        qr = chosen.qr if qr is None else qr
        self.inverse_every = check.positive_int("inverse_every", inverse_every)
        self.refresh_warmup = check.non_negative_int("refresh_warmup", refresh_warmup)
        self.refresh_warmup_schedule = check.choice("refresh_warmup_schedule",
                                                    refresh_warmup_schedule, WARMUP_SCHEDULES)
        self.refresh_warmup_growth = _warmup_growth(refresh_warmup_growth,
                                                    self.refresh_warmup_schedule)
        adam = AdamSettings(*_betas(betas), check.non_negative("eps", eps))
        check.choice("basis", basis, BASES)
        check.choice("carry", carry, CARRIES)
        check.choice("scaling", scaling, SCALINGS)
        check.choice("qr", qr, QRS)
        if scaling == "fisher" and factor_every != 1:
            raise ValueError("scaling='fisher' reads the captured rows every step: it needs "
                             f"factor_every=1, got factor_every={factor_every!r}")
        defaults = dict(lr=lr, momentum=0.0, weight_decay=weight_decay, kl_clip=kl_clip,
                        damping=damping, rho_rel=check.non_negative("rho_rel", rho_rel))
        super().__init__(model, defaults, factor_decay=factor_decay, factor_every=factor_every,
                         backend=backend, param_groups=param_groups, process_group=process_group,
                         distributed_strategy=distributed_strategy, factor_dtype=factor_dtype,
                         inverse_dtype=inverse_dtype, grad_scaler=grad_scaler,
                         max_grad_norm=max_grad_norm, max_factor_dim=max_factor_dim,
                         sync_free=sync_free, precision=precision)
        if scaling == "fisher" and getattr(self.comm, "strategy", None) == "mem-opt":
            self.capture.remove()
            raise ValueError("scaling='fisher' needs every rank to hold every block's bases (its "
                             "ranks' corrections are averaged in them): use "
                             "distributed_strategy='comm-opt', not 'mem-opt' (under FSDP2, "
                             "where a block's bases live on its owner only: scaling='adam')")
        for group in self.param_groups:
            check.non_negative("rho_rel", group["rho_rel"])
            if group["momentum"] != 0.0:
                self.capture.remove()
                raise ValueError("momentum must be 0 in every param group of EKFAC (its first "
                                 f"moment is Adam's, betas[0]); got {group['momentum']!r}")
        self.adam = adam
        self._bind(EigenbasisPreconditioner(self.config, adam, basis, carry, scaling, qr),
                   DiagonalAdam(self.config, adam, self.comm.sum_over_shards
                                if self.comm.shards_parameters else None))

    def refresh_due(self, step: int) -> bool:
        """Whether step ``step`` refreshes the bases: the warmup's refresh steps
        (:func:`warmup_refresh_due`: geometric gaps by default), then every ``inverse_every``."""
        if step < self.refresh_warmup:
            return warmup_refresh_due(step, self.refresh_warmup, self.refresh_warmup_schedule,
                                      self.refresh_warmup_growth)
        return step % self.inverse_every == 0

    def _inverse_due(self) -> list[bool]:
        """Every block at :meth:`refresh_due` of this step (all in the same step)."""
        return [self.refresh_due(self._steps)] * len(self._blocks)

    def _fold_due(self, step: int) -> bool:
        """Every step of the refresh warmup (the bases follow the factors there), then every
        ``factor_every`` steps."""
        return step < self.refresh_warmup or step % self.factor_every == 0

    def fold_gap(self, step: int) -> int:
        """Steps since the fold before the one at ``step`` (1 at the first fold): the fold
        decays the factors by ``factor_decay ** fold_gap(step)``, so their EMA spans the same
        steps whatever ``factor_every``."""
        return next(k for k in range(1, self.factor_every + 1)
                    if step - k < 0 or self._fold_due(step - k))

    def _fold_blocks(self, units: list[tuple[Unit, tuple[Rows, Rows] | None]]) -> None:
        """A <- beta^k A + (1 - beta^k) A_batch (G likewise), k = :meth:`fold_gap`, beta =
        ``factor_decay``."""
        self.block.fold(units, self.comm, decay=self.factor_decay ** self.fold_gap(self._steps))
