"""R-Kalman's preconditioner: Kalman-filtered Kronecker covariances (docs/algorithms.md
section 5). Per block it keeps P_A ~ A^-1 and P_G ~ G^-1, starting at I / prior_precision;
fold = one Kalman predict/update per factor with the (global) batch's observation; apply =
P_G V P_A (a diagonal P, kept as a vector, scales rows or columns). No d x d factor is ever inverted, solved with or eigendecomposed: only the k x k
innovation is factorized (:func:`grng.ops.kalman_update`). A dense P's observation is H = X
(sketched H = Omega X beyond ``kalman_rank`` rows, Omega k x m with N(0, 1/k) entries), with
noise r = n / ((1 - beta) s^2); a diagonal P takes the scalar update
p <- p- / (1 + p- (1 - beta) m), p- = p / beta + q. After each update the variance cap
(``max_variance``) scales row/column i by sqrt(cap / P_ii) where P_ii exceeds it.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from grng import ops
from grng.curvature.factors import Rows, sandwich
from grng.curvature.state import KalmanBlock
from grng.distributed.communicator import Communicator
from grng.ops.reference import symmetrize_from_upper
from grng.precondition.base import CurvatureConfig, Preconditioner, Unit, compute_dtype
from grng.precondition.kalman_observation import KalmanItem, Observation, global_observations


@dataclass(frozen=True)
class KalmanConfig:
    """prior precision (P_0 = I / prior_precision), process noise q, sketch rank k, variance
    cap (None: off) and the seed of the sketch generator."""

    prior_precision: float
    process_noise: float
    kalman_rank: int
    max_variance: float | None
    seed: int


def _stand_in(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A read-only tensor of ``shape`` in the block's dtype and device backed by one element:
    what a rank that does not hold a block passes for its P (the observation's plan reads only
    P's size, dtype and device)."""
    return torch.zeros(1, dtype=compute_dtype(like), device=like.device).expand(shape)


class KalmanPreconditioner(Preconditioner):
    """P_G V P_A with Kalman-updated covariance factors (module docstring)."""

    def __init__(self, config: CurvatureConfig, kalman: KalmanConfig) -> None:
        super().__init__(config)
        self.kalman = kalman
        self._failures = 0
        self._failures_on_device: Tensor | None = None
        self._generators: dict[torch.device, torch.Generator] = {}

    def new_state(self, unit_params, layer) -> KalmanBlock:
        return KalmanBlock()

    def init(self, unit: Unit) -> None:
        """P_A = P_G = I / prior_precision on first use."""
        block = unit.state
        if block.PA is not None:
            return
        kw = dict(dtype=compute_dtype(unit.like), device=unit.like.device)
        v = 1.0 / self.kalman.prior_precision
        block.PA = unit.layer.a_factor.identity(v, **kw)
        block.PG = unit.layer.g_factor.identity(v, **kw)

    def fold(self, units, comm: Communicator) -> None:
        items, targets = [], []
        for unit, rows in units:
            held = comm.holds(unit.index)  # else: sharded, another rank keeps this block
            if held:
                self.init(unit)
            a_rows, g_rows = rows if rows is not None else (None, None)
            for side, structure, r in (("PA", unit.layer.a_factor, a_rows),
                                       ("PG", unit.layer.g_factor, g_rows)):
                # a block-diagonal P: each group's block is filtered on that group's rows
                Ps = structure.blocks(getattr(unit.state, side) if held
                                      else _stand_in(structure.shape, unit.like))
                Xs = [None] * len(Ps) if r is None else structure.blocks(r.X)
                for P, X in zip(Ps, Xs):
                    rows = None if X is None else Rows(X, r.n, r.scale)
                    items.append(KalmanItem(structure.block_structure(), rows, P, unit.like))
                    targets.append(P if held else None)
        observations = global_observations(items, comm, self.config.factor_decay,
                                           self.kalman.kalman_rank, self.sketch)
        for P, obs in zip(targets, observations):
            if obs is not None and P is not None:
                self.observe(P, obs)

    def observe(self, P: Tensor, obs: Observation) -> None:
        """One Kalman update of P in place (then the cap); a failed innovation factorization
        keeps P (counted in ``failures``, warned)."""
        if obs.diag is not None:
            self.scalar_update(P, obs.diag)
            return
        if self.config.sync_free:
            ok = ops.kalman_update_masked(P, obs.H, obs.r, self.config.factor_decay,
                                          self.kalman.process_noise, backend=self.config.backend)
            failed = (~ok).to(torch.int64)
            self._failures_on_device = (failed if self._failures_on_device is None
                                        else self._failures_on_device + failed)
            self._cap(P)
            return
        try:  # the op leaves P untouched when it raises
            ops.kalman_update(P, obs.H, obs.r, self.config.factor_decay, self.kalman.process_noise,
                              backend=self.config.backend)
        except ops.FactorizationError as err:
            self._failures += 1
            warnings.warn(f"R-Kalman: innovation factorization failed ({err}); keeping the "
                          f"previous covariance ({self.failures} failures)", RuntimeWarning,
                          stacklevel=5)
            return
        self._cap(P)

    def scalar_update(self, P: Tensor, observed: Tensor) -> None:
        """p <- p- / (1 + p- (1 - beta) m), p- = p / beta + q: the elementwise Kalman update."""
        beta = self.config.factor_decay
        p_minus = P.div_(beta).add_(self.kalman.process_noise)
        p_minus.div_(1.0 + p_minus * observed.to(p_minus.dtype) * (1.0 - beta))
        if self.kalman.max_variance is not None:
            p_minus.clamp_(max=self.kalman.max_variance)

    @property
    def failures(self) -> int:
        """Innovation factorizations that failed (each kept the previous covariance); the
        sync-free step's count is a device tensor, read here (one host sync)."""
        on_device = 0 if self._failures_on_device is None else int(self._failures_on_device)
        return self._failures + on_device

    def _cap(self, P: Tensor) -> None:
        """P <- D P D, D_ii = min(1, sqrt(max_variance / P_ii)): bounds the variances (D = I,
        an exact no-op, where every P_ii is within the cap; no host read)."""
        cap = self.kalman.max_variance
        if cap is None:
            return
        s = (cap / P.diagonal().clamp(min=cap)).sqrt()
        P.mul_(s[:, None]).mul_(s[None, :])
        P.copy_(symmetrize_from_upper(P))

    def apply(self, unit, V, group) -> Tensor:
        """P_G V P_A (rho g is added by the shared update)."""
        self.init(unit)
        return sandwich(unit.layer.g_factor, unit.state.PG, V, unit.state.PA, unit.layer.a_factor)

    # ------------------------------------------------------------------------ sketch
    def sketch(self, m: int, like: Tensor) -> Tensor:
        """Omega (k x m) with N(0, 1/k) entries from the preconditioner's own generator."""
        k = self.kalman.kalman_rank
        omega = torch.randn(k, m, generator=self.generator(like.device), dtype=like.dtype,
                            device=like.device)
        return omega.mul_(1.0 / math.sqrt(k))

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.kalman.seed)
            self._generators[device] = gen
        return self._generators[device]

    # ------------------------------------------------------------------- checkpoints
    def expected_shapes(self, unit) -> dict[str, tuple[int, ...]]:
        return {"PA": unit.layer.a_factor.shape, "PG": unit.layer.g_factor.shape}

    def load(self, unit, tensors) -> None:
        unit.state.PA, unit.state.PG = tensors.get("PA"), tensors.get("PG")

    def extra_state(self) -> dict:
        """The failure count and the sketch generators' states (checkpointed)."""
        return {"kalman_failures": self.failures,
                "rng": {str(d): g.get_state() for d, g in self._generators.items()}}

    def load_extra_state(self, extra: dict) -> None:
        self._failures = int(extra.get("kalman_failures", 0))
        self._failures_on_device = None
        for dev, state in extra.get("rng", {}).items():
            device = torch.device(dev)
            if device.type == "cuda" and not torch.cuda.is_available():
                # a CUDA generator's state does not fit a CPU generator: on a machine without
                # CUDA the sketches continue from the CPU generator (its saved state or the seed)
                continue
            self.generator(device).set_state(state.cpu())
