"""Bad input (docs/numerics.md): constructor arguments, models without supported layers, frozen and tied parameters, sparse and non-contiguous gradients, parameter groups added later, empty batches."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grng import KFAC, GradReg
from grng import make_closure
from grng.optim import cases
from grng.optim.cases import make_optimizer, optimizer_factory
from optimizer_helpers import (ALL, CURVATURE, F64, FACTORIES, _all_state_finite, _assert_unchanged, _closure, _curv, _data, _mlp, _snapshot, _train)


# (case of grng.optim.cases, a bad keyword, the argument the error must name)
@pytest.mark.parametrize(("case", "bad", "name"), [
    ("kfac-eigen", dict(factor_dtype=torch.float16), "factor_dtype"),
    ("kfac-eigen", dict(factor_dtype="bf16"), "factor_dtype"),
    ("kfac-eigen", dict(inverse_dtype=torch.int32), "inverse_dtype"),
    ("kfac-eigen", dict(grad_scaler=object()), "grad_scaler"),
    ("kfac-eigen", dict(inverse_every=1.5), "inverse_every"),
    ("kfac-eigen", dict(factor_every=True), "factor_every"),
    ("kfac-eigen", dict(lr="0.1"), "lr"),
    ("kfac-eigen", dict(damping=float("inf")), "damping"),
    ("kfac-eigen", dict(momentum=float("nan")), "momentum"),
    ("kfac-eigen", dict(backend="gpu"), "backend"),
    ("ring", dict(rho=-1.0), "rho"),
    ("ring", dict(inverse_dtype=torch.float16), "inverse_dtype"),
    ("reng-exact", dict(gr="x"), "gr"),
    ("reng-exact", dict(epsilon=0.0), "epsilon"),
    ("reng-exact", dict(grad_scaler=3), "grad_scaler"),
    ("rkalman", dict(seed=1.5), "seed"),
    ("rkalman", dict(kalman_rank=0), "kalman_rank"),
    ("rkalman", dict(prior_precision=0.0), "prior_precision"),
    ("rkalman", dict(process_noise=-1.0), "process_noise"),
    ("rkalman", dict(max_variance=-2.0), "max_variance"),
    ("rkalman", dict(factor_decay=0.0), "factor_decay"),
    ("rkalman", dict(rho=float("nan")), "rho"),
    ("rkalman", dict(grad_scaler="yes"), "grad_scaler"),
    ("rkalman", dict(distributed_strategy="x"), "distributed_strategy"),
    ("gradreg-kfac", dict(gamma=-1.0, epsilon=0.1), "gamma"),
    ("gradreg-kfac", dict(gamma="a", epsilon=0.1), "gamma"),
    ("gradreg-kfac", dict(gamma=0.1, epsilon=0.0), "epsilon"),
    ("gradreg-kfac", dict(gamma=0.1, epsilon=0.1, mode="central"), "mode"),
    ("gradreg-kfac", dict(gamma=0.1, epsilon=0.1, grad_scaler=1), "grad_scaler"),
])
def test_constructor_arguments_raise_value_error_naming_them(case: str, bad: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        make_optimizer(case, _mlp(), **bad)


def test_gradreg_model_must_be_a_module() -> None:
    with pytest.raises(ValueError, match="model"):
        GradReg(KFAC(_mlp()), gamma=0.1, epsilon=0.1, model=3)


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
        losses.append(float(opt.step(make_closure(opt, lambda: F.cross_entropy(model(idx).reshape(-1, 11),
                                                                tgt.reshape(-1))))))
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
    for case in ("kfac-eigen", "rkalman"):
        opt = make_optimizer(case, model)
        idx, y = torch.randint(0, 5, (4, 2)), torch.randint(0, 2, (4,))
        with pytest.raises(ValueError, match="sparse gradients"):
            opt.step(make_closure(opt, lambda: F.cross_entropy(model(idx), y)))


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
    opt = make_optimizer(name, model, lr=0.1, param_groups=[{"params": first}])
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
    opt.step(make_closure(opt, lambda: F.cross_entropy(model(x), y, reduction="sum")))
    assert opt.skipped_steps == 1
    for k in ("A", "G"):
        assert torch.equal(opt.layer_state(opt.layers[0])[k], before[1]["state"][0][k])


def test_an_unknown_optimizer_case_is_refused_naming_it() -> None:
    for build in (lambda: make_optimizer("kfac", _mlp()), lambda: optimizer_factory("kfac")):
        with pytest.raises(ValueError, match="name must be one of .*'kfac-eigen'.* got 'kfac'"):
            build()


def test_gradreg_cases_route_their_keywords() -> None:
    """GradReg's keywords go to GradReg (max_grad_norm: it clips what its base steps on); an
    explicit process_group is the group of GradReg and of the K-FAC it wraps."""
    opt = make_optimizer("fgr-sgd", _mlp(), max_grad_norm=0.5)
    assert opt.max_grad_norm == 0.5 and "max_grad_norm" not in opt.base_optimizer.defaults
    sentinel = object()
    base, gr = cases._split_gr({"lr": 0.1, "gamma": 0.1, "process_group": sentinel},
                               cases.SHARED_KEYS)
    assert base == {"lr": 0.1, "process_group": sentinel}
    assert gr == {"gamma": 0.1, "process_group": sentinel}
