"""Production hardening (docs/numerics.md): faults, bad input, checkpoints, gradient
accumulation, empty batches, mixed precision (autocast, GradScaler, low-precision storage) and
torch.compile, for every optimizer of the library; plus a long-run smoke test.

GradScaler is tested on CPU with ``torch.amp.GradScaler("cpu")`` on float32 models (fp16 is not
available on CPU) and with an injected inf. torch.compile is tested with ``backend="aot_eager"``:
inductor works too (checked by hand) but compiles for over a minute on a 2-core machine.
"""
from __future__ import annotations

import copy
import io
import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import grng.curvature.inverse as inverse_mod
from grng import KFAC, RENG, RING, GradReg, RKalman
from grng.ops import NewtonResult

F64 = torch.float64


# ----------------------------------------------------------------------------- helpers


def _mlp(dtype: torch.dtype = F64) -> nn.Module:
    """Two Kronecker blocks and a LayerNorm (diagonal fallback)."""
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 3)).to(dtype)


def _data(k: int, n: int = 8, dtype: torch.dtype = F64, seed: int = 7) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g))
            for _ in range(k)]


def _closure(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    return lambda: F.cross_entropy(model(x), y)


FACTORIES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "kfac-eigen": lambda m, **kw: KFAC(m, lr=0.1, damping=0.05, momentum=0.9, inverse_every=2, **kw),
    "kfac-newton": lambda m, **kw: KFAC(m, lr=0.1, damping=0.05, momentum=0.9, inverse_every=2,
                                        inverse="newton", **kw),
    "kfac-cholesky": lambda m, **kw: KFAC(m, lr=0.1, damping=0.05, momentum=0.9, inverse_every=2,
                                          inverse="cholesky", **kw),
    "ring": lambda m, **kw: RING(m, lr=0.1, damping=0.05, rho=0.1, momentum=0.9, inverse_every=2, **kw),
    "reng-forward": lambda m, **kw: RENG(m, lr=0.1, damping=0.05, rho=0.1, gr="forward",
                                         epsilon=0.01, momentum=0.9, inverse_every=2, **kw),
    "reng-exact": lambda m, **kw: RENG(m, lr=0.1, damping=0.05, rho=0.1, gr="exact",
                                       momentum=0.9, inverse_every=2, **kw),
    "rkalman": lambda m, **kw: RKalman(m, lr=0.1, rho=0.1, momentum=0.9, kalman_rank=5, **kw),
    "gradreg-kfac": lambda m, **kw: GradReg(KFAC(m, lr=0.1, damping=0.05, momentum=0.9,
                                                 inverse_every=2), 0.05, 0.01, model=m, **kw),
    "gradreg-sgd": lambda m, **kw: GradReg(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                                           0.05, 0.01, "exact", model=m, **kw),
}
ALL = list(FACTORIES)
CURVATURE = [n for n in ALL if n != "gradreg-sgd"]


def _curv(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return opt.base_optimizer if isinstance(opt, GradReg) else opt


def _train(model: nn.Module, opt: torch.optim.Optimizer, data) -> list[float]:
    return [float(opt.step(_closure(model, x, y))) for x, y in data]


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[list[Tensor], dict]:
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _assert_same(a, b, path: str = "") -> None:
    """Recursive equality of nested state (tensors bit for bit)."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (path, a.keys(), b.keys())
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), (path, a, b)


def _assert_unchanged(model, opt, before) -> None:
    params, state = before
    for p, p0 in zip(model.parameters(), params):
        assert torch.equal(p, p0)
    after = opt.state_dict()
    if "grng" in after:  # everything but the skip counter
        after["grng"] = {**after["grng"], "skipped": state["grng"]["skipped"]}
    _assert_same(state, after)


def _all_state_finite(opt) -> bool:
    return all(bool(torch.isfinite(v).all()) for st in opt.state.values() for v in st.values()
               if isinstance(v, Tensor) and v.is_floating_point())


# =================================================================== 1. faults


class _InfGrad(torch.autograd.Function):
    """Identity whose backward returns inf: an injected overflow in one gradient."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return torch.full_like(g, float("inf"))



@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("fault", ["nan-input", "inf-grad", "nan-loss-only"])
def test_non_finite_step_leaves_parameters_and_state_unchanged(name: str, fault: str) -> None:
    torch.manual_seed(0)
    model = _mlp()
    opt = FACTORIES[name](model)
    _train(model, opt, _data(3))
    before = _snapshot(model, opt)
    steps = getattr(_curv(opt), "steps", None)
    x, y = _data(1, seed=3)[0]
    if fault == "nan-input":
        x = x.clone()
        x[2, 1] = float("nan")
        closure = _closure(model, x, y)
    elif fault == "inf-grad":  # an inf in one parameter's gradient only (finite loss)
        def closure():
            return F.cross_entropy(model(x), y) + 1e-30 * _InfGrad.apply(model[3].bias[:1]).sum()
    else:  # the loss is NaN, the gradient finite
        def closure():
            return F.cross_entropy(model(x), y) + torch.tensor(float("nan"), dtype=F64)
    with pytest.warns(RuntimeWarning, match="skip"):
        opt.step(closure)
    _assert_unchanged(model, opt, before)
    assert opt.skipped_steps == 1
    if steps is not None:
        assert _curv(opt).steps == steps
    # and training goes on normally afterwards
    _train(model, opt, _data(2, seed=5))
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if steps is not None:
        assert _curv(opt).steps == steps + 2


def test_eigh_failure_retries_in_float64(monkeypatch) -> None:
    real = torch.linalg.eigh
    calls = []

    def flaky(M, *a, **k):
        calls.append(M.dtype)
        if M.dtype != torch.float64:
            raise torch._C._LinAlgError("injected: float32 eigh failed")
        return real(M, *a, **k)

    model = _mlp(torch.float32)
    opt = KFAC(model, lr=0.1, inverse_every=1)
    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(model, opt, _data(2, dtype=torch.float32))
    assert torch.float32 in calls and torch.float64 in calls
    st = opt.layer_state(opt.layers[0])
    assert st["QA"].dtype == torch.float32
    l, Q = real(st["A"].double())
    torch.testing.assert_close(st["lA"].double(), l, rtol=1e-4, atol=1e-5)


def test_eigh_failure_keeps_previous_inverse_with_a_warning(monkeypatch) -> None:
    model = _mlp()
    opt = KFAC(model, lr=0.1, inverse_every=1)
    _train(model, opt, _data(2))
    st = opt.layer_state(opt.layers[0])
    kept = {k: st[k].clone() for k in ("QA", "lA", "QG", "lG")}

    def broken(*a, **k):
        raise torch._C._LinAlgError("injected: eigh failed")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.warns(RuntimeWarning, match="keeping the previous inverse"):
        _train(model, opt, _data(1, seed=9))
    for k, v in kept.items():
        assert torch.equal(st[k], v), k
    assert not torch.equal(st["A"], kept["QA"])  # the factors moved on; the inverse was kept
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_eigh_failure_without_previous_inverse_uses_damping_only(monkeypatch) -> None:
    monkeypatch.setattr(torch.linalg, "eigh",
                        lambda *a, **k: (_ for _ in ()).throw(torch._C._LinAlgError("injected")))
    model = _mlp()
    opt = KFAC(model, lr=0.01, damping=1.0)
    with pytest.warns(RuntimeWarning, match="damping only"):
        _train(model, opt, _data(1))
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_newton_schulz_not_converging_falls_back_to_cholesky(monkeypatch) -> None:
    def never(M, X0=None, **kw):
        return NewtonResult(torch.eye(M.shape[0], dtype=M.dtype), False, 0.5, 60)

    model = _mlp()
    opt = KFAC(model, lr=0.1, damping=0.05, inverse="newton", inverse_every=1)
    monkeypatch.setattr(inverse_mod.ops, "newton_schulz_inverse", never)
    with pytest.warns(RuntimeWarning, match="Newton-Schulz did not converge.*Cholesky"):
        _train(model, opt, _data(1))
    st = opt.layer_state(opt.layers[0])
    da, dg = inverse_mod.tikhonov_split(st["A"], st["G"], 0.05)
    for key, extra in (("A", da), ("G", dg)):
        M = st[key] + extra * torch.eye(st[key].shape[0], dtype=F64)
        torch.testing.assert_close(st["X" + key], torch.linalg.inv(M), rtol=1e-9, atol=1e-11)


class _DeadNet(nn.Module):
    """Singular and all-zero factors: a no-bias layer whose inputs are all 0 (A = 0), a layer
    whose output is multiplied by 0 (G = 0), a ReLU layer that is dead (biases very negative),
    and an embedding whose rows 5..9 are never used (zero diagonal of A)."""

    def __init__(self) -> None:
        super().__init__()
        self.zero_in = nn.Linear(3, 4, bias=False)
        self.unused_out = nn.Linear(3, 4)
        self.dead = nn.Linear(3, 4)
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.dead.bias.fill_(-100.0)

    def forward(self, x: Tensor, idx: Tensor) -> Tensor:
        h = self.zero_in(torch.zeros_like(x)) + 0.0 * self.unused_out(x)
        h = h + torch.relu(self.dead(x)) + self.emb(idx).mean(1)
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("name", ["kfac-eigen", "kfac-newton", "kfac-cholesky", "rkalman"])
def test_singular_and_zero_factors_never_give_nan(name: str) -> None:
    torch.manual_seed(1)
    model = _DeadNet().double()
    opt = FACTORIES[name](model)
    g = torch.Generator().manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(6):
            x = torch.randn(8, 3, generator=g, dtype=F64)
            idx = torch.randint(0, 5, (8, 2), generator=g)
            y = torch.randint(0, 2, (8,), generator=g)
            opt.step(lambda: F.cross_entropy(model(x, idx), y))
    assert opt.steps == 6 and opt.skipped_steps == 0
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert _all_state_finite(opt)
    st = opt.layer_state(opt.layers[0])
    if name != "rkalman":
        assert torch.count_nonzero(st["A"]) == 0  # the all-zero factor really was there


# ================================================================ 2. bad input


@pytest.mark.parametrize(("make", "name"), [
    (lambda m: KFAC(m, factor_dtype=torch.float16), "factor_dtype"),
    (lambda m: KFAC(m, factor_dtype="bf16"), "factor_dtype"),
    (lambda m: KFAC(m, inverse_dtype=torch.int32), "inverse_dtype"),
    (lambda m: KFAC(m, grad_scaler=object()), "grad_scaler"),
    (lambda m: KFAC(m, inverse_every=1.5), "inverse_every"),
    (lambda m: KFAC(m, factor_every=True), "factor_every"),
    (lambda m: KFAC(m, lr="0.1"), "lr"),
    (lambda m: KFAC(m, damping=float("inf")), "damping"),
    (lambda m: KFAC(m, momentum=float("nan")), "momentum"),
    (lambda m: KFAC(m, backend="gpu"), "backend"),
    (lambda m: RING(m, rho=-1.0), "rho"),
    (lambda m: RING(m, inverse_dtype=torch.float16), "inverse_dtype"),
    (lambda m: RENG(m, gr="x"), "gr"),
    (lambda m: RENG(m, epsilon=0.0), "epsilon"),
    (lambda m: RENG(m, grad_scaler=3), "grad_scaler"),
    (lambda m: RKalman(m, seed=1.5), "seed"),
    (lambda m: RKalman(m, kalman_rank=0), "kalman_rank"),
    (lambda m: RKalman(m, prior_precision=0.0), "prior_precision"),
    (lambda m: RKalman(m, process_noise=-1.0), "process_noise"),
    (lambda m: RKalman(m, max_variance=-2.0), "max_variance"),
    (lambda m: RKalman(m, factor_decay=0.0), "factor_decay"),
    (lambda m: RKalman(m, rho=float("nan")), "rho"),
    (lambda m: RKalman(m, grad_scaler="yes"), "grad_scaler"),
    (lambda m: RKalman(m, distributed_strategy="x"), "distributed_strategy"),
    (lambda m: GradReg(KFAC(m), gamma=-1.0, epsilon=0.1), "gamma"),
    (lambda m: GradReg(KFAC(m), gamma="a", epsilon=0.1), "gamma"),
    (lambda m: GradReg(KFAC(m), gamma=0.1, epsilon=0.0), "epsilon"),
    (lambda m: GradReg(KFAC(m), gamma=0.1, epsilon=0.1, mode="central"), "mode"),
    (lambda m: GradReg(KFAC(m), gamma=0.1, epsilon=0.1, model=3), "model"),
    (lambda m: GradReg(KFAC(m), gamma=0.1, epsilon=0.1, grad_scaler=1), "grad_scaler"),
])
def test_constructor_arguments_raise_value_error_naming_them(make, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        make(_mlp())


class _NoLayers(nn.Module):
    """Nothing a Kronecker block covers: every parameter gets the diagonal fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.scale = nn.Parameter(torch.randn(4, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x) @ self.scale


@pytest.mark.parametrize("name", ALL)
def test_model_without_supported_layers_uses_the_diagonal_fallback(name: str) -> None:
    torch.manual_seed(0)
    model = _NoLayers().double()
    opt = FACTORIES[name](model)
    assert _curv(opt).layers == [] if hasattr(_curv(opt), "layers") else True
    data = _data(1, n=32) * 30
    losses = _train(model, opt, data)
    assert losses[-1] < losses[0]
    if name != "gradreg-sgd":
        key = "PD" if name == "rkalman" else "D"
        assert key in _curv(opt).curvature_state(model.scale)


@pytest.mark.parametrize("name", CURVATURE)
def test_frozen_parameters_are_excluded(name: str) -> None:
    model = _mlp()
    model[0].weight.requires_grad_(False)   # frozen weight, trainable bias: bias is diagonal
    model[2].requires_grad_(False)
    frozen = [model[0].weight.clone(), model[2].weight.clone()]
    outer = FACTORIES[name](model)
    opt = _curv(outer)
    assert [layer.module for layer in opt.layers] == [model[3]]
    owned = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model[0].weight) not in owned and id(model[2].weight) not in owned
    _train(model, outer, _data(3))
    assert torch.equal(model[0].weight, frozen[0]) and torch.equal(model[2].weight, frozen[1])
    key = "PD" if name == "rkalman" else "D"
    assert key in _curv(outer).curvature_state(model[0].bias)


class _TiedLM(nn.Module):
    """An embedding table shared with the output projection (weight tying)."""

    def __init__(self, vocab: int = 11, d: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab)
        self.out.weight = self.emb.weight

    def forward(self, idx: Tensor) -> Tensor:
        return self.out(torch.tanh(self.mix(self.emb(idx))))


@pytest.mark.parametrize("name", CURVATURE)
def test_tied_embedding_and_output_weights(name: str) -> None:
    torch.manual_seed(3)
    model = _TiedLM().double()
    opt = FACTORIES[name](model)
    curv = _curv(opt)
    owners = [layer.module for layer in curv.layers]
    assert owners == [model.emb, model.mix]          # one block for the tied weight: the embedding's
    assert sum(p is model.emb.weight for g in curv.param_groups for p in g["params"]) == 1
    g = torch.Generator().manual_seed(4)
    losses = []
    for _ in range(8):
        idx = torch.randint(0, 11, (6, 5), generator=g)
        tgt = torch.randint(0, 11, (6, 5), generator=g)
        losses.append(float(opt.step(lambda: F.cross_entropy(model(idx).reshape(-1, 11),
                                                                tgt.reshape(-1)))))
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    st = curv.curvature_state(model.emb.weight)
    key = "PA" if name == "rkalman" else "A"
    assert st[key].shape == (11,)                    # the embedding's diagonal A, counted once
    assert ("PD" if name == "rkalman" else "D") in curv.curvature_state(model.out.bias)


def test_sparse_gradients_raise_a_clear_error() -> None:
    with pytest.raises(ValueError, match="sparse"):
        KFAC(nn.Sequential(nn.Embedding(5, 3, sparse=True), nn.Linear(3, 2)))

    class SparseUse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.randn(5, 3))
            self.head = nn.Linear(3, 2)

        def forward(self, idx):
            return self.head(F.embedding(idx, self.table, sparse=True).mean(1))

    model = SparseUse()
    for make in (lambda m: KFAC(m), lambda m: RKalman(m)):
        opt = make(model)
        idx, y = torch.randint(0, 5, (4, 2)), torch.randint(0, 2, (4,))
        with pytest.raises(ValueError, match="sparse gradients"):
            opt.step(lambda: F.cross_entropy(model(idx), y))


@pytest.mark.parametrize("name", ["kfac-eigen", "rkalman"])
def test_non_contiguous_gradients(name: str) -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.LayerNorm(5), nn.Linear(5, 3)).double()
    twin = copy.deepcopy(model)
    opts = [FACTORIES[name](model), FACTORIES[name](twin)]
    for x, y in _data(3, n=6):
        x = torch.randn(6, 5, dtype=F64)
        for m, o, scramble in ((model, opts[0], True), (twin, opts[1], False)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            if scramble:
                for p in m.parameters():
                    g = p.grad
                    p.grad = (g.t().contiguous().t() if g.dim() == 2
                              else torch.stack([g, g], 1)[:, 0])
                    assert not p.grad.is_contiguous()
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["kfac-eigen", "ring", "rkalman"])
def test_add_param_group_later_gets_the_diagonal_fallback(name: str) -> None:
    torch.manual_seed(6)
    model = _mlp()
    first = list(model[0].parameters()) + list(model[2].parameters())
    make = {"kfac-eigen": KFAC, "ring": RING, "rkalman": RKalman}[name]
    opt = make(model, lr=0.1, param_groups=[{"params": first}])
    assert [layer.module for layer in opt.layers] == [model[0]]
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": list(model[3].parameters()), "lr": -1.0})
    assert len(opt.param_groups) == 1                 # a rejected group is not kept
    with pytest.raises(ValueError, match="not in model"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    before = [p.clone() for p in model[3].parameters()]
    opt.add_param_group({"params": list(model[3].parameters()), "lr": 0.05})
    _train(model, opt, _data(3))
    key = "PD" if name == "rkalman" else "D"
    for p, p0 in zip(model[3].parameters(), before):
        assert key in opt.curvature_state(p) and not torch.equal(p, p0)
    assert [layer.module for layer in opt.layers] == [model[0]]


class _Routed(nn.Module):
    """Rows routed to an 'expert' by a mask: in some batches the expert gets no rows."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(3, 4)
        self.expert = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.shared(x))
        mask = x[:, 0] > 0
        out = h.clone()
        out[mask] = out[mask] + self.expert(h[mask])
        return self.head(out)


@pytest.mark.parametrize("name", ["kfac-eigen", "kfac-newton", "ring", "reng-forward", "rkalman"])
def test_a_layer_with_an_empty_batch_skips_its_factor_update(name: str) -> None:
    torch.manual_seed(7)
    model = _Routed().double()
    opt = FACTORIES[name](model)
    x = torch.randn(8, 3, dtype=F64)
    x[:4, 0], x[4:, 0] = x[:4, 0].abs() + 0.1, -x[4:, 0].abs() - 0.1
    y = torch.randint(0, 2, (8,))
    opt.step(_closure(model, x, y))
    st = opt.layer_state(opt.layers[1])
    keys = ("PA", "PG") if name == "rkalman" else ("A", "G")
    kept = {k: st[k].clone() for k in keys}
    x2 = x.clone()
    x2[:, 0] = -x2[:, 0].abs() - 0.1                     # the expert gets 0 rows
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(_closure(model, x2, y))
    for k in keys:
        assert torch.equal(st[k], kept[k]), k            # no update (and no 0/0) for the expert
    assert not torch.equal(opt.layer_state(opt.layers[0])[keys[0]], kept[keys[0]])
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert _all_state_finite(opt) and opt.skipped_steps == 0


def test_a_whole_empty_batch_is_skipped_not_divided_by_zero() -> None:
    """mean over 0 rows is NaN: the step is skipped (warned), state untouched."""
    model = _mlp()
    opt = KFAC(model, lr=0.1)
    _train(model, opt, _data(1))
    before = _snapshot(model, opt)
    x, y = torch.zeros(0, 4, dtype=F64), torch.zeros(0, dtype=torch.long)
    with pytest.warns(RuntimeWarning, match="skip"):
        opt.step(_closure(model, x, y))
    _assert_unchanged(model, opt, before)
    # a sum-reduced loss over 0 rows is 0 with zero gradients: factors untouched, params move by 0
    opt.step(lambda: F.cross_entropy(model(x), y, reduction="sum"))
    assert opt.skipped_steps == 1
    for k in ("A", "G"):
        assert torch.equal(opt.layer_state(opt.layers[0])[k], before[1]["state"][0][k])


# ================================================================ 3. checkpoints


def _resume_case(name: str, **kw) -> None:
    torch.manual_seed(21)
    model = _mlp(torch.float32)
    opt = FACTORIES[name](model, **kw)
    data = _data(9, dtype=torch.float32)
    _train(model, opt, data[:4])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, data[4:])

    buf.seek(0)
    ckpt = torch.load(buf, map_location="cpu")
    torch.manual_seed(999)                                  # the global RNG must not matter
    model2 = _mlp(torch.float32)
    model2.load_state_dict(ckpt["model"])
    opt2 = FACTORIES[name](model2, **kw)
    opt2.load_state_dict(ckpt["opt"])
    _train(model2, opt2, data[4:])
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p1, p2)
    _assert_same(opt.state_dict(), opt2.state_dict())


@pytest.mark.parametrize("name", ALL)
def test_resumed_run_continues_bit_for_bit(name: str) -> None:
    _resume_case(name)


def test_resumed_run_with_bfloat16_storage_continues_bit_for_bit() -> None:
    _resume_case("kfac-eigen", factor_dtype=torch.bfloat16, inverse_dtype=torch.bfloat16)


def test_state_dict_holds_factors_inverses_counters_and_rng() -> None:
    model = _mlp()
    opt = RKalman(model, kalman_rank=3)
    _train(model, opt, _data(2))
    sd = opt.state_dict()
    assert sd["grng"]["steps"] == 2 and "rng" in sd["grng"] and sd["grng"]["rng"]
    assert {"PA", "PG"} <= set(sd["state"][0])
    kf = KFAC(_mlp(), inverse="newton", momentum=0.9)
    _train(kf.model, kf, _data(1))
    assert {"A", "G", "XA", "XG", "momentum_buffer"} <= set(kf.state_dict()["state"][0])


@pytest.mark.parametrize("name", ["kfac-eigen", "rkalman"])
def test_load_into_another_dtype_with_map_location(name: str) -> None:
    """A float64 run's checkpoint, loaded with map_location into a float32 model: every state
    tensor in float32 on the model's device; training continues and stays close to float64."""
    torch.manual_seed(2)
    model = _mlp()
    opt = FACTORIES[name](model)
    data = _data(6)
    _train(model, opt, data[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, map_location=torch.device("cpu"))
    model32 = _mlp(torch.float32)
    model32.load_state_dict(ckpt["model"])
    opt32 = FACTORIES[name](model32)
    opt32.load_state_dict(ckpt["opt"])
    for st in opt32.state.values():
        for v in st.values():
            if isinstance(v, Tensor) and v.is_floating_point():
                assert v.dtype == torch.float32 and v.device == torch.device("cpu")
    _train(model, opt, data[3:])
    _train(model32, opt32, [(x.float(), y) for x, y in data[3:]])
    tol = 1e-4 if name == "kfac-eigen" else 1e-2  # R-Kalman's sketch draws differ per dtype
    for p, q in zip(model.parameters(), model32.parameters()):
        torch.testing.assert_close(q.double(), p, rtol=1e-3, atol=tol)


def test_bfloat16_model_keeps_float32_factors_through_a_checkpoint() -> None:
    model = _mlp(torch.bfloat16)
    opt = KFAC(model, lr=0.05)
    _train(model, opt, _data(2, dtype=torch.bfloat16))
    st = opt.layer_state(opt.layers[0])
    assert st["A"].dtype == torch.float32
    opt2 = KFAC(model, lr=0.05)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    st2 = opt2.layer_state(opt2.layers[0])
    assert st2["A"].dtype == torch.float32 and torch.equal(st2["A"], st["A"])


@pytest.mark.parametrize("name", ["kfac-eigen", "rkalman", "gradreg-kfac"])
def test_checkpoint_of_a_different_model_raises(name: str) -> None:
    src = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 3)).double()
    o_src = FACTORIES[name](src)
    x, y = torch.randn(4, 5, dtype=F64), torch.randint(0, 3, (4,))
    o_src.step(_closure(src, x, y))
    opt = FACTORIES[name](_mlp())
    with pytest.raises(ValueError, match="does not match the model"):
        opt.load_state_dict(o_src.state_dict())


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a machine without CUDA")
def test_rkalman_checkpoint_from_a_cuda_machine_loads_without_cuda() -> None:
    """The saved sketch RNG of a CUDA run (a CUDA generator state) must not break loading on a
    CPU-only machine; the CPU generator's own saved state is still restored."""
    model = _mlp()
    opt = RKalman(model, kalman_rank=3)
    _train(model, opt, _data(2))
    sd = copy.deepcopy(opt.state_dict())
    cpu_state = sd["grng"]["rng"]["cpu"]
    sd["grng"]["rng"]["cuda:0"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state
    fresh = RKalman(model, kalman_rank=3)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.block.generator(torch.device("cpu")).get_state(), cpu_state)
    _train(model, fresh, _data(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["kfac-eigen", "rkalman"])
def test_checkpoint_moves_between_cpu_and_cuda(name: str) -> None:  # pragma: no cover - GPU only
    """CPU checkpoint -> CUDA model and CUDA checkpoint -> (map_location) CPU model: every state
    tensor lands on its parameter's device and training continues like the source run."""
    torch.manual_seed(23)
    cpu_model = _mlp()
    opt = FACTORIES[name](cpu_model)
    data = _data(4)
    _train(cpu_model, opt, data[:2])
    gpu_model = copy.deepcopy(cpu_model).cuda()
    o_gpu = FACTORIES[name](gpu_model)
    o_gpu.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all(v.is_cuda for st in o_gpu.state.values() for v in st.values()
               if isinstance(v, Tensor) and v.is_floating_point())
    _train(gpu_model, o_gpu, [(x.cuda(), y.cuda()) for x, y in data[2:]])
    buf = io.BytesIO()
    torch.save({"model": gpu_model.state_dict(), "opt": o_gpu.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, map_location="cpu")
    back = _mlp()
    back.load_state_dict(ckpt["model"])
    o_back = FACTORIES[name](back)
    o_back.load_state_dict(ckpt["opt"])
    _train(back, o_back, data[:1])
    assert all(bool(torch.isfinite(p).all()) for p in back.parameters())
    if name == "rkalman":  # CPU and CUDA sketch generators draw different streams
        return
    _train(cpu_model, opt, data[2:])
    _train(cpu_model, opt, data[:1])
    for p, q in zip(cpu_model.parameters(), back.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-8)


# ======================================================== 5. gradient accumulation


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 2, padding=1)
        self.emb = nn.Embedding(7, 3)
        self.fc = nn.Linear(3 * 4 * 4 + 3, 3)

    def forward(self, x: Tensor, idx: Tensor) -> Tensor:
        return self.fc(torch.cat([torch.tanh(self.conv(x)).flatten(1), self.emb(idx).mean(1)], 1))


@pytest.mark.parametrize("name", ["kfac-eigen", "rkalman"])
def test_gradient_accumulation_equals_one_big_batch(name: str) -> None:
    torch.manual_seed(8)
    big = _ConvNet().double()
    acc = copy.deepcopy(big)
    o_big, o_acc = FACTORIES[name](big), FACTORIES[name](acc)
    g = torch.Generator().manual_seed(9)
    k = 3
    for _ in range(3):
        x = torch.randn(12, 2, 3, 3, generator=g, dtype=F64)
        idx = torch.randint(0, 7, (12, 2), generator=g)
        y = torch.randint(0, 3, (12,), generator=g)
        o_big.zero_grad()
        F.cross_entropy(big(x, idx), y).backward()
        o_big.step()
        o_acc.zero_grad()
        for xs, ids, ys in zip(x.chunk(k), idx.chunk(k), y.chunk(k)):
            (F.cross_entropy(acc(xs, ids), ys) / k).backward()
        o_acc.step()
        for lb, la in zip(o_big.layers, o_acc.layers):
            sb, sa = o_big.layer_state(lb), o_acc.layer_state(la)
            for key in ("PA", "PG") if name == "rkalman" else ("A", "G"):
                torch.testing.assert_close(sa[key], sb[key], rtol=1e-10, atol=1e-12)
    for p, q in zip(big.parameters(), acc.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-11)


# ============================================================ 6. mixed precision


@pytest.mark.parametrize("name", ALL)
def test_autocast_bfloat16_trains_every_optimizer(name: str) -> None:
    torch.manual_seed(10)
    model = _mlp(torch.float32)
    opt = FACTORIES[name](model)
    data = _data(1, n=32, dtype=torch.float32) * 12

    def closure_for(x, y):
        def closure():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            return F.cross_entropy(out.float(), y)
        return closure

    losses = [float(opt.step(closure_for(x, y))) for x, y in data]
    assert losses[-1] < losses[0]
    assert opt.skipped_steps == 0 and all(bool(torch.isfinite(p).all()) for p in model.parameters())
    curv = _curv(opt)
    if hasattr(curv, "layers"):
        st = curv.layer_state(curv.layers[0])
        key = "PA" if name == "rkalman" else "A"
        assert st[key].dtype == torch.float32


def test_autocast_rows_give_the_float32_factors_of_bfloat16_activations() -> None:
    """Under autocast the captured rows are bf16; the factors are accumulated in float32."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = KFAC(model, factor_decay=0.0)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = torch.tanh(model[0](x))
        out = model[2](h)
    F.cross_entropy(out.float(), y).backward()
    opt.step()
    hbar = torch.cat([h.float(), torch.ones(10, 1)], 1)
    A = opt.layer_state(opt.layers[1])["A"]
    assert A.dtype == torch.float32
    torch.testing.assert_close(A, hbar.T @ hbar / 10, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["kfac-eigen", "rkalman"])
def test_a_step_taken_inside_autocast_keeps_float32_arithmetic(name: str) -> None:
    """Backward and step inside the autocast block (a common pattern): the optimizer's own
    GEMMs (X^T X, the preconditioner) must not run in bf16."""
    torch.manual_seed(12)
    m_in = _mlp(torch.float32)
    m_out = copy.deepcopy(m_in)
    o_in, o_out = FACTORIES[name](m_in), FACTORIES[name](m_out)
    for x, y in _data(3, dtype=torch.float32):
        for m, o, inside in ((m_in, o_in, True), (m_out, o_out, False)):
            o.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(m(x).float(), y)
                if inside:
                    loss.backward()
                    o.step()
            if not inside:
                loss.backward()
                o.step()
    for p, q in zip(m_out.parameters(), m_in.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    for la, lb in zip(o_in.layers, o_out.layers):
        for key, v in o_out.layer_state(lb).items():
            torch.testing.assert_close(o_in.layer_state(la)[key], v, rtol=1e-6, atol=1e-7)


def _scaled_vs_plain(name: str, scaler_kw: bool) -> None:
    torch.manual_seed(12)
    plain_model = _mlp(torch.float32)
    amp_model = copy.deepcopy(plain_model)
    plain = FACTORIES[name](plain_model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    amp = FACTORIES[name](amp_model, **({"grad_scaler": scaler} if scaler_kw else {}))
    for x, y in _data(4, dtype=torch.float32):
        plain.step(_closure(plain_model, x, y))
        if scaler_kw:       # closure recipe: the optimizer scales, unscales each pass once
            amp.step(_closure(amp_model, x, y))
        else:               # one-pass recipe: scaler.scale(loss).backward(); scaler.step(opt)
            amp.zero_grad()
            scaler.scale(F.cross_entropy(amp_model(x), y)).backward()
            scaler.step(amp)
        scaler.update()
    assert scaler.get_scale() == 2.0 ** 10 and amp.skipped_steps == 0
    for p, q in zip(plain_model.parameters(), amp_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    c_plain, c_amp = _curv(plain), _curv(amp)
    if hasattr(c_plain, "layers"):
        for lp, la in zip(c_plain.layers, c_amp.layers):
            for key, v in c_plain.layer_state(lp).items():
                torch.testing.assert_close(c_amp.layer_state(la)[key], v, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["kfac-eigen", "ring", "rkalman"])
def test_grad_scaler_step_matches_unscaled_training(name: str) -> None:
    _scaled_vs_plain(name, scaler_kw=False)


@pytest.mark.parametrize("name", ["kfac-newton", "reng-forward", "reng-exact", "rkalman",
                                  "gradreg-kfac", "gradreg-sgd"])
def test_grad_scaler_closure_recipe_matches_unscaled_training(name: str) -> None:
    _scaled_vs_plain(name, scaler_kw=True)


@pytest.mark.parametrize("name", ["kfac-eigen", "rkalman", "reng-forward", "gradreg-kfac"])
def test_grad_scaler_with_bfloat16_autocast(name: str) -> None:
    """autocast(bf16) + GradScaler("cpu") matches autocast without a scaler (power-of-two
    scales are exact in bf16 too), for the scaler.step recipe and the closure recipe."""
    torch.manual_seed(22)
    m_plain = _mlp(torch.float32)
    m_amp = copy.deepcopy(m_plain)
    closure_recipe = name in ("reng-forward", "gradreg-kfac")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    o_plain = FACTORIES[name](m_plain)
    o_amp = FACTORIES[name](m_amp, **({"grad_scaler": scaler} if closure_recipe else {}))

    def closure_for(m, x, y):
        def closure():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return F.cross_entropy(m(x).float(), y)
        return closure

    for x, y in _data(4, dtype=torch.float32):
        o_plain.step(closure_for(m_plain, x, y))
        if closure_recipe:
            o_amp.step(closure_for(m_amp, x, y))
        else:
            o_amp.zero_grad()
            scaler.scale(closure_for(m_amp, x, y)()).backward()
            scaler.step(o_amp)
        scaler.update()
    assert o_amp.skipped_steps == 0
    for p, q in zip(m_plain.parameters(), m_amp.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


def test_gradreg_sam_with_grad_scaler() -> None:
    torch.manual_seed(13)
    m1 = _mlp(torch.float32)
    m2 = copy.deepcopy(m1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    o1 = GradReg(KFAC(m1, lr=0.1), 0.0, 0.05, "sam", model=m1)
    o2 = GradReg(KFAC(m2, lr=0.1), 0.0, 0.05, "sam", model=m2, grad_scaler=scaler)
    for x, y in _data(3, dtype=torch.float32):
        o1.step(_closure(m1, x, y))
        o2.step(_closure(m2, x, y))
        scaler.update()
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["kfac-eigen", "rkalman"])
def test_grad_scaler_step_skips_an_injected_inf_and_lowers_the_scale(name: str) -> None:
    torch.manual_seed(14)
    model = _mlp(torch.float32)
    opt = FACTORIES[name](model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    data = _data(3, dtype=torch.float32)
    for i, (x, y) in enumerate(data):
        if i == 2:
            before = _snapshot(model, opt)
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        if i == 2:
            model[3].weight.grad[0, 0] = float("inf")
        with warnings.catch_warnings():
            warnings.simplefilter("error")          # an overflow is routine: no warning
            scaler.step(opt)
        scaler.update()
    _assert_unchanged(model, opt, before)
    assert opt.skipped_steps == 1 and opt.steps == 2
    assert scaler.get_scale() == 2.0 ** 11


@pytest.mark.parametrize("name", ["reng-forward", "reng-exact", "gradreg-sgd", "gradreg-kfac"])
@pytest.mark.parametrize("where", ["theta", "probe"])
def test_two_pass_grad_scaler_skips_an_overflow_in_either_pass(name: str, where: str) -> None:
    if where == "probe" and name in ("reng-exact", "gradreg-sgd"):
        pytest.skip("exact mode has no probe pass")
    torch.manual_seed(15)
    model = _mlp(torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    opt = FACTORIES[name](model, grad_scaler=scaler)
    data = _data(3, dtype=torch.float32)
    for x, y in data[:2]:
        opt.step(_closure(model, x, y))
        scaler.update()
    before = _snapshot(model, opt)
    calls = []
    x, y = data[2]

    def closure():
        calls.append(1)
        loss = F.cross_entropy(model(x), y)
        blow = (where == "theta" and len(calls) == 1) or (where == "probe" and len(calls) == 2)
        return loss * float("inf") if blow else loss

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure)
    scaler.update()
    assert len(calls) == (1 if where == "theta" else 2)   # no probe after an overflow at theta
    _assert_unchanged(model, opt, before)
    assert opt.skipped_steps == 1
    assert scaler.get_scale() == 2.0 ** 11


def test_unscale_before_step_needs_the_scaler_for_the_rows() -> None:
    """scaler.unscale_(opt) (e.g. for clipping) then scaler.step(opt): grads are unscaled but the
    captured rows are not; with grad_scaler= the optimizer knows S, without it: a clear error."""
    torch.manual_seed(16)
    for with_kw in (False, True):
        model = _mlp(torch.float32)
        twin = copy.deepcopy(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
        opt = KFAC(model, lr=0.1, **({"grad_scaler": scaler} if with_kw else {}))
        ref_opt = KFAC(twin, lr=0.1)
        x, y = _data(1, dtype=torch.float32)[0]
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e3)
        if not with_kw:
            with pytest.raises(RuntimeError, match="grad_scaler"):
                scaler.step(opt)
            continue
        scaler.step(opt)
        scaler.update()
        ref_opt.step(_closure(twin, x, y))
        torch.testing.assert_close(opt.layer_state(opt.layers[0])["G"],
                                   ref_opt.layer_state(ref_opt.layers[0])["G"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("inverse", ["eigen", "newton", "cholesky"])
def test_bfloat16_factor_and_inverse_storage(inverse: str) -> None:
    torch.manual_seed(17)
    m32 = _mlp(torch.float32)
    m16 = copy.deepcopy(m32)
    o32 = KFAC(m32, lr=0.05, damping=0.05, inverse=inverse, inverse_every=2)
    o16 = KFAC(m16, lr=0.05, damping=0.05, inverse=inverse, inverse_every=2,
               factor_dtype=torch.bfloat16, inverse_dtype=torch.bfloat16)
    data = _data(6, dtype=torch.float32)
    _train(m32, o32, data)
    _train(m16, o16, data)
    keys = ("A", "G", "QA", "lA") if inverse == "eigen" else ("A", "G", "XA", "XG")
    for layer in o16.layers:
        st = o16.layer_state(layer)
        for key in keys:
            assert st[key].dtype == torch.bfloat16, key
        assert st["momentum_buffer" if "momentum_buffer" in st else "A"].dtype in (torch.float32,
                                                                                   torch.bfloat16)
    assert o16.curvature_state(m16[2].weight)["D"].dtype == torch.bfloat16
    for p, q in zip(m32.parameters(), m16.parameters()):
        assert bool(torch.isfinite(q).all())
        torch.testing.assert_close(q, p, rtol=0.05, atol=0.02)
    bytes16 = sum(v.numel() * v.element_size() for st in o16.state.values() for v in st.values()
                  if isinstance(v, Tensor))
    bytes32 = sum(v.numel() * v.element_size() for st in o32.state.values() for v in st.values()
                  if isinstance(v, Tensor))
    assert bytes16 <= 0.55 * bytes32


@pytest.mark.parametrize("name", ["ring", "reng-forward", "reng-exact"])
def test_bfloat16_storage_for_ring_and_reng(name: str) -> None:
    torch.manual_seed(18)
    model = _mlp(torch.float32)
    opt = FACTORIES[name](model, factor_dtype=torch.bfloat16, inverse_dtype=torch.bfloat16)
    losses = _train(model, opt, _data(1, n=32, dtype=torch.float32) * 10)
    assert losses[-1] < losses[0] and opt.skipped_steps == 0
    st = opt.layer_state(opt.layers[0])
    assert {st[k].dtype for k in ("A", "G", "QA", "lA", "QG", "lG")} == {torch.bfloat16}


def test_bfloat16_storage_accumulates_in_float32() -> None:
    """The EMA is computed in float32 from the stored value and rounded once per update."""
    model = nn.Sequential(nn.Linear(3, 2))
    opt = KFAC(model, lr=0.0, factor_decay=0.5, factor_dtype=torch.bfloat16)
    xs = [torch.randn(5, 3) for _ in range(2)]
    for x in xs:
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    x0, x1 = (torch.cat([x, torch.ones(5, 1)], 1) for x in xs)
    first = (x0.T @ x0 / 5).to(torch.bfloat16)
    expected = (0.5 * first.float() + 0.5 * (x1.T @ x1 / 5)).to(torch.bfloat16)
    torch.testing.assert_close(opt.layer_state(opt.layers[0])["A"], expected, rtol=0, atol=0)


# ================================================================= 7. torch.compile


@pytest.mark.parametrize("name", ALL)
def test_compiled_model_trains_and_captures_the_same_factors(name: str) -> None:
    torch._dynamo.reset()
    torch.manual_seed(18)
    eager = _mlp(torch.float32)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager")
    o_eager, o_comp = FACTORIES[name](eager), FACTORIES[name](model)
    if name in ("reng-exact", "gradreg-sgd"):   # double backprop: not through a compiled graph
        x, y = _data(1, dtype=torch.float32)[0]
        with pytest.raises(RuntimeError, match="finite differences"):
            o_comp.step(lambda: F.cross_entropy(compiled(x), y))
        return
    for x, y in _data(2, dtype=torch.float32):
        o_eager.step(_closure(eager, x, y))
        o_comp.step(lambda: F.cross_entropy(compiled(x), y))
    for p, q in zip(eager.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
    ce, cc = _curv(o_eager), _curv(o_comp)
    if hasattr(ce, "layers"):
        for le, lc in zip(ce.layers, cc.layers):
            for key, v in ce.layer_state(le).items():
                if key in ("A", "G", "PA", "PG"):
                    torch.testing.assert_close(cc.layer_state(lc)[key], v, rtol=1e-4, atol=1e-6)


# ============================================================== long-run smoke test


def test_long_run_smoke_all_optimizers_thousands_of_steps() -> None:
    """~3,200 small float32 steps over all optimizers (noisy data, dead inputs, a LayerNorm):
    no NaN, no skipped step, no warning."""
    steps = {"kfac-eigen": 500, "kfac-newton": 400, "kfac-cholesky": 400, "ring": 400,
             "reng-forward": 250, "reng-exact": 200, "rkalman": 500, "gradreg-kfac": 250,
             "gradreg-sgd": 250}
    g = torch.Generator().manual_seed(19)
    X = torch.randn(256, 4, generator=g)
    X[:, 3] = 0.0                                      # a dead input coordinate
    Y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, k in steps.items():
            torch.manual_seed(20)
            model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 3))
            opt = FACTORIES[name](model)
            first = last = None
            for i in range(k):
                idx = torch.randint(0, 256, (16,), generator=g)
                loss = float(opt.step(_closure(model, X[idx], Y[idx])))
                first = loss if first is None else first
                last = loss
            assert math.isfinite(last), name
            assert opt.skipped_steps == 0, name
            assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), name
            assert _all_state_finite(_curv(opt)), name
