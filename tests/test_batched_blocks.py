"""Blocks of equal shape go through one batched call (fold, eigen refresh, application) and take
exactly the steps the block-by-block path takes (docs/performance.md "Batched blocks")."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grng
from grng.curvature.inverse import EigenInverse, InverseStrategy, _TikhonovInverse
from grng.distributed import plan
from grng.optim.cases import optimizer_factory
from grng.ops import dispatch
from grng.precondition.kronecker import KroneckerPreconditioner
from optimizer_helpers import _assert_same_blocks


def _model() -> nn.Module:
    """Four hidden layers of one shape (8 x 9 blocks), a head of another, a bias-free layer."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(5, 8), nn.Tanh()]
    for _ in range(4):
        layers += [nn.Linear(8, 8), nn.Tanh()]
    layers += [nn.Linear(8, 8, bias=False), nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers)


def _train(make, steps: int = 7) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _model()
    opt = make(model)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(32, 5, generator=g), torch.randint(0, 3, (32,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


_TIKHONOV_ON_DEVICE = _TikhonovInverse._refresh_all_on_device


def _unbatched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(KroneckerPreconditioner, "_batch_key", lambda self, unit, V, d: None)
    monkeypatch.setattr(plan, "FOLD_BATCH_MAX_ELEMENTS", -1)
    monkeypatch.setattr(plan, "FOLD_BATCH_MAX_ELEMENTS_CPU", -1)
    monkeypatch.setattr(EigenInverse, "refresh_many", InverseStrategy.refresh_many)
    monkeypatch.setattr(_TikhonovInverse, "_refresh_all_on_device",
                        lambda self, items, backend: [
                            inv for item in items
                            for inv in _TIKHONOV_ON_DEVICE(self, [item], backend)])


MAKERS = {  # cases of grng.optim.cases with this test's hyperparameters
    "kfac-eigen": optimizer_factory("kfac-eigen", lr=0.05, inverse_every=3, factor_every=1),
    "kfac-newton": optimizer_factory("kfac-newton", lr=0.05, inverse_every=3),
    "ring-cholesky-momentum": optimizer_factory("ring", lr=0.05, inverse="cholesky", momentum=0.9,
                                                inverse_every=2),
    "kfac-sync-free": optimizer_factory("kfac-newton", lr=0.05, inverse_every=2, sync_free=True),
    "kfac-reference": optimizer_factory("kfac-eigen", lr=0.05, inverse_every=3,
                                        backend="reference"),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_batched_equals_block_by_block(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    batched, opt_b = _train(MAKERS[name])
    with monkeypatch.context() as m:
        _unbatched(m)
        single, opt_s = _train(MAKERS[name])
    for p, q in zip(single.parameters(), batched.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)  # batched GEMMs round apart
    # eigenvectors are unique only up to sign
    _assert_same_blocks(opt_s, opt_b, rtol=1e-3, atol=1e-5, keys=lambda key: not key.startswith("Q"))


def _op_calls(monkeypatch: pytest.MonkeyPatch) -> Counter:
    calls: Counter = Counter()
    original = dispatch.call

    def spy(op, backend, *args):
        if isinstance(args[0], torch.Tensor):
            calls[op, tuple(args[0].shape)] += 1
        return original(op, backend, *args)
    monkeypatch.setattr(grng.ops, "call", spy)
    return calls


def test_one_call_per_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """Equal shapes share one call: one factor_update per (side size, rows), one eigh per
    factor size, one eigen_apply per block shape."""
    model, opt = _train(MAKERS["kfac-eigen"], steps=3)  # refreshes at step 3 (the next)
    calls = _op_calls(monkeypatch)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert calls["eigen_apply", (4, 8, 9)] == 1
    # A (9 x 9: 8 inputs + bias) of the four hidden layers and the head: one batch of 5
    assert calls["factor_update", (5, 9, 9)] == 1
    # G (8 x 8) of the four hidden layers, the first layer and the bias-free one: one batch of 6
    assert calls["factor_update", (6, 8, 8)] == 1
    # every 8 x 8 factor (those six G and the bias-free layer's A) in one eigh, the 9 x 9 in one
    assert calls["eigh", (7, 8, 8)] == 1 and calls["eigh", (5, 9, 9)] == 1
    assert not any(op == "eigh" and shape == (8, 8) for op, shape in calls)


def test_sync_free_refresh_is_one_batched_inversion(monkeypatch: pytest.MonkeyPatch) -> None:
    """sync_free newton: the refresh inverts every equal-size dense factor of the step in one
    fixed-iteration Newton-Schulz call: one call per factor size."""
    model, opt = _train(MAKERS["kfac-sync-free"], steps=4)  # refreshes at steps 0, 2, 4
    shapes = []
    original = grng.ops.newton_schulz_masked

    def spy(M, X0, iterations, tol, **kwargs):
        shapes.append(tuple(M.shape))
        return original(M, X0, iterations, tol, **kwargs)
    monkeypatch.setattr(grng.ops, "newton_schulz_masked", spy)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    # A: 6 (first layer), 9 (four hidden + head), 8 (bias-free); G: 8 (six), 3 (head)
    assert sorted(shapes) == sorted([(1, 3, 3), (1, 6, 6), (7, 8, 8), (5, 9, 9)])


def test_stacks_persist_between_steps() -> None:
    """After the first batched application the blocks' inverses are slices of one stack, which
    later steps read without stacking again; a checkpoint of them loads into a fresh optimizer
    that takes the same next step."""
    model, opt = _train(MAKERS["kfac-newton"], steps=4)
    hidden = [opt.layer_state(layer) for layer in opt.layers[1:5]]
    bases = {id(st["XG"]._base) for st in hidden}
    assert len(bases) == 1 and None not in {st["XG"]._base for st in hidden}
    sd = opt.state_dict()
    model2 = _model()
    model2.load_state_dict(model.state_dict())
    opt2 = MAKERS["kfac-newton"](model2)
    opt2.load_state_dict(sd)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert {id(opt.layer_state(layer)["XG"]._base) for layer in opt.layers[1:5]} == bases


def test_backend_refusing_batched_inputs_applies_block_by_block(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """ops.accepts says whether a backend takes stacked inputs (the reference and the Triton
    kernel do); when the forced backend refuses them, the blocks are applied one at a time and
    the step is the same."""
    V, Q, lam = torch.randn(2, 4, 3), torch.eye(4).expand(2, 4, 4), torch.rand(2, 4)
    QA, lA = torch.eye(3).expand(2, 3, 3), torch.rand(2, 3)
    assert grng.ops.accepts("eigen_apply", "reference", V, Q, lam, QA, lA, 0.1)
    batched, _ = _train(MAKERS["kfac-eigen"])
    calls = _op_calls(monkeypatch)
    monkeypatch.setattr(EigenInverse, "accepts", lambda self, inv, V, damping, backend, g, a: False)
    single, _ = _train(MAKERS["kfac-eigen"])
    assert not any(op == "eigen_apply" and len(shape) == 3 for op, shape in calls)
    for p, q in zip(single.parameters(), batched.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)



def test_a_refreshed_block_is_copied_into_its_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    """stagger_refresh: one block's inverse is replaced at a time; the stack stays the same
    tensor (only that block's slice is written), and the steps equal the block-by-block ones."""
    make = lambda m: grng.KFAC(m, lr=0.05, inverse_every=4, stagger_refresh=True,  # noqa: E731
                               factor_every=1)
    model, opt = _train(make, steps=3)
    hidden = opt.layers[1:5]
    bases = {opt.layer_state(layer)["QG"]._base.data_ptr() for layer in hidden}
    g = torch.Generator().manual_seed(5)
    for _ in range(4):  # every hidden block refreshes once in these steps
        x, y = torch.randn(32, 5, generator=g), torch.randint(0, 3, (32,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        assert {opt.layer_state(layer)["QG"]._base.data_ptr() for layer in hidden} == bases
    batched, _ = _train(make)
    with monkeypatch.context() as m:
        _unbatched(m)
        single, _ = _train(make)
    for p, q in zip(single.parameters(), batched.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
