"""Preconditioners of parameters without a Kronecker block (docs/algorithms.md section 4).

- :class:`DiagonalFisher`: D <- beta D + (1 - beta) g * g (first update sets it); direction
  g / (D + damping) (g until D exists).
- :class:`DiagonalKalman`: R-Kalman's elementwise variance p (prior 1 / prior_precision),
  p <- p- / (1 + p- (1 - beta) g * g), p- = p / beta + q, capped at ``max_variance``;
  direction p * g.

Both use the gradient as it is: under data parallelism DDP has already averaged it, so no
communication is needed.
"""
from __future__ import annotations

import torch
from torch import Tensor

from grng.curvature.state import DiagonalState
from grng.precondition.base import Preconditioner, compute_dtype
from grng.precondition.kalman import KalmanPreconditioner


class DiagonalFisher(Preconditioner):
    """Diagonal empirical Fisher EMA, stored in ``factor_dtype`` when set."""

    key = "D"

    def new_state(self, unit_params, layer) -> DiagonalState:
        return DiagonalState(self.key)

    def fold(self, units, comm) -> None:
        """D <- beta D + (1 - beta) g * g: the running states kept in their computing dtype in
        three multi-tensor ops per (device, dtype), the others (first folds, low-precision
        storage) one by one."""
        beta = self.config.factor_decay
        batches: dict[tuple, list[tuple[Tensor, Tensor]]] = {}
        for unit, _ in units:
            p = unit.like
            if p.grad is None:
                continue
            cur = unit.state.value
            if cur is not None and cur.dtype == compute_dtype(p) == p.grad.dtype:
                batches.setdefault((cur.device, cur.dtype), []).append((cur, p.grad))
                continue
            value = p.grad.to(compute_dtype(p)).square()
            storage = self.config.factor_dtype or value.dtype
            cur = unit.state.value
            if cur is None:
                unit.state.value = value.clone() if value.dtype == storage else value.to(storage)
            elif cur.dtype == value.dtype:
                cur.mul_(beta).add_(value, alpha=1.0 - beta)
            else:  # low-precision storage: blend in the value's (>= float32) dtype, store back
                unit.state.value = cur.to(value.dtype).mul_(beta).add_(value, alpha=1.0 - beta).to(storage)
        for pairs in batches.values():  # the same arithmetic as the loop, elementwise
            curs = [c for c, _ in pairs]
            squares = torch._foreach_mul([g for _, g in pairs], [g for _, g in pairs])
            torch._foreach_mul_(curs, beta)
            torch._foreach_add_(curs, squares, alpha=1.0 - beta)

    def apply(self, unit, V, group) -> Tensor:
        """g / (D + damping) (g until D exists)."""
        D = unit.state.value
        if D is None:
            return V
        return V / (D.to(compute_dtype(unit.like)) + group["damping"])

    def apply_many(self, items) -> list[Tensor]:
        """:meth:`apply` of each item; states kept in the gradient's dtype in two multi-tensor
        ops per (device, dtype, damping)."""
        out: list[Tensor | None] = [None] * len(items)
        batches: dict[tuple, list[int]] = {}
        for k, (unit, V, group) in enumerate(items):
            D = unit.state.value
            if D is not None and D.dtype == V.dtype == compute_dtype(unit.like):
                batches.setdefault((D.device, D.dtype, float(group["damping"])), []).append(k)
            else:
                out[k] = self.apply(unit, V, group)
        for (_, _, damping), ks in batches.items():
            denoms = torch._foreach_add([items[k][0].state.value for k in ks], damping)
            for k, d in zip(ks, torch._foreach_div([items[k][1] for k in ks], denoms)):
                out[k] = d
        return out  # type: ignore[return-value]

    def expected_shapes(self, unit) -> dict[str, tuple[int, ...]]:
        return {self.key: tuple(unit.like.shape)}

    def storage_dtype(self, unit, name) -> torch.dtype:
        return self.config.factor_dtype or compute_dtype(unit.like)

    def load(self, unit, tensors) -> None:
        unit.state.value = tensors.get(self.key)


class DiagonalKalman(Preconditioner):
    """R-Kalman's elementwise variances, sharing the block preconditioner's Kalman settings."""

    key = "PD"

    def __init__(self, kalman: KalmanPreconditioner) -> None:
        super().__init__(kalman.config)
        self.kalman = kalman

    def new_state(self, unit_params, layer) -> DiagonalState:
        return DiagonalState(self.key)

    def fold(self, units, comm) -> None:
        for unit, _ in units:
            p = unit.like
            if p.grad is None:
                continue
            if unit.state.value is None:
                unit.state.value = torch.full_like(p, 1.0 / self.kalman.kalman.prior_precision,
                                                   dtype=compute_dtype(p))
            self.kalman.scalar_update(unit.state.value, p.grad.to(unit.state.value.dtype).square())

    def apply(self, unit, V, group) -> Tensor:
        """p_D * g (the prior variance before the first update)."""
        if unit.state.value is None:
            return V / self.kalman.kalman.prior_precision
        return unit.state.value * V

    def expected_shapes(self, unit) -> dict[str, tuple[int, ...]]:
        return {self.key: tuple(unit.like.shape)}

    def load(self, unit, tensors) -> None:
        unit.state.value = tensors.get(self.key)
