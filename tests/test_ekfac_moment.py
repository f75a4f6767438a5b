"""EKFAC's first moment kept in the Kronecker eigenbasis (docs/algorithms.md "EKFAC").

The preconditioner keeps m_b = Q_G^T m Q_A instead of the parameter-space EMA m of the
gradient matrix, and rotates it exactly, m_b <- (Q_G,new^T Q_G,old) m_b (Q_A,old^T Q_A,new), at
a change of basis. In exact arithmetic this is the formulation grng 0.3.0 shipped (m in
parameter space, projected every step); checked here in float64:

- after every step m_b equals Q_G^T m Q_A, m the EMA of the gradient matrices the steps saw
  (tracked here in plain torch), to rounding, over steps spanning several refreshes, for both
  carries, both bases, both scalings, batched blocks and a side without a basis (an embedding);
- a checkpoint written by grng 0.3.0 (``tests/data/checkpoint_ekfac_v0_3.pt``, m in parameter
  space, written by ``tests/data/make_checkpoint_ekfac_v0_3.py``) loads, converted to the
  eigenbasis, and resumes to the parameters of the 0.3.0 run continued without interruption,
  within :data:`RTOL` (rounding: the old and new formulations round differently).

The runs use eps = 1e-4: in a null direction of a factor (the softmax's and the LayerNorm's) the
projection is rounding noise u |V| in both formulations, different noise, and Adam's ratio
divides it by eps, so at the default eps (1e-8) the two formulations' float64 parameters differ
by about lr u |V| / eps ~ 1e-10 (docs/algorithms.md "EKFAC").
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import grng
from grng.precondition import eigenbasis

F64 = torch.float64
DATA = Path(__file__).parent / "data"
SAVED_AT, RESUMED = 5, 6
RTOL = 1e-12  # relative to the largest parameter entry
#: grng 0.3.0's refresh schedule (it had no refresh warmup), for the runs compared with its fixture
V0_3_SCHEDULE = dict(refresh_warmup=0)

#: name -> EKFAC keywords (with inverse_every=3 the resumed steps hold two refreshes; folds
#: every step, grng 0.3.0's default)
_BASE = dict(lr=0.02, eps=1e-4, factor_every=1, inverse_every=3)
CONFIGS: dict[str, dict[str, Any]] = {
    "default": _BASE,
    "keep_eigh": dict(_BASE, carry="keep", basis="eigh"),
    "fisher": dict(_BASE, scaling="fisher", rho_rel=0.1, weight_decay=0.01),
    "sync_free": dict(_BASE, sync_free=True),
}


class TokenNet(nn.Module):
    """An embedding (diagonal A: a block with no Q_A), two 6 x 7 Linear blocks (one batch), a
    LayerNorm (Adam fallback) and a 3 x 7 head, over 4 positions; float64."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.body = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
                                  nn.LayerNorm(6), nn.Linear(6, 3))
        self.double()

    def forward(self, idx: Tensor) -> Tensor:
        return self.body(self.emb(idx))


def batches(k: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randint(0, 10, (8, 4), generator=g), torch.randint(0, 3, (8, 4), generator=g))
            for _ in range(k)]


def step(net: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    opt.zero_grad()
    F.cross_entropy(net(x).reshape(-1, 3), y.reshape(-1)).backward()
    opt.step()


def train(net: nn.Module, opt: torch.optim.Optimizer, data) -> None:
    for x, y in data:
        step(net, opt, x, y)


class GroupedNet(nn.Module):
    """A grouped convolution (block-diagonal sides, (groups, b, b) bases) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, groups=2)
        self.head = nn.Linear(16, 3)
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def _grouped_batches(k: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(8)
    return [(torch.randn(8, 2, 4, 4, generator=g, dtype=F64),
             torch.randint(0, 3, (8,), generator=g)) for _ in range(k)]


def _grouped_step(net: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    opt.step()


#: (model, batches, one step) for the invariant
MODELS = {"tokens": (TokenNet, batches, step), "grouped": (GroupedNet, _grouped_batches,
                                                          _grouped_step)}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("model", list(MODELS))
def test_first_moment_is_the_projected_parameter_space_ema(name: str, model: str) -> None:
    """After every step of 11 (four refreshes), every block's m_b equals Q_G^T m Q_A (the
    side's identity where it has no basis), m = EMA of the gradient matrices, to rounding."""
    make, data, one_step = MODELS[model]
    torch.manual_seed(0)
    net = make()
    opt = grng.EKFAC(net, **CONFIGS[name])
    beta1 = opt.adam.beta1
    m: dict[int, Tensor] = {}
    without_basis = rotated = 0
    for t, (x, y) in enumerate(data(11)):
        one_step(net, opt, x, y)
        for unit in opt._blocks:
            V = unit.grad_matrix()
            m[unit.index] = (1 - beta1) * V if t == 0 else beta1 * m[unit.index] + (1 - beta1) * V
            st = unit.state
            want = eigenbasis.to_basis(m[unit.index], st.QG, st.QA)
            scale = float(want.abs().max())
            assert scale > 1e-4
            torch.testing.assert_close(st.exp_avg_basis, want, rtol=0, atol=1e-13 * scale)
            without_basis += st.QA is None
            rotated += float((st.exp_avg_basis - m[unit.index]).abs().max()) > 1e-3 * scale
    assert rotated > 0  # the bases are not the identity
    assert without_basis > 0 or model != "tokens"  # the embedding's A side has none


@pytest.mark.parametrize("name", list(CONFIGS))
def test_trajectory_equals_the_parameter_space_formulation(name: str) -> None:
    """From the start, every step's parameters equal those of grng 0.3.0 (m in parameter
    space; the fixture's trajectory), over 11 steps with four refreshes."""
    run = torch.load(DATA / "checkpoint_ekfac_v0_3.pt", weights_only=False)["runs"][name]
    torch.manual_seed(0)
    net = TokenNet()
    opt = grng.EKFAC(net, **CONFIGS[name], **V0_3_SCHEDULE)
    start = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    for (x, y), want in zip(batches(SAVED_AT + RESUMED), run["trajectory"], strict=True):
        step(net, opt, x, y)
        got = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
        assert float((got - want).abs().max()) <= RTOL * float(want.abs().max())
    assert float((got - start).abs().max()) > 0.05


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_v0_3_checkpoint_converts_and_resumes(name: str) -> None:
    """grng 0.3.0's state dict (``exp_avg`` in parameter space) loads as m_b = Q_G^T m Q_A and
    the resumed steps (two refreshes) reach the 0.3.0 run's parameters; saving again writes
    ``exp_avg_basis`` and no ``exp_avg`` for the blocks."""
    fixture = torch.load(DATA / "checkpoint_ekfac_v0_3.pt", weights_only=False)
    assert fixture["grng"] == "0.3.0"
    run = fixture["runs"][name]
    net = TokenNet()
    net.load_state_dict(run["model"])
    opt = grng.EKFAC(net, **CONFIGS[name], **V0_3_SCHEDULE)
    opt.load_state_dict(run["optimizer"])
    saved_state = run["optimizer"]["state"]
    for unit in opt._blocks:
        old = saved_state[[id(p) for p in opt._all_params()].index(id(unit.like))]
        st = unit.state
        assert "exp_avg_basis" not in old
        torch.testing.assert_close(st.exp_avg_basis,
                                   eigenbasis.to_basis(old["exp_avg"], old["QG"], old.get("QA")),
                                   rtol=0, atol=0)
        assert torch.equal(st.exp_avg_sq, old["exp_avg_sq"])
    train(net, opt, batches(SAVED_AT + RESUMED)[SAVED_AT:])
    for p, want in zip(net.parameters(), run["final"], strict=True):
        assert float((p.detach() - want).abs().max()) <= RTOL * float(want.abs().max())
    resaved = opt.state_dict()["state"]
    index = [id(p) for p in opt._all_params()]
    for unit in opt._blocks:
        names = set(resaved[index.index(id(unit.like))])
        assert "exp_avg_basis" in names and "exp_avg" not in names


@pytest.mark.parametrize("sync_free", [False, True])
def test_a_grouped_convolution_checkpoint_resumes_bit_for_bit(sync_free: bool) -> None:
    """Block-diagonal sides keep (groups, b, b) bases and (groups, ...) moments: the state dict
    declares those shapes, loads, and the resumed steps (a refresh among them) are bit for bit
    the uninterrupted run's."""
    data = _grouped_batches(8)
    torch.manual_seed(0)
    net = GroupedNet()
    opt = grng.EKFAC(net, inverse_every=3, sync_free=sync_free)
    train_grouped = lambda n, o, d: [_grouped_step(n, o, x, y) for x, y in d]  # noqa: E731
    train_grouped(net, opt, data[:4])
    saved_model = {k: v.clone() for k, v in net.state_dict().items()}
    saved = torch.load(_roundtrip(opt.state_dict()), weights_only=False)
    assert tuple(saved["state"][0]["QG"].shape) == (2, 2, 2)
    train_grouped(net, opt, data[4:])
    other = GroupedNet()
    other.load_state_dict(saved_model)
    resumed = grng.EKFAC(other, inverse_every=3, sync_free=sync_free)
    resumed.load_state_dict(saved)
    train_grouped(other, resumed, data[4:])
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), other.parameters()))


def _roundtrip(state: dict) -> Any:
    """``state`` written to and read back from an in-memory file (no aliasing of live state)."""
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf
