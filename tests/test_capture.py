"""Curvature capture: the Kronecker factors of ALGORITHMS.md section 1, checked independently.

Every expected value is dense float64 math written here (per-example gradients from
``torch.func``, output gradients from ``retain_grad``, patches cut by slicing): nothing calls
the capture code to produce what it is compared with. The factors are read back through
``opt.layer_state(layer)["A"]`` / ``["G"]`` after one ``step`` with ``lr=0``.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from grng import KFAC
from grng.curvature.blocks import find_blocks
from grng.curvature.capture import CurvatureCapture
from optimizer_helpers import linear_factors, with_ones

DT = torch.float64


# ----------------------------------------------------------------------------- helpers


def _close(actual: Tensor, expected: Tensor, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual.to(DT), expected.to(DT), rtol=rtol, atol=atol)


def _state_of(opt: KFAC, module: nn.Module) -> dict:
    for layer in opt.layers:
        if layer.weight is module.weight:
            return opt.layer_state(layer)
    raise KeyError(f"{module} has no Kronecker block")


def _per_example_grads(model: nn.Module, loss_one, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """d l_n / d theta for every example n (functional_call + vmap(grad)); call before hooks."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        return loss_one(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    return vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)


def _sq_loss(out: Tensor, y: Tensor) -> Tensor:
    """Mean over examples (all leading dims) of sum over features of (tanh(out) - y)^2."""
    return (out.tanh() - y).square().sum(-1).mean()


def _row_vec_grad(module: nn.Module) -> Tensor:
    """Row-major vec of [dW db] (bias as the last column)."""
    gw = module.weight.grad.reshape(module.weight.shape[0], -1)
    if getattr(module, "bias", None) is not None:
        gw = torch.cat([gw, module.bias.grad.reshape(-1, 1)], dim=1)
    return gw.reshape(-1)


def _manual_patches(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """(N, T, C*kh*kw) patches by slicing a zero-padded copy: channel-major, then kernel pos."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    xp = torch.zeros(n, c, h + 2 * ph, w + 2 * pw, dtype=x.dtype)
    xp[:, :, ph:ph + h, pw:pw + w] = x
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, :, i * sh: i * sh + dh * (kh - 1) + 1: dh, j * sw: j * sw + dw * (kw - 1) + 1: dw]
            assert patch.shape[2:] == (kh, kw)
            rows.append(patch.reshape(n, -1))
    return torch.stack(rows, dim=1)


class _Bias(nn.Module):
    """A standalone bias: no Kronecker block covers it."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(0.1 * torch.randn(d, dtype=DT))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias


# ----------------------------------------------------------------------------- Linear


def test_linear_factors_equal_per_example_gradient_moments() -> None:
    n, i, o = 7, 4, 3
    lin = nn.Linear(i, o).double()
    x, y = torch.randn(n, i, dtype=DT), torch.randn(n, o, dtype=DT)
    pg = _per_example_grads(lin, _sq_loss, x, y)
    e = pg["bias"]                                         # (n, o): e_n = d l_n / d s_n
    _close(pg["weight"], e[:, :, None] * x[:, None, :])    # grad W_n = e_n a_n^T (sanity)
    abar = with_ones(x)
    A_exp, G_exp = abar.T @ abar / n, e.T @ e / n

    opt = KFAC(lin, lr=0.0)
    _sq_loss(lin(x), y).backward()
    _close(e.mean(0), lin.bias.grad)      # the loss is a mean over n
    opt.step()
    st = opt.layer_state(opt.layers[0])
    _close(st["A"], A_exp)
    _close(st["G"], G_exp)
    # the bias is the LAST input coordinate: A's last row is the mean of a_bar
    _close(st["A"][-1], abar.mean(0))
    assert st["A"][-1, -1].item() == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("bias", [True, False])
def test_one_example_kronecker_is_outer_product_of_gradient(bias: bool) -> None:
    """N = 1: A (x) G (row-major vec, V -> G V A) is exactly vec(grad) vec(grad)^T."""
    lin = nn.Linear(3, 2, bias=bias).double()
    x, y = torch.randn(1, 3, dtype=DT), torch.randn(1, 2, dtype=DT)
    pg = _per_example_grads(lin, _sq_loss, x, y)
    opt = KFAC(lin, lr=0.0)
    out = lin(x)
    out.retain_grad()
    _sq_loss(out, y).backward()
    opt.step()
    st = opt.layer_state(opt.layers[0])
    e = out.grad[0]                              # N = 1: e = g_hat
    abar = with_ones(x)[0] if bias else x[0]
    _close(st["G"], torch.outer(e, e))
    _close(st["A"], torch.outer(abar, abar))
    assert st["A"].shape == ((4, 4) if bias else (3, 3))
    g_bar = pg["weight"][0]
    if bias:
        g_bar = torch.cat([g_bar, pg["bias"][0][:, None]], dim=1)
    v = g_bar.reshape(-1)
    _close(v, _row_vec_grad(lin))
    _close(torch.kron(st["G"], st["A"]), torch.outer(v, v))


def test_linear_three_dim_input_rows_are_tokens() -> None:
    b, t, i, o = 3, 5, 4, 2
    lin = nn.Linear(i, o).double()
    x, y = torch.randn(b, t, i, dtype=DT), torch.randn(b, t, o, dtype=DT)
    rows_x, rows_y = x.reshape(-1, i), y.reshape(-1, o)
    pg = _per_example_grads(lin, _sq_loss, rows_x, rows_y)   # every token is an example
    e = pg["bias"]
    n = b * t
    abar = with_ones(rows_x)

    opt = KFAC(lin, lr=0.0)
    _sq_loss(lin(x), y).backward()
    _close(e.mean(0), lin.bias.grad)
    opt.step()
    st = opt.layer_state(opt.layers[0])
    _close(st["A"], abar.T @ abar / n)
    _close(st["G"], e.T @ e / n)


def test_linear_without_bias() -> None:
    n = 5
    lin = nn.Linear(4, 3, bias=False).double()
    x, y = torch.randn(n, 4, dtype=DT), torch.randn(n, 3, dtype=DT)
    opt = KFAC(lin, lr=0.0)
    out = lin(x)
    out.retain_grad()
    _sq_loss(out, y).backward()
    opt.step()
    st = opt.layer_state(opt.layers[0])
    e = n * out.grad
    assert st["A"].shape == (4, 4)
    _close(st["A"], x.T @ x / n)
    _close(st["G"], e.T @ e / n)


def test_weight_sharing_accumulates_every_call() -> None:
    n = 4
    lin = nn.Linear(3, 3).double()
    x, y = torch.randn(n, 3, dtype=DT), torch.randn(n, 3, dtype=DT)
    opt = KFAC(lin, lr=0.0)
    h1 = lin(x)
    h1.retain_grad()
    a2 = h1.tanh()
    h2 = lin(a2)
    h2.retain_grad()
    _sq_loss(h2, y).backward()
    opt.step()
    st = opt.layer_state(opt.layers[0])
    rows = 2 * n                                        # both calls' rows are examples
    abar = with_ones(torch.cat([x, a2.detach()]))
    e = rows * torch.cat([h1.grad, h2.grad])
    _close(st["A"], abar.T @ abar / rows)
    _close(st["G"], e.T @ e / rows)


# ----------------------------------------------------------------------------- Conv2d


def test_conv2d_factors_match_manual_unfold() -> None:
    n = 3
    conv = nn.Conv2d(3, 4, kernel_size=(2, 3), stride=(2, 1), padding=(1, 2), dilation=(1, 2)).double()
    x = torch.randn(n, 3, 5, 6, dtype=DT)
    opt = KFAC(conv, lr=0.0)
    out = conv(x)
    out.retain_grad()
    w = torch.randn_like(out)
    (out.tanh() * w).sum(dim=(1, 2, 3)).mean().backward()
    opt.step()

    patches = _manual_patches(x, conv)                     # (n, T, C*kh*kw)
    t = out.shape[2] * out.shape[3]
    assert patches.shape == (n, t, 3 * 2 * 3)
    abar = with_ones(patches.reshape(n * t, -1))
    g_hat = out.grad.permute(0, 2, 3, 1).reshape(n * t, -1)
    # the manual patch order agrees with autograd's weight gradient: sum_t g_hat a_bar^T = [dW db]
    _close((g_hat.T @ abar).reshape(-1), _row_vec_grad(conv))
    e = n * g_hat
    st = opt.layer_state(opt.layers[0])
    _close(st["A"], abar.T @ abar / (n * t))
    _close(st["G"], e.T @ e / n)


def test_conv2d_one_example_one_position_is_outer_product() -> None:
    conv = nn.Conv2d(2, 3, kernel_size=2, stride=2, dilation=(1, 2)).double()
    x = torch.randn(1, 2, 3, 4, dtype=DT)
    opt = KFAC(conv, lr=0.0)
    out = conv(x)
    assert out.shape[2:] == (1, 1)
    out.retain_grad()
    (out.tanh() * torch.randn_like(out)).sum().backward()
    opt.step()
    st = opt.layer_state(opt.layers[0])
    patch = torch.cat([_manual_patches(x, conv)[0, 0], torch.ones(1, dtype=DT)])
    e = out.grad.reshape(-1)
    _close(st["A"], torch.outer(patch, patch))
    _close(st["G"], torch.outer(e, e))
    v = _row_vec_grad(conv)
    _close(torch.kron(st["G"], st["A"]), torch.outer(v, v))


@pytest.mark.parametrize("kwargs, reason", [
    (dict(padding_mode="reflect", padding=1), "padding_mode='reflect'"),
    (dict(padding="same"), "padding='same'"),
])
def test_unsupported_conv2d_gets_the_diagonal_with_one_warning(kwargs, reason) -> None:
    """One policy: a layer the capture cannot treat is built, warned about once (the reason
    and grng.register_layer), and its parameters get the diagonal fallback."""
    model = nn.Sequential(nn.Conv2d(4, 4, 3, **kwargs), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 4, 5, 5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = KFAC(model)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and reason in messages[0] and "grng.register_layer" in messages[0]
    assert opt.coverage()["0.weight"].treatment == "diagonal"
    x = torch.randn(2, 4, 5, 5)
    model(x).square().sum().backward()
    before = model[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model[0].weight)


# ----------------------------------------------------------------------------- Embedding


def test_embedding_diagonal_a_is_token_counts() -> None:
    v, d = 7, 3
    emb = nn.Embedding(v, d).double()
    idx = torch.tensor([[0, 2, 2, 5, 1], [2, 0, 6, 6, 6], [3, 3, 2, 0, 0], [1, 6, 2, 2, 4]])
    n = idx.numel()
    opt = KFAC(emb, lr=0.0)
    out = emb(idx)
    out.retain_grad()
    w = torch.randn_like(out)
    (out.tanh() * w).sum(-1).mean().backward()
    opt.step()
    st = opt.layer_state(opt.layers[0])
    counts = torch.tensor([float((idx == k).sum()) for k in range(v)], dtype=DT)
    assert st["A"].dim() == 1
    _close(st["A"], counts / n)
    e = n * out.grad.reshape(n, d)
    _close(st["G"], e.T @ e / n)


def test_embedding_one_token_outer_product() -> None:
    emb = nn.Embedding(5, 3).double()
    idx = torch.tensor([3])
    opt = KFAC(emb, lr=0.0)
    (emb(idx).tanh() * torch.randn(1, 3, dtype=DT)).sum().backward()
    opt.step()
    st = opt.layer_state(opt.layers[0])
    vec = emb.weight.grad.T.reshape(-1)           # W = E^T (D x V), row-major
    _close(torch.kron(st["G"], torch.diag(st["A"])), torch.outer(vec, vec))


# ------------------------------------------------------------- when nothing is captured


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def test_no_grad_forward_records_nothing() -> None:
    lin = nn.Linear(3, 2).double()
    opt = KFAC(lin, lr=0.0)
    with torch.no_grad():
        for _ in range(3):
            lin(torch.randn(50, 3, dtype=DT))
    assert opt.capture.rows(opt.layers[0]) is None
    x = torch.randn(6, 3, dtype=DT)
    out = lin(x)
    out.retain_grad()
    _sq_loss(out, torch.randn(6, 2, dtype=DT)).backward()
    opt.step()
    A, G = linear_factors(lin, x, out)
    st = opt.layer_state(opt.layers[0])
    _close(st["A"], A)
    _close(st["G"], G)


def test_first_update_sets_then_blends_with_factor_decay() -> None:
    beta = 0.8
    lin = nn.Linear(3, 2).double()
    opt = KFAC(lin, lr=0.0, factor_decay=beta, factor_every=1)
    st = opt.layer_state(opt.layers[0])
    expected = []
    for _ in range(2):
        x = torch.randn(5, 3, dtype=DT)
        out = lin(x)
        out.retain_grad()
        _sq_loss(out, torch.randn(5, 2, dtype=DT)).backward()
        opt.step()
        opt.zero_grad()
        expected.append(linear_factors(lin, x, out))
        if len(expected) == 1:   # set, not blended with anything (e.g. not beta * 0 + ...)
            _close(st["A"], expected[0][0])
            _close(st["G"], expected[0][1])
    (A1, G1), (A2, G2) = expected
    _close(st["A"], beta * A1 + (1 - beta) * A2)
    _close(st["G"], beta * G1 + (1 - beta) * G2)


def test_factors_untouched_when_not_due() -> None:
    beta = 0.7
    lin = nn.Linear(3, 2).double()
    opt = KFAC(lin, lr=0.1, factor_every=2, factor_decay=beta)
    st = opt.layer_state(opt.layers[0])
    seen = []
    for k in range(3):
        x = torch.randn(4 + k, 3, dtype=DT)
        out = lin(x)
        out.retain_grad()
        _sq_loss(out, torch.randn(4 + k, 2, dtype=DT)).backward()
        if k == 1:
            assert opt.capture.rows(opt.layers[0]) is None     # not armed off-step
        opt.step()
        opt.zero_grad()
        seen.append(linear_factors(lin, x, out))
        if k == 0:
            A0, G0 = st["A"].clone(), st["G"].clone()
        if k == 1:
            assert torch.equal(st["A"], A0) and torch.equal(st["G"], G0)
    # step 2 blends step 0's factors with step 2's batch only (never step 1's)
    _close(st["A"], beta * seen[0][0] + (1 - beta) * seen[2][0])
    _close(st["G"], beta * seen[0][1] + (1 - beta) * seen[2][1])


def test_paused_records_nothing() -> None:
    model = _mlp()
    lin1 = model[0]
    opt = KFAC(model, lr=0.1, kl_clip=None, factor_every=1)
    x = torch.randn(5, 3, dtype=DT)
    with opt.curvature_paused():
        _sq_loss(model(x), torch.randn(5, 2, dtype=DT)).backward()
    assert opt.capture.rows(opt.layers[0]) is None
    w0 = lin1.weight.detach().clone()
    g = lin1.weight.grad.clone()
    opt.step()
    assert "A" not in _state_of(opt, lin1) and "G" not in _state_of(opt, lin1)
    _close(lin1.weight.detach(), w0 - 0.1 * g)     # no factors yet: the plain gradient
    opt.zero_grad()

    # a paused probe and a recorded pass in one backward: only the recorded rows count
    x_rec = torch.randn(6, 3, dtype=DT)
    with opt.curvature_paused():
        probe = model(torch.randn(9, 3, dtype=DT)).square().mean()
    out = model[0](x_rec)
    out.retain_grad()
    (_sq_loss(model[2](model[1](out)), torch.randn(6, 2, dtype=DT)) + 0.0 * probe).backward()
    opt.step()
    A, G = linear_factors(lin1, x_rec, out)
    _close(_state_of(opt, lin1)["A"], A)
    _close(_state_of(opt, lin1)["G"], G)


def test_backward_inside_paused_records_nothing() -> None:
    lin = nn.Linear(3, 2).double()
    opt = KFAC(lin, lr=0.0)
    loss = _sq_loss(lin(torch.randn(5, 3, dtype=DT)), torch.randn(5, 2, dtype=DT))
    with opt.curvature_paused():
        loss.backward()
    assert opt.capture.rows(opt.layers[0]) is None
    opt.step()
    assert "A" not in opt.layer_state(opt.layers[0])


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_double_backward_records_once() -> None:
    lin = nn.Linear(3, 2).double()
    opt = KFAC(lin, lr=0.0)
    x = torch.randn(5, 3, dtype=DT)
    out = lin(x)
    out.retain_grad()
    loss = _sq_loss(out, torch.randn(5, 2, dtype=DT))
    loss.backward(create_graph=True)
    A, G = linear_factors(lin, x, out)          # out.grad = g_hat of the plain loss
    gnorm = sum(p.grad.square().sum() for p in lin.parameters())
    for p in lin.parameters():
        p.grad = None
    gnorm.backward()                              # flows through out a second time
    opt.step()
    st = opt.layer_state(opt.layers[0])
    _close(st["A"], A)
    _close(st["G"], G)


# ----------------------------------------------------------------- diagonal fallback


def test_layernorm_and_lone_bias_get_diagonal_fisher() -> None:
    beta, lr, damping = 0.8, 0.1, 0.01
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), _Bias(4), nn.Tanh(), nn.Linear(4, 2)).double()
    ln, lone = model[1], model[2]
    with torch.no_grad():
        ln.weight.add_(0.1 * torch.randn(4, dtype=DT))
        ln.bias.add_(0.1 * torch.randn(4, dtype=DT))
    opt = KFAC(model, lr=lr, damping=damping, factor_decay=beta, kl_clip=None, factor_every=1)
    assert [layer.weight for layer in opt.layers] == [model[0].weight, model[4].weight]
    diag = [ln.weight, ln.bias, lone.bias]
    D_prev = None
    for k in range(2):
        _sq_loss(model(torch.randn(6, 3, dtype=DT)), torch.randn(6, 2, dtype=DT)).backward()
        before = [p.detach().clone() for p in diag]
        grads = [p.grad.clone() for p in diag]
        opt.step()
        opt.zero_grad()
        D_exp = [g.square() for g in grads] if k == 0 else [
            beta * d + (1 - beta) * g.square() for d, g in zip(D_prev, grads)]
        for p, p0, g, D in zip(diag, before, grads, D_exp):
            assert "A" not in opt.curvature_state(p)
            _close(opt.curvature_state(p)["D"], D)
            _close(p.detach(), p0 - lr * g / (D + damping))
        D_prev = D_exp


def test_finding_blocks_observes_nothing_and_the_capture_observes_exactly_them() -> None:
    """The block source (find_blocks) builds the blocks without touching the model; the capture
    hooks the modules of the blocks it is given, and only those."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Embedding(5, 2), nn.Linear(4, 2))
    keep = {id(p) for p in model[0].parameters()} | {id(p) for p in model[3].parameters()}
    found = find_blocks(model, keep)
    assert found.names == ["0", "3"] and [m for m, _ in found.modules] == [model[0], model[3]]
    assert not any(m._forward_hooks for m in model.modules())
    capture = CurvatureCapture(found)
    hooked = [m for m in model.modules() if m._forward_hooks]
    assert hooked == [model[0], model[3]] and capture.layers is found.layers
    x = torch.randn(6, 3)
    model[3](torch.tanh(model[0](x))).sum().backward()
    assert capture.has_rows(found.layers[0]) and capture.has_rows(found.layers[1])
    capture.remove()
    assert not any(m._forward_hooks for m in model.modules())
