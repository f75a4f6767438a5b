"""The step pipeline's phases and gate (docs/architecture.md "Phases and the gate").

A preconditioner with per-step state (an RMS preconditioner: an EMA of g * g and a step count,
written by its ``update`` phase) is bound into a small optimizer here, with no edit of the
pipeline: a skipped step (non-finite gradient, or a non-finite direction after the update
phase) must leave that state bit for bit as it was, on the host path and on the sync-free
path, and the normal steps must update it. ``needs_first_use`` decides which path a sync-free
step takes.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import grng
from grng.curvature.state import StateView
from grng.optim.base import CurvatureOptimizer
from grng.precondition.base import Preconditioner, Unit

BETA = 0.9


@dataclass(eq=False)
class MomentState(StateView):
    """Per-step state only: v (EMA of g * g, the gradient's layout) and t (steps taken)."""

    PER_STEP = ("v", "t")

    v: Tensor | None = None
    t: Tensor | None = None

    def tensors(self) -> dict[str, Tensor]:
        return {k: x for k, x in (("v", self.v), ("t", self.t)) if x is not None}


def gradient(unit: Unit) -> Tensor | None:
    """A block's gradient matrix V, or a diagonal unit's p.grad."""
    return unit.layer.grad_matrix() if unit.layer is not None else unit.like.grad


class RMSPreconditioner(Preconditioner):
    """update: v <- beta v + (1 - beta) g * g, t <- t + 1;
    apply: V / (sqrt(v / (1 - beta^t)) + damping)."""

    poison = False  # a test switch: apply returns NaN (a non-finite direction)

    def new_state(self, unit_params, layer) -> MomentState:
        return MomentState()

    def fold(self, units, comm) -> None:
        """No statistics."""

    def needs_first_use(self, unit, folding) -> bool:
        """The step that creates v and t (a unit with a gradient and no moments yet)."""
        return unit.like.grad is not None and unit.state.v is None

    def update(self, units) -> None:
        for unit in units:
            g = gradient(unit)
            if unit.state.v is None:
                unit.state.v = torch.zeros_like(g)
                unit.state.t = torch.zeros((), dtype=torch.int64, device=g.device)
            unit.state.v.mul_(BETA).add_(g * g, alpha=1.0 - BETA)
            unit.state.t.add_(1)

    def apply(self, unit, V, group) -> Tensor:
        v, t = unit.state.v, unit.state.t
        D = V / ((v / (1.0 - BETA ** t.to(v.dtype))).sqrt() + group["damping"])
        return D * float("nan") if self.poison else D

    def expected_shapes(self, unit) -> dict[str, tuple[int, ...]]:
        v = unit.layer.dims() if unit.layer is not None else tuple(unit.like.shape)
        return {"v": tuple(v), "t": ()}

    def load(self, unit, tensors) -> None:
        unit.state.v, unit.state.t = tensors.get("v"), tensors.get("t")


class RMSOptimizer(CurvatureOptimizer):
    """The pipeline with the RMS preconditioner for the blocks and the other parameters."""

    def __init__(self, model: nn.Module, sync_free: bool, lr: float = 0.01) -> None:
        defaults = dict(lr=lr, damping=1e-3, momentum=0.9, weight_decay=0.0, kl_clip=None)
        super().__init__(model, defaults, factor_decay=0.95, factor_every=1, backend="auto",
                         sync_free=sync_free)
        rms = RMSPreconditioner(self.config)
        self._bind(rms, rms)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.LayerNorm(9), nn.Tanh(), nn.Linear(9, 3, bias=False))


def _step(model: nn.Module, opt: CurvatureOptimizer, seed: int, poison: bool = False,
          seen: list[dict[int, Tensor]] | None = None) -> None:
    """One step on batch ``seed`` (NaN loss and gradients if ``poison``); ``seen`` gets each
    unit's gradient (V or p.grad) as the step saw it."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) * (float("nan") if poison else 1.0)
        loss.backward()
        if seen is not None:
            seen.append({id(u.state): gradient(u).clone() for u, _ in opt._curvature_units()})
        return loss

    opt.step(closure)


def _per_step(opt: CurvatureOptimizer) -> list[dict[str, Tensor]]:
    """Every unit's per-step fields (cloned)."""
    return [{k: t.clone() for k, t in u.state.per_step().items()}
            for u, _ in opt._curvature_units()]


def _same(a: list[dict[str, Tensor]], b: list[dict[str, Tensor]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


@pytest.mark.parametrize("sync_free", [False, True])
def test_normal_steps_update_the_per_step_state(sync_free: bool) -> None:
    """v is the EMA of the gradients the steps saw and t counts them, for blocks and the
    diagonal parameters; the steps move the parameters."""
    model = _model()
    opt = RMSOptimizer(model, sync_free=sync_free)
    start = [p.detach().clone() for p in model.parameters()]
    seen: list[dict[int, Tensor]] = []
    for t in range(4):
        _step(model, opt, t, seen=seen)
    units = [u for u, _ in opt._curvature_units()]
    assert len(units) == 4  # two blocks, LayerNorm's weight and bias
    for unit in units:
        v = torch.zeros_like(seen[0][id(unit.state)])
        for grads in seen:
            v = v * BETA + grads[id(unit.state)].square() * (1.0 - BETA)
        torch.testing.assert_close(unit.state.v, v, rtol=1e-6, atol=0.0)
        assert int(unit.state.t) == 4
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), start))
    assert opt.skipped_steps == 0 and opt.steps == 4


@pytest.mark.parametrize("sync_free", [False, True])
def test_host_and_sync_free_paths_take_the_same_steps(sync_free: bool) -> None:
    """The per-step phase runs in the same place on both paths (float32 rounding apart)."""
    out = []
    for free in (False, sync_free):
        model = _model()
        opt = RMSOptimizer(model, sync_free=free)
        for t in range(5):
            _step(model, opt, t)
        out.append(([p.detach() for p in model.parameters()], _per_step(opt)))
    for p, q in zip(out[0][0], out[1][0]):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    for a, b in zip(out[0][1], out[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=0.0)


def _expect_skip(host: bool) -> contextlib.AbstractContextManager:
    """The host path warns at once; the sync-free path counts on the device and warns later."""
    return pytest.warns(RuntimeWarning, match="step skipped") if host else contextlib.nullcontext()


def _expect_late_warning(device: bool) -> contextlib.AbstractContextManager:
    """The step after a sync-free skip hears of it (on CPU the count's copy has landed)."""
    return (pytest.warns(RuntimeWarning, match="skipped on the device") if device
            else contextlib.nullcontext())


@pytest.mark.parametrize("sync_free", [False, True])
def test_a_non_finite_gradient_leaves_the_per_step_state(sync_free: bool) -> None:
    """A NaN loss and gradient: per-step fields, parameters and momentum bit for bit as they
    were; the skip is counted; the next step updates the state again."""
    model = _model()
    opt = RMSOptimizer(model, sync_free=sync_free)
    for t in range(3):
        _step(model, opt, t)
    state, params = _per_step(opt), [p.detach().clone() for p in model.parameters()]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    with _expect_skip(host=not sync_free):
        _step(model, opt, 3, poison=True)
    assert _same(_per_step(opt), state)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], m)
               for p, m in zip(model.parameters(), momentum))
    assert opt.skipped_steps == 1
    with _expect_late_warning(sync_free):
        _step(model, opt, 4)
    assert all(int(s["t"]) == 4 for s in _per_step(opt))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("at", [0, 3])
@pytest.mark.parametrize("sync_free", [False, True])
def test_a_non_finite_direction_after_the_update_leaves_the_per_step_state(
        sync_free: bool, at: int) -> None:
    """Finite inputs, so the update phase runs, but the direction is NaN: the per-step fields
    are put back as they were (at step 0: unset again), the parameters are unchanged."""
    model = _model()
    opt = RMSOptimizer(model, sync_free=sync_free)
    for t in range(at):
        _step(model, opt, t)
    state, params = _per_step(opt), [p.detach().clone() for p in model.parameters()]
    opt.block.poison = True
    host = not sync_free or at == 0  # the step creating the moments takes the host path
    with _expect_skip(host):
        _step(model, opt, at)
    opt.block.poison = False
    assert _same(_per_step(opt), state)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert opt.skipped_steps == 1
    with _expect_late_warning(not host):
        _step(model, opt, at + 1)
    assert all(int(s["t"]) == at + 1 for s in _per_step(opt))


def _gate_of_a_skipped_step(opt: CurvatureOptimizer, step: Callable[[], None]) -> str:
    """Which gate skipped a poisoned step: 'host' (counted on the host) or 'device'."""
    host, device = opt.counters.skipped, opt._skipped_device_count()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        step()
    if opt.counters.skipped == host + 1:
        return "host"
    assert opt._skipped_device_count() == device + 1
    return "device"


def test_needs_first_use_drives_the_host_or_device_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sync-free step takes the host path when the preconditioner says a unit's first use
    is due (no old value to select on the device), the device path otherwise."""
    model = _model()
    opt = RMSOptimizer(model, sync_free=True)
    asked: list[bool] = []
    answer = RMSPreconditioner.needs_first_use

    def spy(self, unit, folding):
        asked.append(answer(self, unit, folding))
        return asked[-1]

    monkeypatch.setattr(RMSPreconditioner, "needs_first_use", spy)
    assert _gate_of_a_skipped_step(opt, lambda: _step(model, opt, 0, poison=True)) == "host"
    assert any(asked)  # no moments yet: the first use
    _step(model, opt, 1)
    asked.clear()
    assert _gate_of_a_skipped_step(opt, lambda: _step(model, opt, 2, poison=True)) == "device"
    assert asked and not any(asked)
    monkeypatch.setattr(RMSPreconditioner, "needs_first_use", lambda self, unit, folding: True)
    assert _gate_of_a_skipped_step(opt, lambda: _step(model, opt, 3, poison=True)) == "host"


def test_kronecker_first_use_is_rows_into_a_new_block_or_factors_without_an_inverse() -> None:
    """K-FAC's answer: folding rows into a block without factors, or a block with factors and
    no inverse yet; a block with both, or without rows this step, needs nothing."""
    model = _model()
    opt = grng.KFAC(model, lr=0.05, inverse="newton", sync_free=True)
    unit = opt._blocks[0]
    assert opt.block.needs_first_use(unit, folding=True)
    assert not opt.block.needs_first_use(unit, folding=False)
    _step(model, opt, 0)
    assert unit.state.inverse is not None
    assert not opt.block.needs_first_use(unit, folding=True)
    unit.state.inverse = None  # e.g. a checkpoint without inverses
    assert opt.block.needs_first_use(unit, folding=False)
    diagonal = opt._diagonal_unit(model[1].weight)
    assert not opt.diagonal.needs_first_use(diagonal, folding=True)  # has its D


def test_the_per_step_state_is_checkpointed() -> None:
    """The per-step fields travel in the state dict like any curvature tensor."""
    model = _model()
    opt = RMSOptimizer(model, sync_free=False)
    for t in range(2):
        _step(model, opt, t)
    other = RMSOptimizer(_model(), sync_free=False)
    other.load_state_dict(opt.state_dict())
    assert _same(_per_step(other), _per_step(opt))
