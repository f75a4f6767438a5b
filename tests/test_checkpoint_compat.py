"""Checkpoints written by earlier grng versions still load, and the resumed run continues as
the run that wrote them did.

``tests/data/checkpoint_v0_1.pt`` was written by grng 0.1.0 (commit f7ed533, before the
communicator/preconditioner pipeline): per optimizer, the model and optimizer state after 3
steps and the parameters after 2 more steps.

``tests/data/checkpoint_v0_3.pt`` was written by grng 0.3.0 with
``tests/data/make_checkpoint_v0_3.py`` from :data:`V0_3` below: per configuration, the model
and optimizer state after :data:`SAVED_AT` steps and the parameters after :data:`RESUMED`
more steps of the same, uninterrupted run.

Loading is checked bit for bit (every saved tensor and counter is what the reloaded optimizer
holds). The resumed parameters are compared within :data:`RTOL` of the saved ones: the
resumed steps run LAPACK/BLAS (eigendecompositions, GEMMs), whose float64 results differ in
the last bits between builds and CPUs (the 0.1 fixture, written elsewhere, resumes here within
1.2e-14 of parameters of size 20); a wrong load (a lost momentum buffer, a step counter off by
one, a factor rounded through float32) moves them by 1e-8 or far more.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grng.optim.cases import make_optimizer

DATA = Path(__file__).parent / "data"

# test id -> (case of grng.optim.cases, hyperparameters); written by grng 0.1.0, whose
# defaults were factor_every=1 and R-Kalman prior_precision=1.0
V0_1: dict[str, tuple[str, dict[str, Any]]] = {
    "kfac": ("kfac-eigen", dict(lr=0.1, damping=1e-2, momentum=0.5, inverse_every=2,
                                factor_every=1)),
    "kfac_newton": ("kfac-newton", dict(lr=0.1, damping=1e-2, inverse_every=2, factor_every=1)),
    "rkalman": ("rkalman", dict(lr=0.1, rho=0.1, kalman_rank=4, prior_precision=1.0,
                                factor_every=1)),
}

# The 0.3 fixture: K-FAC eigen and newton (host and sync-free step), RING, R-Kalman; every one
# with momentum buffers, Kronecker blocks (the Linears) and diagonal units (the LayerNorm), and
# a fold / refresh period of 2 so that the resumed steps depend on the saved step counters.
V0_3: dict[str, tuple[str, dict[str, Any]]] = {
    "kfac_eigen": ("kfac-eigen", dict(lr=0.1, damping=1e-2, momentum=0.9, weight_decay=1e-3,
                                      factor_every=1, inverse_every=2)),
    "kfac_newton": ("kfac-newton", dict(lr=0.1, damping=1e-2, momentum=0.9, factor_every=2,
                                        inverse_every=2)),
    "kfac_newton_sync_free": ("kfac-newton", dict(lr=0.1, damping=1e-2, momentum=0.9,
                                                  factor_every=2, inverse_every=2,
                                                  sync_free=True)),
    "ring": ("ring", dict(lr=0.1, damping=1e-2, rho=0.1, momentum=0.9, factor_every=1,
                          inverse_every=2)),
    "rkalman": ("rkalman", dict(lr=0.1, rho=0.1, momentum=0.9, kalman_rank=4, factor_every=2)),
}
SAVED_AT, RESUMED = 3, 3
RTOL = 1e-12  # relative to the largest parameter entry


def model() -> nn.Module:
    """Two Kronecker blocks and a LayerNorm (diagonal units), float64."""
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3)).double()


def batches(k: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(10, 6, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (10,), generator=g)) for _ in range(k)]


def train(net: nn.Module, opt: torch.optim.Optimizer, data) -> None:
    """``loss.backward(); opt.step()`` on each batch."""
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()


def _assert_same_parameters(net: nn.Module, expected: list[torch.Tensor]) -> None:
    """Each parameter equals the saved one within RTOL of the saved one's largest entry."""
    for p, want in zip(net.parameters(), expected, strict=True):
        err = float((p.detach() - want).abs().max())
        assert err <= RTOL * float(want.abs().max()), (tuple(p.shape), err)


def _assert_holds(loaded: Any, saved: Any, path: str = "") -> None:
    """Every tensor and number of ``saved`` is in ``loaded``, bit for bit (later versions may
    add entries)."""
    if isinstance(saved, torch.Tensor):
        assert isinstance(loaded, torch.Tensor) and torch.equal(loaded.to(saved.dtype), saved), path
    elif isinstance(saved, dict):
        for k, v in saved.items():
            assert k in loaded, f"{path}/{k} not loaded"
            _assert_holds(loaded[k], v, f"{path}/{k}")
    elif isinstance(saved, (list, tuple)):
        assert len(loaded) == len(saved), path
        for i, (a, b) in enumerate(zip(loaded, saved)):
            _assert_holds(a, b, f"{path}[{i}]")
    else:
        assert loaded == saved, (path, loaded, saved)


def _resume(saved: dict[str, Any], case: str, hp: dict[str, Any]) -> tuple[nn.Module, Any]:
    net = model()
    net.load_state_dict(saved["model"])
    opt = make_optimizer(case, net, **hp)
    opt.load_state_dict(saved["optimizer"])
    return net, opt


@pytest.mark.parametrize("name", list(V0_1))
def test_v0_1_checkpoint_resumes(name: str) -> None:
    saved = torch.load(DATA / "checkpoint_v0_1.pt", weights_only=False)[name]
    net, opt = _resume(saved, *V0_1[name])
    assert opt.steps == 3
    train(net, opt, batches()[3:])
    _assert_same_parameters(net, saved["final"])


@pytest.mark.parametrize("name", list(V0_3))
def test_v0_3_checkpoint_loads_and_resumes(name: str) -> None:
    """A fresh optimizer loaded from the 0.3 checkpoint holds its state bit for bit and reaches
    the parameters of the run that wrote it, continued without interruption."""
    fixture = torch.load(DATA / "checkpoint_v0_3.pt", weights_only=False)
    assert fixture["grng"] == "0.3.0"
    saved = fixture["runs"][name]
    net, opt = _resume(saved, *V0_3[name])
    assert opt.steps == SAVED_AT
    _assert_holds(opt.state_dict(), saved["optimizer"])
    train(net, opt, batches(SAVED_AT + RESUMED)[SAVED_AT:])
    assert opt.steps == SAVED_AT + RESUMED
    _assert_same_parameters(net, saved["final"])


def test_v0_3_checkpoint_holds_what_it_is_meant_to_cover() -> None:
    """The fixture is not vacuous: momentum buffers, Kronecker and diagonal curvature state,
    the step counters, and parameters that moved after the save."""
    runs = torch.load(DATA / "checkpoint_v0_3.pt", weights_only=False)["runs"]
    per_param = {"kfac_eigen": {"A", "G", "QA", "lA", "QG", "lG"},
                 "kfac_newton": {"A", "G", "XA", "XG"}, "kfac_newton_sync_free": {"A", "G"},
                 "ring": {"A", "G"}, "rkalman": {"PA", "PG"}}
    for name, saved in runs.items():
        sd = saved["optimizer"]
        assert sd["grng"]["steps"] == SAVED_AT, name
        keys = set().union(*(entry.keys() for entry in sd["state"].values()))
        assert "momentum_buffer" in keys and per_param[name] <= keys, (name, keys)
        assert {"D", "PD"} & keys, (name, keys)  # the LayerNorm's diagonal units
        moved = [not torch.equal(p, q) for p, q in
                 zip(saved["model"].values(), saved["final"])]
        assert all(moved), name


def test_a_checkpoint_of_another_optimizer_is_refused_naming_the_state() -> None:
    saved = torch.load(DATA / "checkpoint_v0_1.pt", weights_only=False)["kfac"]
    case, hp = V0_1["rkalman"]
    opt = make_optimizer(case, model(), **hp)
    with pytest.raises(ValueError, match="does not match the model"):
        opt.load_state_dict(saved["optimizer"])
