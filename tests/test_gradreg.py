"""Gradient regularization: F-GR / B-GR / DB / SAM agree with the math, restore state exactly."""
from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

from grng import make_closure
from grng.optim.gradreg import GradReg, flood, regularized_gradient

MODES = ("forward", "backward", "exact", "sam")


# ----------------------------------------------------------------------------- helpers


def _quadratic(n: int = 12) -> tuple[list[Tensor], Callable[[], Tensor], Tensor, Tensor]:
    """L = 0.5 x^T A x - b^T x over x = concat(flattened params), float64, A SPD."""
    m = torch.randn(n, n, dtype=torch.float64)
    a = m @ m.T / n + torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, dtype=torch.float64)
    params = [
        torch.randn(6, dtype=torch.float64, requires_grad=True),
        torch.randn(2, 3, dtype=torch.float64, requires_grad=True),
    ]

    def closure() -> Tensor:
        x = torch.cat([p.reshape(-1) for p in params])
        return 0.5 * x @ a @ x - b @ x

    return params, closure, a, b


def _flat(tensors: list[Tensor]) -> Tensor:
    """concat of flattened tensors."""
    return torch.cat([t.reshape(-1) for t in tensors])


def _grad_at(params: list[Tensor], closure: Callable[[], Tensor], shift: Tensor) -> Tensor:
    """Flat g(theta + shift) by hand, evaluated with each param's data swapped for theta + shift."""
    saved = [p.data for p in params]
    shifts = torch.split(shift, [p.numel() for p in params])
    for p, s in zip(params, shifts):
        p.data = p.data + s.view_as(p)
    try:
        g = torch.autograd.grad(closure(), params)
    finally:
        for p, s in zip(params, saved):
            p.data = s
    return _flat(list(g))


def _mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    """Small MLP with curved nonlinearities (nonzero Hessian) and one unused parameter."""
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Softplus(), nn.Linear(6, 1))
    model = model.to(dtype)
    model.unused = nn.Parameter(torch.randn(3, dtype=dtype))
    return model


def _mlp_closure(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    """Closure returning the MSE loss (no backward)."""
    return lambda: (model(x).squeeze(-1) - y).pow(2).mean()


class CountingContext:
    """A probe_context factory that counts entries and knows whether it is active."""

    def __init__(self) -> None:
        self.entries = 0
        self.active = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        self.entries += 1
        self.active = True
        try:
            yield
        finally:
            self.active = False


# ----------------------------------------------------------------------------- the math


@pytest.mark.parametrize("mode", ["forward", "backward", "exact"])
def test_quadratic_all_modes_equal_g_plus_gamma_A_g(mode: str) -> None:
    params, closure, a, b = _quadratic()
    gamma, eps = 0.3, 1e-2
    loss = regularized_gradient(params, make_closure(params, closure), gamma, eps, mode)
    x = _flat([p.detach() for p in params])
    g = a @ x - b
    expected = g + gamma * a @ g
    assert torch.allclose(_flat([p.grad for p in params]), expected, rtol=0, atol=1e-10)
    assert torch.allclose(loss, 0.5 * x @ a @ x - b @ x, rtol=0, atol=1e-12)
    assert not loss.requires_grad


def test_quadratic_modes_agree_with_each_other() -> None:
    params, closure, _, _ = _quadratic()
    results = []
    for mode in ("forward", "backward", "exact"):
        regularized_gradient(params, make_closure(params, closure), 0.7, 1e-3, mode)
        results.append(_flat([p.grad for p in params]))
    for r in results[1:]:
        assert torch.allclose(r, results[0], rtol=0, atol=1e-10)


def test_forward_with_gamma_equal_epsilon_is_unnormalized_sam() -> None:
    model = _mlp(torch.float64)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    closure = _mlp_closure(model, x, y)
    params = [p for p in model.parameters() if p is not model.unused]
    eps = 0.05
    g = _grad_at(params, closure, torch.zeros(sum(p.numel() for p in params), dtype=torch.float64))
    expected = _grad_at(params, closure, eps * g)
    regularized_gradient(params, make_closure(params, closure), eps, eps, "forward")
    assert torch.allclose(_flat([p.grad for p in params]), expected, rtol=0, atol=1e-12)


def test_sam_is_gradient_at_normalized_ascent_point() -> None:
    model = _mlp(torch.float64)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    closure = _mlp_closure(model, x, y)
    params = [p for p in model.parameters() if p is not model.unused]
    rho = 0.1
    g = _grad_at(params, closure, torch.zeros(sum(p.numel() for p in params), dtype=torch.float64))
    expected = _grad_at(params, closure, rho * g / g.norm())
    regularized_gradient(params, make_closure(params, closure), 123.0, rho, "sam")  # gamma is unused by SAM
    assert torch.allclose(_flat([p.grad for p in params]), expected, rtol=0, atol=1e-12)


def test_sam_zero_gradient_returns_zero_gradient() -> None:
    p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    regularized_gradient([p], make_closure([p], lambda: (p**2).sum()), 0.0, 0.1, "sam")
    assert torch.equal(p.grad, torch.zeros(4, dtype=torch.float64))
    assert torch.equal(p, torch.zeros(4, dtype=torch.float64))


def test_mlp_finite_differences_converge_to_double_backprop() -> None:
    """Off a quadratic, F-GR and B-GR are O(eps) from DB, with opposite leading errors."""
    model = _mlp(torch.float64)
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randn(32, dtype=torch.float64)
    closure = _mlp_closure(model, x, y)
    params = list(model.parameters())

    def reg(mode: str, eps: float) -> Tensor:
        regularized_gradient(params, make_closure(params, closure), 0.5, eps, mode)
        return _flat([p.grad for p in params if p.grad is not None])

    exact = reg("exact", 1.0)
    err = {eps: (reg("forward", eps) - exact).norm() for eps in (1e-3, 5e-4)}
    assert err[1e-3] < 1e-2 * exact.norm()
    assert 0.4 < err[5e-4] / err[1e-3] < 0.6  # first order in eps
    central = (reg("forward", 1e-3) + reg("backward", 1e-3)) / 2
    assert (central - exact).norm() < 0.01 * err[1e-3]


# ----------------------------------------------------------------------------- exact restoration


@pytest.mark.parametrize("mode", MODES)
def test_params_bit_identical_and_unused_param_untouched(mode: str) -> None:
    model = _mlp()
    x, y = torch.randn(16, 5), torch.randn(16)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, 7.0)  # stale gradients are discarded
    regularized_gradient(params, make_closure(params, _mlp_closure(model, x, y)), 0.2, 1e-2, mode)
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    assert model.unused.grad is None
    for p in params:
        if p is not model.unused:
            assert p.grad is not None and torch.isfinite(p.grad).all()
            assert not torch.equal(p.grad, torch.full_like(p, 7.0))


def test_requires_grad_false_param_gets_no_grad() -> None:
    model = _mlp()
    model[0].bias.requires_grad_(False)
    model[0].bias.grad = torch.ones(8)
    closure = _mlp_closure(model, torch.randn(4, 5), torch.randn(4))
    regularized_gradient(list(model.parameters()), make_closure(model, closure), 0.1, 0.01, "forward")
    assert model[0].bias.grad is None


@pytest.mark.parametrize("mode", ["forward", "exact", "sam"])
def test_gradreg_step_equals_base_step_on_regularized_gradient(mode: str) -> None:
    model_a = _mlp()
    model_b = copy.deepcopy(model_a)
    x, y = torch.randn(16, 5), torch.randn(16)
    base_a = torch.optim.SGD(model_a.parameters(), lr=0.05, momentum=0.9)
    opt_a = GradReg(base_a, gamma=0.1, epsilon=0.02, mode=mode)
    params_b = list(model_b.parameters())
    opt_b = torch.optim.SGD(params_b, lr=0.05, momentum=0.9)
    for _ in range(3):
        loss_a = opt_a.step(make_closure(opt_a, _mlp_closure(model_a, x, y)))
        loss_b = regularized_gradient(params_b, make_closure(params_b, _mlp_closure(model_b, x, y)), 0.1, 0.02, mode)
        opt_b.step()
        assert torch.equal(loss_a, loss_b)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)


def test_forward_gradient_matches_hand_formula_on_mlp() -> None:
    model = _mlp(torch.float64)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    closure = _mlp_closure(model, x, y)
    params = [p for p in model.parameters() if p is not model.unused]
    gamma, eps = 0.4, 0.03
    g = _grad_at(params, closure, torch.zeros(sum(p.numel() for p in params), dtype=torch.float64))
    expected = (1 - gamma / eps) * g + (gamma / eps) * _grad_at(params, closure, eps * g)
    regularized_gradient(params, make_closure(params, closure), gamma, -eps, "forward")  # the sign of epsilon is the mode's
    assert torch.allclose(_flat([p.grad for p in params]), expected, rtol=0, atol=1e-11)
    expected_b = (1 + gamma / eps) * g - (gamma / eps) * _grad_at(params, closure, -eps * g)
    regularized_gradient(params, make_closure(params, closure), gamma, eps, "backward")
    assert torch.allclose(_flat([p.grad for p in params]), expected_b, rtol=0, atol=1e-11)


# ----------------------------------------------------------------------------- BatchNorm


def _bn_model() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))


@pytest.mark.parametrize("mode", MODES)
def test_batchnorm_stats_updated_once_with_model(mode: str) -> None:
    model = _bn_model()
    reference = copy.deepcopy(model)
    x, y = torch.randn(32, 5), torch.randn(32)
    reference(x)  # one plain training-mode forward at theta
    opt = GradReg(torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.5, epsilon=0.1, mode=mode, model=model)
    opt.step(make_closure(opt, _mlp_closure(model, x, y)))
    bn, ref = model[1], reference[1]
    assert int(bn.num_batches_tracked) == 1
    assert torch.equal(bn.running_mean, ref.running_mean)
    assert torch.equal(bn.running_var, ref.running_var)


def test_batchnorm_without_model_updates_twice() -> None:
    model = _bn_model()
    opt = GradReg(torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.5, epsilon=0.1)
    opt.step(make_closure(opt, _mlp_closure(model, torch.randn(32, 5), torch.randn(32))))
    assert int(model[1].num_batches_tracked) == 2


# ----------------------------------------------------------------------------- training, schedulers, state


def _digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data[:300], dtype=torch.float32) / 16.0
    return x, torch.tensor(data.target[:300])


@pytest.mark.parametrize(
    ("make_base", "mode"),
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9), "forward"),
        (lambda ps: torch.optim.SGD(ps, lr=0.5), "backward"),
        (lambda ps: torch.optim.AdamW(ps, lr=1e-2), "exact"),
        (lambda ps: torch.optim.AdamW(ps, lr=1e-2), "sam"),
    ],
)
def test_training_on_digits_decreases_loss(make_base: Callable, mode: str) -> None:
    x, y = _digits()
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = GradReg(make_base(model.parameters()), gamma=0.05, epsilon=0.05, mode=mode, model=model)
    closure = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
    first = opt.step(make_closure(opt, closure))
    for _ in range(49):
        last = opt.step(make_closure(opt, closure))
    assert torch.isfinite(last) and last < 0.5 * first


def test_step_lr_scheduler_changes_wrapper_and_base_lr() -> None:
    model = _mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = GradReg(base, gamma=0.1, epsilon=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(make_closure(opt, _mlp_closure(model, torch.randn(8, 5), torch.randn(8))))
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert base.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.param_groups is base.param_groups and opt.state is base.state


def test_zero_grad_through_wrapper() -> None:
    model = _mlp()
    opt = GradReg(torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.1, epsilon=0.01)
    opt.step(make_closure(opt, _mlp_closure(model, torch.randn(8, 5), torch.randn(8))))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_state_dict_round_trip() -> None:
    model_a = _mlp()
    x, y = torch.randn(16, 5), torch.randn(16)
    base_a = torch.optim.AdamW(model_a.parameters(), lr=1e-2)
    opt_a = GradReg(base_a, gamma=0.2, epsilon=0.03, mode="backward")
    for _ in range(3):
        opt_a.step(make_closure(opt_a, _mlp_closure(model_a, x, y)))
    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)  # a real checkpoint: torch's state_dict aliases live state tensors
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["gradreg"] == {"gamma": 0.2, "epsilon": 0.03, "mode": "backward"}

    model_b = copy.deepcopy(model_a)
    base_b = torch.optim.AdamW(model_b.parameters(), lr=1.0)
    opt_b = GradReg(base_b, gamma=0.0, epsilon=1.0, mode="forward")
    opt_b.load_state_dict(state)
    assert (opt_b.gamma, opt_b.epsilon, opt_b.mode) == (0.2, 0.03, "backward")
    assert opt_b.param_groups is base_b.param_groups and opt_b.state is base_b.state
    assert opt_b.param_groups[0]["lr"] == 1e-2
    opt_a.step(make_closure(opt_a, _mlp_closure(model_a, x, y)))
    opt_b.step(make_closure(opt_b, _mlp_closure(model_b, x, y)))
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)


# ----------------------------------------------------------------------------- probe_context


@pytest.mark.parametrize("mode", MODES)
def test_probe_context_entered_exactly_for_probe(mode: str) -> None:
    model = _mlp()
    x, y = torch.randn(8, 5), torch.randn(8)
    ctx = CountingContext()
    closure_calls: list[bool] = []
    backward_calls: list[bool] = []

    def closure() -> Tensor:
        closure_calls.append(ctx.active)
        h = model[0](x)
        h.register_hook(lambda grad: backward_calls.append(ctx.active))
        return (model[1:](h).squeeze(-1) - y).pow(2).mean()

    regularized_gradient(list(model.parameters()), make_closure(model, closure), 0.1, 0.01, mode, probe_context=ctx)
    assert ctx.entries == 1 and not ctx.active
    if mode == "exact":
        assert closure_calls == [False]
        assert backward_calls == [False, True]  # the Hessian-vector pass runs inside the context
    else:
        assert closure_calls == [False, True]
        assert backward_calls == [False, True]


def test_gradreg_uses_base_curvature_paused() -> None:
    ctx = CountingContext()

    class PausingSGD(torch.optim.SGD):
        def curvature_paused(self) -> contextlib.AbstractContextManager[None]:
            return ctx()

    model = _mlp()
    opt = GradReg(PausingSGD(model.parameters(), lr=0.1), gamma=0.1, epsilon=0.01, mode="forward")
    opt.step(make_closure(opt, _mlp_closure(model, torch.randn(8, 5), torch.randn(8))))
    opt.step(make_closure(opt, _mlp_closure(model, torch.randn(8, 5), torch.randn(8))))
    assert ctx.entries == 2


def test_gamma_zero_skips_probe_and_gives_plain_gradient() -> None:
    params, closure, a, b = _quadratic()
    ctx = CountingContext()
    for mode in ("forward", "backward", "exact"):
        regularized_gradient(params, make_closure(params, closure), 0.0, 0.1, mode, probe_context=ctx)
        plain = a @ _flat([p.detach() for p in params]) - b
        assert torch.allclose(_flat([p.grad for p in params]), plain, rtol=0, atol=1e-12)
    assert ctx.entries == 0


def test_params_restored_when_probe_raises() -> None:
    p = torch.randn(5, requires_grad=True)
    before = p.detach().clone()
    calls = []

    def closure() -> Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("probe failed")
        return (p**3).sum()

    with pytest.raises(RuntimeError, match="probe failed"):
        regularized_gradient([p], make_closure([p], closure), 0.1, 0.5, "forward")
    assert torch.equal(p, before)


# ----------------------------------------------------------------------------- validation


def _sgd() -> torch.optim.Optimizer:
    return torch.optim.SGD(_mlp().parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"gamma": -0.1, "epsilon": 0.1}, "gamma"),
        ({"gamma": float("nan"), "epsilon": 0.1}, "gamma"),
        ({"gamma": 0.1, "epsilon": 0.0}, "epsilon"),
        ({"gamma": 0.1, "epsilon": float("inf")}, "epsilon"),
        ({"gamma": 0.1, "epsilon": 0.1, "mode": "central"}, "mode"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        GradReg(_sgd(), **kwargs)
    p = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match=name):
        regularized_gradient([p], p.sum, kwargs["gamma"], kwargs["epsilon"], kwargs.get("mode", "forward"))


def test_base_optimizer_must_be_an_optimizer() -> None:
    with pytest.raises(TypeError, match="base_optimizer"):
        GradReg([torch.randn(3, requires_grad=True)], gamma=0.1, epsilon=0.1)  # type: ignore[arg-type]


def test_step_requires_closure() -> None:
    opt = GradReg(_sgd(), gamma=0.1, epsilon=0.1)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(TypeError, match="closure"):
        opt.step(1.0)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- flooding


def test_flood_value_and_gradient_sign() -> None:
    w = torch.tensor(2.0, requires_grad=True)
    above = flood(w**2, 1.0)  # L = 4 > b
    assert above.item() == pytest.approx(4.0)
    (g_above,) = torch.autograd.grad(above, w)
    assert g_above.item() == pytest.approx(4.0)

    v = torch.tensor(0.5, requires_grad=True)
    below = flood(v**2, 1.0)  # L = 0.25 < b: |0.25 - 1| + 1 = 1.75, gradient flipped
    assert below.item() == pytest.approx(1.75)
    (g_below,) = torch.autograd.grad(below, v)
    assert g_below.item() == pytest.approx(-1.0)


def test_flood_rejects_negative_level() -> None:
    with pytest.raises(ValueError, match="b"):
        flood(torch.tensor(1.0), -0.1)
    with pytest.raises(ValueError, match="flood level b"):
        flood(torch.tensor(1.0), -0.1)


def test_deepcopy_keeps_sharing_with_copied_base() -> None:
    model = _mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = GradReg(base, gamma=0.1, epsilon=0.01, mode="sam", model=model)
    clone = copy.deepcopy(opt)
    assert clone.param_groups is clone.base_optimizer.param_groups
    assert clone.state is clone.base_optimizer.state
    assert clone.base_optimizer is not opt.base_optimizer and (clone.gamma, clone.mode) == (0.1, "sam")


def test_first_order_passes_accumulate_into_grad() -> None:
    """F-GR/B-GR/SAM take gradients from the closure's backward(), so accumulate-grad hooks
    (DDP's all-reduce) run; a leaf outside params is the closure's business, and only the params'
    .grad are replaced by the regularized gradient."""
    model = _mlp()
    fired = []
    model[0].weight.register_post_accumulate_grad_hook(lambda p: fired.append(1))
    other = torch.randn(3, requires_grad=True)

    def closure() -> Tensor:
        return (model(torch.randn(4, 5)) ** 2).mean() + (other**2).sum()

    regularized_gradient(list(model.parameters()), make_closure(model, closure), 0.1, 0.01, "forward")
    assert len(fired) == 2
    assert all(p.grad is not None for p in model.parameters() if p is not model.unused)
