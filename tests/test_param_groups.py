"""Param groups as LLM codebases write them, and the schedulers that edit them (issue 24):
decay / no-decay groups split a Kronecker block's weight and bias; a list of groups in the
model's place says what to pass; OneCycleLR's momentum cycling is refused where the optimizer
was built without momentum; ``step()`` without gradients changes nothing."""
from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from grng import KFAC, RENG, RING, RKalman, make_closure
from grng.optim.cases import CASES, optimizer_factory

F64 = torch.float64


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3)).to(F64)


def _data(seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 6, generator=g, dtype=F64)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def _decay_groups(model: nn.Module, **bias_group: float) -> list[dict]:
    """Weights (ndim >= 2) weight_decay=0.1; biases and norms 0.0 (the LLM recipe); the
    Linear biases in a group of their own with ``bias_group``'s extra hyperparameters."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    biases = [model[0].bias, model[3].bias]
    norms = list(model[1].parameters())
    return [{"params": decay, "weight_decay": 0.1},
            {"params": biases, "weight_decay": 0.0, **bias_group},
            {"params": norms, "weight_decay": 0.0}]


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "kfac": optimizer_factory("kfac-eigen", lr=0.1, damping=0.05, inverse_every=1),
    "ring": optimizer_factory("ring", lr=0.1, damping=0.05, rho=0.1, inverse_every=1),
    "reng": optimizer_factory("reng-forward", lr=0.1, damping=0.05, rho=0.05, epsilon=0.01,
                              inverse_every=1),
    "rkalman": optimizer_factory("rkalman", lr=0.1, rho=0.1, kalman_rank=4),
}


def _step(opt: torch.optim.Optimizer, model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float(opt.step(make_closure(opt, lambda: F.cross_entropy(model(x), y))))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_decay_and_no_decay_groups_are_accepted(name: str) -> None:
    """The blocks are those of one group; a step moves the weights as one group with
    weight_decay=0.1 and the biases and norms as one group with 0.0 (the block's direction is
    computed jointly, each group's hyperparameters applied per parameter; the damping of the
    blocks' bias group is not used: a block takes its weight's group's); training then lowers
    the loss."""
    make = OPTIMIZERS[name]
    x, y = _data()
    split, decayed, plain = _model(), _model(), _model()
    extra = {} if name == "rkalman" else {"damping": 123.0}  # R-Kalman has no damping
    opt = make(split, param_groups=_decay_groups(split, **extra), kl_clip=None)
    decayed_opt = make(decayed, weight_decay=0.1, kl_clip=None)
    plain_opt = make(plain, weight_decay=0.0, kl_clip=None)
    assert opt.coverage().blocks() == plain_opt.coverage().blocks() == ["0", "3"]
    for o, m in ((opt, split), (decayed_opt, decayed), (plain_opt, plain)):
        _step(o, m, x, y)
    for (n, p), q, r in zip(split.named_parameters(), decayed.parameters(), plain.parameters()):
        expected = q if p.ndim >= 2 else r
        assert torch.equal(p, expected), n
    assert not torch.equal(decayed[0].weight, plain[0].weight)  # the decay did something
    losses = [_step(opt, split, x, y) for _ in range(10)]
    assert all(torch.isfinite(p).all() for p in split.parameters())
    assert losses[-1] < 0.8 * losses[0], losses


def test_decay_groups_with_the_default_kl_clip_train() -> None:
    """kl_clip (default) is applied per group, as it always was: the split run trains."""
    model = _model()
    x, y = _data()
    opt = KFAC(model, lr=0.1, damping=0.05, param_groups=_decay_groups(model))
    losses = [_step(opt, model, x, y) for _ in range(12)]
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("cls", [CASES[c].build for c in ("kfac-eigen", "ring", "reng-forward",
                                                            "rkalman")])
def test_param_groups_in_the_model_place_say_what_to_pass(cls: type) -> None:
    model = _model()
    with pytest.raises(TypeError, match=r"model first.*param_groups=\["):
        cls([{"params": list(model.parameters())}])
    with pytest.raises(TypeError, match="param_groups="):
        cls(model.parameters())
    with pytest.raises(TypeError, match="got int$"):
        cls(3)


# ------------------------------------------------------------------------------- OneCycleLR
def test_one_cycle_momentum_on_a_momentum_free_rkalman_is_refused() -> None:
    """OneCycleLR(cycle_momentum=True) writes momentum 0.85-0.95 into every group: R-Kalman,
    built with momentum=0, refuses to step (parameters unchanged) and says what to pass;
    with cycle_momentum=False it trains; with momentum > 0 the cycling is allowed."""
    x, y = _data()
    model = _model()
    opt = RKalman(model, lr=0.05, rho=0.1, kalman_rank=4)
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"momentum=0.*cycle_momentum=False"):
        _step(opt, model, x, y)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))

    model = _model()
    opt = RKalman(model, lr=0.05, rho=0.1, kalman_rank=4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20,
                                                cycle_momentum=False)
    losses = []
    for _ in range(20):
        losses.append(_step(opt, model, x, y))
        sched.step()
    assert opt.param_groups[0]["momentum"] == 0.0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.8 * losses[0], losses

    model = _model()
    opt = RKalman(model, lr=0.05, rho=0.1, kalman_rank=4, momentum=0.5)
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20)
    _step(opt, model, x, y)
    assert opt.steps == 1


# ------------------------------------------------------------------------ no gradients
@pytest.mark.parametrize("sync_free", [False, True])
def test_step_without_gradients_is_a_warned_no_op(sync_free: bool) -> None:
    """step() with no gradient: a RuntimeWarning, no step counted, nothing changed; the next
    real step is the run's first (bit-identical to an optimizer that never saw the empty one)."""
    x, y = _data()
    model, twin = _model(), _model()
    opt = KFAC(model, lr=0.1, damping=0.05, factor_every=2, inverse_every=3, sync_free=sync_free)
    ref = KFAC(twin, lr=0.1, damping=0.05, factor_every=2, inverse_every=3, sync_free=sync_free)
    model(x)  # a forward without backward leaves captured rows only
    state = copy.deepcopy(opt.state_dict())
    with pytest.warns(RuntimeWarning, match="no parameter has a gradient.*did not advance"):
        assert opt.step() is None
    assert opt.steps == 0 and opt.skipped_steps == 0
    assert str(opt.state_dict()) == str(state)
    for _ in range(4):
        _step(opt, model, x, y)
        _step(ref, twin, x, y)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert opt.steps == ref.steps == 4
