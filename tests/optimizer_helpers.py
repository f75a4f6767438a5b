"""Shared helpers of the optimizer tests: the small model and data, the optimizer cases (from
:mod:`grng.optim.cases`, the table the benchmarks and the demo use too), training and state
comparison."""
from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grng import GradReg, make_closure
from grng.optim.cases import optimizer_factory
from grng.testing import classification_batches, small_mlp

F64 = torch.float64


def with_ones(rows: Tensor) -> Tensor:
    """[rows, 1]: the rows with the bias column K-FAC's A factor appends."""
    return torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], dim=1)


def linear_factors(lin: nn.Linear, x: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
    """(A, G) of one Linear call from its input and its retained output gradient:
    A = abar^T abar / n, G = e^T e / n with abar = [x, 1] and e = n dL/d out."""
    n = x.shape[0]
    abar = with_ones(x.detach())
    e = n * out.grad
    return abar.T @ abar / n, e.T @ e / n



def _mlp(dtype: torch.dtype = F64) -> nn.Module:
    """Two Kronecker blocks and a LayerNorm (diagonal fallback)."""
    return small_mlp(dtype)


def _data(k: int, n: int = 8, dtype: torch.dtype = F64, seed: int = 7) -> list[tuple[Tensor, Tensor]]:
    return classification_batches(k, n, dtype=dtype, seed=seed)


def _closure(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    """torch.optim's closure: zero the model's gradients, cross entropy, backward, the loss."""
    return make_closure(model, lambda: F.cross_entropy(model(x), y))


def _scaled_closure(model: nn.Module, x: Tensor, y: Tensor, scaler) -> Callable[[], Tensor]:
    """The closure of the GradScaler recipe: it backpropagates scaler.scale(loss)."""
    def closure() -> Tensor:
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        return loss
    return closure


_CURV = dict(lr=0.1, damping=0.05, momentum=0.9, inverse_every=2)
# test id -> (case of grng.optim.cases, the tests' hyperparameters)
_TESTED: dict[str, tuple[str, dict]] = {
    "kfac-eigen": ("kfac-eigen", _CURV),
    "kfac-newton": ("kfac-newton", _CURV),
    "kfac-cholesky": ("kfac-cholesky", _CURV),
    "ring": ("ring", {**_CURV, "rho": 0.1}),
    "reng-forward": ("reng-forward", {**_CURV, "rho": 0.1}),
    "reng-exact": ("reng-exact", {**_CURV, "rho": 0.1}),
    "rkalman": ("rkalman", dict(lr=0.1, rho=0.1, momentum=0.9, kalman_rank=5,
                                prior_precision=1.0, kl_clip=None)),
    "gradreg-kfac": ("gradreg-kfac", _CURV),
    "gradreg-sgd": ("db-sgd", dict(lr=0.1, momentum=0.9)),
}


FACTORIES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    name: optimizer_factory(case, **hp) for name, (case, hp) in _TESTED.items()}
ALL = list(FACTORIES)
CURVATURE = [n for n in ALL if n != "gradreg-sgd"]


def _curv(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return opt.base_optimizer if isinstance(opt, GradReg) else opt


def _assert_same_blocks(a: torch.optim.Optimizer, b: torch.optim.Optimizer, rtol: float,
                        atol: float, keys: Callable[[str], bool] = lambda key: True) -> None:
    """Every Kronecker block's state tensor of ``b`` (the names ``keys`` selects) is close to
    ``a``'s (GradReg: its base optimizer's; nothing for optimizers without blocks)."""
    ca, cb = _curv(a), _curv(b)
    if not hasattr(ca, "layers"):
        return
    for la, lb in zip(ca.layers, cb.layers):
        for key, v in ca.layer_state(la).items():
            if keys(key):
                torch.testing.assert_close(cb.layer_state(lb)[key], v, rtol=rtol, atol=atol)


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

