"""torch.optim's closure convention (CHANGELOG 0.2.0): the closure zeroes, runs forward and
backward and returns the loss; None or no closure uses the gradients present; a 0.1-style
forward-only closure gets a clear error; two-pass methods call it twice; unknown keywords and
max_grad_norm."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import grng
from grng import make_closure
from grng.optim.cases import make_optimizer, optimizer_factory
from grng.testing import classification_batches, small_mlp

F64 = torch.float64


def _torch_closure(opt, model, x, y, calls=None):
    def closure():
        if calls is not None:
            calls.append(1)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("make", [
    optimizer_factory("kfac-eigen", lr=0.1, damping=0.05, inverse_every=1),
    optimizer_factory("ring", lr=0.1, damping=0.05, rho=0.1),
    optimizer_factory("rkalman", lr=0.1, rho=0.1),
])
def test_closure_step_equals_backward_then_step(make) -> None:
    """opt.step(closure) with a torch closure is exactly zero_grad; backward; step()."""
    torch.manual_seed(0)
    m1 = small_mlp()
    m2 = copy.deepcopy(m1)
    o1, o2 = make(m1), make(m2)
    for x, y in classification_batches(3):
        loss = o1.step(_torch_closure(o1, m1, x, y))
        o2.zero_grad()
        ref = F.cross_entropy(m2(x), y)
        ref.backward()
        o2.step()
        assert torch.equal(loss, ref.detach())
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_torch_closure_works_the_same_for_torch_optimizers() -> None:
    """The same closure drives torch.optim.SGD and grng (the convention is shared)."""
    m = small_mlp()
    x, y = classification_batches(1)[0]
    sgd = torch.optim.SGD(m.parameters(), lr=0.1)
    assert sgd.step(_torch_closure(sgd, m, x, y)) is not None


def test_a_closure_returning_none_uses_the_gradients_present() -> None:
    """Lightning's manual mode: backward done by the user, opt.step() passes a closure that
    returns None; the gradients are not wiped."""
    torch.manual_seed(1)
    m1 = small_mlp()
    m2 = copy.deepcopy(m1)
    o1 = grng.KFAC(m1, lr=0.1, damping=0.05)
    o2 = grng.KFAC(m2, lr=0.1, damping=0.05)
    x, y = classification_batches(1)[0]
    for m, o in ((m1, o1), (m2, o2)):
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
    assert o1.step(lambda: None) is None
    o2.step()
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    assert o1.steps == 1


@pytest.mark.parametrize("make", [
    optimizer_factory("kfac-eigen", lr=0.1),
    optimizer_factory("reng-forward", lr=0.1),
    optimizer_factory("reng-exact", lr=0.1),
    optimizer_factory("fgr-sgd", lr=0.1, momentum=0, gamma=0.1, epsilon=0.01),
])
def test_a_forward_only_closure_gets_an_error_that_says_what_to_change(make) -> None:
    m = small_mlp()
    opt = make(m)
    x, y = classification_batches(1)[0]
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(RuntimeError, match="make_closure"):
        opt.step(lambda: F.cross_entropy(m(x), y))
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))


@pytest.mark.parametrize("gr", ["forward", "backward"])
def test_two_pass_methods_call_the_closure_at_theta_and_at_the_probe(gr: str) -> None:
    m = small_mlp()
    opt = grng.RENG(m, lr=0.1, damping=0.05, gr=gr, epsilon=0.01)
    x, y = classification_batches(1)[0]
    calls: list[int] = []
    opt.step(_torch_closure(opt, m, x, y, calls))
    assert len(calls) == 2


def test_exact_mode_calls_the_closure_once_and_matches_double_backprop() -> None:
    """gr="exact" keeps the closure's graph: g + rho H g equals autograd's double backward."""
    torch.manual_seed(2)
    m = small_mlp()
    x, y = classification_batches(1)[0]
    params = list(m.parameters())
    loss = F.cross_entropy(m(x), y)
    g = torch.autograd.grad(loss, params, create_graph=True)
    hg = torch.autograd.grad(g, params, grad_outputs=[gi.detach() for gi in g])
    expected = [gi.detach() + 0.3 * hi for gi, hi in zip(g, hg)]
    calls: list[int] = []

    def closure():
        calls.append(1)
        m.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        return loss

    grng.regularized_gradient(params, closure, 0.3, 0.01, "exact")
    assert len(calls) == 1
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)
        assert not p.grad.requires_grad


def test_two_pass_methods_refuse_a_closure_that_returns_none() -> None:
    m = small_mlp()
    opt = grng.RENG(m, lr=0.1, gr="forward")
    with pytest.raises(ValueError, match="returns the loss"):
        opt.step(lambda: None)


@pytest.mark.parametrize("call", [
    optimizer_factory("kfac-eigen", dampnig=0.1),
    optimizer_factory("ring", damping=0.1, rh=0.2),
    optimizer_factory("reng-exact", kalman_rank=3),
    optimizer_factory("rkalman", damping=0.1),
    optimizer_factory("kfac-eigen", rho=0.1),
    optimizer_factory("kfac-eigen", stagger=True),
])
def test_unknown_keywords_raise_type_error_naming_them(call) -> None:
    with pytest.raises(TypeError) as err:
        call(small_mlp())
    msg = str(err.value)
    assert "unexpected keyword argument" in msg
    expected = {"dampnig": "did you mean 'damping'", "rh": "did you mean 'rho'",
                "kalman_rank": "option of RKalman", "damping": "prior_precision",
                "rho": "RING", "stagger": "did you mean 'stagger_refresh'"}
    assert any(k in msg and v in msg for k, v in expected.items()), msg


@pytest.mark.parametrize("name", ["kfac", "reng", "gradreg"])
def test_max_grad_norm_clips_the_gradient_the_update_uses(name: str) -> None:
    """After the step the gradient the update used (in .grad: g, or g + gamma H g for the
    two-pass methods) has norm max_grad_norm; with plain SGD as GradReg's base the parameters
    then move by exactly lr * max_grad_norm."""
    torch.manual_seed(3)
    m = small_mlp()
    x, y = classification_batches(1, n=16)[0]
    lr, cap = 0.5, 1e-3
    case, hp = {"kfac": ("kfac-eigen", {}), "reng": ("reng-forward", {}),
                "gradreg": ("fgr-sgd", dict(momentum=0, gamma=0.1, epsilon=0.01))}[name]
    opt = make_optimizer(case, m, lr=lr, max_grad_norm=cap, **hp)
    before = [p.detach().clone() for p in m.parameters()]
    opt.step(make_closure(opt, lambda: 1e3 * F.cross_entropy(m(x), y)))
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in m.parameters()]))
    assert float(norm) == pytest.approx(cap, rel=1e-6)
    if name == "gradreg":
        moved = torch.linalg.vector_norm(torch.stack([(p - b).norm() for p, b in
                                                      zip(m.parameters(), before)]))
        assert float(moved) == pytest.approx(lr * cap, rel=1e-6)


def test_bad_max_grad_norm_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="max_grad_norm"):
        grng.KFAC(small_mlp(), max_grad_norm=0.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        grng.GradReg(torch.optim.SGD(small_mlp().parameters(), lr=0.1), 0.1, 0.01,
                     max_grad_norm=-1.0)


def test_make_closure_accepts_an_optimizer_a_module_or_tensors() -> None:
    m = small_mlp()
    x, y = classification_batches(1)[0]
    for target in (torch.optim.SGD(m.parameters(), lr=0.1), m, list(m.parameters())):
        for p in m.parameters():
            p.grad = torch.ones_like(p)
        loss = make_closure(target, lambda: F.cross_entropy(m(x), y))()
        expected = torch.autograd.grad(F.cross_entropy(m(x), y), list(m.parameters()))
        for p, e in zip(m.parameters(), expected):
            torch.testing.assert_close(p.grad, e)
        assert loss.requires_grad
