"""The ``precision`` option (grng/optim/precision.py): what each value changes, and that training
with it works."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grng
from grng import ops


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _losses(opt: torch.optim.Optimizer, model: nn.Module, steps: int = 25) -> list[float]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 4, (64,), generator=g)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        out.append(float(loss.detach()))
    return out


def test_bf16_stores_and_applies_in_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Factors and inverses in bfloat16, the eigen-application fed bfloat16 eigenvectors, the
    direction in float32; the loss falls as with fp32 and the parameters stay finite float32."""
    seen = []
    original = ops.eigen_apply

    def spy(V, QG, lG, QA, lA, damping, *, backend="auto"):
        seen.append(QG.dtype)
        return original(V, QG, lG, QA, lA, damping, backend=backend)
    monkeypatch.setattr(ops, "eigen_apply", spy)
    model = _model()
    opt = grng.KFAC(model, lr=0.05, precision="bf16", inverse_every=5)
    losses = _losses(opt, model)
    assert set(seen) == {torch.bfloat16}
    state = opt.layer_state(opt.layers[0])
    assert state["A"].dtype == state["QG"].dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    reference_model = _model()
    reference = _losses(grng.KFAC(reference_model, lr=0.05, inverse_every=5), reference_model)
    assert losses[-1] < 0.7 * losses[0]
    assert abs(losses[-1] - reference[-1]) < 0.1 * reference[0]


def test_tf32_allows_tf32_inside_the_step_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """precision='tf32' switches torch's CUDA float32 matmul setting (which the Triton launchers
    read) on for the optimizer's arithmetic and restores it after; 'fp32' leaves it alone."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    seen = []
    original = ops.eigen_apply

    def spy(*args, **kwargs):
        seen.append(matmul.fp32_precision)
        return original(*args, **kwargs)
    monkeypatch.setattr(ops, "eigen_apply", spy)
    for precision, expected in (("tf32", "tf32"), ("fp32", before)):
        seen.clear()
        model = _model()
        with pytest.warns(RuntimeWarning, match="TF32 exists only on CUDA") if precision == "tf32" \
                else contextlib.nullcontext():
            opt = grng.KFAC(model, lr=0.05, precision=precision)
        _losses(opt, model, steps=3)
        assert seen and set(seen) == {expected}
        assert matmul.fp32_precision == before


def test_bad_values_name_the_argument() -> None:
    with pytest.raises(ValueError, match="precision"):
        grng.KFAC(_model(), precision="fp16")
    with pytest.raises(ValueError, match="factor_dtype"):
        grng.KFAC(_model(), precision="bf16", factor_dtype=torch.float32)
    with pytest.raises(ValueError, match="precision='bf16'"):
        grng.RKalman(_model(), precision="bf16")
    assert grng.KFAC(_model(), precision="bf16", inverse_dtype=torch.bfloat16).inverse_dtype == \
        torch.bfloat16


def test_rkalman_tf32_trains() -> None:
    model = _model()
    with pytest.warns(RuntimeWarning, match="TF32"):
        opt = grng.RKalman(model, lr=0.01, precision="tf32")
    losses = _losses(opt, model)
    assert losses[-1] < losses[0]


def test_bf16_blocks_of_one_shape_are_applied_together() -> None:
    """Five equal 8 x 9 blocks in bf16: one batched application, directions in float32, the
    same steps as one block at a time to bf16 rounding."""
    from grng.precondition.kronecker import KroneckerPreconditioner

    def run(batched: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        hidden = [m for _ in range(4) for m in (nn.Tanh(), nn.Linear(8, 8))]
        model = nn.Sequential(nn.Linear(8, 8), *hidden, nn.Tanh(), nn.Linear(8, 4))
        opt = grng.KFAC(model, lr=0.05, precision="bf16", inverse_every=2, factor_every=1)
        if not batched:
            opt.block._batch_key = lambda unit, V, damping: None
        _losses(opt, model, steps=6)
        return [p.detach().clone() for p in model.parameters()]

    seen = []
    original = ops.eigen_apply

    def spy(V, *args, **kwargs):
        seen.append(tuple(V.shape))
        return original(V, *args, **kwargs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "eigen_apply", spy)
        batched = run(True)
    assert (5, 8, 9) in seen
    for p, q in zip(run(False), batched):
        assert q.dtype == torch.float32
        torch.testing.assert_close(q, p, rtol=2e-2, atol=2e-3)
