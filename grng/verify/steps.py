"""Whole-step check: K-FAC, RING, R-Kalman and EKFAC steps through a backend equal the reference.

A small model (Linear 7 -> 13, tanh, Linear 13 -> 5; 19 examples) takes its check's steps
(``loss.backward(); opt.step()``; one, or two for EKFAC so that its second step carries the
moments into a basis refreshed by subspace iteration) three times from the same start: in
float64 on the reference backend (the truth T), in float32 on the reference backend (R) and in
float32 on the backend (B). The compared output is the parameter update (theta_after -
theta_before, all parameters concatenated), under the rule of :mod:`grng.verify.checks` (a
float32 output: floor 2 eps). Every optimizer comes from its case in :mod:`grng.optim.cases`.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from grng.optim.cases import make_optimizer
from grng.verify.checks import Check, case_seed, compare, live_backends

# step check -> (its case of grng.optim.cases, the check's hyperparameters, steps taken)
_STEP_CASES: dict[str, tuple[str, dict[str, float], int]] = {
    "kfac_step": ("kfac-eigen", dict(lr=0.05, damping=1e-2), 1),
    "ring_step": ("ring", dict(lr=0.05, damping=1e-2, rho=0.1), 1),
    "rkalman_step": ("rkalman", dict(lr=0.05), 1),
    # eps 1e-2, not Adam's 1e-8: cross-entropy's output gradients sum to zero, so the last
    # layer's G has a null direction whose projected gradient is pure rounding, which
    # V' / (sqrt(v) + 1e-8) would blow up to a full-size step component in float32 (the float32
    # reference itself then errs by ~10%, and the check could catch nothing smaller)
    "ekfac_step": ("ekfac", dict(lr=0.05, factor_every=1, inverse_every=1, eps=1e-2), 2),
}
STEP_CHECKS: tuple[str, ...] = tuple(_STEP_CASES)
_IN, _HIDDEN, _OUT, _BATCH = 7, 13, 5, 19


def _optimizer(name: str, model: nn.Module, backend: str) -> torch.optim.Optimizer:
    if name not in _STEP_CASES:
        raise ValueError(f"step check must be one of {STEP_CHECKS}, got {name!r}")
    case, hp, _ = _STEP_CASES[name]
    return make_optimizer(case, model, backend=backend, **hp)


def _update(name: str, model: nn.Module, backend: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """theta_after - theta_before over the check's steps (on the same batch), flattened."""
    opt = _optimizer(name, model, backend)
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    for _ in range(_STEP_CASES[name][2]):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return after - before


def check_step(name: str, backend: str, device: str | torch.device, seed: int = 0) -> Check:
    """One ``name`` step through ``backend`` against the float64 reference step."""
    dev = torch.device(device)
    row = Check(name, backend, "float32", f"MLP {_IN}-{_HIDDEN}-{_OUT}, batch {_BATCH}")
    gen = torch.Generator().manual_seed(case_seed(seed, name))
    model = nn.Sequential(nn.Linear(_IN, _HIDDEN), nn.Tanh(), nn.Linear(_HIDDEN, _OUT))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    x = torch.randn(_BATCH, _IN, generator=gen)
    y = torch.randint(0, _OUT, (_BATCH,), generator=gen)
    try:
        got = _update(name, copy.deepcopy(model).to(dev), backend, x.to(dev), y.to(dev))
    except Exception as err:  # noqa: BLE001 - any failure of the backend is a failed check
        row.passed, row.note = False, f"raised {type(err).__name__}: {err}"
        return row
    same = _update(name, copy.deepcopy(model).to(dev), "reference", x.to(dev), y.to(dev))
    truth = _update(name, copy.deepcopy(model).to(device=dev, dtype=torch.float64), "reference",
                    x.to(device=dev, dtype=torch.float64), y.to(dev))
    c = compare(got, same, truth, 1)
    row.error, row.ref_error = float(c["error"]), float(c["ref_error"])
    row.ratio = row.error / row.ref_error if row.ref_error > 0 else None
    allowed = 2.0 * row.ref_error + c["floor"]
    row.passed = row.error <= allowed
    if not row.passed:
        row.note = (f"update off at {list(c['worst'])}: {c['got']:.6g} vs {c['want']:.6g}, "
                    f"error {row.error:.2e} > allowed {allowed:.2e}")
    return row


def check_steps(device: str | torch.device, backends: Sequence[str] | None = None, seed: int = 0,
                deadline: float | None = None, *, steps: Sequence[str] = STEP_CHECKS,
                progress: Callable[[Check], None] | None = None) -> list[Check]:
    """:func:`check_step` for every step check x backend (default: every live backend)."""
    chosen = live_backends(device)[0] if backends is None else list(backends)
    rows = []
    for name in steps:
        for backend in chosen:
            if deadline is not None and time.monotonic() > deadline:
                row = Check(name, backend, "float32", "", note="skipped: deadline passed")
            else:
                row = check_step(name, backend, device, seed)
            rows.append(row)
            if progress is not None:
                progress(row)
    return rows


__all__ = ["STEP_CHECKS", "check_step", "check_steps"]
