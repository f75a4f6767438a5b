"""Sharded training with FSDP2 (docs/distributed.md "FSDP2"): real gloo processes on 127.0.0.1.

Every Linear and the root are wrapped by ``fully_shard`` (parameters become DTensor row shards;
the 7-wide layer and its bias split unevenly across 2 and 3 ranks, the 2-wide one leaves rank 2
without rows); a LayerNorm's parameters take the diagonal preconditioners on their shards. Each
curvature member, on the host and the sync-free path, must end with the full parameters one
process reaches on the whole batch (float64, relative error < 1e-9), and a rank must hold no
dense factor of a block it does not own. The single-process references are computed once in
the test process before spawning.
"""
from __future__ import annotations

import os
import tempfile
import time
import traceback
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grng import make_closure
from spawn_helpers import free_port, rank_report, spawn_ranks
from grng.optim.cases import optimizer_factory

GLOBAL_BATCH = 12
STEPS = 5
WORLD_SIZES = (1, 2, 3)
TIMEOUT_S = 180


class Net(nn.Module):
    """Linear 5 -> 7 (bias) -> LayerNorm -> Linear 7 -> 2 (no bias) -> Linear 2 -> 3 (bias); the
    norm follows the tanh, so no factor has a degenerate eigenspace (where EKFAC's basis, and
    so Adam's scaling, would follow the rounding)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.norm = nn.LayerNorm(7)
        self.b = nn.Linear(7, 2, bias=False)
        self.c = nn.Linear(2, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.b(self.norm(torch.tanh(self.a(x))))))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return Net().double()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(200 + step)
    return (torch.randn(GLOBAL_BATCH, 5, generator=g, dtype=torch.float64),
            torch.randn(GLOBAL_BATCH, 3, generator=g, dtype=torch.float64))


_KFAC = dict(lr=0.1, damping=1e-2, momentum=0.5, kl_clip=1e-2, inverse_every=2)
# Adam's eps = 1e-6: with 1e-8 a projection of size ~1e-16 (rounding) divides by a root of the
# same size, so one process alone moves by ~5e-10 between orderings of the same float64 sums
_EKFAC = dict(lr=0.05, weight_decay=0.01, inverse_every=2, eps=1e-6)
#: every curvature member (a case of grng.optim.cases with this test's hyperparameters)
CONFIGS = {
    "kfac-eigen": optimizer_factory("kfac-eigen", **_KFAC),
    "kfac-cholesky": optimizer_factory("kfac-cholesky", **_KFAC),
    "ring": optimizer_factory("ring", lr=0.1, damping=1e-2, rho=0.1, inverse_every=2),
    "reng-forward": optimizer_factory("reng-forward", lr=0.1, damping=1e-2, rho=0.1,
                                      epsilon=1e-2, inverse_every=2),
    # exact (double backprop) falls back to the forward difference with one warning: FSDP2's
    # reduce-scatter is outside autograd; the reference is RENG (forward)
    "reng-exact": optimizer_factory("reng-exact", lr=0.1, damping=1e-2, rho=0.1, epsilon=1e-2,
                                    inverse_every=2),
    "rkalman-rows": optimizer_factory("rkalman", lr=0.1, rho=0.1, kalman_rank=200),
    "rkalman-sketch": optimizer_factory("rkalman", lr=0.1, rho=0.1, kalman_rank=3),
    "ekfac": optimizer_factory("ekfac", **_EKFAC),
    # a NaN in rank 0's rows at step 2: every rank skips that step, as one process does
    "kfac-nan": optimizer_factory("kfac-eigen", **_KFAC),
}
NAN_AT = {"kfac-nan": 2}
RUNS = [(name, sync_free) for name in CONFIGS for sync_free in (False, True)]
#: the configuration of one process a sharded run must equal (itself unless named here)
REFERENCE = {"reng-exact": "reng-forward"}


def _key(name: str, sync_free: bool) -> str:
    return f"{name}/{'sync_free' if sync_free else 'host'}"


def _train(model: nn.Module, opt, rank: int, world: int, steps: range = range(STEPS),
           nan_at: int | None = None) -> None:
    local = GLOBAL_BATCH // world
    for step in steps:
        x, y = _batch(step)
        if step == nan_at:
            x[0, 0] = float("nan")
        x, y = x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]
        opt.step(make_closure(opt, lambda: F.mse_loss(model(x), y)))


def _references() -> dict[str, list[torch.Tensor]]:
    refs = {}
    for name, sync_free in RUNS:
        model = _model()
        opt = CONFIGS[REFERENCE.get(name, name)](model, sync_free=sync_free)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _train(model, opt, 0, 1, nan_at=NAN_AT.get(name))
        assert opt.skipped_steps == (name in NAN_AT)
        refs[_key(name, sync_free)] = [p.detach().clone() for p in model.parameters()]
    return refs


def shard(model: nn.Module, world: int) -> nn.Module:
    """fully_shard every Linear, then the root (the LayerNorm's parameters go with the root)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for module in model.modules():
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _worker(rank: int, world: int, port: int, refs: dict, out_dir: str) -> None:
    with rank_report(rank, world, port, out_dir) as report:
        for name, sync_free in RUNS:
            key = _key(name, sync_free)
            try:
                t0 = time.perf_counter()
                model = shard(_model(), world)
                opt = CONFIGS[name](model, sync_free=sync_free)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    _train(model, opt, rank, world, nan_at=NAN_AT.get(name))
                if opt.skipped_steps != (name in NAN_AT):
                    raise AssertionError(f"{opt.skipped_steps} steps skipped")
                fell_back = any("falls back to the forward" in str(w.message) for w in caught)
                if fell_back != (name in REFERENCE):
                    raise AssertionError(f"fall-back warning: {fell_back}")
                full = [p.full_tensor().detach() for p in model.parameters()]
                err = max(float((p - r).abs().max() / (r.abs().max() + 1e-30))
                          for p, r in zip(full, refs[key]))
                report[key] = {"rel_err": err, "seconds": time.perf_counter() - t0,
                               "foreign_dense": _foreign_dense(opt),
                               "owned_blocks": sum(opt.comm.owns(u.index) for u in opt._blocks)}
            except Exception:  # noqa: BLE001 - reported per case
                report[key] = {"error": traceback.format_exc()}
                raise
        if world == 1:
            report["hsdp"] = _hsdp_refusal()


def _hsdp_refusal() -> str:
    """K-FAC on an HSDP model (fully_shard on a 2-D mesh: Replicate, Shard(0)): the message."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard"))
    model = fully_shard(_model(), mesh=mesh)
    try:
        CONFIGS["kfac-eigen"](model)
    except NotImplementedError as err:
        return str(err)
    return "accepted"


def _foreign_dense(opt) -> list[str]:
    """The curvature tensors of at least two dimensions this rank keeps for blocks it does not
    own (must be none)."""
    out = []
    for unit in opt._blocks:
        if opt.comm.owns(unit.index):
            continue
        for name, t in unit.state.items():
            if t.dim() >= 2:
                out.append(f"block {unit.index} {name} {tuple(t.shape)}")
    return out


_RESULTS: dict[int, list[dict]] = {}


@pytest.fixture(scope="module")
def references():
    return _references()


def _results(world: int, refs) -> list[dict]:
    if world not in _RESULTS:
        _RESULTS[world] = spawn_ranks(_worker, world, refs, timeout_s=TIMEOUT_S)
    return _RESULTS[world]



@pytest.mark.parametrize("world", WORLD_SIZES)
def test_sharded_matches_single_process(world, references):
    """Every curvature member, host and sync-free: the single-process parameters."""
    bad = []
    for rank, report in enumerate(_results(world, references)):
        for name, sync_free in RUNS:
            entry = report.get(_key(name, sync_free), {"error": "missing"})
            if "error" in entry:
                bad.append(f"rank {rank} {_key(name, sync_free)}: {entry['error']}")
            elif not entry["rel_err"] < 1e-9:
                bad.append(f"rank {rank} {_key(name, sync_free)}: {entry}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("world", (2, 3))
def test_a_rank_holds_no_dense_factor_of_a_block_it_does_not_own(world, references):
    """Factors, inverses, covariances and moments of a block live on its owner only; every
    block has exactly one owner."""
    results = _results(world, references)
    for name, sync_free in RUNS:
        key = _key(name, sync_free)
        assert sum(r[key]["owned_blocks"] for r in results) == 3, key
        for rank, report in enumerate(results):
            assert report[key]["foreign_dense"] == [], (rank, key, report[key])


# ------------------------------------------------------------------ sharded checkpoints
#: members whose state covers every kind: momentum, inverses, diagonal Fisher (K-FAC); sketch
#: generators and covariances (R-Kalman); Adam moments in blocks and on their own (EKFAC)
CKPT_CASES = ("kfac-eigen", "rkalman-sketch", "ekfac")
SAVED_AT = 2  # steps before the checkpoint (a refresh follows the resume)


def _full(model: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def _restored(name: str, world: int, path: str):
    """A fresh sharded model and optimizer, both loaded from ``path`` with DCP."""
    import torch.distributed.checkpoint as dcp

    from grng.distributed import checkpoint

    model = shard(_model(), world)
    opt = CONFIGS[name](model)
    sd = {"model": model.state_dict()}
    dcp.load(sd, checkpoint_id=os.path.join(path, "model"))
    model.load_state_dict(sd["model"])
    checkpoint.load(opt, os.path.join(path, "optim"))
    return model, opt


def _ckpt_worker(rank: int, world: int, port: int, refs: dict, root: str, out_dir: str) -> None:
    """World 2: save after SAVED_AT steps, then resume in a fresh optimizer (bit for bit the
    uninterrupted run). World 3: resume the world-2 checkpoint (the single-process run)."""
    import torch.distributed.checkpoint as dcp

    from grng.distributed import checkpoint

    with rank_report(rank, world, port, out_dir) as report:
        for name in CKPT_CASES:
            path = os.path.join(root, name)
            rest = range(SAVED_AT, STEPS)
            try:
                if world == 2:
                    model = shard(_model(), world)
                    opt = CONFIGS[name](model)
                    _train(model, opt, rank, world, range(SAVED_AT))
                    dcp.save({"model": model.state_dict()}, checkpoint_id=os.path.join(path, "model"))
                    checkpoint.save(opt, os.path.join(path, "optim"))
                    _train(model, opt, rank, world, rest)
                    model2, opt2 = _restored(name, world, path)
                    _train(model2, opt2, rank, world, rest)
                    report[name] = {"bitwise": all(torch.equal(a, b) for a, b in
                                                   zip(_full(model), _full(model2)))}
                else:
                    model, opt = _restored(name, world, path)
                    _train(model, opt, rank, world, rest)
                    ref = refs[_key(name, False)]
                    report[name] = {"rel_err": max(
                        float((p - r).abs().max() / (r.abs().max() + 1e-30))
                        for p, r in zip(_full(model), ref))}
                with pytest.raises(NotImplementedError, match="grng.distributed.checkpoint"):
                    opt.state_dict()
            except Exception:  # noqa: BLE001 - reported per case
                report[name] = {"error": traceback.format_exc()}
                raise


def test_sharded_checkpoint_resumes_bit_for_bit_and_reshards_from_2_to_3_ranks(references):
    """torch.distributed.checkpoint: saved on 2 ranks; resumed on 2 ranks it is the
    uninterrupted run bit for bit; resumed on 3 ranks it is the single-process run."""
    with tempfile.TemporaryDirectory() as root:
        saved = spawn_ranks(_ckpt_worker, 2, references, root, timeout_s=TIMEOUT_S)
        resumed = spawn_ranks(_ckpt_worker, 3, references, root, timeout_s=TIMEOUT_S)
    for rank, report in enumerate(saved):
        for name in CKPT_CASES:
            assert report[name].get("bitwise") is True, (rank, name, report[name])
    for rank, report in enumerate(resumed):
        for name in CKPT_CASES:
            assert report[name].get("rel_err", 1.0) < 1e-9, (rank, name, report[name])


def test_the_example_runs_saves_and_resumes(tmp_path):
    """examples/fsdp_train.py as one process (a mesh of one rank): it trains, saves with DCP and
    resumes from the checkpoint at the step it saved."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "fsdp_train.py"
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    args = [sys.executable, str(script), "--steps", "3", "--checkpoint", str(tmp_path / "ck")]
    first = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    env["MASTER_PORT"] = str(free_port())
    second = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed at step 3" in second.stdout and "step   5" in second.stdout, second.stdout


def test_hsdp_is_refused_with_a_clear_message(references):
    """A 2-D mesh (HSDP) is not supported: NotImplementedError naming the layout."""
    message = _results(1, references)[0]["hsdp"]
    assert "not supported" in message and "2-D mesh" in message, message
