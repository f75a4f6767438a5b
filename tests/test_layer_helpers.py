"""The layer helpers beyond Linear/Conv2d/Embedding (docs/algorithms.md "Layer helpers"), each
checked like tests/test_capture.py checks those: its A and G against per-example gradients from
``torch.func`` (for one example, vec(grad W_bar) vec(grad W_bar)^T = A (x) G exactly) or against
an independent dense computation (patches cut by slicing, attention written out by hand), and
its preconditioned step against a dense solve. Also: subclasses through the registry, keyword
inputs, weight norm's chain rule, and factor sides kept diagonal by ``max_factor_dim``.
"""
from __future__ import annotations

import contextlib
import copy
import math
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.utils import parametrizations

from grng import KFAC, RKalman, register_layer
from grng.curvature.attention import attention_forward
from grng.optim.cases import make_optimizer, optimizer_factory
from grng.curvature.layers import (Conv1dLayer, LinearLayer, TransposedLinearLayer,
                                   WeightNormLayer, helper_for, make_layers,
                                   registered_layers)

DT = torch.float64


# ----------------------------------------------------------------------------- helpers


def _close(actual: Tensor, expected: Tensor, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual.to(DT), expected.to(DT), rtol=rtol, atol=atol)


def _with_ones(rows: Tensor) -> Tensor:
    return torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], dim=1)


def _state(opt, name: str) -> dict:
    return opt.layer_state(opt.layers[opt.capture.names.index(name)])


def _layer(opt, name: str):
    return opt.layers[opt.capture.names.index(name)]


def _loss(out: Tensor, w: Tensor) -> Tensor:
    """A mean over examples (the first dim) of a smooth function of the output."""
    return (out.tanh() * w).reshape(out.shape[0], -1).sum(1).mean()


def _dense_eigen_step(A: Tensor, G: Tensor, V: Tensor, damping: float) -> Tensor:
    """(A (x) G + damping I)^-1 V with row-major vec (the matrix is kron(G, A)); a vector
    factor is a diagonal one."""
    A = torch.diag(A) if A.dim() == 1 else A
    G = torch.diag(G) if G.dim() == 1 else G
    K = torch.kron(G.to(DT), A.to(DT)) + damping * torch.eye(V.numel(), dtype=DT)
    return torch.linalg.solve(K, V.reshape(-1).to(DT)).reshape(V.shape)


class Conv1D(nn.Module):
    """transformers' ``Conv1D`` (GPT-2), reproduced here so that the tests need no transformers:
    weight stored in x out, y = x W + b. Its ``__module__`` is the one the registry knows."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(0.3 * torch.randn(nx, nf))
        self.bias = nn.Parameter(0.1 * torch.randn(nf))

    def forward(self, x: Tensor) -> Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


Conv1D.__module__ = "transformers.pytorch_utils"
Conv1D.__qualname__ = "Conv1D"


# ----------------------------------------------------------------- registry and subclasses


class _MyLinear(nn.Linear):
    """A user's Linear subclass."""


@pytest.mark.parametrize("cls", [nn.modules.linear.NonDynamicallyQuantizableLinear, _MyLinear])
def test_linear_subclasses_get_the_linear_block(cls: type) -> None:
    n = 6
    sub = cls(4, 3).double()
    plain = nn.Linear(4, 3).double()
    plain.load_state_dict(sub.state_dict())
    assert helper_for(sub) is LinearLayer
    x, w = torch.randn(n, 4, dtype=DT), torch.randn(n, 3, dtype=DT)
    states = []
    for module in (sub, plain):
        opt = KFAC(module, lr=0.0)
        out = module(x)
        out.retain_grad()
        _loss(out, w).backward()
        opt.step()
        states.append(opt.layer_state(opt.layers[0]))
        e = n * out.grad
        _close(states[-1]["G"], e.T @ e / n)
        _close(states[-1]["A"], _with_ones(x).T @ _with_ones(x) / n)
    assert torch.equal(states[0]["A"], states[1]["A"]) and torch.equal(states[0]["G"], states[1]["G"])


def test_registration_by_dotted_name_covers_the_class_and_its_subclasses() -> None:
    class Sub(Conv1D):
        pass

    assert registered_layers()["transformers.pytorch_utils.Conv1D"] is TransposedLinearLayer
    assert helper_for(Conv1D(3, 2)) is TransposedLinearLayer
    assert helper_for(Sub(3, 2)) is TransposedLinearLayer


def test_register_layer_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="dotted class name"):
        register_layer("Conv1D", LinearLayer)
    with pytest.raises(TypeError, match="module_type"):
        register_layer(int, LinearLayer)
    with pytest.raises(TypeError, match="helper"):
        register_layer(nn.Linear, object)


@pytest.mark.parametrize("kind, side", [("linear", "G"), ("conv1d", "G"), ("conv2d", "G"),
                                        ("conv3d", "G"), ("embedding", "A"), ("transposed", "A"),
                                        ("weight-normed transposed", "A")])
def test_each_helper_says_which_kronecker_side_its_weights_dim_0_is(kind: str, side: str) -> None:
    """``dim0``: the weight's dim 0 indexes the rows of the gradient matrix (G) or its columns
    (A), and ``to_matrix`` / ``split`` lay the weight out so."""
    module = {"linear": lambda: nn.Linear(3, 2), "conv1d": lambda: nn.Conv1d(2, 3, 2),
              "conv2d": lambda: nn.Conv2d(2, 3, 2), "conv3d": lambda: nn.Conv3d(2, 3, 2),
              "embedding": lambda: nn.Embedding(5, 3), "transposed": lambda: Conv1D(2, 3),
              "weight-normed transposed": lambda: parametrizations.weight_norm(Conv1D(2, 3), dim=0)}[kind]()
    layer = make_layers(module)[0][0]
    assert layer.dim0 == side
    w = torch.randn(layer.weight.shape, dtype=DT)
    tensors = [w] + ([torch.randn(layer.bias.shape, dtype=DT)] if layer.has_bias else [])
    mat = layer.inner.to_matrix(tensors) if kind.startswith("weight") else layer.to_matrix(tensors)
    assert tuple(mat.shape) == layer.dims()
    core = mat[:, :-1] if layer.has_bias else mat
    for i in range(w.shape[0]):   # dim 0's slice i is row i (G) or column i (A)
        assert torch.equal(core[i] if side == "G" else core[:, i], w[i].reshape(-1))
    back = layer.inner.split(mat) if kind.startswith("weight") else layer.split(mat)
    assert all(torch.equal(a, b) for a, b in zip(back, tensors))


# ----------------------------------------------------------------------------- Conv1d


def _manual_patches_1d(x: Tensor, conv: nn.Conv1d) -> Tensor:
    """(N, T, C*k) patches by slicing a padded copy (channel-major, then kernel position)."""
    (k,), (s,), (d,) = conv.kernel_size, conv.stride, conv.dilation
    if conv.padding == "same":
        total = d * (k - 1)
        left, right = total // 2, total - total // 2
    else:
        left = right = 0 if conv.padding == "valid" else conv.padding[0]
    if conv.padding_mode == "zeros":
        xp = torch.cat([x.new_zeros(*x.shape[:2], left), x, x.new_zeros(*x.shape[:2], right)], -1)
    elif conv.padding_mode == "circular":
        xp = torch.cat([x[..., x.shape[-1] - left:], x, x[..., :right]], -1)
    else:  # reflect
        xp = torch.cat([x[..., 1:left + 1].flip(-1), x, x[..., -right - 1:-1].flip(-1)], -1)
    t_out = (xp.shape[-1] - d * (k - 1) - 1) // s + 1
    rows = [xp[:, :, t * s: t * s + d * (k - 1) + 1: d].reshape(x.shape[0], -1) for t in range(t_out)]
    return torch.stack(rows, dim=1)


CONV1D_CASES = {
    "plain": dict(kernel_size=3),
    "stride-pad-dilation": dict(kernel_size=3, stride=2, padding=2, dilation=2),
    "same": dict(kernel_size=4, padding="same", dilation=2),
    "valid-nobias": dict(kernel_size=2, padding="valid", bias=False),
    "reflect": dict(kernel_size=3, padding=2, padding_mode="reflect"),
    "circular": dict(kernel_size=3, padding=1, padding_mode="circular", stride=2),
}


@pytest.mark.parametrize("case", sorted(CONV1D_CASES))
def test_conv1d_factors_match_manual_patches(case: str) -> None:
    n = 3
    conv = nn.Conv1d(2, 4, **CONV1D_CASES[case]).double()
    assert helper_for(conv) is Conv1dLayer
    x = torch.randn(n, 2, 9, dtype=DT)
    opt = KFAC(conv, lr=0.0)
    out = conv(x)
    out.retain_grad()
    _loss(out, torch.randn_like(out)).backward()
    opt.step()
    patches = _manual_patches_1d(x, conv)
    t = out.shape[-1]
    assert patches.shape == (n, t, 2 * conv.kernel_size[0])
    rows = patches.reshape(n * t, -1)
    abar = _with_ones(rows) if conv.bias is not None else rows
    g_hat = out.grad.transpose(1, 2).reshape(n * t, -1)
    # the manual patch order agrees with autograd: sum_t g_hat a_bar^T = [dW db]
    _close(g_hat.T @ abar, opt.layers[0].grad_matrix())
    e = n * g_hat
    st = opt.layer_state(opt.layers[0])
    _close(st["A"], abar.T @ abar / (n * t))
    _close(st["G"], e.T @ e / n)


def test_conv1d_one_example_one_position_is_outer_product() -> None:
    conv = nn.Conv1d(2, 3, kernel_size=3, dilation=2).double()
    x = torch.randn(1, 2, 5, dtype=DT)
    y = torch.randn(1, 3, 1, dtype=DT)

    def one(p, xi, yi):
        return _loss(functional_call(conv, p, (xi[None],)), yi[None])

    pg = vmap(grad(one), in_dims=(None, 0, 0))({k: v.detach() for k, v in conv.named_parameters()}, x, y)
    v = torch.cat([pg["weight"][0].reshape(3, -1), pg["bias"][0][:, None]], 1).reshape(-1)
    opt = KFAC(conv, lr=0.0)
    _loss(conv(x), y).backward()
    opt.step()
    st = opt.layer_state(opt.layers[0])
    _close(torch.kron(st["G"], st["A"]), torch.outer(v, v))


def test_unbatched_conv1d_call_is_one_example() -> None:
    conv = nn.Conv1d(2, 3, kernel_size=2).double()
    x = torch.randn(2, 6, dtype=DT)
    opt = KFAC(conv, lr=0.0)
    out = conv(x)
    out.retain_grad()
    _loss(out[None], torch.randn(1, *out.shape, dtype=DT)).backward()
    opt.step()
    abar = _with_ones(_manual_patches_1d(x[None], conv)[0])
    e = out.grad.T
    st = opt.layer_state(opt.layers[0])
    _close(st["A"], abar.T @ abar / abar.shape[0])
    _close(st["G"], e.T @ e)


# ------------------------------------------------------------- grouped / depthwise convolutions

GROUPED_CASES = {  # (module, input shape)
    "conv1d-groups2": (lambda: nn.Conv1d(4, 6, 3, groups=2, padding=1), (3, 4, 7)),
    "conv1d-depthwise-nobias": (lambda: nn.Conv1d(3, 3, 2, groups=3, bias=False, stride=2),
                                (2, 3, 9)),
    "conv2d-depthwise": (lambda: nn.Conv2d(4, 4, 3, groups=4, padding=1), (2, 4, 5, 5)),
    "conv2d-groups2-multiplier": (lambda: nn.Conv2d(4, 6, (2, 3), groups=2, stride=(1, 2)),
                                  (3, 4, 4, 6)),
}


def _grouped_rows(conv: nn.Module, x: Tensor, out: Tensor) -> tuple[Tensor, Tensor, int]:
    """(a_bar (N T, C k [+1]) by slicing (1-D) or unfold (2-D), g_hat (N T, O), N)."""
    n = x.shape[0]
    if isinstance(conv, nn.Conv1d):
        rows = _manual_patches_1d(x, conv).reshape(-1, conv.weight[0].numel() * conv.groups)
        g_hat = out.grad.transpose(1, 2).reshape(-1, out.shape[1])
    else:
        patches = nn.functional.unfold(x, conv.kernel_size, dilation=conv.dilation,
                                       padding=conv.padding, stride=conv.stride)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        g_hat = out.grad.permute(0, 2, 3, 1).reshape(-1, out.shape[1])
    return rows, g_hat, n


def _per_group(conv: nn.Module, rows: Tensor, g_hat: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per group j: (a_bar_j with the ones column when biased, g_hat_j)."""
    g = conv.groups
    out = []
    for j in range(g):
        a = rows.reshape(rows.shape[0], g, -1)[:, j]
        out.append((_with_ones(a) if conv.bias is not None else a,
                    g_hat.reshape(g_hat.shape[0], g, -1)[:, j]))
    return out


@pytest.mark.parametrize("case", sorted(GROUPED_CASES))
def test_grouped_conv_block_diagonal_factors_and_gradient_layout(case: str) -> None:
    make, shape = GROUPED_CASES[case]
    conv = make().double()
    x = torch.randn(*shape, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # covered: no construction warning
        opt = KFAC(conv, lr=0.0)
    layer = opt.layers[0]
    g = conv.groups
    assert opt.coverage().fraction("kronecker") == 1.0
    out = conv(x)
    out.retain_grad()
    _loss(out, torch.randn_like(out)).backward()
    opt.step()
    rows, g_hat, n = _grouped_rows(conv, x, out)
    st = opt.layer_state(layer)
    V = layer.grad_matrix()
    assert V.shape == layer.matrix_shape() == (g, conv.out_channels // g,
                                               conv.weight[0].numel() + int(conv.bias is not None))
    assert st["A"].shape == (g, V.shape[2], V.shape[2]) and st["G"].shape == (g, V.shape[1],
                                                                              V.shape[1])
    for j, (abar, gh) in enumerate(_per_group(conv, rows, g_hat)):
        _close(gh.T @ abar, V[j])                         # the layout agrees with autograd
        e = n * gh
        _close(st["A"][j], abar.T @ abar / abar.shape[0])
        _close(st["G"][j], e.T @ e / n)
    parts = layer.split(V)                                # split inverts grad_matrix
    for p, t in zip(layer.params, parts):
        _close(t, p.grad)


@pytest.mark.parametrize("conv", [nn.Conv1d(4, 6, 3, groups=2), nn.Conv2d(3, 6, 2, groups=3)],
                         ids=["conv1d", "conv2d"])
def test_grouped_conv_one_example_one_position_is_outer_product_per_group(conv) -> None:
    """torch.func: for one example at one output position, A_j (x) G_j = v_j v_j^T per group,
    v_j the group's per-example gradient of [W_j b_j]."""
    conv = conv.double()
    shape = (1, conv.in_channels) + tuple(conv.kernel_size)
    x = torch.randn(*shape, dtype=DT)
    y = torch.randn(1, conv.out_channels, *([1] * len(conv.kernel_size)), dtype=DT)

    def one(p, xi, yi):
        return _loss(functional_call(conv, p, (xi[None],)), yi[None])

    pg = vmap(grad(one), in_dims=(None, 0, 0))(
        {k: v.detach() for k, v in conv.named_parameters()}, x, y)
    g = conv.groups
    opt = KFAC(conv, lr=0.0)
    _loss(conv(x), y).backward()
    opt.step()
    st = opt.layer_state(opt.layers[0])
    W = pg["weight"][0].reshape(g, conv.out_channels // g, -1)
    b = pg["bias"][0].reshape(g, -1, 1)
    for j in range(g):
        v = torch.cat([W[j], b[j]], 1).reshape(-1)
        _close(torch.kron(st["G"][j], st["A"][j]), torch.outer(v, v))


@pytest.mark.parametrize("inverse, sync_free", [("eigen", False), ("newton", False),
                                                ("cholesky", False), ("newton", True),
                                                ("cholesky", True)])
def test_grouped_conv_step_is_the_dense_block_diagonal_solve(inverse: str, sync_free: bool
                                                             ) -> None:
    """Two steps (the second from a previous inverse) against the dense float64 solve of the
    block-diagonal Kronecker matrix, group by group: eigen (A_j (x) G_j + damping I)^-1 V_j;
    factored Tikhonov with pi_j from group j's own traces (the groups' inputs are scaled apart,
    so that one pi from the whole block's traces gives another step; checked)."""
    torch.manual_seed(1)
    damping, lr = 0.05, 0.3
    conv = nn.Conv2d(4, 6, 3, groups=2, padding=1).double()
    opt = KFAC(conv, lr=lr, damping=damping, inverse=inverse, inverse_every=1, kl_clip=None,
               sync_free=sync_free, factor_decay=0.9)
    scale = torch.tensor([1.0, 1.0, 10.0, 10.0], dtype=DT).view(1, 4, 1, 1)  # group 1 x 10
    for _ in range(2):
        x = torch.randn(3, 4, 4, 4, dtype=DT) * scale
        w = torch.randn(3, 6, 4, 4, dtype=DT)
        opt.zero_grad()
        W0 = opt.layers[0].to_matrix([p.detach() for p in opt.layers[0].params]).clone()
        _fit_once(opt, conv, x, w)
        layer = opt.layers[0]
        V = layer.grad_matrix()
        st = opt.layer_state(layer)
        A, G = st["A"], st["G"]
        pis = [math.sqrt((A[j].trace() / A.shape[1]) / (G[j].trace() / G.shape[1]))
               for j in range(conv.groups)]
        whole = math.sqrt((A.diagonal(dim1=-2, dim2=-1).sum() / (A.shape[0] * A.shape[1]))
                          / (G.diagonal(dim1=-2, dim2=-1).sum() / (G.shape[0] * G.shape[1])))
        rd = math.sqrt(damping)
        eg, ea = torch.eye(G.shape[1], dtype=DT), torch.eye(A.shape[1], dtype=DT)

        def tikhonov(j: int, pi: float) -> Tensor:
            return torch.linalg.solve(G[j] + rd / pi * eg, V[j]) @ torch.linalg.inv(
                A[j] + pi * rd * ea)
        if inverse == "eigen":
            D = torch.stack([_dense_eigen_step(A[j], G[j], V[j], damping)
                             for j in range(conv.groups)])
        else:
            D = torch.stack([tikhonov(j, pis[j]) for j in range(conv.groups)])
            other = torch.stack([tikhonov(j, whole) for j in range(conv.groups)])
            assert not torch.allclose(D, other, rtol=1e-3, atol=0)  # the test tells them apart
        W1 = layer.to_matrix([p.detach() for p in layer.params])
        tol = dict(rtol=1e-6, atol=1e-8) if inverse == "newton" else dict(rtol=1e-8, atol=1e-10)
        _close(W1, W0 - lr * D, **tol)


class _SplitConv(nn.Module):
    """g dense convolutions, conv j on input channels j C/g .. (j + 1) C/g, outputs concatenated:
    a grouped convolution written as g separate layers."""

    def __init__(self, grouped: nn.Conv2d) -> None:
        super().__init__()
        g = grouped.groups
        c, o = grouped.in_channels // g, grouped.out_channels // g
        self.convs = nn.ModuleList(
            nn.Conv2d(c, o, grouped.kernel_size, padding=grouped.padding).to(grouped.weight.dtype)
            for _ in range(g))
        with torch.no_grad():
            for j, conv in enumerate(self.convs):
                conv.weight.copy_(grouped.weight[j * o:(j + 1) * o])
                conv.bias.copy_(grouped.bias[j * o:(j + 1) * o])

    def forward(self, x: Tensor) -> Tensor:
        parts = x.chunk(len(self.convs), 1)
        return torch.cat([conv(part) for conv, part in zip(self.convs, parts)], 1)


@pytest.mark.parametrize("inverse", ["eigen", "newton", "cholesky"])
def test_grouped_conv_steps_like_its_groups_as_separate_layers(inverse: str) -> None:
    """K-FAC on a grouped convolution takes the steps it takes on the same groups written as g
    separate dense convolutions (each group its own Kronecker block, damping split included),
    with the groups' inputs on scales 1 and 30."""
    torch.manual_seed(2)
    grouped = nn.Conv2d(4, 6, 3, groups=2, padding=1).double()
    split = _SplitConv(grouped)
    kw = dict(lr=0.3, damping=0.05, inverse=inverse, inverse_every=1, kl_clip=None,
              factor_decay=0.9)
    opt_grouped = KFAC(grouped, **kw)
    opt_split = KFAC(split, **kw)
    scale = torch.tensor([1.0, 1.0, 30.0, 30.0], dtype=DT).view(1, 4, 1, 1)
    for _ in range(3):
        x, w = torch.randn(5, 4, 4, 4, dtype=DT) * scale, torch.randn(5, 6, 4, 4, dtype=DT)
        opt_grouped.zero_grad()
        _fit_once(opt_grouped, grouped, x, w)
        opt_split.zero_grad()
        _fit_once(opt_split, split, x, w)
    tol = dict(rtol=1e-6, atol=1e-9) if inverse == "newton" else dict(rtol=1e-9, atol=1e-12)
    _close(grouped.weight.detach(), torch.cat([c.weight.detach() for c in split.convs]), **tol)
    _close(grouped.bias.detach(), torch.cat([c.bias.detach() for c in split.convs]), **tol)


def test_depthwise_conv_eigen_step_is_the_dense_block_diagonal_solve() -> None:
    """A depthwise conv (G_c a scalar per channel, A_c (k k + 1)^2) at K-FAC's default damping,
    the whole block laid out as one dense float64 matrix diag_c(G_c (x) A_c): the eigen step is
    (that matrix + damping I)^-1 vec(V), every channel's damping exact whatever its G_c's scale."""
    torch.manual_seed(2)
    damping, lr, c = 1e-3, 0.01, 5
    conv = nn.Conv2d(c, c, 3, padding=1, groups=c).double()
    opt = KFAC(conv, lr=lr, damping=damping, inverse="eigen", inverse_every=1, kl_clip=None)
    x = torch.randn(4, c, 6, 6, dtype=DT) * torch.logspace(-2, 1, c, dtype=DT)[:, None, None]
    layer = opt.layers[0]
    W0 = layer.to_matrix([p.detach() for p in layer.params]).clone()
    _fit_once(opt, conv, x, torch.randn(4, c, 6, 6, dtype=DT))
    st = opt.layer_state(layer)
    assert st["G"].shape == (c, 1, 1) and st["A"].shape == (c, 10, 10)
    V = layer.grad_matrix()
    K = torch.block_diag(*(torch.kron(st["G"][j], st["A"][j]) for j in range(c)))
    D = torch.linalg.solve(K + damping * torch.eye(K.shape[0], dtype=DT), V.reshape(-1))
    _close(layer.to_matrix([p.detach() for p in layer.params]), W0 - lr * D.reshape(V.shape),
           rtol=1e-8, atol=1e-10)


def test_grouped_conv_rkalman_is_the_kalman_filter_per_group() -> None:
    """R-Kalman on a block-diagonal factor: P_j <- Kalman(P_j, rows of group j) per group."""
    from grng.ops import reference
    conv = nn.Conv1d(4, 4, 3, groups=2).double()
    x = torch.randn(2, 4, 5, dtype=DT)
    opt = RKalman(conv, lr=0.0, kalman_rank=64)
    out = conv(x)
    out.retain_grad()
    _loss(out, torch.randn_like(out)).backward()
    opt.step()
    st = opt.layer_state(opt.layers[0])
    assert st["PA"].shape == (2, 7, 7) and st["PG"].shape == (2, 2, 2)
    rows, g_hat, n = _grouped_rows(conv, x, out)
    cfg = opt.block.config
    prior = 1.0 / opt.block.kalman.prior_precision
    for j, (abar, gh) in enumerate(_per_group(conv, rows, g_hat)):
        for P, H, m, s in ((st["PA"][j], abar, abar.shape[0], 1.0), (st["PG"][j], gh, n, n)):
            expect = prior * torch.eye(P.shape[0], dtype=DT)
            reference.kalman_update(expect, H, m / ((1.0 - cfg.factor_decay) * s ** 2),
                                    cfg.factor_decay, opt.block.kalman.process_noise)
            cap = opt.block.kalman.max_variance
            if cap is not None:
                d = (cap / expect.diagonal().clamp(min=cap)).sqrt()
                expect = expect * d[:, None] * d[None, :]
            _close(P, expect, rtol=1e-8, atol=1e-10)


def test_grouped_conv_sync_free_rkalman_equals_the_host_path() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(), nn.Linear(36, 2)).double()
    twin = copy.deepcopy(model)
    host, free = RKalman(model, lr=0.1), RKalman(twin, lr=0.1, sync_free=True)
    for _ in range(3):
        x = torch.randn(5, 4, 5, 5, dtype=DT)
        for opt, m in ((host, model), (free, twin)):
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()
    assert free.layer_state(free.layers[0])["PA"].shape == (4, 10, 10)
    for p, q in zip(model.parameters(), twin.parameters()):
        _close(q, p, rtol=1e-12)


@pytest.mark.parametrize("inverse", ["eigen", "cholesky"])
def test_grouped_conv_checkpoint_round_trip_and_shapes(inverse: str) -> None:
    conv = nn.Conv2d(4, 4, 3, groups=4).double()
    opt = KFAC(conv, lr=0.1, inverse=inverse)
    _fit_once(opt, conv, torch.randn(2, 4, 5, 5, dtype=DT), torch.randn(2, 4, 3, 3, dtype=DT))
    sd = opt.state_dict()
    other = KFAC(conv, lr=0.1, inverse=inverse)
    other.load_state_dict(sd)
    for k, v in opt.layer_state(opt.layers[0]).items():
        assert torch.equal(v, other.layer_state(other.layers[0])[k]), k
    dense = KFAC(nn.Conv2d(4, 4, 3).double(), lr=0.1, inverse=inverse)
    with pytest.raises(ValueError, match="has shape"):
        dense.load_state_dict(sd)


# ----------------------------------------------------------------------------- Conv3d


def _manual_patches_3d(x: Tensor, conv: nn.Conv3d) -> Tensor:
    """(N T, C k_d k_h k_w) patches by slicing a zero-padded copy, output positions in
    (d, h, w) order, each patch channel-major then kernel position."""
    p, k, s, d = conv.padding, conv.kernel_size, conv.stride, conv.dilation
    xp = nn.functional.pad(x, (p[2], p[2], p[1], p[1], p[0], p[0]))
    out = [(xp.shape[2 + i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(3)]
    rows = []
    for n in range(x.shape[0]):
        for i in range(out[0]):
            for j in range(out[1]):
                for l in range(out[2]):
                    patch = xp[n, :, i * s[0]: i * s[0] + d[0] * (k[0] - 1) + 1: d[0],
                               j * s[1]: j * s[1] + d[1] * (k[1] - 1) + 1: d[1],
                               l * s[2]: l * s[2] + d[2] * (k[2] - 1) + 1: d[2]]
                    rows.append(patch.reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("kwargs", [dict(kernel_size=2), dict(kernel_size=(2, 1, 3), padding=1,
                                    stride=(1, 2, 1), dilation=(2, 1, 1), bias=False),
                                    dict(kernel_size=2, groups=2)],
                         ids=["plain", "pad-stride-dilation-nobias", "groups2"])
def test_conv3d_factors_match_manual_patches(kwargs) -> None:
    torch.manual_seed(0)
    conv = nn.Conv3d(4, 6, **kwargs).double()
    x = torch.randn(2, 4, 4, 3, 5, dtype=DT)
    opt = KFAC(conv, lr=0.0)
    out = conv(x)
    out.retain_grad()
    _loss(out, torch.randn_like(out)).backward()
    opt.step()
    rows = _manual_patches_3d(x, conv)
    g_hat = out.grad.permute(0, 2, 3, 4, 1).reshape(-1, out.shape[1])
    layer, st, n = opt.layers[0], opt.layer_state(opt.layers[0]), x.shape[0]
    V = layer.grad_matrix()
    for j, (abar, gh) in enumerate(_per_group(conv, rows, g_hat)):
        Vj, A, G = (V, st["A"], st["G"]) if conv.groups == 1 else (V[j], st["A"][j], st["G"][j])
        _close(gh.T @ abar, Vj)
        _close(A, abar.T @ abar / abar.shape[0])
        _close(G, (n * gh).T @ (n * gh) / n)


def test_conv3d_one_example_one_position_is_outer_product() -> None:
    conv = nn.Conv3d(2, 3, kernel_size=(2, 2, 3)).double()
    x = torch.randn(1, 2, 2, 2, 3, dtype=DT)
    y = torch.randn(1, 3, 1, 1, 1, dtype=DT)

    def one(p, xi, yi):
        return _loss(functional_call(conv, p, (xi[None],)), yi[None])

    params = {k: v.detach() for k, v in conv.named_parameters()}
    pg = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    v = torch.cat([pg["weight"][0].reshape(3, -1), pg["bias"][0][:, None]], 1).reshape(-1)
    opt = KFAC(conv, lr=0.0)
    _loss(conv(x), y).backward()
    opt.step()
    st = opt.layer_state(opt.layers[0])
    _close(torch.kron(st["G"], st["A"]), torch.outer(v, v))


# ------------------------------------------------------------- transformers' Conv1D


def _conv1d_classes() -> list:
    classes = [Conv1D]
    try:
        from transformers.pytorch_utils import Conv1D as HFConv1D
    except ImportError:  # the replica above stands in
        return classes
    return classes + [HFConv1D]


@pytest.mark.parametrize("cls", _conv1d_classes(), ids=lambda c: c.__module__)
def test_transposed_linear_factors_and_gradient_layout(cls: type) -> None:
    n, nx, nf = 5, 4, 3
    layer = cls(nf, nx).double()
    assert helper_for(layer) is TransposedLinearLayer
    x, w = torch.randn(n, 2, nx, dtype=DT), torch.randn(n, 2, nf, dtype=DT)
    rows_x, rows_w = x.reshape(-1, nx), w.reshape(-1, nf)

    def one(p, xi, wi):
        return _loss(functional_call(layer, p, (xi[None],)), wi[None])

    pg = vmap(grad(one), in_dims=(None, 0, 0))({k: v.detach() for k, v in layer.named_parameters()},
                                                rows_x, rows_w)   # every token is an example
    e = pg["bias"]                                                  # (N, nf)
    _close(pg["weight"], rows_x[:, :, None] * e[:, None, :])         # weight is in x out
    opt = KFAC(layer, lr=0.0)
    _loss(layer(x).reshape(-1, nf), rows_w).backward()     # a mean over the tokens
    block = opt.layers[0]
    assert block.dims() == (nf, nx + 1)
    # the gradient matrix is d_G x d_A = [W^T b]: the transpose of the stored weight's
    _close(block.grad_matrix(), torch.cat([layer.weight.grad.T, layer.bias.grad[:, None]], 1))
    opt.step()
    st = opt.layer_state(block)
    N = n * 2
    abar = _with_ones(rows_x)
    _close(st["A"], abar.T @ abar / N)
    _close(st["G"], e.T @ e / N)


def test_transposed_linear_one_example_identity_and_step() -> None:
    layer = Conv1D(3, 4).double()
    x, w = torch.randn(1, 4, dtype=DT), torch.randn(1, 3, dtype=DT)
    damping, lr = 0.1, 0.5
    opt = KFAC(layer, lr=lr, damping=damping, inverse_every=1, kl_clip=None)  # the plain step
    _loss(layer(x), w).backward()
    V = torch.cat([layer.weight.grad.T, layer.bias.grad[:, None]], 1)
    W0 = torch.cat([layer.weight.detach().T, layer.bias.detach()[:, None]], 1).clone()
    opt.step()
    st = opt.layer_state(opt.layers[0])
    v = V.reshape(-1)
    _close(torch.kron(st["G"], st["A"]), torch.outer(v, v))
    D = _dense_eigen_step(st["A"], st["G"], V, damping)
    W1 = torch.cat([layer.weight.detach().T, layer.bias.detach()[:, None]], 1)
    _close(W1, W0 - lr * D, rtol=1e-9)


# --------------------------------------------------------------------- keyword inputs


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "embedding", "transposed"])
def test_keyword_inputs_are_captured_like_positional_ones(kind: str) -> None:
    make, x, key = {
        "linear": (lambda: nn.Linear(3, 2), torch.randn(4, 3), "input"),
        "conv1d": (lambda: nn.Conv1d(2, 3, 2), torch.randn(4, 2, 5), "input"),
        "conv2d": (lambda: nn.Conv2d(2, 3, 2), torch.randn(4, 2, 3, 3), "input"),
        "embedding": (lambda: nn.Embedding(5, 3), torch.randint(0, 5, (4, 2)), "input"),
        "transposed": (lambda: Conv1D(2, 3), torch.randn(4, 3), "x"),
    }[kind]
    torch.manual_seed(0)
    module = make().double()
    x = x.double() if x.is_floating_point() else x
    states = []
    for call in (lambda m: m(x), lambda m: m(**{key: x})):
        m = copy.deepcopy(module)
        opt = KFAC(m, lr=0.0)
        out = call(m)
        _loss(out, torch.ones_like(out)).backward()
        opt.step()
        states.append(opt.layer_state(opt.layers[0]))
    assert torch.equal(states[0]["A"], states[1]["A"]) and torch.equal(states[0]["G"], states[1]["G"])


# ------------------------------------------------------------------ MultiheadAttention


def _masks(kind: str, L: int, S: int, B: int) -> dict:
    g = torch.Generator().manual_seed(3)
    if kind == "bool":
        return {"attn_mask": torch.rand(L, S, generator=g) > 0.7}
    if kind == "float":
        return {"attn_mask": torch.randn(L, S, generator=g, dtype=DT)}
    if kind == "padding":
        return {"key_padding_mask": torch.rand(B, S, generator=g) > 0.7}
    if kind == "causal":
        return {"attn_mask": nn.Transformer.generate_square_subsequent_mask(L, dtype=DT), "is_causal": True}
    return {}


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kind", ["self", "cross", "distinct", "kdim"])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("mask", ["none", "bool", "float", "padding", "causal"])
@pytest.mark.parametrize("extras", [False, True])
def test_attention_forward_is_torch_op_for_op(batch_first: bool, kind: str, need_weights: bool,
                                              mask: str, extras: bool) -> None:
    """The re-expressed forward gives torch's outputs, weights and gradients bit for bit."""
    E, H, L, B = 8, 2, 4, 3
    S = L if kind == "self" or mask == "causal" else 5
    kdim = 5 if kind == "kdim" else None
    m = nn.MultiheadAttention(E, H, bias=not extras, add_bias_kv=extras, add_zero_attn=extras,
                              kdim=kdim, vdim=kdim, batch_first=batch_first).double()

    def make(T: int, d: int) -> Tensor:
        return torch.randn(*((B, T, d) if batch_first else (T, B, d)), dtype=DT, requires_grad=True)

    q = make(L, E)
    if kind == "self":
        k = v = q
    elif kind == "cross":
        k = v = make(S, E)
    else:
        k, v = make(S, kdim or E), make(S, kdim or E)
    kw = dict(need_weights=need_weights, **_masks(mask, L, S, B))
    reports = []
    ref = m(q, k, v, **kw)
    mine = attention_forward(m, lambda *a: reports.append(a[0]), q, k, v, **kw)
    def same(a: Tensor, b: Tensor) -> None:  # bit for bit (a fully masked row is NaN in both)
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)

    same(mine[0], ref[0])
    assert (ref[1] is None) == (mine[1] is None)
    if ref[1] is not None:
        same(mine[1], ref[1])
    params = list(m.parameters())
    g_ref = torch.autograd.grad(ref[0].nan_to_num().sum(), params)
    g_mine = torch.autograd.grad(mine[0].nan_to_num().sum(), params)
    for a, b in zip(g_mine, g_ref):
        same(a, b)
    assert reports[-1] == "out_proj" and set(reports) == (
        {"q_proj", "k_proj", "v_proj", "out_proj"} if kdim else {"in_proj", "out_proj"})


def _attention_by_hand(m: nn.MultiheadAttention, query: Tensor, key: Tensor
                       ) -> tuple[Tensor, tuple[Tensor, ...]]:
    """nn.MultiheadAttention (sequence-first, bias, no mask, no dropout) written out, with the
    projection outputs and the attended values (out_proj's input) retaining their gradients."""
    E, H = m.embed_dim, m.num_heads
    d = E // H
    W, b = m.in_proj_weight, m.in_proj_bias
    q = query @ W[:E].T + b[:E]
    k = key @ W[E:2 * E].T + b[E:2 * E]
    v = key @ W[2 * E:].T + b[2 * E:]
    L, B, S = q.shape[0], q.shape[1], k.shape[0]

    def heads(t: Tensor, T: int) -> Tensor:
        return t.reshape(T, B, H, d).permute(1, 2, 0, 3)

    att = torch.softmax(heads(q, L) @ heads(k, S).transpose(-1, -2) / math.sqrt(d), -1) @ heads(v, S)
    o = att.permute(2, 0, 1, 3).reshape(L, B, E)
    out = o @ m.out_proj.weight.T + m.out_proj.bias
    for t in (q, k, v, o, out):
        t.retain_grad()
    return out, (q, k, v, o)


@pytest.mark.parametrize("cross", [False, True])
def test_attention_blocks_match_attention_written_out(cross: bool) -> None:
    """in_proj: one block, A over every projected token, G over the 3E outputs (a cross call's
    rows are zero in the columns it does not produce); out_proj: a block on the attended values."""
    E, H, L, S, B = 6, 2, 4, 5, 3
    m = nn.MultiheadAttention(E, H).double()
    x = torch.randn(L, B, E, dtype=DT)
    mem = torch.randn(S, B, E, dtype=DT) if cross else x
    w = torch.randn(L, B, E, dtype=DT)
    out, (q, k, v, o) = _attention_by_hand(m, x, mem)
    _loss(out.transpose(0, 1), w.transpose(0, 1)).backward()
    m.zero_grad()

    opt = KFAC(m, lr=0.0)
    assert opt.capture.names == ["in_proj", "out_proj"]
    mine = m(x, mem, mem)[0]
    torch.testing.assert_close(mine, out, rtol=1e-12, atol=1e-12)
    _loss(mine.transpose(0, 1), w.transpose(0, 1)).backward()
    opt.step()

    if cross:
        a_rows = torch.cat([x.reshape(-1, E), mem.reshape(-1, E)])
        zq, zkv = torch.zeros(L * B, 2 * E, dtype=DT), torch.zeros(S * B, E, dtype=DT)
        g_rows = torch.cat([torch.cat([q.grad.reshape(-1, E), zq], 1),
                            torch.cat([zkv, k.grad.reshape(-1, E), v.grad.reshape(-1, E)], 1)])
    else:
        a_rows = x.reshape(-1, E)
        g_rows = torch.cat([q.grad, k.grad, v.grad], -1).reshape(-1, 3 * E)
    n = a_rows.shape[0]
    abar, e = _with_ones(a_rows), n * g_rows
    st = _state(opt, "in_proj")
    _close(st["A"], abar.T @ abar / n)
    _close(st["G"], e.T @ e / n)
    # the rows reproduce the gradient: sum g_hat a_bar^T = [dW_in db_in]
    _close(g_rows.T @ abar, _layer(opt, "in_proj").grad_matrix())

    obar, e_out = _with_ones(o.detach().reshape(-1, E)), L * B * out.grad.reshape(-1, E)
    st = _state(opt, "out_proj")
    _close(st["A"], obar.T @ obar / (L * B))
    _close(st["G"], e_out.T @ e_out / (L * B))


def test_attention_one_token_is_outer_product_of_its_gradient() -> None:
    m = nn.MultiheadAttention(4, 2).double()
    x = torch.randn(1, 1, 4, dtype=DT)
    opt = KFAC(m, lr=0.0)
    _loss(m(x, x, x)[0][0], torch.randn(1, 4, dtype=DT)).backward()
    opt.step()
    for name, weight, bias in (("in_proj", m.in_proj_weight, m.in_proj_bias),
                               ("out_proj", m.out_proj.weight, m.out_proj.bias)):
        st = _state(opt, name)
        vec = torch.cat([weight.grad, bias.grad[:, None]], 1).reshape(-1)
        _close(torch.kron(st["G"], st["A"]), torch.outer(vec, vec))


def test_attention_rows_reproduce_per_sequence_gradients() -> None:
    """torch.func per-example (per-sequence) gradients of in_proj and out_proj are the sums of
    the captured rows' outer products over that sequence's tokens."""
    E, H, L, B = 6, 3, 5, 4
    m = nn.MultiheadAttention(E, H, batch_first=True).double()
    x, w = torch.randn(B, L, E, dtype=DT), torch.randn(B, L, E, dtype=DT)
    params = {k: p.detach() for k, p in m.named_parameters()}

    def one(p, xi, wi):
        return _loss(functional_call(m, p, (xi[None], xi[None], xi[None]))[0], wi[None])

    pg = vmap(grad(one), in_dims=(None, 0, 0))(params, x, w)
    opt = KFAC(m, lr=0.0)
    _loss(m(x, x, x)[0], w).backward()
    for name, wkey, bkey in (("in_proj", "in_proj_weight", "in_proj_bias"),
                             ("out_proj", "out_proj.weight", "out_proj.bias")):
        a_rows, g_rows = opt.capture.rows(_layer(opt, name))
        # rows are sequence-first (the module transposes): token t of sequence n is row t B + n
        A = a_rows.X.reshape(L, B, -1)
        Eg = (g_rows.X * g_rows.scale).reshape(L, B, -1)
        for n in range(B):
            expected = torch.cat([pg[wkey][n], pg[bkey][n][:, None]], 1)
            _close(B / g_rows.n * Eg[:, n].T @ A[:, n], expected, rtol=1e-9)
    opt.step()


def test_separate_kdim_vdim_projections_get_weight_blocks_and_a_diagonal_bias() -> None:
    E, L, S, B = 6, 3, 4, 2
    m = nn.MultiheadAttention(E, 2, kdim=3, vdim=5).double()
    q, k, v = (torch.randn(L, B, E, dtype=DT), torch.randn(S, B, 3, dtype=DT),
               torch.randn(S, B, 5, dtype=DT))
    opt = KFAC(m, lr=0.0)
    assert opt.capture.names == ["q_proj", "k_proj", "v_proj", "out_proj"]
    cov = opt.coverage()
    assert cov["in_proj_bias"].treatment == "diagonal"
    assert {cov[f"{r}_proj_weight"].block for r in "qkv"} == {"q_proj", "k_proj", "v_proj"}
    _loss(m(q, k, v)[0], torch.randn(L, B, E, dtype=DT)).backward()
    for name, inputs, weight in (("q_proj", q, m.q_proj_weight), ("k_proj", k, m.k_proj_weight),
                                 ("v_proj", v, m.v_proj_weight)):
        a_rows, g_rows = opt.capture.rows(_layer(opt, name))
        _close(a_rows.X, inputs.reshape(-1, inputs.shape[-1]))        # weight-only: no ones
        _close(g_rows.X.T @ a_rows.X, weight.grad)
    opt.step()
    assert _state(opt, "k_proj")["A"].shape == (3, 3) and _state(opt, "v_proj")["G"].shape == (E, E)


@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_layers_are_covered_and_unchanged(batch_first: bool) -> None:
    torch.manual_seed(0)
    enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first).double()
    dec = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first).double()
    plain = copy.deepcopy(enc)
    shape = (2, 5, 8) if batch_first else (5, 2, 8)
    src, tgt = torch.randn(*shape, dtype=DT), torch.randn(*shape, dtype=DT)
    before = (enc(src), dec(tgt, src))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # nothing falls to the diagonal silently
        opts = KFAC(enc, lr=0.0), KFAC(dec, lr=0.0)
    for opt, model in zip(opts, (enc, dec)):
        cov = opt.coverage()
        assert not cov.degraded()
        assert {e.name for e in cov.treatment("diagonal")} == {
            n for n, p in model.named_parameters() if "norm" in n}
    assert "multihead_attn.in_proj" in opts[1].capture.names
    after = (enc(src), dec(tgt, src))
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    (after[0].square().mean() + after[1].square().mean()).backward()
    for opt in opts:
        opt.step()
        assert all(opt.layer_state(layer)["A"] is not None for layer in opt.layers)
    opts[0].zero_grad()
    enc.eval()
    plain.eval()
    with torch.no_grad():                                # eval: the module's own (fast) path
        assert torch.equal(enc(src), plain(src))
    assert opts[0].capture.rows(opts[0].layers[0]) is None


def test_attention_forward_is_restored_and_copies_run_their_own() -> None:
    m = nn.MultiheadAttention(4, 2).double()
    x = torch.randn(3, 2, 4, dtype=DT)
    opt1, opt2 = KFAC(m, lr=0.0), KFAC(m, lr=0.0)       # two captures on one module
    twin = copy.deepcopy(m)
    twin(x, x, x)[0].sum().backward()
    assert opt1.capture.rows(opt1.layers[0]) is None     # the copy reports to no capture
    m(x, x, x)[0].sum().backward()
    assert opt1.capture.rows(opt1.layers[0]) is not None
    assert opt2.capture.rows(opt2.layers[0]) is not None
    opt1.capture.remove()
    assert "forward" in vars(m)                          # opt2 still attached
    opt2.capture.remove()
    assert "forward" not in vars(m)


def test_attention_subclass_with_its_own_forward_is_named_not_silently_wrong() -> None:
    class Custom(nn.MultiheadAttention):
        def forward(self, x):
            return super().forward(x, x, x)[0]

    with pytest.warns(UserWarning, match="overrides MultiheadAttention.forward"):
        opt = KFAC(Custom(4, 2))
    assert opt.coverage()["in_proj_weight"].treatment == "diagonal"


# ----------------------------------------------------------------------- weight norm


def _wn_cases() -> dict:
    return {
        "linear-dim0": (lambda: nn.Linear(4, 3), 0, (5, 4)),
        "linear-dim1": (lambda: nn.Linear(4, 3), 1, (5, 4)),
        "linear-whole": (lambda: nn.Linear(4, 3, bias=False), None, (5, 4)),
        "conv1d": (lambda: nn.Conv1d(2, 3, 2), 0, (5, 2, 4)),
        "conv2d": (lambda: nn.Conv2d(2, 3, 2), 0, (5, 2, 3, 3)),
        "transposed": (lambda: Conv1D(3, 4), 0, (5, 4)),
    }


@pytest.mark.parametrize("case", sorted(_wn_cases()))
def test_weight_norm_block_is_the_effective_weights_block(case: str) -> None:
    make, dim, xshape = _wn_cases()[case]
    torch.manual_seed(0)
    plain = make().double()
    wn = parametrizations.weight_norm(copy.deepcopy(plain), dim=dim)
    x = torch.randn(*xshape, dtype=DT)
    opts = [make_optimizer("kfac-eigen", module, lr=0.0) for module in (plain, wn)]
    block = opts[1].layers[0]
    assert isinstance(block, WeightNormLayer)
    po = wn.parametrizations.weight
    assert block.params[0] is po.original1 and block.params[1] is po.original0
    for module, opt in zip((plain, wn), opts):
        out = module(x)
        _loss(out, torch.ones_like(out)).backward()
        opt.step()
    for key in ("A", "G"):
        _close(opts[1].layer_state(block)[key], opts[0].layer_state(opts[0].layers[0])[key])
    # the chain rule recovers the effective weight's gradient from (grad_v, grad_g)
    G_W = block.grad_matrix()
    _close(G_W, opts[0].layers[0].grad_matrix())
    # a direction D on [W b] maps to (delta_v, delta_g) that move W by exactly D (first order)
    D = torch.randn_like(G_W)
    parts = block.split(D)
    D_w = opts[0].layers[0].split(D)[0]
    def weight(v: Tensor, g: Tensor) -> Tensor:  # W = g v / ||v||, written out
        dims = [d for d in range(v.dim()) if d != block.dim] if block.dim != -1 else None
        return g * v / torch.linalg.vector_norm(v, dim=dims, keepdim=dims is not None)

    _close(weight(po.original1, po.original0), wn.weight)
    _, tangent = jvp(weight, (po.original1.detach(), po.original0.detach()), (parts[0], parts[1]))
    _close(tangent, D_w)
    # and the KL estimate sum <d, g> is the effective weight's
    grads = [p.grad for p in block.params]
    _close(sum((d * g).sum() for d, g in zip(parts, grads)), (D * G_W).sum())


def test_weight_normed_attention_out_proj_gets_the_effective_weights_block() -> None:
    m = nn.MultiheadAttention(4, 2).double()
    parametrizations.weight_norm(m.out_proj)
    x = torch.randn(3, 2, 4, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = KFAC(m, lr=0.0)
    block = _layer(opt, "out_proj")
    assert isinstance(block, WeightNormLayer) and opt.capture.names == ["in_proj", "out_proj"]
    out = m(x, x, x)[0]
    _loss(out, torch.ones_like(out)).backward()
    a_rows, g_rows = opt.capture.rows(block)
    _close(g_rows.X.T @ a_rows.X, block.grad_matrix())    # W's gradient, from (grad_v, grad_g)
    opt.step()
    assert opt.layer_state(block)["A"].shape == (5, 5)


def test_deprecated_weight_norm_and_other_parametrizations_are_named() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        old = torch.nn.utils.weight_norm(nn.Linear(3, 4))
    orth = parametrizations.orthogonal(nn.Linear(4, 4))
    model = nn.Sequential(old, nn.Tanh(), orth)
    with pytest.warns(UserWarning) as record:
        opt = KFAC(model)
    message = " ".join(str(r.message) for r in record)  # with the 0 % coverage warning
    assert "0.weight_v" in message and "computed in the forward" in message
    assert "2.parametrizations.weight.original" in message and "parametrized" in message
    assert opt.layers == []


# ------------------------------------------------------------------- max_factor_dim


def _fit_once(opt, model: nn.Module, x: Tensor, w: Tensor) -> Tensor:
    out = model(x)
    out.retain_grad()
    _loss(out, w).backward()
    opt.step()
    return out


@pytest.mark.parametrize("side", ["G", "A", "both"])
@pytest.mark.parametrize("inverse", ["eigen", "newton", "cholesky"])
def test_sides_above_max_factor_dim_are_diagonal_and_preconditioned_exactly(side: str, inverse: str
                                                                            ) -> None:
    n, damping, lr = 9, 0.05, 0.3
    i, o = {"G": (3, 7), "A": (7, 3), "both": (7, 7)}[side]
    lin = nn.Linear(i, o).double()
    x, w = torch.randn(n, i, dtype=DT), torch.randn(n, o, dtype=DT)
    with pytest.warns(UserWarning, match="max_factor_dim=6"):
        opt = KFAC(lin, lr=lr, damping=damping, inverse=inverse, inverse_every=1, kl_clip=None,
                   max_factor_dim=6)
    W0 = torch.cat([lin.weight.detach(), lin.bias.detach()[:, None]], 1).clone()
    out = _fit_once(opt, lin, x, w)
    V = torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1)
    abar, e = _with_ones(x), n * out.grad
    A, G = abar.T @ abar / n, e.T @ e / n
    diag_g, diag_a = side in ("G", "both"), side in ("A", "both")
    st = opt.layer_state(opt.layers[0])
    _close(st["G"], G.diagonal() if diag_g else G)        # a vector: never d x d
    _close(st["A"], A.diagonal() if diag_a else A)
    Am, Gm = st["A"], st["G"]
    if inverse == "eigen":
        D = _dense_eigen_step(Am, Gm, V, damping)
    else:  # factored Tikhonov: pi = sqrt((tr A / d_A) / (tr G / d_G))
        Ad = torch.diag(Am) if diag_a else Am
        Gd = torch.diag(Gm) if diag_g else Gm
        pi = math.sqrt((Ad.trace() / Ad.shape[0]) / (Gd.trace() / Gd.shape[0]))
        rd = math.sqrt(damping)
        D = torch.linalg.solve(Gd + rd / pi * torch.eye(o, dtype=DT), V) @ torch.linalg.inv(
            Ad + pi * rd * torch.eye(i + 1, dtype=DT))
    W1 = torch.cat([lin.weight.detach(), lin.bias.detach()[:, None]], 1)
    _close(W1, W0 - lr * D, rtol=1e-7, atol=1e-9)


def test_rkalman_diagonal_side_is_the_scalar_kalman_filter() -> None:
    n, beta = 6, 0.9
    lin = nn.Linear(3, 7).double()
    with pytest.warns(UserWarning, match="max_factor_dim"):
        opt = RKalman(lin, lr=0.0, rho=0.0, factor_decay=beta, process_noise=0.0,
                      prior_precision=0.5, max_variance=None, max_factor_dim=6, factor_every=1)
    info = torch.full((7,), 0.5, dtype=DT)                # P_G^-1 starts at prior_precision I
    for _ in range(3):
        out = _fit_once(opt, lin, torch.randn(n, 3, dtype=DT), torch.randn(n, 7, dtype=DT))
        e = n * out.grad
        info = beta * info + (1 - beta) * (e * e).mean(0)
        opt.zero_grad()
    PG = opt.layer_state(opt.layers[0])["PG"]
    assert PG.shape == (7,)
    _close(PG, 1.0 / info, rtol=1e-9)


def test_a_large_vocabulary_head_allocates_no_dense_vocabulary_factor() -> None:
    head = nn.Linear(8, 20000)                            # an LM head: d_G = vocabulary
    with pytest.warns(UserWarning, match=r"\(20000\)"):
        opt = KFAC(head, lr=0.0)                          # the default max_factor_dim
    _fit_once(opt, head, torch.randn(4, 8), torch.randn(4, 20000))
    st = opt.layer_state(opt.layers[0])
    assert st["G"].shape == (20000,) and st["A"].shape == (9, 9)
    assert "QG" not in st and st["lG"].shape == (20000,)


def test_diagonal_sides_checkpoint_and_reject_mismatches() -> None:
    lin = nn.Linear(3, 7).double()
    with pytest.warns(UserWarning):
        opt = KFAC(lin, lr=0.1, max_factor_dim=6)
    _fit_once(opt, lin, torch.randn(5, 3, dtype=DT), torch.randn(5, 7, dtype=DT))
    sd = opt.state_dict()
    with pytest.warns(UserWarning):
        other = KFAC(lin, lr=0.1, max_factor_dim=6)
    other.load_state_dict(sd)
    for k, v in opt.layer_state(opt.layers[0]).items():
        assert torch.equal(v, other.layer_state(other.layers[0])[k]), k
    dense = KFAC(lin, lr=0.1)                             # G dense: the saved vector does not fit
    with pytest.raises(ValueError, match="'G' has shape"):
        dense.load_state_dict(sd)


def test_max_factor_dim_compares_a_grouped_convs_per_group_blocks() -> None:
    """Conv2d(8, 12, 3, groups=4): per group G is 3 x 3 and A (2 * 9 + 1) = 19 x 19, the full
    sides 12 and 76. A limit between the per-group and the full sizes keeps the block-diagonal
    factors; a limit below a per-group side gives the layer the diagonal fallback with the
    reason (a dense layer's side above the limit is kept diagonal inside its block)."""
    model = nn.Sequential(nn.Conv2d(8, 12, 3, groups=4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(12, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = KFAC(model, max_factor_dim=19)             # 12 and 76 are above it, 3 and 19 not
    assert kept.layers[0].a_factor.shape == (4, 19, 19)
    assert kept.layers[0].g_factor.shape == (4, 3, 3)
    assert kept.coverage()["0.weight"].treatment == "kronecker"
    for limit, side in ((18, "A 19"), (2, "G 3, A 19")):
        with pytest.warns(UserWarning, match=rf"0.weight .*: its per-group factor side \({side}; groups=4\) "
                                             rf"is above max_factor_dim={limit}"):
            opt = KFAC(model, max_factor_dim=limit)
        cov = opt.coverage()
        assert cov["0.weight"].treatment == cov["0.bias"].treatment == "diagonal"
        assert "max_factor_dim" in cov["0.weight"].note
        x = torch.randn(5, 8, 4, 4)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("bad", [0, -3, 2.5, "big"])
def test_max_factor_dim_is_validated(bad) -> None:
    with pytest.raises(ValueError, match="max_factor_dim"):
        KFAC(nn.Linear(2, 2), max_factor_dim=bad)


@pytest.mark.parametrize("make", [optimizer_factory("kfac-eigen", lr=0.1, max_factor_dim=6),
                                  optimizer_factory("rkalman", lr=0.1, max_factor_dim=6)],
                         ids=["kfac", "rkalman"])
def test_diagonal_sides_through_a_process_group(make, tmp_path) -> None:
    """World size 1 over gloo: the process-group communicator packs, reduces and unpacks the
    diagonal factors and observations to the single-process result."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 7)).double()
    data = [(torch.randn(5, 7, dtype=DT), torch.randn(5, 7, dtype=DT)) for _ in range(3)]
    with pytest.warns(UserWarning):  # the sides above max_factor_dim, said at construction
        _world_one_equals_local(make, model, data, tmp_path, warns=True)


@pytest.mark.parametrize("make", [optimizer_factory("kfac-eigen", lr=0.1),
                                  optimizer_factory("kfac-newton", lr=0.1),
                                  optimizer_factory("rkalman", lr=0.1)],
                         ids=["kfac-eigen", "kfac-newton", "rkalman"])
def test_grouped_conv_through_a_process_group(make, tmp_path) -> None:
    """World size 1 over gloo: the process-group communicator packs, reduces and unpacks the
    block-diagonal factors, inverses and directions to the single-process result."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, groups=6),
                          nn.Conv2d(6, 4, 1, groups=2), nn.Flatten(), nn.Linear(36, 2)).double()
    data = [(torch.randn(4, 3, 5, 5, dtype=DT), torch.randn(4, 2, dtype=DT)) for _ in range(3)]
    _world_one_equals_local(make, model, data, tmp_path)


def _world_one_equals_local(make, model: nn.Module, data, tmp_path, warns: bool = False) -> None:
    """``make(model)`` and ``make(twin, process_group=<gloo, world size 1>)`` trained on
    ``data``: the process-group communicator's result equals the local one's to 1e-10
    (``warns``: the group's construction warns as the local one's does)."""
    twin = copy.deepcopy(model)
    local = make(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        with pytest.warns(UserWarning) if warns else contextlib.nullcontext():
            grouped = make(twin, process_group=dist.group.WORLD)
        assert type(grouped.comm).__name__ == "ProcessGroupCommunicator"
        for x, w in data:
            for opt, m in ((local, model), (grouped, twin)):
                opt.zero_grad()
                _loss(m(x), w).backward()
                opt.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            _close(q, p, rtol=1e-10)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("calls", [1, 3])
def test_linear_rows_are_the_concatenated_calls_written_once(bias: bool, calls: int) -> None:
    """A Linear's A rows are [a 1] (a without a bias) and its G rows g, over every call's
    leading dimensions, contiguous, equal to the plain concatenation (one call, no bias: the
    captured tensor itself, not a copy)."""
    from grng.curvature.layers import LinearLayer

    layer = LinearLayer(nn.Linear(5, 3, bias=bias).double())
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 1 + k, 5, generator=g, dtype=torch.float64) for k in range(calls)]
    grads = [torch.randn(2, 1 + k, 3, generator=g, dtype=torch.float64) for k in range(calls)]
    a, gr = layer.a_rows(inputs), layer.g_rows(inputs, grads)
    flat = torch.cat([x.reshape(-1, 5) for x in inputs])
    want_a = torch.cat([flat, torch.ones(flat.shape[0], 1, dtype=flat.dtype)], 1) if bias else flat
    assert torch.equal(a.X, want_a) and a.X.is_contiguous() and a.n == flat.shape[0]
    assert torch.equal(gr.X, torch.cat([x.reshape(-1, 3) for x in grads]))
    assert gr.X.is_contiguous() and gr.n == flat.shape[0]
    if calls == 1:
        assert gr.X.data_ptr() == grads[0].data_ptr()
        assert (a.X.data_ptr() == inputs[0].data_ptr()) == (not bias)
