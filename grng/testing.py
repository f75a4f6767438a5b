"""Helpers for tests and benchmarks of optimizers (shipped, so users' own tests can use them).

- :func:`spd_matrix`: a random symmetric positive definite matrix with a chosen condition number.
- :func:`small_mlp`: the small model the tests train (two Kronecker blocks and a LayerNorm).
- :func:`classification_batches`: reproducible random (x, y) batches for it.
- :func:`compare_optimizers`: train two (model, optimizer) pairs on the same batches and
  report, step by step, the largest parameter difference and both losses.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Comparison", "classification_batches", "compare_optimizers", "small_mlp",
           "spd_matrix"]


def spd_matrix(d: int, cond: float = 100.0, *, largest: float = 1.0,
               batch: Sequence[int] = (), dtype: torch.dtype = torch.float64,
               device: str | torch.device = "cpu", generator: torch.Generator | None = None
               ) -> Tensor:
    """Q diag(l) Q^T (a ``batch`` of them) with Q random orthogonal (Haar) and l log-spaced in
    [largest / cond, largest]; built in float64, exactly symmetric, then cast."""
    g = torch.randn(*batch, d, d, dtype=torch.float64, generator=generator)
    Q, R = torch.linalg.qr(g)
    Q = Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)
    lam = torch.logspace(math.log10(largest / cond), math.log10(largest), d, dtype=torch.float64)
    if d == 1:
        lam = torch.full((1,), float(largest), dtype=torch.float64)
    M = (Q * lam) @ Q.transpose(-2, -1)
    M = 0.5 * (M + M.transpose(-2, -1))
    return M.to(dtype=dtype, device=device)


def small_mlp(dtype: torch.dtype = torch.float64, sizes: Sequence[int] = (4, 6, 3)) -> nn.Module:
    """Linear-Tanh-LayerNorm-Linear: two Kronecker blocks and a diagonal-fallback LayerNorm."""
    i, h, o = sizes
    return nn.Sequential(nn.Linear(i, h), nn.Tanh(), nn.LayerNorm(h), nn.Linear(h, o)).to(dtype)


def classification_batches(k: int, n: int = 8, features: int = 4, classes: int = 3,
                           dtype: torch.dtype = torch.float64, seed: int = 7
                           ) -> list[tuple[Tensor, Tensor]]:
    """``k`` batches of n Gaussian inputs with random class labels (reproducible by ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, features, generator=g, dtype=dtype),
             torch.randint(0, classes, (n,), generator=g)) for _ in range(k)]


@dataclass
class Comparison:
    """Per step: max |theta_a - theta_b| over all parameters, and each run's loss."""

    param_diff: list[float] = field(default_factory=list)
    loss_a: list[float] = field(default_factory=list)
    loss_b: list[float] = field(default_factory=list)

    @property
    def max_param_diff(self) -> float:
        return max(self.param_diff, default=0.0)


def compare_optimizers(
    make_a: Callable[[nn.Module], torch.optim.Optimizer],
    make_b: Callable[[nn.Module], torch.optim.Optimizer],
    model: nn.Module,
    batches: Sequence[tuple[Tensor, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> Comparison:
    """Train copies of ``model`` with ``make_a`` and ``make_b`` on the same ``batches``
    (``opt.step(closure)``, torch.optim's closure: zero, forward, backward) and compare them
    after every step."""
    from grng.optim.gradient_source import make_closure

    model_a, model_b = copy.deepcopy(model), copy.deepcopy(model)
    opt_a, opt_b = make_a(model_a), make_b(model_b)
    out = Comparison()
    for x, y in batches:
        for m, opt, losses in ((model_a, opt_a, out.loss_a), (model_b, opt_b, out.loss_b)):
            loss = opt.step(make_closure(opt, lambda m=m: loss_fn(m(x), y)))
            losses.append(float(loss))
        out.param_diff.append(max(float((pa.detach() - pb.detach()).abs().max()) for pa, pb in
                                  zip(model_a.parameters(), model_b.parameters())))
    return out
