"""The gate of the step pipeline (docs/architecture.md "Phases and the gate"): what happens to a
step whose inputs or direction are not finite.

The pipeline (:meth:`grng.optim.base.CurvatureOptimizer.step`) runs fold -> refresh -> update ->
apply -> fused update once, asking its gate at each point where a step can fail:

- :class:`HostGate` reads each finite flag on the host (``comm.all_true``, one sync agreed
  across ranks) and ends a failed step early (``skip_step``);
- :class:`DeviceGate` (``sync_free``) never reads a flag: it runs every stage and selects
  new = where(ok, new, old) on the device, counting a skip in a device tensor.

What a skipped step must leave as it was: the folded statistics and the inverses of the blocks
due (the device gate keeps them, or, where the communicator ``masks_folds``, has the Kronecker
factors folded only where its flag says so: ``comm.masked_folds``; the host gate skips before
the fold), and each unit's
per-step fields (``StateView.PER_STEP``, written by a preconditioner's ``update`` phase), which
both gates keep (the device gate also before the refresh of a block due, which may carry them
into a new basis), except those of a preconditioner that ``masks_per_step`` (EKFAC's Adam
moments, through ``adam_moments_masked``): no copy of them on either gate; the device gate hands
it its flag, and a step refused after the update phase (a non-finite direction from finite
inputs) keeps their advance on both gates alike; a state type that declares none costs nothing.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ContextManager, Protocol

import torch
from torch import Tensor

from grng import ops
from grng.curvature.state import StateView
from grng.finite import all_finite, finite_flag
from grng.ops import masked
from grng.precondition.base import Unit

#: (state, name -> tensor as it was) of each state a step may change
Kept = list[tuple[StateView, dict[str, Tensor]]]
#: (group, its parameters with a gradient, their momentum buffers or None) per param group
Groups = Iterator[tuple[dict[str, Any], list[Tensor], list[Tensor] | None]]


class GatedOptimizer(Protocol):
    """What a gate needs of the curvature optimizer (grng.optim.base.CurvatureOptimizer)."""

    backend: str
    comm: Any
    counters: Any  # grng.optim.base.StepCounters

    def skip_step(self, why: str, warn: bool = True) -> None: ...


def keep_per_step(units: Iterable[Unit]) -> Kept:
    """A copy of the per-step fields of every unit whose state declares some."""
    return [(u.state, {k: t.clone() for k, t in u.state.per_step().items()})
            for u in units if u.state.PER_STEP]


def select(kept: Kept, ok: Tensor) -> None:
    """Each kept tensor <- where(ok, now, kept) on the device (in place where the dtype is
    unchanged, so a batched block keeps its slice of a stack)."""
    for st, old in kept:
        for k, t in st.items():
            if k in old:
                if t.dtype == old[k].dtype:
                    t.copy_(torch.where(ok, t, old[k]))
                else:
                    st.replace(k, masked.select(ok, t, old[k]))


def put_back(kept: Kept) -> None:
    """Each kept per-step field as it was (in place where it can be; a field set since the
    copy is unset again)."""
    for st, old in kept:
        now = st.per_step()
        for k in now.keys() - old.keys():
            st.replace(k, None)
        for k, t in old.items():
            cur = now.get(k)
            if cur is not None and cur.dtype == t.dtype and cur.shape == t.shape:
                cur.copy_(t)
            else:
                st.replace(k, t)


def _update_args(comm: Any, group: dict[str, Any], gparams: list[Tensor],
                 bufs: list[Tensor] | None, directions: dict[int, Tensor]) -> tuple:
    """The positional arguments of ``fused_update`` for one param group, as this rank applies
    them (``comm.update_arguments``: unchanged unless parameters are sharded)."""
    return comm.update_arguments(
        gparams, [p.grad for p in gparams], [directions[id(p)] for p in gparams], bufs,
        group["lr"], group["momentum"], group["weight_decay"], group.get("rho", 0.0),
        group["kl_clip"])


class HostGate:
    """Read each finite flag on the host; a failed check skips the step (warned, counted)."""

    def __init__(self, opt: GatedOptimizer) -> None:
        self.opt = opt
        self.per_step: Kept = []

    def admit(self, flag: Tensor | None, reason: Callable[[], str], warn: bool) -> bool:
        """Whether the step's inputs are finite on every rank (else skipped: ``reason()``)."""
        if self.opt.comm.all_true(flag is None or bool(flag)):
            return True
        self.opt.skip_step(reason(), warn=warn)
        return False

    def keep_statistics(self, blocks: list[Unit], due: Sequence[bool], diagonal: list[Unit],
                        fold: bool) -> None:
        """Nothing to keep: a non-finite input ended the step before the fold."""

    def folding(self) -> ContextManager[Any]:
        """The fold's context: nothing (a non-finite input ended the step before the fold)."""
        return contextlib.nullcontext()

    def restore_statistics(self) -> None:
        """Nothing to restore (see :meth:`keep_statistics`)."""

    def keep_per_step(self, units: Iterable[Unit]) -> None:
        """Copy the per-step fields before the update phase writes them (of the units whose
        preconditioner does not ``masks_per_step``: as on the device gate)."""
        self.per_step = keep_per_step(units)

    def per_step_flag(self) -> Tensor | None:
        """None: the update phase runs only on finite inputs; a skip puts the copies back."""
        return None

    def accept(self, directions: dict[int, Tensor]) -> bool:
        """Whether every direction is finite (else the per-step fields are put back, skipped)."""
        if self.opt.comm.all_true_sharded(all_finite(directions.values())):
            return True
        self._skip("non-finite preconditioned direction")
        return False

    def commit(self, groups: Groups, directions: dict[int, Tensor]) -> bool:
        """One ``fused_update`` per param group; False if a backend found a non-finite d + rho g."""
        for group, gparams, bufs in groups:
            if not ops.fused_update(*_update_args(self.opt.comm, group, gparams, bufs, directions),
                                    backend=self.opt.backend):
                # unreachable after accept() unless a backend disagrees
                self._skip("non-finite combined direction")
                return False
        return True

    def _skip(self, why: str) -> None:
        put_back(self.per_step)
        self.opt.skip_step(why)


class DeviceGate:
    """Select on the device: ok is a device flag; a skipped step is counted in
    ``counters.skipped_on_device`` and warned a step or two late (``counters.report``)."""

    def __init__(self, opt: GatedOptimizer, owner: str, device: torch.device) -> None:
        self.opt = opt
        self.owner = owner
        self.device = device
        self.ok: Tensor
        self.statistics: Kept = []
        self.per_step: Kept = []

    def admit(self, flag: Tensor | None, reason: Callable[[], str], warn: bool) -> bool:
        """ok <- the inputs' flag on the device, agreed across ranks; the step always goes on
        (``reason`` and ``warn`` are the host gate's)."""
        ok = torch.ones((), dtype=torch.bool, device=self.device) if flag is None else flag
        self.ok = self.opt.comm.all_true_flag(ok.to(self.device))
        return True

    def keep_statistics(self, blocks: list[Unit], due: Sequence[bool], diagonal: list[Unit],
                        fold: bool) -> None:
        """Copy what fold and refresh may change: the whole state of the blocks ``due`` (with
        its per-step fields, which a refresh may carry into a new basis: EKFAC), the folded
        statistics of the other units on a ``fold`` step; no copy of the folded fields the
        communicator folds only where ok (:meth:`folding`)."""
        masks = self.opt.comm.masks_folds
        changing = [(u.state, now) for u, now in zip(blocks, due)]
        changing += [(u.state, False) for u in diagonal]
        self.statistics = []
        for st, now in changing:
            fields = st.items() if now else st.folded().items() if fold else ()
            masked = st.FOLDED if masks and st.FOLDS_THROUGH_COMMUNICATOR else ()
            self.statistics.append((st, {k: t.clone() for k, t in fields if k not in masked}))

    def folding(self) -> ContextManager[Any]:
        """The fold's context: the communicator folds only where ok (when it can)."""
        return self.opt.comm.masked_folds(self.ok)

    def restore_statistics(self) -> None:
        """A skipped step leaves the statistics and inverses as they were."""
        select(self.statistics, self.ok)

    def keep_per_step(self, units: Iterable[Unit]) -> None:
        """Copy the per-step fields before the update phase writes them (of the units whose
        preconditioner does not mask its update by :meth:`per_step_flag`)."""
        self.per_step = keep_per_step(units)

    def per_step_flag(self) -> Tensor | None:
        """The inputs' flag, for a preconditioner that writes its per-step fields only where it
        is True (``masks_per_step``): no copy of them. A step skipped later (a non-finite
        direction or update) keeps their advance, finite since the inputs were."""
        return self.ok

    def accept(self, directions: dict[int, Tensor]) -> bool:
        """ok <- ok and every direction finite; the step always goes on."""
        # directions of sharded parameters: agreed across ranks (None: nothing to check here)
        flag = self.opt.comm.all_true_sharded_flag(finite_flag(directions.values()))
        self.ok = self.ok if flag is None else self.ok & flag
        return True

    def commit(self, groups: Groups, directions: dict[int, Tensor]) -> bool:
        """One ``fused_update_masked`` per param group (nothing written where not ok); the
        per-step fields selected on the result; a skip counted on the device."""
        applied = self.ok
        for group, gparams, bufs in groups:
            applied = applied & ops.fused_update_masked(
                *_update_args(self.opt.comm, group, gparams, bufs, directions), self.ok,
                backend=self.opt.backend)
        select(self.per_step, applied)
        skipped = (~applied).to(torch.int64)
        counters = self.opt.counters
        counters.skipped_on_device = (skipped if counters.skipped_on_device is None
                                      else counters.skipped_on_device + skipped)
        if not torch.compiler.is_compiling():  # a compiled step stays one graph; eager ones warn
            counters.report.poll(counters.skipped_on_device, self.owner)
        return True
