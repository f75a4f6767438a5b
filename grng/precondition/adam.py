"""Adam's moments as a preconditioner's per-step state (docs/algorithms.md "EKFAC").

The per-step phase of EKFAC (block and diagonal alike):

    t <- t + 1,   m <- beta1 m + (1 - beta1) g,   v <- beta2 v + (1 - beta2) s

with s = g * g for a parameter without a block, or the squared projection of the gradient
matrix in the block's Kronecker eigenbasis; the direction is Adam's bias-corrected ratio

    (m' / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps),

m' being m (or its projection), or EKFAC's original (Fisher) ratio
(m' / (1 - beta1^t)) / (v / (1 - beta2^t) + damping). :class:`DiagonalAdam` is that
preconditioner for the parameters without a Kronecker block; the learning rate and decoupled
weight decay are the shared fused update's (with momentum 0: the first moment is here). The
gradient-regularization term relative to the step, d + rho_rel (||d|| / ||g||) g, is
:func:`with_relative_gr`. Units of one layout are updated and applied as one batch over
persistent stacks of their moments (:func:`batches`, :func:`stacked`).
"""
from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
from torch import Tensor

from grng import ops
from grng.curvature.stacks import Stacks
from grng.curvature.state import AdamMoments, StateView
from grng.precondition.base import CurvatureConfig, Preconditioner, Unit, compute_dtype


@dataclass(frozen=True)
class AdamSettings:
    """Adam's EMA decays (beta1: first moment, beta2: second) and the denominator's eps."""

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def advance(self, step: Tensor, m: Tensor, v: Tensor, g: Tensor, s: Tensor) -> None:
        """t <- t + 1, m <- beta1 m + (1 - beta1) g, v <- beta2 v + (1 - beta2) s, in place."""
        step.add_(1.0)
        m.mul_(self.beta1).add_(g, alpha=1.0 - self.beta1)
        v.mul_(self.beta2).add_(s, alpha=1.0 - self.beta2)

    def masked_step(self, step: Tensor, m: Tensor, v: Tensor, Vb: Tensor, ok: Tensor | None,
                    backend: str) -> Tensor:
        """Where ``ok`` (a device flag; None: always): t <- t + 1, m <- beta1 m + (1 - beta1) Vb,
        v <- beta2 v + (1 - beta2) Vb^2, in place; returns Adam's ratio of the moments as they
        end up (one ``adam_moments_masked`` call: nothing read on the host, nothing copied)."""
        ok = torch.ones((), dtype=torch.bool, device=Vb.device) if ok is None else ok
        step.add_(ok.to(step.dtype))
        bias1 = 1.0 - torch.pow(self.beta1, step)
        bias2 = (1.0 - torch.pow(self.beta2, step)).sqrt()
        return ops.adam_moments_masked(Vb, m, v, self.beta1, self.beta2, bias1, bias2, self.eps,
                                       ok, backend=backend)

    @staticmethod
    def start(state: StateView, g: Tensor, s: Tensor, first: str = "exp_avg") -> None:
        """Zero moments shaped as ``g`` and ``s`` and a zero count, on ``state`` (the first
        moment under the field ``first``)."""
        setattr(state, first, torch.zeros_like(g))
        state.exp_avg_sq = torch.zeros_like(s)
        state.step = torch.zeros((), dtype=g.dtype, device=g.device)

    def ratio(self, m: Tensor, v: Tensor, step: Tensor) -> Tensor:
        """(m / (1 - beta1^t)) / (sqrt(v) / sqrt(1 - beta2^t) + eps), t = ``step`` (a device
        scalar, or one per leading index of a stack: no host read)."""
        step = _leading(step, m)
        bias1 = 1.0 - torch.pow(self.beta1, step)
        bias2 = (1.0 - torch.pow(self.beta2, step)).sqrt()
        return (m / bias1) / (v.sqrt() / bias2 + self.eps)

    def fisher_ratio(self, m: Tensor, v: Tensor, step: Tensor, damping: float) -> Tensor:
        """(m / (1 - beta1^t)) / (v / (1 - beta2^t) + damping): EKFAC's original scaling, v
        the EMA of the Fisher's eigenvalue correction (no square root)."""
        step = _leading(step, m)
        bias1 = 1.0 - torch.pow(self.beta1, step)
        bias2 = 1.0 - torch.pow(self.beta2, step)
        return (m / bias1) / (v / bias2 + damping)


def _leading(step: Tensor, like: Tensor) -> Tensor:
    """``step`` (0-dim, or (L,) for a stack of L) shaped to broadcast over ``like``."""
    return step.reshape(step.shape + (1,) * (like.dim() - step.dim()))


def with_relative_gr(d: Tensor, g: Tensor, rho_rel: float, dims: int | None = None,
                     over_shards: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """d + rho_rel (||d|| / ||g||) g (docs/algorithms.md "EKFAC", gradient regularization): the
    GRNG term rho g with rho measured in the step's own scale, so the term is a fraction
    rho_rel of ||d||; norms over the last ``dims`` dimensions (None: all; a stack's leading
    dimension is its blocks), a zero g adds nothing; d itself for rho_rel = 0. With
    ``over_shards`` (d, g: this rank's shards of sharded parameters) the squared norms are
    summed over the ranks by it, so the norms are the whole parameters'."""
    if rho_rel == 0.0:
        return d
    over = tuple(range(d.dim() - (d.dim() if dims is None else dims), d.dim()))
    if over_shards is None:
        dn = torch.linalg.vector_norm(d, dim=over, keepdim=True)
        gn = torch.linalg.vector_norm(g, dim=over, keepdim=True)
    else:
        squares = torch.stack([(d * d).sum(dim=over, keepdim=True),
                               (g * g).to(d.dtype).sum(dim=over, keepdim=True)])
        dn, gn = over_shards(squares).sqrt().unbind(0)
    gn = gn.clamp_min(torch.finfo(g.dtype).tiny)
    return d + (rho_rel * dn / gn) * g.to(d.dtype)


def batches(units: list[Unit], layout: Callable[[Unit], Hashable | None],
            extra: Callable[[Unit], Hashable] = lambda unit: ()) -> list[list[Unit]]:
    """``units`` grouped by ``(layout(unit), extra(unit))``; a unit whose layout is None alone."""
    groups: dict[Hashable, list[Unit]] = {}
    out: list[list[Unit]] = []
    for unit in units:
        key = layout(unit)
        if key is None:
            out.append([unit])
        else:
            groups.setdefault((key, extra(unit)), []).append(unit)
    return out + list(groups.values())


def stacked(stacks: Stacks, batch: list[Unit], names: tuple[str, ...], out: StateView
            ) -> StateView:
    """``out`` holding each named field of the ``batch`` units as one (L, ...) stack kept
    between steps (the units' fields become the stack's slices; a field unset on the first
    unit stays unset); a batch of one: that unit's own state."""
    if len(batch) == 1:
        return batch[0].state
    ids = tuple(id(u.like) for u in batch)
    for name in names:
        fields = [getattr(u.state, name) for u in batch]
        if fields[0] is None:
            continue
        S, views = stacks.stack((name, ids), fields)
        for u, view in zip(batch, views):
            setattr(u.state, name, view)
        setattr(out, name, S)
    return out


def stack_of(tensors: list[Tensor]) -> Tensor:
    """One tensor as it is; several stacked on a new leading dimension."""
    return tensors[0] if len(tensors) == 1 else torch.stack(tensors)


class StepRatios:
    """What this step's update phase hands to the apply phase, per unit key: Adam's ratio N
    (``AdamSettings.masked_step``) and the gradient it was formed from, kept from the update's
    batched calls (a unit's tensors, or stacks with a unit per row), each taken once."""

    def __init__(self) -> None:
        self._of: dict[int, tuple[tuple[Tensor, ...], int | None]] = {}

    def clear(self) -> None:
        self._of.clear()

    def put(self, keys: list[int], *tensors: Tensor) -> None:
        """The tensors of the units ``keys`` (one unit's, or stacks with a unit per row)."""
        for k, key in enumerate(keys):
            self._of[key] = (tensors, None if len(keys) == 1 else k)

    def get(self, key: int, j: int) -> Tensor | None:
        """The ``j``-th tensor of unit ``key`` (its row of a stack), left in place; None when
        the unit has none."""
        got = self._of.get(key)
        if got is None:
            return None
        tensors, k = got
        return tensors[j] if k is None else tensors[j][k]

    def take(self, keys: list[int]) -> tuple[Tensor, ...] | None:
        """The tensors of these units, each as one tensor (stacked where several: the update's
        own stacks when it is the same batch), None when one unit has none."""
        got = [self._of.pop(key, None) for key in keys]
        if any(g is None for g in got):
            return None
        first = got[0][0]  # type: ignore[index]
        if len(keys) == 1:
            k = got[0][1]  # type: ignore[index]
            return first if k is None else tuple(t[k] for t in first)
        if all(ts is first and k == i for i, (ts, k) in enumerate(got)) \
                and len(first[0]) == len(keys):  # type: ignore[misc]
            return first
        return tuple(torch.stack([ts[j] if k is None else ts[j][k]  # type: ignore[index]
                                  for ts, k in got]) for j in range(len(first)))


class DiagonalAdam(Preconditioner):
    """Adam for a parameter without a Kronecker block: ``update`` writes the moments (the
    per-step fields of :class:`~grng.curvature.state.AdamMoments`, only where the device
    gate's flag says: ``adam_moments_masked``) and forms the ratio, which ``apply`` returns."""

    masks_per_step = True

    def __init__(self, config: CurvatureConfig, adam: AdamSettings,
                 over_shards: Callable[[Tensor], Tensor] | None = None) -> None:
        """``over_shards``: the sum over ranks of per-shard sums (the communicator's
        ``sum_over_shards``; None or the identity where parameters are whole)."""
        super().__init__(config)
        self.adam = adam
        self.over_shards = over_shards
        self.stacks = Stacks()
        self.ratios = StepRatios()

    def new_state(self, unit_params, layer) -> AdamMoments:
        return AdamMoments()

    def fold(self, units, comm) -> None:
        """No running statistics: Adam's moments are per-step state."""

    def needs_first_use(self, unit, folding) -> bool:
        """The step that creates the moments (a unit with a gradient and none yet)."""
        return unit.like.grad is not None and unit.state.step is None

    @staticmethod
    def _layout(unit: Unit) -> Hashable | None:
        """Units batch when their moments are started and share shape, dtype and device."""
        m = unit.state.exp_avg
        return None if unit.state.step is None else (tuple(m.shape), m.dtype, m.device)

    def _state(self, batch: list[Unit]) -> StateView:
        return stacked(self.stacks, batch, AdamMoments.PER_STEP, AdamMoments())

    def update(self, units, ok: Tensor | None = None) -> None:
        """Adam's moments of each unit (batched by layout), written only where ``ok``; the
        ratios kept for :meth:`apply_many`."""
        grads = {id(u.like): u.like.grad.to(compute_dtype(u.like)) for u in units}
        for unit in units:
            if unit.state.step is None:
                g = grads[id(unit.like)]
                self.adam.start(unit.state, g, g)
        self.ratios.clear()
        for batch in batches(units, self._layout):
            g = stack_of([grads[id(u.like)] for u in batch])
            st = self._state(batch)
            self.ratios.put([id(u.like) for u in batch], self.adam.masked_step(
                st.step, st.exp_avg, st.exp_avg_sq, g, ok, self.config.backend), g)

    def apply(self, unit, V, group) -> Tensor:
        return self.apply_many([(unit, V, group)])[0]

    def apply_many(self, items) -> list[Tensor]:
        """The ratio (with the relative GR term) of each (unit, p.grad, group); units of one
        layout and one group's rho_rel in one batched call."""
        at = {id(unit): k for k, (unit, _, _) in enumerate(items)}
        out: list[Tensor | None] = [None] * len(items)
        for batch in batches([unit for unit, _, _ in items], self._layout,
                             lambda unit: items[at[id(unit)]][2].get("rho_rel", 0.0)):
            ks = [at[id(u)] for u in batch]
            st = self._state(batch)
            kept = self.ratios.take([id(u.like) for u in batch])
            if kept is None:  # no update this step (an apply on its own): the stored moments
                g = stack_of([items[k][1] for k in ks])
                N = self.adam.ratio(st.exp_avg, st.exp_avg_sq, st.step)
            else:  # the update's ratio and gradient (stack)
                N, g = kept
            D = with_relative_gr(N, g,
                                 items[ks[0]][2].get("rho_rel", 0.0),
                                 dims=g.dim() - (len(batch) > 1), over_shards=self.over_shards)
            for k, d in zip(ks, D.unbind(0) if len(batch) > 1 else [D]):
                out[k] = d
        return out  # type: ignore[return-value]

    def expected_shapes(self, unit) -> dict[str, tuple[int, ...]]:
        shape = tuple(unit.like.shape)
        return {"exp_avg": shape, "exp_avg_sq": shape, "step": ()}

    def load(self, unit, tensors) -> None:
        st = unit.state
        st.exp_avg, st.exp_avg_sq, st.step = (tensors.get(k) for k in st.PER_STEP)
