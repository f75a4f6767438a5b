"""Data-parallel grng (docs/distributed.md): DDP on gloo, real processes on 127.0.0.1.

One process group per world size (1, 2, 3) runs every optimizer check; the single-process
references (one process, the concatenated global batch, the same mean loss) are computed once
in the test process before spawning. float64 throughout, tight tolerances.
"""
from __future__ import annotations

import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import grng
from grng import make_closure
from spawn_helpers import rank_report, spawn_ranks
from grng.optim.cases import CASES, make_optimizer, optimizer_factory
from grng.distributed import LocalCommunicator
from grng.curvature.factors import DenseFactor, DiagonalFactor
from grng.distributed.assignment import assign_layers, rank_loads

GLOBAL_BATCH = 12
STEPS = 4
WORLD_SIZES = (1, 2, 3)
TIMEOUT_S = 150


# --------------------------------------------------------------------------------- models
class ConvNet(nn.Module):
    """Conv2d + Linear blocks + a LayerNorm (diagonal Fisher)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(27, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.out(torch.tanh(self.norm(self.fc(h))))


class EmbedNet(nn.Module):
    """Embedding (diagonal A) + Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.emb(x)).mean(1))


class Branchy(nn.Module):
    """``extra`` is skipped by the forward of some ranks (unused-layer case)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.extra = nn.Linear(5, 5)
        self.out = nn.Linear(5, 2)
        self.skip = False

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if not self.skip:
            h = torch.tanh(self.extra(h))
        return self.out(h)


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return {"conv": ConvNet, "conv_nan": ConvNet, "embed": EmbedNet,
            "branchy": Branchy}[kind]().double()


def _batch(kind: str, step: int):
    g = torch.Generator().manual_seed(100 + step)
    if kind in ("conv", "conv_nan"):
        x = torch.randn(GLOBAL_BATCH, 2, 5, 5, generator=g, dtype=torch.float64)
        y = torch.randn(GLOBAL_BATCH, 3, generator=g, dtype=torch.float64)
        if kind == "conv_nan" and step == 1:  # rank 0's rows: a step every rank skips
            x[0, 0, 0, 0] = float("nan")
    elif kind == "embed":
        x = torch.randint(0, 10, (GLOBAL_BATCH, 5), generator=g)
        y = torch.randn(GLOBAL_BATCH, 3, generator=g, dtype=torch.float64)
    else:
        x = torch.randn(GLOBAL_BATCH, 4, generator=g, dtype=torch.float64)
        y = torch.randn(GLOBAL_BATCH, 2, generator=g, dtype=torch.float64)
    return x, y


# name -> (model kind, optimizer factory(model, **dist_kwargs), uses closure); each factory is
# a case of grng.optim.cases with this test's hyperparameters
_KFAC = dict(lr=0.1, damping=1e-2, momentum=0.5, kl_clip=1e-2, inverse_every=2)
_RHO = dict(lr=0.1, damping=1e-2, rho=0.1, inverse_every=2)
_RKALMAN = dict(lr=0.1, rho=0.1)
_GR = dict(lr=0.1, momentum=0, gamma=0.05, epsilon=1e-2)


def _kfac(case: str = "kfac-eigen", **kw):
    return optimizer_factory(case, **{**_KFAC, **kw})


RUNS = {
    "kfac_eigen_comm": ("conv", _kfac(), True),
    "kfac_eigen_mem": ("conv", _kfac(distributed_strategy="mem-opt"), True),
    "kfac_eigen_nocl": ("conv", _kfac(), False),
    "kfac_newton_comm": ("conv", _kfac("kfac-newton"), True),
    "kfac_cholesky_mem": ("conv", _kfac("kfac-cholesky", distributed_strategy="mem-opt"), True),
    "kfac_embed_comm": ("embed", _kfac(), True),
    "kfac_embed_mem": ("embed", _kfac(distributed_strategy="mem-opt"), True),
    "kfac_buckets": ("conv", _kfac(), True),  # 256-byte buckets: many async all-reduces in flight
    "kfac_every": ("conv", _kfac(factor_every=2, inverse_every=3, distributed_strategy="mem-opt"), True),
    "ring": ("conv", optimizer_factory("ring", **_RHO), True),
    "reng_forward": ("conv", optimizer_factory("reng-forward", **_RHO, epsilon=1e-2), True),
    "reng_exact": ("conv", optimizer_factory("reng-exact", **_RHO), True),
    "rkalman_rows": ("conv", optimizer_factory("rkalman", **_RKALMAN, kalman_rank=200), True),
    "rkalman_sketch": ("conv", optimizer_factory("rkalman", **_RKALMAN, kalman_rank=8), True),
    "rkalman_mem": ("conv", optimizer_factory("rkalman", **_RKALMAN, kalman_rank=8,
                                              distributed_strategy="mem-opt"), True),
    "reng_exact_mem": ("conv", optimizer_factory("reng-exact", lr=0.1, damping=1e-2, rho=0.1,
                                                 inverse="newton", distributed_strategy="mem-opt"),
                       True),
    "rkalman_embed": ("embed", optimizer_factory("rkalman", **_RKALMAN, kalman_rank=16), True),
    "gradreg_forward": ("conv", optimizer_factory("fgr-sgd", **{**_GR, "momentum": 0.5}), True),
    "gradreg_exact": ("conv", optimizer_factory("db-sgd", **_GR), True),
    "gradreg_sam": ("conv", optimizer_factory("sam-sgd", **{**_GR, "epsilon": 5e-2}), True),
    # B-GR around K-FAC: the F-GR (K-FAC) case in backward mode (the group goes to both)
    "gradreg_kfac": ("conv", optimizer_factory("gradreg-kfac", lr=0.1, damping=1e-2,
                                               inverse_every=2, gamma=0.05, epsilon=1e-2,
                                               mode="backward"), True),
}


def _scaler():
    """A GradScaler whose power-of-two scale makes scaling exact in float64."""
    return torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=10_000)


# lifted refusals: storage dtypes and GradScaler under a process group equal one process
RUNS.update({
    "kfac_factor_dtype": ("conv", _kfac(factor_dtype=torch.float32), True),
    "kfac_inverse_dtype_mem": ("conv", _kfac(inverse_dtype=torch.float32,
                                             distributed_strategy="mem-opt"), True),
    "kfac_inverse_dtype_comm": ("embed", _kfac(inverse_dtype=torch.float32), True),
    "kfac_scaler": ("conv", lambda m, **d: make_optimizer(
        "kfac-eigen", m, lr=0.1, damping=1e-2, inverse_every=2, grad_scaler=_scaler(), **d), True),
    "reng_scaler": ("conv", lambda m, **d: make_optimizer(
        "reng-forward", m, **_RHO, epsilon=1e-2, grad_scaler=_scaler(), **d), True),
    "reng_exact_scaler": ("conv", lambda m, **d: make_optimizer(
        "reng-exact", m, **_RHO, grad_scaler=_scaler(), **d), True),
    "gradreg_scaler": ("conv", lambda m, **d: make_optimizer(
        "sam-sgd", m, **_GR, grad_scaler=_scaler(), **d), True),
})
# the sync-free step (device-side flags, an all-reduce MIN of the finite flag) under a group
RUNS.update({
    "kfac_newton_sync_free": ("conv", _kfac("kfac-newton", sync_free=True), True),
    "kfac_cholesky_sync_free_mem": ("conv", _kfac("kfac-cholesky", sync_free=True,
                                                  distributed_strategy="mem-opt"), True),
    "rkalman_sync_free": ("conv", optimizer_factory("rkalman", **_RKALMAN, kalman_rank=8,
                                                    sync_free=True), True),
    # mem-opt: ranks keep different inverses yet take the same (device) gate, so a skipped
    # step is skipped as one process skips it on the device
    "kfac_cholesky_sync_free_mem_nan": ("conv_nan", _kfac("kfac-cholesky", sync_free=True,
                                                          distributed_strategy="mem-opt"), True),
})
# EKFAC: bases broadcast by their owners (comm-opt) or kept there (mem-opt), moments on every
# rank. Models whose factors have distinct eigenvalues: inside a degenerate eigenspace (the
# conv net's fc A, 28 x 28 of rank 12 at the first step) the basis follows the rounding of A,
# and Adam's scaling is not invariant to a rotation there (docs/algorithms.md "EKFAC")
_EKFAC = dict(lr=0.05, weight_decay=0.01, inverse_every=2)
RUNS.update({
    "ekfac_comm": ("branchy", optimizer_factory("ekfac", **_EKFAC), True),
    "ekfac_mem": ("branchy", optimizer_factory("ekfac", **_EKFAC,
                                               distributed_strategy="mem-opt"), True),
    "ekfac_embed_comm": ("embed", optimizer_factory("ekfac", **_EKFAC), True),
    "ekfac_sync_free": ("branchy", optimizer_factory("ekfac", **_EKFAC, sync_free=True), True),
    # folds at steps 0, 1 (the warmup), then 3 (of STEPS = 4), decaying by factor_decay ** 2
    "ekfac_fold_period_mem": ("branchy", optimizer_factory("ekfac", **_EKFAC, factor_every=3,
                                                           refresh_warmup=2,
                                                           distributed_strategy="mem-opt"),
                              True),
    # the original scaling: each rank's eigenvalue correction averaged (equal local batches;
    # comm-opt only: mem-opt keeps a block's bases on its owner and is refused)
    "ekfac_fisher_comm": ("branchy", optimizer_factory("ekfac", **_EKFAC, scaling="fisher",
                                                       rho_rel=0.2), True),
    "ekfac_fisher_embed_comm": ("embed", optimizer_factory("ekfac", **_EKFAC, scaling="fisher"),
                                True),
})
# float32 storage rounds the same float64 sums that differ in their last bits
TOLERANCE = {"kfac_factor_dtype": 1e-5, "kfac_inverse_dtype_mem": 1e-5,
             "kfac_inverse_dtype_comm": 1e-5}

_UNUSED = dict(lr=0.1, damping=1e-2, inverse_every=2)
UNUSED_RUNS = {
    "unused_kfac_comm": optimizer_factory("kfac-eigen", **_UNUSED),
    "unused_kfac_mem": optimizer_factory("kfac-eigen", **_UNUSED, distributed_strategy="mem-opt"),
    "unused_rkalman": optimizer_factory("rkalman", lr=0.1, kalman_rank=4),
    "unused_reng": optimizer_factory("reng-forward", lr=0.1, damping=1e-2),
    "unused_ekfac": optimizer_factory("ekfac", lr=0.05, inverse_every=2),
}


def _train(name: str, model: nn.Module, opt, rank: int, world: int) -> None:
    kind, _, use_closure = RUNS[name]
    local = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = _batch(kind, step)
        x, y = x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]

        def closure():
            return F.mse_loss(model(x), y)

        scaler = getattr(opt, "grad_scaler", None)
        if use_closure and scaler is not None:  # the closure backpropagates the scaled loss
            def scaled_closure():
                opt.zero_grad()
                loss = closure()
                scaler.scale(loss).backward()
                return loss

            opt.step(scaled_closure)
            scaler.update()
        elif use_closure:
            opt.step(make_closure(opt, closure))
        else:
            opt.zero_grad()
            closure().backward()
            opt.step()


def _references() -> dict[str, list[torch.Tensor]]:
    refs = {}
    for name, (kind, factory, _) in RUNS.items():
        model = _model(kind)
        _train(name, model, factory(model), 0, 1)
        refs[name] = [p.detach().clone() for p in model.parameters()]
    return refs


# ------------------------------------------------------------------------- the workers
def _worker(rank: int, world: int, port: int, refs: dict, out_dir: str) -> None:
    with rank_report(rank, world, port, out_dir) as report:
        _run_cases(rank, world, refs, report)


def _run_cases(rank: int, world: int, refs: dict, report: dict) -> None:
    """Every RUNS and UNUSED_RUNS run on this rank; results go into ``report``."""
    # world size 1: pass the group explicitly, which exercises the distributed code path
    dkw = {"process_group": dist.group.WORLD} if world == 1 else {}
    for name, (kind, factory, _) in RUNS.items():
        try:
            t0 = time.perf_counter()
            model = _model(kind)
            ddp = nn.parallel.DistributedDataParallel(model)
            opt = factory(ddp, **dkw)
            if name == "kfac_buckets":
                opt.comm.reducer.cap_bytes = 256
            _train(name, ddp, opt, rank, world)
            params = [p.detach() for p in model.parameters()]
            err = max(float((p - r).abs().max() / (r.abs().max() + 1e-30))
                      for p, r in zip(params, refs[name]))
            report[name] = {"rel_err": err, "same_on_ranks": _same_on_ranks(params, world),
                            "seconds": time.perf_counter() - t0}
        except Exception:  # noqa: BLE001 - reported per case
            report[name] = {"error": traceback.format_exc()}
            raise
    for name, factory in UNUSED_RUNS.items():
        model = _model("branchy")
        model.skip = world > 1 and rank == world - 1
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        opt = factory(ddp, **dkw)
        t0 = time.perf_counter()
        for step in range(STEPS):
            x, y = _batch("branchy", step)
            local = GLOBAL_BATCH // world
            x, y = x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]
            opt.step(make_closure(opt, lambda: F.mse_loss(ddp(x), y)))
        params = [p.detach() for p in model.parameters()]
        report[name] = {"same_on_ranks": _same_on_ranks(params, world),
                        "finite": all(bool(torch.isfinite(p).all()) for p in params),
                        "seconds": time.perf_counter() - t0}
    if world == 1:
        report["fsdp"] = _fsdp_refusals()


def _fsdp_refusals() -> dict[str, str]:
    """Build each optimizer on an FSDP2 (fully_shard, DTensor parameters) model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = fully_shard(_model("branchy"), mesh=init_device_mesh("cpu", (1,)))
    out = {}
    for name, case in CASES.items():  # every grng optimizer (and GradReg around SGD)
        if not (case.curvature or case.two_pass):
            continue
        try:
            case.make(model)
            out[name] = "accepted"
        except NotImplementedError as err:
            out[name] = str(err)
    return out


def _same_on_ranks(params, world: int) -> bool:
    flat = torch.cat([p.reshape(-1) for p in params])
    bufs = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(bufs, flat)
    return all(torch.equal(b, flat) for b in bufs)


_RESULTS: dict[int, list[dict]] = {}


@pytest.fixture(scope="module")
def references():
    return _references()


def _results(world: int, refs) -> list[dict]:
    if world not in _RESULTS:
        _RESULTS[world] = spawn_ranks(_worker, world, refs, timeout_s=TIMEOUT_S)
    return _RESULTS[world]



@pytest.mark.parametrize("world", WORLD_SIZES)
def test_matches_single_process(world, references):
    """Every optimizer, every rank: the single-process parameters on the global batch."""
    results = _results(world, references)
    bad = []
    for rank, report in enumerate(results):
        for name in RUNS:
            entry = report.get(name, {"error": "missing"})
            if "error" in entry:
                bad.append(f"rank {rank} {name}: {entry['error']}")
            elif not (entry["rel_err"] < TOLERANCE.get(name, 1e-10) and entry["same_on_ranks"]):
                bad.append(f"rank {rank} {name}: {entry}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_unused_layer_does_not_hang(world, references):
    """One rank's forward skips a layer: every optimizer completes and the ranks agree."""
    results = _results(world, references)
    for rank, report in enumerate(results):
        for name in UNUSED_RUNS:
            entry = report.get(name)
            assert entry is not None, f"rank {rank} {name} did not finish"
            assert entry["same_on_ranks"] and entry["finite"], (rank, name, entry)


def test_fsdp2_is_accepted_by_the_curvature_optimizers_and_refused_by_gradreg(references):
    """fully_shard (DTensor parameters): the curvature optimizers build on it (tests/test_fsdp.py
    checks their results); GradReg around another optimizer raises NotImplementedError, never
    a silent wrong result."""
    refusals = _results(1, references)[0]["fsdp"]
    for name, message in refusals.items():
        if message != "accepted":  # only GradReg refuses, clearly
            assert message.startswith("GradReg") and "FSDP" in message, (name, message)
            assert "not supported" in message, (name, message)
    accepted = {name for name, message in refusals.items() if message == "accepted"}
    assert {"kfac-eigen", "ring", "reng-forward", "rkalman", "ekfac"} <= accepted, refusals


# ------------------------------------------------------------------- no processes needed
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_assignment_covers_every_layer_once_and_balances(world):
    g = torch.Generator().manual_seed(world)
    dims = [tuple(int(v) for v in torch.randint(1, 300, (2,), generator=g)) for _ in range(23)]
    costs = [DenseFactor(dg).cost() + DenseFactor(da).cost() for dg, da in dims]
    owner = assign_layers(costs, world)
    assert len(owner) == len(costs) and all(0 <= r < world for r in owner)
    loads = rank_loads(costs, owner, world)
    assert sum(loads) == pytest.approx(sum(costs))
    # greedy LPT bound: the largest load is at most mean + the largest single cost
    assert max(loads) <= sum(costs) / world + max(costs) + 1e-6
    assert assign_layers(costs, world) == owner  # deterministic
    if world <= len(costs):
        assert set(owner) == set(range(world))


def test_assignment_edge_cases():
    assert assign_layers([], 3) == []
    assert assign_layers([5.0, 5.0, 5.0], 3) == [0, 1, 2]
    assert assign_layers([8.0, 1.0, 1.0, 6.0], 2) == [0, 1, 1, 1]
    with pytest.raises(ValueError):
        assign_layers([1.0], 0)
    with pytest.raises(ValueError):
        assign_layers([-1.0], 2)
    assert DenseFactor(4).cost() + DiagonalFactor(10).cost() == 64 + 10


def test_single_process_uses_the_local_communicator():
    model = _model("conv")
    opt = grng.KFAC(model)
    assert isinstance(opt.comm, LocalCommunicator)


def test_bad_strategy_is_refused():
    with pytest.raises(ValueError):
        grng.KFAC(_model("conv"), distributed_strategy="fast")


def test_pack_unpack_upper_triangle_roundtrip():
    from grng.curvature.pieces import Piece
    from grng.distributed.comm import pack, unpack
    X = torch.randn(7, 5, dtype=torch.float64)
    M = X.T @ X
    M = torch.triu(M) + torch.triu(M, 1).T
    piece = Piece("sym", (5, 5), counted=True)
    seg = pack(piece, M, 3.0, torch.float64, M.device)
    assert seg.numel() == 5 * 6 // 2 + 1 == piece.numel
    back, count = unpack(piece, seg)
    assert count == 3.0 and torch.equal(back, M)
    zero, count = unpack(piece, pack(piece, None, 0.0, torch.float64, M.device))
    assert count == 0.0 and torch.equal(zero, torch.zeros(5, 5, dtype=torch.float64))


# ------------------------------------------------ R-Kalman observations, uneven row scales
_OBS_ROWS = (3, 5)   # rows (= examples = scale) of each rank: the scales differ
_OBS_BETA = 0.9


def _obs_rows(rank: int) -> torch.Tensor:
    return torch.randn(_OBS_ROWS[rank], 4, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(10 + rank))


def _obs_sketch():
    gen = torch.Generator().manual_seed(0)
    return lambda m, like: torch.randn(2, m, dtype=like.dtype, generator=gen)


def _observation_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from grng.curvature.factors import Rows
    from grng.distributed.communicator import ProcessGroupCommunicator
    from grng.precondition.kalman_observation import KalmanItem, global_observations
    with rank_report(rank, world, port, out_dir) as report:
        comm = ProcessGroupCommunicator(dist.group.WORLD, "comm-opt", [1.0])
        X, P = _obs_rows(rank), torch.eye(4, dtype=torch.float64)
        rows = Rows(X, X.shape[0], float(X.shape[0]))
        out = {}
        for name, k in (("rows", 100), ("sketch", 2)):
            obs = global_observations([KalmanItem(DenseFactor(4), rows, P, P)], comm, _OBS_BETA,
                                      k, _obs_sketch())[0]
            out[name] = (obs.H.tolist(), obs.r)
        report.update(out)


def test_kalman_observations_of_ranks_with_different_row_scales():
    """Ranks whose rows carry different scales s_r: the observation (H, r) sent relative to a
    common scale s equals the global one, (sum_r Omega_r s_r X_r, N / (1 - beta)), up to the
    factor s that leaves the Kalman update unchanged ((H / s, r / s^2))."""
    reports = spawn_ranks(_observation_worker, 2, timeout_s=TIMEOUT_S)
    E = torch.cat([_obs_rows(r) * float(_OBS_ROWS[r]) for r in range(2)])  # e = s_r x rows
    omega = _obs_sketch()(E.shape[0], E)
    r_global = sum(_OBS_ROWS) / (1.0 - _OBS_BETA)
    s = float(_OBS_ROWS[0])  # the first rank with rows
    for report in reports:
        for name, expected in (("rows", E), ("sketch", omega @ E)):
            H, r = report[name]
            torch.testing.assert_close(torch.tensor(H, dtype=torch.float64) * s, expected,
                                       rtol=1e-13, atol=1e-13)
            assert r * s ** 2 == pytest.approx(r_global, rel=1e-14)
