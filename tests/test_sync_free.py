"""The sync-free step (``sync_free=True``, the default on CUDA): no tensor read on the host.

On CPU a host read is detected by counting the Python entry points of a device-to-host
transfer (``Tensor.item``, ``__bool__``, ``__float__``, ``__int__``, ``__index__``,
``tolist``) during ``step()``; on CUDA by ``torch.cuda.set_sync_debug_mode("error")``. The
sync-free step must take the same steps as the host-branching one, and skip a non-finite step
with everything left exactly as it was.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grng
from grng.curvature.inverse import NewtonInverse
from grng.optim.cases import optimizer_factory

HOST_READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist")

# name -> optimizer factory (a case of grng.optim.cases) -- every member of the family with the
# options that change the path
CONFIGS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "kfac-newton": optimizer_factory("kfac-newton", lr=0.05, inverse_every=2),
    "kfac-cholesky": optimizer_factory("kfac-cholesky", lr=0.05, inverse_every=2),
    "kfac-eigen": optimizer_factory("kfac-eigen", lr=0.05, inverse_every=1000),
    "ring-momentum-wd": optimizer_factory("ring", lr=0.05, momentum=0.9, weight_decay=1e-2,
                                          inverse="newton", inverse_every=3),
    "kfac-no-clip-factor-every": optimizer_factory("kfac-cholesky", lr=0.05, kl_clip=None,
                                                   factor_every=2, inverse_every=2),
    "kfac-max-grad-norm": optimizer_factory("kfac-newton", lr=0.05, max_grad_norm=0.5,
                                            inverse_every=2),
    "reng-forward": optimizer_factory("reng-forward", lr=0.05, inverse="newton", inverse_every=2),
    "reng-exact": optimizer_factory("reng-exact", lr=0.05, inverse="newton", inverse_every=2),
    "kfac-bf16-stagger": optimizer_factory("kfac-newton", lr=0.05, inverse_every=3,
                                           stagger_refresh=True, precision="bf16"),
    "rkalman": optimizer_factory("rkalman", lr=0.05, kalman_rank=4),
}


def _model() -> nn.Module:
    """A small model with a bias-free layer and a parameter without a block (diagonal path)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.LayerNorm(9), nn.Tanh(), nn.Linear(9, 3, bias=False))


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def _closure(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
             poison: bool = False) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if poison:
            loss = loss * float("nan")
        loss.backward()
        return loss
    return closure


@contextlib.contextmanager
def count_host_reads() -> Iterator[list[str]]:
    """Record the name of every host read of a tensor inside the block."""
    seen: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def spy(name: str, original: Callable) -> Callable:
        def wrapper(self, *args, **kwargs):
            seen.append(name)
            return original(self, *args, **kwargs)
        return wrapper

    for name, original in saved.items():
        setattr(torch.Tensor, name, spy(name, original))
    try:
        yield seen
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


def _train(name: str, sync_free: bool, steps: int, backend: str = "auto",
           poison_at: int | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _model()
    opt = CONFIGS[name](model, sync_free=sync_free, backend=backend)
    for t in range(steps):
        x, y = _batch(t)
        with pytest.warns(RuntimeWarning) if (t == poison_at and not sync_free) else \
                contextlib.nullcontext():
            opt.step(_closure(model, opt, x, y, poison=t == poison_at))
    return model, opt


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_steps_read_nothing_on_the_host(name: str, backend: str) -> None:
    """After the first step (which creates the factors), a step reads no tensor on the host:
    fold, refresh (for eigen: the steps without one), preconditioning and update included."""
    model = _model()
    opt = CONFIGS[name](model, sync_free=True, backend=backend)
    x, y = _batch(0)
    opt.step(_closure(model, opt, x, y))
    for t in range(1, 7):
        x, y = _batch(t)
        closure = _closure(model, opt, x, y)
        with count_host_reads() as reads:
            opt.step(closure)
        assert reads == [], f"step {t}: host reads {reads}"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_counter_detects_a_host_read() -> None:
    """The detector itself: the host-branching step (sync_free=False) is caught."""
    model = _model()
    opt = grng.KFAC(model, lr=0.05, sync_free=False)
    x, y = _batch(0)
    opt.step(_closure(model, opt, x, y))
    with count_host_reads() as reads:
        opt.step(_closure(model, opt, x, y))
    assert "__bool__" in reads


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sync_free_takes_the_same_steps(name: str) -> None:
    """sync_free=True and False train to the same parameters (float32 rounding apart: the KL
    clip's nu is a device scalar, Newton-Schulz runs a fixed number of iterations)."""
    a, _ = _train(name, False, 8)
    b, opt = _train(name, True, 8)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
    assert opt.steps == 8 and opt.skipped_steps == 0


@pytest.mark.parametrize("name", ["kfac-newton", "ring-momentum-wd", "rkalman", "kfac-eigen"])
def test_a_non_finite_step_changes_nothing(name: str) -> None:
    """A NaN loss (and gradients) on a sync-free step: parameters, factors, inverses, momentum
    buffers and R-Kalman covariances are bit-for-bit what they were; the skip is counted (the
    fold/refresh schedule counts it as a step: it never reads the flag); training goes on."""
    model, opt = _train(name, True, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = [{k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for s in opt.state.values()]
    curv = [{k: v.clone() for k, v in u.state.items()} for u, _ in opt._curvature_units()]
    x, y = _batch(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the skipped step itself does not wait to warn
        opt.step(_closure(model, opt, x, y, poison=True))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for s, saved in zip(opt.state.values(), state):
        for k, v in saved.items():
            assert torch.equal(s[k], v), k
    for (u, _), saved in zip(opt._curvature_units(), curv):
        for k, v in saved.items():
            assert torch.equal(u.state[k], v), k
    assert opt.skipped_steps == 1 and opt.steps == 3
    x, y = _batch(4)  # training goes on, and the skip is heard of a step late
    with pytest.warns(RuntimeWarning, match=r"1 step\(s\) skipped on the device.*1 so far"):
        opt.step(_closure(model, opt, x, y))
    assert opt.skipped_steps == 1 and opt.steps == 4
    assert not torch.equal(model.state_dict()["0.weight"], before["0.weight"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("masks", [True, False])
def test_a_skipped_fold_leaves_the_factors_with_or_without_copies(
        masks: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local communicator folds the Kronecker factors (NaN rows here) only where the device
    flag says so, and the gate keeps no copy of them; a communicator that cannot
    (``masks_folds`` False, as the process-group one) gets copies selected back. Either way a
    skipped fold leaves A and G bit for bit as they were."""
    from grng.optim.gate import DeviceGate

    model, opt = _train("kfac-no-clip-factor-every", True, 4)  # step 4 folds (factor_every=2)
    if not masks:
        monkeypatch.setattr(opt.comm, "masks_folds", False)
        monkeypatch.setattr(opt.comm, "masked_folds", lambda ok: contextlib.nullcontext())
    kept: list[set[str]] = []
    keep = DeviceGate.keep_statistics

    def spy(self: DeviceGate, *args: object) -> None:
        keep(self, *args)
        kept.append({k for _, old in self.statistics for k in old})

    monkeypatch.setattr(DeviceGate, "keep_statistics", spy)
    factors = [(u.state, {k: u.state[k].clone() for k in ("A", "G")})
               for u, _ in opt._curvature_units() if "A" in u.state]
    assert factors
    x, y = _batch(4)
    opt.step(_closure(model, opt, x, y, poison=True))
    assert opt.skipped_steps == 1 and len(kept) == 1
    assert ({"A", "G"} <= kept[0]) == (not masks)
    for state, saved in factors:
        for k, v in saved.items():
            assert torch.equal(state[k], v), k


def test_unconverged_newton_keeps_the_previous_inverse(monkeypatch: pytest.MonkeyPatch) -> None:
    """One Newton-Schulz iteration cannot converge: the refresh keeps every dense factor's
    previous inverse on the device and counts it."""
    model, opt = _train("kfac-newton", True, 2)  # refreshed at steps 0 (host) and 2 is next
    monkeypatch.setattr(NewtonInverse, "ITERATIONS_ON_DEVICE", 1)
    saved = [{k: v.clone() for k, v in u.state.inverse.tensors().items()} for u in opt._blocks]
    x, y = _batch(2)
    opt.step(_closure(model, opt, x, y))
    for u, inv in zip(opt._blocks, saved):
        for k, v in inv.items():
            if v.dim() == 2:
                assert torch.equal(u.state.inverse.tensors()[k], v), k
    assert opt.inverse.kept_previous >= 2


def test_counters_survive_a_checkpoint() -> None:
    """Skips counted on the device are saved and restored with the step counter."""
    model, opt = _train("kfac-newton", True, 4, poison_at=2)
    assert (opt.steps, opt.skipped_steps) == (3, 1)
    sd = opt.state_dict()
    model2 = _model()
    opt2 = CONFIGS["kfac-newton"](model2, sync_free=True)
    opt2.load_state_dict(sd)
    assert (opt2.steps, opt2.skipped_steps) == (3, 1)


def test_sync_free_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="sync_free"):
        grng.KFAC(_model(), sync_free="yes")


def test_default_is_off_on_cpu() -> None:
    assert grng.KFAC(_model()).sync_free is False
    assert grng.RKalman(_model()).sync_free is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["kfac-newton", "kfac-cholesky", "ring-momentum-wd", "rkalman"])
def test_no_cuda_synchronization(name: str) -> None:
    """On CUDA the steps after the first run under set_sync_debug_mode("error")."""
    torch.manual_seed(0)
    model = _model().cuda()
    opt = CONFIGS[name](model)
    assert opt.sync_free
    data = [tuple(t.cuda() for t in _batch(s)) for s in range(5)]
    opt.step(_closure(model, opt, *data[0]))
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in data[1:]:
            opt.step(_closure(model, opt, x, y))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("drift", [0.1, 1.0, 10.0])
def test_fixed_newton_schulz_recovers_from_a_stale_inverse(drift: float) -> None:
    """kappa(M) = 1e6, d = 64, the previous inverse that of a drifted SPD factor (its residual
    up to ~7, so no warm start): the start X0 / ||M X0||_F converges within the 20 fixed
    iterations to float64 accuracy, where 20 iterations from I / ||M||_F do not."""
    from grng.ops import masked

    torch.manual_seed(0)
    d = 64
    eye = torch.eye(d, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    M = (Q * torch.logspace(-6, 0, d, dtype=torch.float64)) @ Q.T
    M = 0.5 * (M + M.T)
    B = torch.randn(d, d, dtype=torch.float64) / d ** 0.5
    X0 = torch.linalg.inv(M + drift * 1e-6 * B @ B.T)
    X0 = 0.5 * (X0 + X0.T)
    X, ok = masked.newton_schulz_fixed(M, X0, NewtonInverse.ITERATIONS_ON_DEVICE, 1e-10)
    assert bool(ok)
    torch.testing.assert_close(X, torch.linalg.inv(M), rtol=1e-6, atol=0.0)
    cold = eye / torch.linalg.matrix_norm(M)
    _, cold_ok = masked.newton_schulz_fixed(M, cold, NewtonInverse.ITERATIONS_ON_DEVICE, 1e-10)
    assert not bool(cold_ok)  # I / ||M||_F scaled again is the old cold start: too slow here


class _Branchy(nn.Module):
    """A trunk, and a layer the forward uses only when ``late`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk, self.late_layer, self.late = nn.Linear(6, 3), nn.Linear(6, 3), False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x) + (self.late_layer(x) if self.late else 0.0)


@pytest.mark.parametrize("name", ["kfac-newton", "rkalman"])
def test_a_layer_first_used_on_a_non_finite_step_gets_no_statistics(name: str) -> None:
    """A layer whose first rows arrive on a NaN fold step: K-FAC has no old factors to select
    on the device, so that step takes the host path (warned, skipped) and the layer stays
    without factors; R-Kalman's covariances start at the prior, which the device path restores
    bit for bit. The next finite fold creates or updates them; training goes on finite."""
    torch.manual_seed(0)
    model = _Branchy()
    opt = CONFIGS[name](model, sync_free=True)
    for t in range(4):  # factor_every=2: step 4 folds
        x, y = _batch(t)
        opt.step(_closure(model, opt, x, y))
    model.late = True
    late = opt.layer_state(opt.layers[1])
    before = {k: v.clone() for k, v in late.items()}
    x, y = _batch(4)
    with pytest.warns(RuntimeWarning, match="skipped") if not before else \
            contextlib.nullcontext():
        opt.step(_closure(model, opt, x, y, poison=True))
    assert opt.skipped_steps == 1
    assert late.keys() == before.keys() and all(torch.equal(late[k], v) for k, v in before.items())
    for t in (5, 6):
        x, y = _batch(t)
        opt.step(_closure(model, opt, x, y))
    assert late.folded() and all(torch.isfinite(v).all() for v in late.values())
    assert not all(torch.equal(late[k], v) for k, v in before.items()) or not before
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.skipped_steps == 1


def test_eigen_refresh_steps_take_the_host_path() -> None:
    """An eigen refresh reads its result on the host anyway: a sync-free K-FAC takes the host path
    on refresh steps, so a NaN there is one clear skip warning, no eigendecomposition of
    non-finite factors (and no 'factorization failed' warnings)."""
    model = _model()
    opt = grng.KFAC(model, lr=0.05, inverse_every=2, factor_every=1, sync_free=True)
    for t in range(2):
        x, y = _batch(t)
        opt.step(_closure(model, opt, x, y))
    x, y = _batch(2)  # step 2: a refresh step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(_closure(model, opt, x, y, poison=True))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "step skipped" in messages[0], messages
    assert opt.skipped_steps == 1


class _Structures(nn.Module):
    """A grouped convolution (block-diagonal factors), an embedding (a diagonal A) and a
    linear layer (dense factors)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.conv = nn.Conv1d(4, 8, 3, groups=2)
        self.out = nn.Linear(8 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.conv(self.emb(x).transpose(1, 2)).flatten(1))


def test_a_skipped_fold_leaves_every_factor_structure() -> None:
    """The masked fold of each structure: block-diagonal (in place, batched over groups),
    diagonal (a fold of a copy and a select), dense: a NaN step leaves every factor bit for bit,
    and the next step folds again."""
    torch.manual_seed(0)
    model = _Structures()
    opt = grng.KFAC(model, lr=0.01, inverse="cholesky", inverse_every=2, factor_every=1,
                    sync_free=True)
    gen = torch.Generator().manual_seed(0)

    def step(poison: bool) -> None:
        x, y = torch.randint(0, 11, (5, 6), generator=gen), torch.randint(0, 3, (5,), generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) * (float("nan") if poison else 1.0)
        loss.backward()
        opt.step()

    for _ in range(3):
        step(False)
    units = [u for u, _ in opt._curvature_units() if "A" in u.state]
    assert sorted(u.state["A"].dim() for u in units) == [1, 2, 3]
    saved = [{k: u.state[k].clone() for k in ("A", "G")} for u in units]
    step(True)
    assert opt.skipped_steps == 1
    for u, s in zip(units, saved):
        for k, v in s.items():
            assert torch.equal(u.state[k], v), k
    with pytest.warns(RuntimeWarning, match="skipped on the device"):
        step(False)
    assert all(not torch.equal(u.state["G"], s["G"]) for u, s in zip(units, saved))
