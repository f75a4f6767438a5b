"""Mixed precision (docs/numerics.md): autocast, GradScaler (``torch.amp.GradScaler("cpu")`` on float32 models, fp16 being unavailable on CPU, with an injected inf) and low-precision factor/inverse storage."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grng import KFAC, GradReg
from grng import make_closure
from optimizer_helpers import (ALL, FACTORIES, _assert_same_blocks, _assert_unchanged, _closure,
                               _curv, _data, _mlp, _scaled_closure, _snapshot, _train)

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

    losses = [float(opt.step(make_closure(opt, closure_for(x, y)))) for x, y in data]
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
        if scaler_kw:       # closure recipe: the closure scales, the optimizer unscales each pass once
            amp.step(_scaled_closure(amp_model, x, y, scaler))
        else:               # one-pass recipe: scaler.scale(loss).backward(); scaler.step(opt)
            amp.zero_grad()
            scaler.scale(F.cross_entropy(amp_model(x), y)).backward()
            scaler.step(amp)
        scaler.update()
    assert scaler.get_scale() == 2.0 ** 10 and amp.skipped_steps == 0
    for p, q in zip(plain_model.parameters(), amp_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    _assert_same_blocks(plain, amp, rtol=1e-4, atol=1e-6)


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

    def scaled_closure_for(m, x, y):
        def closure():
            m.zero_grad(set_to_none=True)
            loss = closure_for(m, x, y)()
            scaler.scale(loss).backward()
            return loss
        return closure

    for x, y in _data(4, dtype=torch.float32):
        o_plain.step(make_closure(o_plain, closure_for(m_plain, x, y)))
        if closure_recipe:
            o_amp.step(scaled_closure_for(m_amp, x, y))
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
        o2.step(_scaled_closure(m2, x, y, scaler))
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
        opt.step(_scaled_closure(model, x, y, scaler))
        scaler.update()
    before = _snapshot(model, opt)
    calls = []
    x, y = data[2]

    def closure():
        calls.append(1)
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        blow = (where == "theta" and len(calls) == 1) or (where == "probe" and len(calls) == 2)
        loss = loss * float("inf") if blow else loss
        scaler.scale(loss).backward()
        return loss

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
    opt = KFAC(model, lr=0.0, factor_decay=0.5, factor_dtype=torch.bfloat16, factor_every=1)
    xs = [torch.randn(5, 3) for _ in range(2)]
    for x in xs:
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    x0, x1 = (torch.cat([x, torch.ones(5, 1)], 1) for x in xs)
    first = (x0.T @ x0 / 5).to(torch.bfloat16)
    expected = (0.5 * first.float() + 0.5 * (x1.T @ x1 / 5)).to(torch.bfloat16)
    torch.testing.assert_close(opt.layer_state(opt.layers[0])["A"], expected, rtol=0, atol=0)
