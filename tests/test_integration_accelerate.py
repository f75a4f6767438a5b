"""grng under Hugging Face accelerate (real ``accelerate.Accelerator`` on CPU): gradient
accumulation with ``accelerator.accumulate`` must fold the rows of every micro-batch into the
step's factors (no micro-batch dropped or counted twice across the micro-steps where the
wrapped optimizer skips ``step()``), and the two-pass methods step on the whole window."""
from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import grng
from grng.optim.cases import optimizer_factory

accelerate = pytest.importorskip("accelerate")

F64 = torch.float64
K = 3        # micro-batches per optimizer step
N = 4        # rows per micro-batch
STEPS = 4    # optimizer steps


@pytest.fixture(autouse=True)
def _fresh_accelerator_state() -> Iterator[None]:
    """accelerate keeps one process-wide state; reset it around each test (as accelerate's
    own test cases do) so each test's Accelerator gets its own settings."""
    from accelerate.state import AcceleratorState, GradientState
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


class _Net(nn.Module):
    """Embedding + two Linear blocks + a LayerNorm (diagonal fallback)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 3)
        self.fc1 = nn.Linear(5 + 3, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: Tensor, idx: Tensor) -> Tensor:
        h = torch.cat([x, self.emb(idx).mean(1)], dim=1)
        return self.fc2(self.norm(torch.tanh(self.fc1(h))))


def _dataset(rows: int, seed: int = 3) -> TensorDataset:
    """Inputs, token ids and labels of a fixed random linear teacher (learnable)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 5, generator=g, dtype=F64)
    idx = torch.randint(0, 9, (rows, 2), generator=g)
    teacher = torch.randn(5, 3, generator=g, dtype=F64)
    y = (x @ teacher).argmax(1)
    return TensorDataset(x, idx, y)


OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "kfac": optimizer_factory("kfac-eigen", lr=0.2, damping=0.05, momentum=0.5, inverse_every=1),
    "ring": optimizer_factory("ring", lr=0.2, damping=0.05, rho=0.1, momentum=0.5,
                              inverse_every=1),
    "rkalman": optimizer_factory("rkalman", lr=0.2, rho=0.1, momentum=0.5, kalman_rank=4),
    "ekfac": optimizer_factory("ekfac", lr=0.05, inverse_every=1),
}
FACTOR_KEYS = {"kfac": ("A", "G"), "ring": ("A", "G"), "rkalman": ("PA", "PG"),
               "ekfac": ("A", "G")}
# parameter tolerance of the accumulated run against the big batch: EKFAC's Adam scaling
# divides the gradient's component along cross-entropy's null direction (rounding, ~1e-17)
# by sqrt(v) + eps, eps = 1e-8, which lifts the summation-order difference to ~3e-11
PARAM_TOL = {"ekfac": dict(rtol=1e-7, atol=1e-9)}


def _batch_loss(model: nn.Module, x: Tensor, idx: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x, idx), y)


def _full_loss(model: nn.Module, data: TensorDataset) -> float:
    x, idx, y = data.tensors
    with torch.no_grad():
        return float(F.cross_entropy(model(x, idx), y))


def _twins(make: Callable[[nn.Module], torch.optim.Optimizer]) -> tuple:
    """(data, a model and its optimizer for the plain big-batch loop, the Accelerator with K
    accumulation steps, the same model and a fresh optimizer prepared by it, the micro-batch
    loader)."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    data = _dataset(STEPS * K * N)
    big = _Net().double()
    acc_model = copy.deepcopy(big)
    big_opt = make(big)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=K)
    acc_model, acc_opt, loader = accelerator.prepare(
        acc_model, make(acc_model), DataLoader(data, batch_size=N, shuffle=False))
    return data, big, big_opt, accelerator, acc_model, acc_opt, loader


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_accumulated_steps_fold_every_micro_batch(name: str) -> None:
    """K micro-batches through ``accelerator.accumulate`` give the factors and the parameters
    of one K-times-larger batch in a plain loop; the optimizer steps only on sync steps."""
    data, big, big_opt, accelerator, acc_model, acc_opt, loader = _twins(OPTIMIZERS[name])
    inner = acc_opt.optimizer  # accelerate's AcceleratedOptimizer wraps the grng optimizer
    big_batches = list(DataLoader(data, batch_size=K * N, shuffle=False))
    before = _full_loss(acc_model, data)

    micro = 0
    for x, idx, y in loader:
        with accelerator.accumulate(acc_model):
            accelerator.backward(F.cross_entropy(acc_model(x, idx), y))
            acc_opt.step()       # skipped by accelerate except on the K-th micro-batch
            acc_opt.zero_grad()  # likewise
        micro += 1
        assert inner.steps == micro // K, "a non-sync micro-step stepped the optimizer"
        if micro % K:
            continue
        bx, bidx, by = big_batches[micro // K - 1]
        big_opt.zero_grad()
        F.cross_entropy(big(bx, bidx), by).backward()
        big_opt.step()
        for lb, la in zip(big_opt.layers, inner.layers):
            for key in FACTOR_KEYS[name]:
                torch.testing.assert_close(inner.layer_state(la)[key],
                                           big_opt.layer_state(lb)[key], rtol=1e-10, atol=1e-12)
    assert inner.steps == STEPS and inner.skipped_steps == 0
    for p, q in zip(big.parameters(), acc_model.parameters()):
        torch.testing.assert_close(q, p, **PARAM_TOL.get(name, dict(rtol=1e-9, atol=1e-11)))
    after = _full_loss(acc_model, data)
    assert all(torch.isfinite(p).all() for p in acc_model.parameters())
    assert after < 0.9 * before, (before, after)


def _window_closure(accelerator: accelerate.Accelerator, model: nn.Module,
                    opt: torch.optim.Optimizer, window: list[tuple[Tensor, Tensor, Tensor]]
                    ) -> Callable[[], Tensor]:
    """torch.optim's closure over a whole accumulation window: zero, then forward and
    ``accelerator.backward`` (which divides by K) per micro-batch; returns the window's loss."""
    def closure() -> Tensor:
        opt.zero_grad()
        total = torch.zeros((), dtype=F64)
        for x, idx, y in window:
            loss = F.cross_entropy(model(x, idx), y)
            accelerator.backward(loss)
            total += loss.detach() / len(window)
        return total
    return closure


TWO_PASS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "reng-forward": optimizer_factory("reng-forward", lr=0.2, damping=0.05, rho=0.05,
                                      epsilon=0.01, momentum=0.5, inverse_every=1),
    "gradreg-sgd": optimizer_factory("fgr-sgd", lr=0.5, momentum=0.5, gamma=0.05, epsilon=0.01),
}


@pytest.mark.parametrize("name", list(TWO_PASS))
def test_two_pass_step_on_the_whole_window(name: str) -> None:
    """RENG / GradReg with accumulation: a closure over the window's micro-batches (called at
    theta and at the probe) gives the parameters of one big batch in a plain loop."""
    data, big, big_opt, accelerator, acc_model, acc_opt, loader = _twins(TWO_PASS[name])
    before = _full_loss(acc_model, data)

    window: list[tuple[Tensor, Tensor, Tensor]] = []
    for x, idx, y in loader:
        with accelerator.accumulate(acc_model):
            window.append((x, idx, y))
            if accelerator.sync_gradients:
                acc_opt.step(_window_closure(accelerator, acc_model, acc_opt, window))
                window = []
    assert not window
    for bx, bidx, by in DataLoader(data, batch_size=K * N, shuffle=False):
        big_opt.step(grng.make_closure(big_opt, functools.partial(_batch_loss, big, bx, bidx, by)))
    for p, q in zip(big.parameters(), acc_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-11)
    after = _full_loss(acc_model, data)
    assert all(torch.isfinite(p).all() for p in acc_model.parameters())
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("name", list(TWO_PASS))
def test_a_step_without_closure_says_what_applies_in_accelerate(name: str) -> None:
    """``opt.step()`` through accelerate's wrapper: the error gives accelerate's recipe (a
    closure over the window with ``accelerator.backward``), not the HF Trainer's."""
    from accelerate import Accelerator

    model = _Net().double()
    accelerator = Accelerator(cpu=True)
    model, opt = accelerator.prepare(model, TWO_PASS[name](model))
    x, idx, y = _dataset(N)[:]
    accelerator.backward(F.cross_entropy(model(x, idx), y))
    with pytest.raises(ValueError, match="needs a closure") as err:
        opt.step()
    assert "accelerator.backward(loss)" in str(err.value)
    assert "Trainer" not in str(err.value)
