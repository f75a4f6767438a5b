"""grng.KFAC: the step against dense damped natural-gradient math (ALGORITHMS.md sections 2, 4),
the update options, torch.optim conventions, checkpoints, argument checks and a real fit.

Expected steps are built here from the running factors with ``torch.kron`` and
``torch.linalg.solve`` in float64: never by calling the optimizer's own inverse code.
"""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grng import KFAC
from grng.curvature.inverse import tikhonov_split
from grng import make_closure

DT = torch.float64


# ----------------------------------------------------------------------------- helpers


def _close(actual: Tensor, expected: Tensor, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual.to(DT), expected.to(DT), rtol=rtol, atol=atol)


def _mlp(bias: bool = True) -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 2, bias=bias), nn.Tanh(), nn.Linear(2, 2)).double()


def _conv_model() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, 3, kernel_size=2, stride=1, padding=1), nn.Tanh(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 2)).double()


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return (model(x).tanh() - y).square().sum(-1).mean()


def _batch(model: nn.Module, n: int = 6) -> tuple[Tensor, Tensor]:
    shape = (n, 2, 3, 3) if isinstance(model[0], nn.Conv2d) else (n, 3)
    return torch.randn(*shape, dtype=DT), torch.randn(n, 2, dtype=DT)


def _wbar(module: nn.Module, grad: bool = False) -> Tensor:
    """[W b] (or [dW db]) as the d_G x d_A matrix, bias last."""
    w = module.weight.grad if grad else module.weight.detach()
    mat = w.reshape(w.shape[0], -1)
    if module.bias is not None:
        b = module.bias.grad if grad else module.bias.detach()
        mat = torch.cat([mat, b.reshape(-1, 1)], dim=1)
    return mat.clone()


def _kron_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _factors(opt: KFAC, module: nn.Module) -> tuple[Tensor, Tensor]:
    for layer in opt.layers:
        if layer.weight is module.weight:
            st = opt.layer_state(layer)
            return st["A"].clone(), st["G"].clone()
    raise KeyError(module)


def _eye(d: int) -> Tensor:
    return torch.eye(d, dtype=DT)


def dense_eigen(A: Tensor, G: Tensor, V: Tensor, damping: float) -> Tensor:
    """(A (x) G + damping I)^-1 V with row-major vec: the matrix is kron(G, A)."""
    K = torch.kron(G.to(DT), A.to(DT)) + damping * _eye(V.numel())
    return torch.linalg.solve(K, V.reshape(-1).to(DT)).reshape(V.shape)


def dense_tikhonov(A: Tensor, G: Tensor, V: Tensor, damping: float) -> Tensor:
    """((G + sqrt(l)/pi I) (x) (A + pi sqrt(l) I))^-1 V, pi = sqrt((tr A/dA) / (tr G/dG))."""
    A, G = A.to(DT), G.to(DT)
    pi = math.sqrt((torch.trace(A).item() / A.shape[0]) / (torch.trace(G).item() / G.shape[0]))
    MA = A + pi * math.sqrt(damping) * _eye(A.shape[0])
    MG = G + math.sqrt(damping) / pi * _eye(G.shape[0])
    return torch.linalg.solve(torch.kron(MG, MA), V.reshape(-1).to(DT)).reshape(V.shape)


DENSE = {"eigen": dense_eigen, "newton": dense_tikhonov, "cholesky": dense_tikhonov}


def _step(model: nn.Module, opt: KFAC, x: Tensor, y: Tensor) -> dict[nn.Module, Tensor]:
    """zero_grad, backward, step; returns each Kronecker module's gradient matrix."""
    opt.zero_grad()
    _loss(model, x, y).backward()
    grads = {m: _wbar(m, grad=True) for m in _kron_modules(model)}
    opt.step()
    return grads


# ------------------------------------------------------------- the step, dense checks


@pytest.mark.parametrize("make", [_mlp, _conv_model], ids=["mlp", "conv"])
@pytest.mark.parametrize("inverse", ["eigen", "newton", "cholesky"])
def test_one_step_equals_dense_damped_natural_gradient(make, inverse: str) -> None:
    lr, damping = 0.3, 0.05
    model = make()
    opt = KFAC(model, kl_clip=None, lr=lr, damping=damping, inverse=inverse)
    before = {m: _wbar(m) for m in _kron_modules(model)}
    grads = _step(model, opt, *_batch(model))
    assert len(opt.layers) == len(before)
    for m, W0 in before.items():
        A, G = _factors(opt, m)
        expected = W0 - lr * DENSE[inverse](A, G, grads[m], damping)
        _close(_wbar(m), expected)
        assert not torch.allclose(expected, W0 - lr * grads[m])   # preconditioning matters


def test_newton_and_cholesky_agree_tightly() -> None:
    model = _conv_model()
    twin = copy.deepcopy(model)
    x, y = _batch(model)
    o1 = KFAC(model, lr=0.2, damping=0.01, inverse="newton", inverse_every=1, factor_decay=0.5)
    o2 = KFAC(twin, lr=0.2, damping=0.01, inverse="cholesky", inverse_every=1, factor_decay=0.5)
    for _ in range(3):   # later steps warm-start Newton-Schulz from the previous inverse
        x, y = _batch(model)
        _step(model, o1, x, y)
        _step(twin, o2, x, y)
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-11, atol=1e-13)


def test_inverse_refreshed_only_every_inverse_every_steps() -> None:
    lr, damping = 0.1, 0.02
    model = _mlp()
    opt = KFAC(model, kl_clip=None, lr=lr, damping=damping, inverse_every=2, factor_decay=0.5, factor_every=1)
    m = model[2]
    _step(model, opt, *_batch(model))
    A0, G0 = _factors(opt, m)
    W1 = _wbar(m)
    grads = _step(model, opt, *_batch(model))      # step 1: factors move, inverse does not
    A1, G1 = _factors(opt, m)
    assert not torch.allclose(A1, A0) and not torch.allclose(G1, G0)
    _close(_wbar(m), W1 - lr * dense_eigen(A0, G0, grads[m], damping))
    W2 = _wbar(m)
    grads = _step(model, opt, *_batch(model))      # step 2: refreshed from the current factors
    A2, G2 = _factors(opt, m)
    _close(_wbar(m), W2 - lr * dense_eigen(A2, G2, grads[m], damping))


# ------------------------------------------------------------------- update options


def test_momentum_is_heavy_ball_on_the_direction() -> None:
    lr, damping, mom = 0.2, 0.03, 0.9
    model = _mlp()
    opt = KFAC(model, lr=lr, damping=damping, momentum=mom, inverse_every=1, factor_decay=0.7,
               kl_clip=None)
    bufs = {m: torch.zeros_like(_wbar(m)) for m in _kron_modules(model)}
    for _ in range(2):
        before = {m: _wbar(m) for m in bufs}
        grads = _step(model, opt, *_batch(model))
        for m in bufs:
            A, G = _factors(opt, m)
            bufs[m] = mom * bufs[m] + dense_eigen(A, G, grads[m], damping)
            _close(_wbar(m), before[m] - lr * bufs[m])
    assert not torch.allclose(bufs[model[0]], dense_eigen(*_factors(opt, model[0]), grads[model[0]], damping))


def test_decoupled_weight_decay() -> None:
    lr, damping, wd = 0.2, 0.03, 0.5
    model = _mlp()
    opt = KFAC(model, kl_clip=None, lr=lr, damping=damping, weight_decay=wd)
    before = {m: _wbar(m) for m in _kron_modules(model)}
    grads = _step(model, opt, *_batch(model))
    for m, W0 in before.items():
        A, G = _factors(opt, m)
        _close(_wbar(m), (1 - lr * wd) * W0 - lr * dense_eigen(A, G, grads[m], damping))


@pytest.mark.parametrize("kl_clip", [1e-5, 1e6])
def test_kl_clip(kl_clip: float) -> None:
    lr, damping = 0.3, 0.05
    model = _mlp()
    opt = KFAC(model, lr=lr, damping=damping, kl_clip=kl_clip)
    before = {m: _wbar(m) for m in _kron_modules(model)}
    grads = _step(model, opt, *_batch(model))
    d = {m: dense_eigen(*_factors(opt, m), grads[m], damping) for m in before}
    vg = sum(float((d[m] * grads[m]).sum()) for m in before)
    assert vg > 0
    nu = min(1.0, math.sqrt(kl_clip / (lr * lr * vg)))
    assert (nu < 0.5) if kl_clip < 1 else (nu == 1.0)
    for m, W0 in before.items():
        _close(_wbar(m), W0 - lr * nu * d[m])


def test_step_closure_equals_backward_then_step() -> None:
    model = _conv_model()
    twin = copy.deepcopy(model)
    kw = dict(lr=0.1, damping=0.02, momentum=0.5, inverse_every=2)
    o1, o2 = KFAC(model, **kw), KFAC(twin, **kw)
    for _ in range(3):
        x, y = _batch(model)
        o1.zero_grad()
        loss1 = _loss(model, x, y)
        loss1.backward()
        o1.step()
        for p in twin.parameters():                  # stale gradients must be discarded
            p.grad = torch.randn_like(p)
        loss2 = o2.step(make_closure(o2, lambda: _loss(twin, x, y)))
        assert loss2 is not None and not loss2.requires_grad
        assert torch.equal(loss2, loss1.detach())
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q)
            assert torch.equal(p.grad, q.grad)


# ------------------------------------------------------------- torch.optim conventions


def test_param_groups_with_their_own_lr_and_damping() -> None:
    model = _mlp()
    l1, l2 = model[0], model[2]
    groups = [{"params": list(l1.parameters()), "lr": 0.3},
              {"params": list(l2.parameters()), "lr": 0.02, "damping": 0.2}]
    opt = KFAC(model, kl_clip=None, lr=1.0, damping=0.01, param_groups=groups)
    before = {m: _wbar(m) for m in (l1, l2)}
    grads = _step(model, opt, *_batch(model))
    for m, lr, damping in ((l1, 0.3, 0.01), (l2, 0.02, 0.2)):
        _close(_wbar(m), before[m] - lr * dense_eigen(*_factors(opt, m), grads[m], damping))


def test_param_group_subset_leaves_other_params_alone() -> None:
    model = _mlp()
    frozen = [p.detach().clone() for p in model[0].parameters()]
    opt = KFAC(model, lr=0.1, param_groups=[{"params": list(model[2].parameters())}])
    assert [layer.weight for layer in opt.layers] == [model[2].weight]
    _step(model, opt, *_batch(model))
    for p, p0 in zip(model[0].parameters(), frozen):
        assert torch.equal(p, p0)


def test_lr_scheduler_changes_the_step() -> None:
    lr, damping = 0.4, 0.05
    model = _mlp()
    opt = KFAC(model, kl_clip=None, lr=lr, damping=damping, inverse_every=1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.25)
    _step(model, opt, *_batch(model))
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr * 0.25)
    before = {m: _wbar(m) for m in _kron_modules(model)}
    grads = _step(model, opt, *_batch(model))
    for m, W0 in before.items():
        _close(_wbar(m), W0 - lr * 0.25 * dense_eigen(*_factors(opt, m), grads[m], damping))


def test_zero_grad() -> None:
    model = _mlp()
    opt = KFAC(model)
    _loss(model, *_batch(model)).backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def _ln_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).double()


def _batches(k: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(99)
    return [(torch.randn(5, 3, generator=g, dtype=DT), torch.randn(5, 2, generator=g, dtype=DT))
            for _ in range(k)]


@pytest.mark.parametrize("inverse", ["eigen", "newton"])
@pytest.mark.parametrize("via", ["bytes", "deepcopy"])
def test_state_dict_round_trip_is_bit_exact(inverse: str, via: str) -> None:
    kw = dict(lr=0.1, damping=0.02, momentum=0.8, weight_decay=1e-3, factor_every=2,
              inverse_every=2, factor_decay=0.9, inverse=inverse)
    data = _batches(6)
    model = _ln_model()
    opt = KFAC(model, **kw)
    for x, y in data[:3]:
        _step(model, opt, x, y)
    if via == "bytes":
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=False)
    else:
        ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    assert any("A" in s and "QA" in s or "XA" in s for s in ckpt["opt"]["state"].values())
    for x, y in data[3:]:
        _step(model, opt, x, y)

    torch.manual_seed(4321)                      # a different initialization, then restore
    fresh = _ln_model()
    fresh.load_state_dict(ckpt["model"])
    opt2 = KFAC(fresh, **kw)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.steps == 3
    for x, y in data[3:]:
        _step(fresh, opt2, x, y)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    for layer, layer2 in zip(opt.layers, opt2.layers):
        for key, value in opt.layer_state(layer).items():
            assert torch.equal(value, opt2.layer_state(layer2)[key]), key


def test_load_state_dict_of_another_model_raises() -> None:
    opt = KFAC(_mlp())
    other = nn.Sequential(nn.Linear(4, 2), nn.Tanh(), nn.Linear(2, 2)).double()
    o_other = KFAC(other)
    _step(other, o_other, torch.randn(5, 4, dtype=DT), torch.randn(5, 2, dtype=DT))
    with pytest.raises(ValueError):
        opt.load_state_dict(o_other.state_dict())
    with pytest.raises(ValueError):                  # a different number of parameters
        opt.load_state_dict(KFAC(_mlp(bias=False)).state_dict())
    with pytest.raises(ValueError, match="grng"):    # not a grng checkpoint
        opt.load_state_dict(torch.optim.SGD(_mlp().parameters(), lr=0.1).state_dict())


class _Gain(nn.Module):
    """A parameter no Kronecker block covers (diagonal Fisher state, momentum buffer)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(d, dtype=DT))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.g.mean()


def test_load_state_dict_with_mismatched_diagonal_state_raises() -> None:
    """Same Kronecker layers, a non-Kronecker parameter of another shape: rejected at load."""
    def make(d: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(3, 2), nn.Tanh(), _Gain(d), nn.Linear(2, 2)).double()

    src = make(1)
    o_src = KFAC(src, momentum=0.9)
    _step(src, o_src, *_batch(src))
    dst = make(3)
    o_dst = KFAC(dst, momentum=0.9)
    with pytest.raises(ValueError):
        o_dst.load_state_dict(o_src.state_dict())


# -------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-0.1), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(damping=0.0), "damping"),
    (dict(damping=-1e-3), "damping"),
    (dict(factor_decay=1.0), "factor_decay"),
    (dict(factor_decay=-0.1), "factor_decay"),
    (dict(inverse="svd"), "inverse"),
    (dict(backend="cuda-magic"), "backend"),
    (dict(factor_every=0), "factor_every"),
    (dict(inverse_every=0), "inverse_every"),
    (dict(momentum=-0.5), "momentum"),
    (dict(weight_decay=-1e-4), "weight_decay"),
    (dict(kl_clip=0.0), "kl_clip"),
    (dict(kl_clip=-1.0), "kl_clip"),
])
def test_bad_arguments_raise_naming_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        KFAC(_mlp(), **kwargs)


@pytest.mark.parametrize("key, value", [("lr", -0.1), ("damping", 0.0), ("momentum", -1.0),
                                         ("weight_decay", -0.1), ("kl_clip", -1.0)])
def test_bad_param_group_values_raise(key: str, value: float) -> None:
    model = _mlp()
    groups = [{"params": list(model[0].parameters())},
              {"params": list(model[2].parameters()), key: value}]
    with pytest.raises(ValueError, match=key):
        KFAC(model, param_groups=groups)


def test_model_without_trainable_parameters_raises() -> None:
    model = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="param"):
        KFAC(model)
    with pytest.raises(ValueError):
        KFAC(nn.Tanh())


# -------------------------------------------------------------------- non-finite skip


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_skips_the_step(bad: float) -> None:
    beta = 0.5
    model = _ln_model()
    opt = KFAC(model, lr=0.1, momentum=0.9, factor_decay=beta, inverse_every=1, factor_every=1)
    _step(model, opt, *_batches(1)[0])
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    A_before, _ = _factors(opt, model[0])

    opt.zero_grad()
    _loss(model, torch.randn(50, 3, dtype=DT), torch.randn(50, 2, dtype=DT)).backward()
    model[3].weight.grad[0, 1] = bad
    with pytest.warns(RuntimeWarning, match="skip"):
        opt.step()
    assert opt.skipped_steps == 1 and opt.steps == 1
    for p, p0 in zip(model.parameters(), params):
        assert torch.equal(p, p0)
    after = opt.state_dict()
    assert after["state"].keys() == state["state"].keys()
    for k, st in state["state"].items():
        assert st.keys() == after["state"][k].keys()
        for key, value in st.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after["state"][k][key])), key

    # the next good step folds in its own batch only, not the skipped one's rows
    x = torch.randn(4, 3, dtype=DT)
    opt.zero_grad()
    _loss(model, x, torch.randn(4, 2, dtype=DT)).backward()
    opt.step()
    xbar = torch.cat([x, torch.ones(4, 1, dtype=DT)], dim=1)
    _close(_factors(opt, model[0])[0], beta * A_before + (1 - beta) * xbar.T @ xbar / 4)
    assert opt.steps == 2 and opt.skipped_steps == 1


# ------------------------------------------------------------------------- a real fit


@pytest.fixture(scope="module")
def digits() -> tuple[Tensor, Tensor]:
    datasets = pytest.importorskip("sklearn.datasets")
    X, y = datasets.load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32)
    X = (X - X.mean(0)) / (X.std(0) + 1e-3)
    return X, torch.tensor(y)


@pytest.mark.parametrize("inverse", ["eigen", "newton", "cholesky"])
def test_kfac_fits_digits(digits, inverse: str) -> None:
    X, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = KFAC(model, lr=0.05, damping=0.03, momentum=0.5, inverse=inverse, inverse_every=5)
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        start = loss_fn(model(X), y).item()
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        idx = torch.randint(0, X.shape[0], (128,), generator=g)
        opt.step(make_closure(opt, lambda: loss_fn(model(X[idx]), y[idx])))
    with torch.no_grad():
        end = loss_fn(model(X), y).item()
        acc = (model(X).argmax(1) == y).float().mean().item()
    assert opt.skipped_steps == 0
    assert end < 0.25 * start, (start, end)
    assert acc > 0.9


# ------------------------------------------------------------- batched small-factor inverses
def _two_equal_layers() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)).to(DT)


def _cholesky_step(model: nn.Module) -> KFAC:
    opt = KFAC(model, lr=0.1, damping=1e-2, inverse="cholesky")
    x, y = torch.randn(10, 6, dtype=DT), torch.randn(10, 6, dtype=DT)
    opt.step(make_closure(opt, lambda: F.mse_loss(model(x), y)))
    return opt


def test_small_cholesky_factors_are_inverted_in_one_batched_call(monkeypatch) -> None:
    """Four 7x7/6x6 factors of two layers: one batched call per size, results = dense inverses."""
    from grng.ops import dispatch

    calls = []
    impl = dispatch._IMPLS["batched_spd_inverse"]["reference"]
    monkeypatch.setitem(dispatch._IMPLS["batched_spd_inverse"], "reference",
                        dispatch.Impl(lambda Ms, *a: calls.append(Ms.shape) or impl.fn(Ms, *a),
                                      impl.supports))
    opt = _cholesky_step(_two_equal_layers())
    assert sorted(calls) == [(2, 6, 6), (2, 7, 7)]
    for layer in opt.layers:
        st = opt.layer_state(layer)
        da, dg = tikhonov_split(st["A"], st["G"], 1e-2, layer.a_factor, layer.g_factor)
        for key, extra in (("A", da), ("G", dg)):
            expected = torch.linalg.inv(st[key] + extra * torch.eye(st[key].shape[0], dtype=DT))
            _close(st["X" + key], expected, rtol=1e-10, atol=1e-12)


def test_batched_failure_falls_back_to_the_single_path(monkeypatch) -> None:
    """A batch entry reported as failed is inverted one at a time instead (same result)."""
    from grng.ops import dispatch

    impl = dispatch._IMPLS["batched_spd_inverse"]["reference"]

    def failing(Ms, *args):
        inv, ok = impl.fn(Ms, *args)
        return torch.zeros_like(inv), torch.zeros_like(ok)

    monkeypatch.setitem(dispatch._IMPLS["batched_spd_inverse"], "reference",
                        dispatch.Impl(failing, impl.supports))
    failed = _cholesky_step(_two_equal_layers())
    monkeypatch.undo()
    normal = _cholesky_step(_two_equal_layers())
    for a, b in zip(failed.layers, normal.layers):
        for key in ("XA", "XG"):
            x_failed, x_normal = failed.layer_state(a)[key], normal.layer_state(b)[key]
            assert bool(x_failed.abs().sum() > 0)
            _close(x_failed, x_normal, rtol=1e-10, atol=1e-12)
