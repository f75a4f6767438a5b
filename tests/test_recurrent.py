"""Kronecker blocks of nn.LSTM, nn.GRU and nn.RNN (docs/algorithms.md "Recurrent layers"): the
written-out forward equals the fused one in float64 over the option grid; the captured rows
reproduce autograd's gradient of every block (rows stacked over time steps); for one sequence of
one step A (x) G is the outer product of the torch.func gradient; the fused forward runs on the
calls no capture records; coverage, training and checkpoints of recurrent language models.
"""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from grng import KFAC, RKalman
from grng.curvature import recurrent
from grng.curvature.recurrent import RecurrentProjection, recurrent_forward
from grng.optim.cases import optimizer_factory

DT = torch.float64
#: the recurrent modules under test: "RNN" is tanh, "RNN-relu" nonlinearity="relu"
KINDS = ["LSTM", "GRU", "RNN", "RNN-relu"]


def _module(kind: str, *args, **kw) -> nn.Module:
    """nn.LSTM / nn.GRU / nn.RNN (tanh or relu) of ``kind`` (one of KINDS)."""
    if kind == "RNN-relu":
        return nn.RNN(*args, nonlinearity="relu", **kw)
    return getattr(nn, kind)(*args, **kw)


def _flat(out) -> list[Tensor]:
    if isinstance(out, PackedSequence):
        return [out.data]
    if isinstance(out, tuple):
        return [t for o in out for t in _flat(o)]
    return [out]


GRID = [c for c in itertools.product(
    KINDS, [1, 2], [False, True], [False, True], [0, 2], [0.0, 0.4],
    ["padded", "packed", "unbatched"], [False, True])
    if not (c[0] != "LSTM" and c[4]) and not (c[5] and c[1] == 1)]


@pytest.mark.parametrize("kind, layers, bidirectional, batch_first, proj, dropout, form, hx",
                         GRID)
def test_written_out_forward_equals_the_fused_one(kind, layers, bidirectional, batch_first, proj,
                                                  dropout, form, hx) -> None:
    """Outputs, final states and the gradients of every parameter, the input and hx agree to
    float64 rounding; inter-layer dropout draws the same masks (same seed) as the fused CPU
    kernel."""
    torch.manual_seed(0)
    kw = dict(proj_size=proj) if proj else {}
    m = _module(kind, 3, 4, num_layers=layers, bidirectional=bidirectional,
                batch_first=batch_first, dropout=dropout, **kw).double().train()
    T, N = 5, 3
    x = torch.randn(*((N, T) if batch_first else (T, N)), 3, dtype=DT)
    dirs = 2 if bidirectional else 1
    h_size = proj or 4
    state_shape = (layers * dirs,) + (() if form == "unbatched" else (N,))
    states = [torch.randn(*state_shape, h_size, dtype=DT)] if hx else []
    if hx and kind == "LSTM":
        states.append(torch.randn(*state_shape, 4, dtype=DT))
    leaves = [x.requires_grad_()] + [s.requires_grad_() for s in states]
    h0 = None if not hx else (tuple(states) if kind == "LSTM" else states[0])
    if form == "unbatched":
        x = x[0] if batch_first else x[:, 0]
    elif form == "packed":
        x = pack_padded_sequence(x, torch.tensor([5, 2, 4]), batch_first=batch_first,
                                 enforce_sorted=False)
    results = []
    for forward in (m, lambda *a: recurrent_forward(m, lambda *r: None, *a)):
        torch.manual_seed(7)
        out = _flat(forward(x, h0))
        weights = [torch.randn(o.shape, dtype=DT, generator=torch.Generator().manual_seed(i))
                   for i, o in enumerate(out)]
        grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights)),
                                    leaves + list(m.parameters()), retain_graph=True)
        results.append(out + list(grads))
    expected, actual = results
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind, kw", [("LSTM", dict(proj_size=5, bidirectional=True)),
                                      ("GRU", dict(num_layers=2)),
                                      ("RNN", dict(num_layers=2, bidirectional=True)),
                                      ("RNN-relu", dict(num_layers=2))])
def test_written_out_forward_in_float32_is_as_accurate_as_the_fused_one(kind, kw) -> None:
    """float32 (17 x 9 input, hidden 13, packed sequences of lengths 1 to 9): the error (2-norm)
    of every output and gradient against the fused float64 computation is at most 2x the fused
    float32 forward's own error."""
    torch.manual_seed(8)
    m64 = _module(kind, 17, 13, **kw).double()
    x64 = torch.randn(9, 6, 17, dtype=DT)
    lengths = torch.tensor([9, 1, 4, 9, 7, 2])

    def run(m: nn.Module, x: Tensor, written_out: bool) -> list[Tensor]:
        x = x.clone().requires_grad_()
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        out = _flat(recurrent_forward(m, lambda *r: None, packed) if written_out else m(packed))
        w = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)).to(o.dtype)
             for i, o in enumerate(out)]
        grads = torch.autograd.grad(sum((o * wi).sum() for o, wi in zip(out, w)),
                                    [x] + list(m.parameters()))
        return [t.double() for t in out + list(grads)]

    truth = run(m64, x64, False)
    m32 = _module(kind, 17, 13, **kw)
    m32.load_state_dict(m64.state_dict())
    fused, written = run(m32, x64.float(), False), run(m32, x64.float(), True)
    for t, f, w in zip(truth, fused, written):
        assert (w - t).norm() <= 2 * (f - t).norm() + 1e-7 * t.norm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# not relu: over 123 steps a pre-activation within rounding of 0 flips relu's derivative, and
# which ones flip decides the gradients' error, the fused kernel's too (the two errors' ratio
# is about 1 on most draws and 2-5 on a few, either way round; relu is checked in float64 over
# the option grid and in float32 on short packed sequences above)
@pytest.mark.parametrize("kind, kw", [("LSTM", dict(proj_size=3)), ("GRU", dict(num_layers=2)),
                                      ("RNN", dict(bidirectional=True, num_layers=2))])
def test_written_out_forward_on_a_strided_input_is_as_accurate_as_the_fused_one(kind, kw,
                                                                                 dtype) -> None:
    """A non-contiguous batch_first input (every other sequence and feature of a larger tensor;
    1 x 17 and 3 x 123 steps of 9 features, hidden 13), float32 and bfloat16: the error (2-norm)
    of every output and gradient against the fused float64 computation is at most 2x the fused
    forward's own error in the same dtype (bfloat16 needs the recurrence carried in float32,
    as :func:`grng.curvature.recurrent._direction` does)."""
    torch.manual_seed(11)
    m64 = _module(kind, 9, 13, batch_first=True, **kw).double()
    for steps, n in ((17, 1), (123, 3)):
        base = torch.randn(2 * n, steps, 18, dtype=DT)

        def run(m: nn.Module, dt: torch.dtype, written_out: bool) -> list[Tensor]:
            x = base.to(dt).requires_grad_()
            view = x[::2, :, ::2]
            assert not view.is_contiguous()
            out = _flat(recurrent_forward(m, lambda *r: None, view) if written_out else m(view))
            w = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)).to(o.dtype)
                 for i, o in enumerate(out)]
            grads = torch.autograd.grad(sum((o.float() * wi.float()).sum()
                                            for o, wi in zip(out, w)),
                                        [x] + list(m.parameters()))
            return [t.double() for t in out + list(grads)]

        truth = run(m64, DT, False)
        m = _module(kind, 9, 13, batch_first=True, **kw).to(dtype)
        m.load_state_dict(m64.state_dict())
        fused, written = run(m, dtype, False), run(m, dtype, True)
        for t, f, w in zip(truth, fused, written):
            assert (w - t).norm() <= 2 * (f - t).norm() + 1e-7 * t.norm()


@pytest.mark.parametrize("kind, kw", [("LSTM", {}), ("GRU", dict(bidirectional=True)),
                                      ("LSTM", dict(proj_size=2, num_layers=2)),
                                      ("RNN", dict(bidirectional=True)),
                                      ("RNN-relu", dict(num_layers=2))])
def test_double_backward_through_the_written_out_forward_equals_the_fused_one(kind, kw) -> None:
    """create_graph=True (exact gradient regularization): the Hessian-vector product through
    the written-out recurrence (which then recomputes through its plain reference) equals the
    fused forward's."""
    torch.manual_seed(6)
    m = _module(kind, 3, 4, batch_first=True, **kw).double()
    x = pack_padded_sequence(torch.randn(3, 5, 3, dtype=DT), torch.tensor([5, 2, 4]),
                             batch_first=True, enforce_sorted=False)
    params = list(m.parameters())
    v = [torch.randn_like(p) for p in params]
    results = []
    for forward in (m, lambda a: recurrent_forward(m, lambda *r: None, a)):
        out = forward(x)[0].data
        g = torch.autograd.grad(out.tanh().pow(2).sum(), params, create_graph=True)
        hv = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), params)
        results.append(list(g) + list(hv))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def _lm(kind: str, **kw) -> nn.Module:
    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(11, 5)
            self.rnn = _module(kind, 5, 6, batch_first=True, **kw)
            self.head = nn.Linear(6 * (2 if kw.get("bidirectional") else 1)
                                  if not kw.get("proj_size") else kw["proj_size"]
                                  * (2 if kw.get("bidirectional") else 1), 11)

        def forward(self, tokens: Tensor) -> Tensor:
            return self.head(self.rnn(self.emb(tokens))[0])

    return LM()


@pytest.mark.parametrize("kind, kw", [
    ("LSTM", {}), ("GRU", dict(num_layers=2, bidirectional=True)),
    ("LSTM", dict(proj_size=3, num_layers=2)), ("RNN", dict(num_layers=2, bidirectional=True)),
    ("RNN-relu", {})])
def test_recurrent_language_models_are_fully_covered(kind, kw) -> None:
    model = _lm(kind, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = KFAC(model)
    cov = opt.coverage()
    assert cov.fraction("kronecker") == 1.0, str(cov)
    names = [n for n in opt.capture.names if n.startswith("rnn.")]
    expected = [f"rnn.{n}" for n in recurrent._weight_names(model.rnn)]
    assert names == expected


@pytest.mark.parametrize("kind, kw, packed, frozen", [
    ("LSTM", {}, False, ()), ("GRU", {}, False, ()), ("LSTM", dict(bidirectional=True), True, ()),
    ("GRU", dict(num_layers=2, bidirectional=True), True, ()),
    ("LSTM", dict(proj_size=2), True, ()),
    ("LSTM", {}, False, ("weight_ih_l0", "bias_ih_l0")), ("GRU", {}, True, ("bias_hh_l0",)),
    ("RNN", {}, False, ()), ("RNN-relu", dict(num_layers=2, bidirectional=True), True, ()),
    ("RNN", {}, True, ("weight_ih_l0", "bias_ih_l0", "bias_hh_l0"))])
def test_captured_rows_reproduce_every_blocks_gradient(kind, kw, packed, frozen) -> None:
    """sum over the stacked rows of g_hat a_bar^T = [dW db] for every block (rows over time
    steps, both directions, packed sequences of different lengths; a frozen input-hidden
    weight or hidden bias, or both biases too: the hh rows still come)."""
    torch.manual_seed(2)
    m = _module(kind, 3, 4, batch_first=True, **kw).double()
    for name in frozen:
        getattr(m, name).requires_grad_(False)
    opt = KFAC(m, lr=0.0)
    x = torch.randn(3, 5, 3, dtype=DT)
    inp = pack_padded_sequence(x, torch.tensor([5, 2, 4]), batch_first=True,
                               enforce_sorted=False) if packed else x
    out = _flat(m(inp))
    sum(o.tanh().sum() for o in out).backward()
    assert len(opt.layers) == len(recurrent._weight_names(m)) - ("weight_ih_l0" in frozen)
    for layer in opt.layers:
        a_rows, g_rows = opt.capture.rows(layer)
        assert g_rows.scale == g_rows.n                   # e = n g_hat, n = rows
        torch.testing.assert_close(g_rows.X.T @ a_rows.X, layer.grad_matrix(), rtol=1e-10,
                                   atol=1e-12)
        assert a_rows.n == g_rows.n
    opt.step()


@pytest.mark.parametrize("kind", KINDS)
def test_one_step_one_sequence_is_the_outer_product_of_the_gradient(kind) -> None:
    """T = 1, N = 1 (a nonzero h0, so hh sees a nonzero input): A (x) G = v v^T per block,
    v from torch.func."""
    torch.manual_seed(3)
    m = _module(kind, 3, 4).double()
    x = torch.randn(1, 1, 3, dtype=DT)
    h0 = torch.randn(1, 1, 4, dtype=DT)
    hx = (h0, torch.randn(1, 1, 4, dtype=DT)) if kind == "LSTM" else h0
    w = torch.randn(1, 1, 4, dtype=DT)

    def loss(p):
        return (functional_call(m, p, (x, hx))[0].tanh() * w).sum()

    g = grad(loss)({k: v.detach() for k, v in m.named_parameters()})
    opt = KFAC(m, lr=0.0)
    loss(dict(m.named_parameters())).backward()
    opt.step()
    for layer in opt.layers:
        role = layer.role
        v = torch.cat([g["weight_" + role], g["bias_" + role][:, None]], 1).reshape(-1)
        st = opt.layer_state(layer)
        torch.testing.assert_close(torch.kron(st["G"], st["A"]), torch.outer(v, v),
                                   rtol=1e-10, atol=1e-12)


def test_the_fused_forward_runs_when_no_capture_records(monkeypatch) -> None:
    calls = []
    original = recurrent.recurrent_forward
    monkeypatch.setattr(recurrent, "recurrent_forward",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    m = nn.LSTM(3, 4)
    opt = KFAC(m)
    x = torch.randn(2, 3, 3)
    m(x)[0].sum().backward()
    assert calls == [1]
    with torch.no_grad():
        m(x)
    with opt.capture.paused():
        m(x)
    assert calls == [1]
    opt.capture.remove()
    assert "forward" not in vars(m)


def test_steps_that_fold_no_factors_run_the_fused_forward(monkeypatch) -> None:
    """factor_every=3: only every third step's forward is written out."""
    calls = []
    original = recurrent.recurrent_forward
    monkeypatch.setattr(recurrent, "recurrent_forward",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    m = nn.GRU(3, 4)
    opt = KFAC(m, factor_every=3)
    x = torch.randn(2, 3, 3)
    for _ in range(6):
        opt.zero_grad()
        m(x)[0].sum().backward()
        opt.step()
    assert calls == [1, 1]


@pytest.mark.parametrize("make", [optimizer_factory("kfac-eigen", lr=0.05),
                                  optimizer_factory("ekfac", lr=0.05),
                                  optimizer_factory("rkalman", lr=0.05)],
                         ids=["kfac", "ekfac", "rkalman"])
@pytest.mark.parametrize("kind", KINDS)
def test_recurrent_language_model_trains_and_checkpoints(make, kind) -> None:
    torch.manual_seed(4)
    model = _lm(kind)
    opt = make(model)
    tokens = torch.randint(0, 11, (8, 7))
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(tokens[:, :-1]).reshape(-1, 11),
                                           tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    other = make(model)
    other.load_state_dict(opt.state_dict())
    for layer, twin in zip(opt.layers, other.layers):
        for k, v in opt.layer_state(layer).items():
            assert torch.equal(v, other.layer_state(twin)[k]), k


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_recurrent_subclass_with_its_own_forward_gets_the_diagonal_with_the_reason(kind) -> None:
    class Mine(getattr(nn, kind)):
        def forward(self, x, hx=None):
            return super().forward(x, hx)

    with pytest.warns(UserWarning, match=f"overrides {kind}.forward.*grng.register_layer"):
        opt = KFAC(nn.Sequential(Mine(3, 4)))
    assert opt.coverage()["0.weight_ih_l0"].treatment == "diagonal"
    assert isinstance(RecurrentProjection.unsupported(Mine(3, 4)), str)


def test_a_deep_copy_of_an_attached_lstm_runs_its_own_forward() -> None:
    import copy
    torch.manual_seed(5)
    m = nn.LSTM(3, 4, batch_first=True).double()
    opt = KFAC(m)
    twin = copy.deepcopy(m)
    x = torch.randn(2, 5, 3, dtype=DT)
    out = twin(x)[0]
    out.sum().backward()
    assert not any(opt.capture.has_rows(layer) for layer in opt.layers)  # the copy reports nothing
    torch.testing.assert_close(out, m(x)[0], rtol=1e-12, atol=1e-12)


def _kl_clip_warnings(model: nn.Module, **kw) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        KFAC(model, **kw)
    return [str(w.message) for w in caught if "kl_clip=None" in str(w.message)]


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_kl_clip_off_on_recurrent_blocks_warns_once_naming_them(kind) -> None:
    """docs/algorithms.md "Early training and the KL clip": without the clip the recurrent blocks'
    first steps overshoot, so turning it off for their group says so, once; the default, or the
    clip off only for a group without recurrent blocks, says nothing."""
    model = _lm(kind, num_layers=2)
    assert _kl_clip_warnings(model) == []
    (message,) = _kl_clip_warnings(model, kl_clip=None)
    for role in ("ih_l0", "hh_l0", "ih_l1", "hh_l1"):
        assert f"{kind}.{role}" in message
    rnn = list(model.rnn.parameters())
    others = [p for p in model.parameters() if all(p is not q for q in rnn)]
    assert _kl_clip_warnings(model, param_groups=[{"params": rnn},
                                                  {"params": others, "kl_clip": None}]) == []
    assert len(_kl_clip_warnings(model, param_groups=[{"params": rnn, "kl_clip": None},
                                                      {"params": others}])) == 1
