"""R-Kalman (ALGORITHMS.md section 5): Kalman-filtered Kronecker covariances, no d x d inverse.

- with q = 0, no variance cap and all rows, P_A, P_G equal the inverses of the running factors
  M_t = beta M_{t-1} + (1 - beta) M_batch started at prior_precision I (Woodbury);
- no factorization, solve or eigendecomposition ever touches a d x d factor: only the k x k
  (or m x m) innovation; the Gaussian sketch H = Omega X keeps the update unbiased;
- direction P_G g P_A + rho g; thousands of float32 steps on digits stay finite, symmetric and
  failure free; the variance cap prevents covariance windup on never-excited inputs;
- state_dict resumes bit for bit, sketch RNG included; bad arguments raise ValueError.
"""
from __future__ import annotations

import copy
import functools
import io
import time
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from grng import KFAC, RKalman
from grng import make_closure

F64 = torch.float64


# ----------------------------------------------------------------------------- models


class _ConvNet(nn.Module):
    """Conv2d(2 -> 3, 3x3) on 5x5 inputs (T = 9 positions), then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.head = nn.Linear(27, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class _EmbedNet(nn.Module):
    """Embedding (diagonal A), mean over tokens, LayerNorm (diagonal Fisher), Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.emb(x).mean(1)))


def _mlp() -> nn.Module:
    """6 -> 5 (tanh, LayerNorm: diagonal parameters too) -> 4."""
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.LayerNorm(5), nn.Linear(5, 4))


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[int], Tensor]]] = {
    "mlp": (_mlp, lambda n: torch.randn(n, 6, dtype=F64)),
    "conv": (_ConvNet, lambda n: torch.randn(n, 2, 5, 5, dtype=F64)),
    "embedding": (_EmbedNet, lambda n: torch.randint(0, 7, (n, 3))),
}


def _build(case: str) -> tuple[nn.Module, Callable[[int], Tensor]]:
    make, inputs = CASES[case]
    return make().to(F64), inputs


def _ce(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    """torch.optim's closure: zero the gradients, cross entropy, backward, the loss."""
    return make_closure(model, lambda: nn.functional.cross_entropy(model(x), y))


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------- P = inverse running factor


@pytest.mark.parametrize("case", list(CASES))
def test_covariances_are_inverse_running_factors(case: str) -> None:
    """q = 0, no cap, m <= kalman_rank: P_A = M_A^-1, P_G = M_G^-1 (and p_D = 1 / m_D), with
    M_0 = prior_precision I (no "set" at the first update) and M_t = beta M + (1 - beta) M_batch.

    M_batch are K-FAC's batch factors, from a K-FAC with factor_decay = 0 on a twin model
    synced to the same parameters and fed the same batch (its own factors are checked by hand
    in test_ring_reng.py)."""
    torch.manual_seed(8)
    model, inputs = _build(case)
    twin = copy.deepcopy(model)
    beta, prior = 0.9, 2.5
    opt = RKalman(model, lr=0.2, rho=0.3, factor_decay=beta, process_noise=0.0,
                  max_variance=None, kalman_rank=64, prior_precision=prior, factor_every=1)
    probe = KFAC(twin, lr=0.0, damping=1.0, factor_decay=0.0, factor_every=1)
    running: dict[int, Tensor] = {}
    for step in range(6):
        x, y = inputs(6), torch.randint(0, 4, (6,))
        twin.load_state_dict(model.state_dict())
        probe.step(_ce(twin, x, y))
        opt.step(_ce(model, x, y))
        pairs = []
        for lk, lo in zip(probe.layers, opt.layers):
            sk, so = probe.layer_state(lk), opt.layer_state(lo)
            pairs += [(id(lo.weight), "A", sk["A"], so["PA"]), (-id(lo.weight), "G", sk["G"], so["PG"])]
        for p_twin, p in zip(twin.parameters(), model.parameters()):
            if "D" in probe.curvature_state(p_twin):
                pairs.append((id(p), "D", probe.curvature_state(p_twin)["D"], opt.curvature_state(p)["PD"]))
        assert len(pairs) >= 4
        for key, name, batch, P in pairs:
            if key not in running:  # the prior is the start
                running[key] = prior * (torch.eye(batch.shape[0], dtype=F64) if batch.dim() == 2
                                        else torch.ones_like(batch))
            running[key] = beta * running[key] + (1 - beta) * batch
            expected = torch.linalg.inv(running[key]) if batch.dim() == 2 else 1.0 / running[key]
            assert _rel(P, expected) < 1e-9, (case, step, name, _rel(P, expected))
            if P.dim() == 2:
                assert torch.equal(P, P.T)


def test_process_noise_enters_the_predict_step() -> None:
    """q > 0 (no cap, all rows): P_t = ((P_{t-1} / beta + q I)^-1 + (1 - beta) M_batch)^-1,
    the Kalman recursion run densely in the test."""
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).to(F64)
    twin = copy.deepcopy(model)
    beta, q, prior = 0.8, 0.05, 3.0
    opt = RKalman(model, lr=0.2, factor_decay=beta, process_noise=q, max_variance=None,
                  prior_precision=prior, factor_every=1)
    probe = KFAC(twin, lr=0.0, damping=1.0, factor_decay=0.0, factor_every=1)
    expected: dict[tuple[int, str], Tensor] = {}
    for _ in range(4):
        x, y = torch.randn(6, 6, dtype=F64), torch.randint(0, 4, (6,))
        twin.load_state_dict(model.state_dict())
        probe.step(_ce(twin, x, y))
        opt.step(_ce(model, x, y))
        for i, (lk, lo) in enumerate(zip(probe.layers, opt.layers)):
            for key in ("A", "G"):
                M_batch = probe.layer_state(lk)[key]
                eye = torch.eye(M_batch.shape[0], dtype=F64)
                P_prev = expected.get((i, key), eye / prior)
                P_minus = P_prev / beta + q * eye
                expected[i, key] = torch.linalg.inv(torch.linalg.inv(P_minus) + (1 - beta) * M_batch)
                P = opt.layer_state(lo)["P" + key]
                assert _rel(P, expected[i, key]) < 1e-9, (i, key, _rel(P, expected[i, key]))


def test_batch_factors_of_the_probe_are_section_1_by_hand() -> None:
    """The K-FAC probe used above gives A = a_bar^T a_bar / N and G = e^T e / N, e = N g_hat."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).to(F64)
    probe = KFAC(model, lr=0.0, damping=1.0, factor_decay=0.0)
    x, y = torch.randn(7, 6, dtype=F64), torch.randint(0, 4, (7,))
    probe.step(_ce(model, x, y))
    with probe.curvature_paused():
        h = model[1](model[0](x))
        h.retain_grad()
        s1 = model[0](x)
        s1.retain_grad()
        out = model[2](torch.tanh(s1))
        out.retain_grad()
        nn.functional.cross_entropy(out, y).backward()
    ones = torch.ones(7, 1, dtype=F64)
    for layer, a, s in zip(probe.layers, (x, torch.tanh(s1).detach()), (s1, out)):
        a_bar = torch.cat([a, ones], 1)
        e = 7 * s.grad
        torch.testing.assert_close(probe.layer_state(layer)["A"], a_bar.T @ a_bar / 7)
        torch.testing.assert_close(probe.layer_state(layer)["G"], e.T @ e / 7)


# -------------------------------------------------------- no d x d inverse, solve or eigh

_LINALG = ["inv", "inv_ex", "solve", "solve_ex", "eigh", "eig", "eigvals", "eigvalsh", "cholesky",
           "cholesky_ex", "lu_factor", "lu_factor_ex", "lu", "lu_solve", "solve_triangular", "svd",
           "svdvals", "pinv", "lstsq", "qr", "ldl_factor", "ldl_factor_ex", "ldl_solve",
           "tensorinv", "tensorsolve", "det", "slogdet", "matrix_rank", "cond", "matrix_power"]
_TORCH = ["inverse", "cholesky", "cholesky_inverse", "cholesky_solve", "lu", "lu_solve", "svd",
          "pinverse", "triangular_solve", "det", "logdet", "slogdet", "qr", "geqrf", "linalg_solve",
          "linalg_inv", "linalg_eigh", "linalg_cholesky", "linalg_cholesky_ex", "_linalg_eigh"]
_TENSOR = ["inverse", "cholesky", "cholesky_inverse", "cholesky_solve", "pinverse", "svd", "qr",
           "triangular_solve", "lu", "lu_solve", "det", "logdet", "slogdet", "geqrf", "matrix_power"]


def _square_sizes(args: tuple, kwargs: dict) -> list[int]:
    sizes = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, Tensor) and a.dim() >= 2 and a.shape[-1] == a.shape[-2]:
            sizes.append(a.shape[-1])
    return sizes


def _install_recorders(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[int], tuple]]:
    """Every linear-algebra factorization / solve / inverse / eigendecomposition call, with the
    square sizes of its matrix arguments and all argument shapes."""
    calls: list[tuple[str, list[int], tuple]] = []

    def wrap(name: str, fn):
        @functools.wraps(fn)
        def recorder(*args, **kwargs):
            shapes = tuple(tuple(a.shape) for a in args if isinstance(a, Tensor))
            calls.append((name, _square_sizes(args, kwargs), shapes))
            return fn(*args, **kwargs)
        return recorder

    for owner, names, prefix in ((torch.linalg, _LINALG, "torch.linalg."), (torch, _TORCH, "torch."),
                                 (torch.Tensor, _TENSOR, "Tensor.")):
        for name in names:
            if hasattr(owner, name):
                monkeypatch.setattr(owner, name, wrap(prefix + name, getattr(owner, name)))
    return calls


@pytest.fixture
def factorizations(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[int], tuple]]:
    return _install_recorders(monkeypatch)


@pytest.mark.parametrize(("rows", "rank"), [(5, 6), (12, 3)])
def test_no_factor_sized_factorization_ever(factorizations, rows: int, rank: int) -> None:
    """Layers with d_A = 11, 9 and d_G = 8, 7; m = 5 rows with kalman_rank 6 (innovation
    5 x 5), or m = 12 rows sketched to kalman_rank 3 (innovation 3 x 3)."""
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 7))
    factor_dims = {11, 8, 9, 7}
    innovation = min(rows, rank)
    assert not factor_dims & {rows, rank}
    # the reference path, whose torch.linalg calls the recorders see (the ext backend's C++
    # factorizes the same k x k innovation: csrc/cpu_ops.cpp, kalman_update)
    opt = RKalman(model, lr=0.1, kalman_rank=rank, backend="reference")
    for _ in range(4):
        x, y = torch.randn(rows, 10), torch.randint(0, 7, (rows,))
        opt.step(_ce(model, x, y))
    assert opt.steps == 4 and opt.kalman_failures == 0
    sizes = [s for _, ss, _ in factorizations for s in ss]
    names = {name for name, _, _ in factorizations}
    # the innovation Cholesky was seen (the recorders work) ...
    assert any("cholesky" in name for name in names), factorizations
    assert innovation in sizes
    # ... and nothing else: no d x d factor was factorized, solved with or inverted
    assert set(sizes) == {innovation}, factorizations
    assert len(factorizations) >= 4 * 2 * 2


def test_recorder_would_catch_kfac() -> None:
    """Control: the same recorders flag K-FAC's d x d eigendecompositions (the test can fail)."""
    with pytest.MonkeyPatch.context() as mp:
        calls = _install_recorders(mp)
        model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 7))
        opt = KFAC(model, lr=0.1)
        opt.step(_ce(model, torch.randn(5, 10), torch.randint(0, 7, (5,))))
    assert {11, 8, 9, 7} <= {s for _, ss, _ in calls for s in ss}


def test_sketched_update_is_unbiased() -> None:
    """m = 12 rows > kalman_rank = 3: each update adds H^T H / r with H = Omega X: a rank-3 PSD
    matrix in X's row space, whose average is (1 - beta) M_batch (E[Omega^T Omega] = I)."""
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(4, 3)).to(F64)
    beta = 0.9
    opt = RKalman(model, lr=0.0, factor_decay=beta, process_noise=0.0, max_variance=None,
                  kalman_rank=3, prior_precision=1.0, kl_clip=None, factor_every=1)
    probe_model = copy.deepcopy(model)
    probe = KFAC(probe_model, lr=0.0, damping=1.0, factor_decay=0.0, factor_every=1)
    x, y = torch.randn(12, 4, dtype=F64), torch.randn(12, 3, dtype=F64)
    mse = lambda m: make_closure(m, lambda: nn.functional.mse_loss(m(x), y))  # noqa: E731  (G full rank)
    probe.step(mse(probe_model))
    layer = opt.layers[0]
    batch = {"PA": probe.layer_state(probe.layers[0])["A"], "PG": probe.layer_state(probe.layers[0])["G"]}
    a_bar = torch.cat([x, torch.ones(12, 1, dtype=F64)], 1)
    total = {key: torch.zeros_like(M) for key, M in batch.items()}
    prev = {"PA": torch.eye(5, dtype=F64), "PG": torch.eye(3, dtype=F64)}
    steps = 400
    for t in range(steps):
        opt.step(mse(model))  # lr = 0: the same batch at the same point every step
        st = opt.layer_state(layer)
        for key in ("PA", "PG"):
            M_now, M_prev = torch.linalg.inv(st[key]), torch.linalg.inv(prev[key])
            delta = M_now - beta * M_prev
            delta = 0.5 * (delta + delta.T)
            if t < 3:
                ev = torch.linalg.eigvalsh(delta)
                assert ev.min() > -1e-9 * ev.max()  # PSD
                if key == "PA":  # 5 x 5 with 12 rows: rank 3 < 5, inside the row space of a_bar
                    assert int((ev > 1e-9 * ev.max()).sum()) == 3
                    proj = a_bar.T @ torch.linalg.pinv(a_bar.T)
                    torch.testing.assert_close(proj @ delta, delta, rtol=1e-7, atol=1e-9)
            total[key] += delta
            prev[key] = st[key].clone()
    for key, M in batch.items():
        mean = total[key] / steps
        assert _rel(mean, (1 - beta) * M) < 0.15, (key, _rel(mean, (1 - beta) * M))


# --------------------------------------------------------------------------- direction


@pytest.mark.parametrize("case", list(CASES))
def test_direction_is_pg_g_pa_plus_rho_g(case: str) -> None:
    """After the covariance update, theta <- theta - lr (P_G V P_A + rho V), p_D g for diagonals."""
    torch.manual_seed(17)
    model, inputs = _build(case)
    twin = copy.deepcopy(model)
    lr, rho = 0.3, 0.4
    opt = RKalman(model, lr=lr, rho=rho, kalman_rank=4,
                  prior_precision=1.0, kl_clip=None)  # defaults: q > 0, cap on, sketch on
    for _ in range(3):
        x, y = inputs(6), torch.randint(0, 4, (6,))
        twin.load_state_dict(model.state_dict())
        grads = torch.autograd.grad(nn.functional.cross_entropy(twin(x), y), list(twin.parameters()))
        g_of = {id(p): g for p, g in zip(model.parameters(), grads)}
        before = {id(p): p.detach().clone() for p in model.parameters()}
        opt.step(_ce(model, x, y))
        covered = set()
        for layer in opt.layers:
            st = opt.layer_state(layer)
            V = layer.to_matrix([g_of[id(p)] for p in layer.params])
            PA = st["PA"]
            d = st["PG"] @ V @ (torch.diag(PA) if PA.dim() == 1 else PA) + rho * V
            expected = layer.split(layer.to_matrix([before[id(p)] for p in layer.params]) - lr * d)
            for p, e in zip(layer.params, expected):
                torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-13)
                covered.add(id(p))
        for p in model.parameters():
            if id(p) not in covered:
                e = before[id(p)] - lr * (opt.curvature_state(p)["PD"] * g_of[id(p)] + rho * g_of[id(p)])
                torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-13)
    assert opt.skipped_steps == 0 and opt.kalman_failures == 0


# ---------------------------------------------------------------------- long float32 run


def _digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16.0, torch.tensor(data.target)


def test_long_float32_digits_run_is_stable() -> None:
    """3000 float32 steps, MLP 64-32-10, batch 32, default settings except lr: no failed
    factorization, no skipped step, finite parameters, finite symmetric positive definite P,
    the loss lowered; the three always-zero pixels of digits sit at the variance cap (without
    it their variance would grow as 0.95^-t and overflow float32 after about 1730 steps)."""
    X, y = _digits()
    zero_pixels = (X == 0).all(0).nonzero().flatten().tolist()
    assert zero_pixels == [0, 32, 39]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = RKalman(model, prior_precision=1.0, kl_clip=None, lr=0.3)
    with torch.no_grad():
        start = float(nn.functional.cross_entropy(model(X), y))
    gen = torch.Generator().manual_seed(0)
    idx_all = torch.randint(0, X.shape[0], (3000, 32), generator=gen)
    t0 = time.perf_counter()
    for idx in idx_all:
        xb, yb = X[idx], y[idx]
        opt.step(make_closure(opt, lambda: nn.functional.cross_entropy(model(xb), yb)))
    elapsed = time.perf_counter() - t0
    with torch.no_grad():
        end = float(nn.functional.cross_entropy(model(X), y))
    assert opt.steps == 3000 and opt.skipped_steps == 0 and opt.kalman_failures == 0
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    cap = opt.max_variance
    assert cap == 1.0
    for layer in opt.layers:
        st = opt.layer_state(layer)
        for key in ("PA", "PG"):
            P = st[key]
            assert P.dtype == torch.float32
            assert bool(torch.isfinite(P).all())
            assert torch.equal(P, P.T)
            assert float(P.diagonal().max()) <= cap * (1 + 1e-6)
            assert float(torch.linalg.eigvalsh(P.double()).min()) > 0.0
    PA = opt.layer_state(opt.layers[0])["PA"]
    for i in zero_pixels:
        assert abs(float(PA[i, i]) - cap) <= 1e-6 * cap
    assert end < 0.15 * start, (start, end)
    print(f"R-Kalman digits: 3000 steps in {elapsed:.1f} s, loss {start:.3f} -> {end:.4f}")


# ----------------------------------------------------------------------------- windup


def _windup_run(steps: int, **kw) -> tuple[RKalman, list[float]]:
    """Linear(4 -> 3) whose input feature 1 is always zero; returns P_A[1, 1] after each step."""
    torch.manual_seed(31)
    model = nn.Linear(4, 3)
    opt = RKalman(model, lr=0.1, **{"factor_every": 1, **kw})
    W = torch.randn(3, 4)
    xs = torch.randn(steps, 8, 4)
    xs[..., 1] = 0.0
    trace = []
    for x in xs:
        target = x @ W.T
        opt.step(make_closure(opt, lambda: nn.functional.mse_loss(model(x), target)))
        trace.append(float(opt.layer_state(opt.layers[0])["PA"][1, 1]))
    return opt, trace


def test_variance_cap_prevents_windup() -> None:
    """3000 float32 steps with a never-excited input: P's diagonal stays <= max_variance."""
    opt, trace = _windup_run(3000)
    assert opt.skipped_steps == 0 and opt.kalman_failures == 0
    cap = opt.max_variance
    assert max(trace) <= cap * (1 + 1e-6) and abs(trace[-1] - cap) <= 1e-6 * cap
    for layer in opt.layers:
        for key in ("PA", "PG"):
            P = opt.layer_state(layer)[key]
            assert bool(torch.isfinite(P).all()) and float(P.diagonal().max()) <= cap * (1 + 1e-6)
    assert all(bool(torch.isfinite(p).all()) for p in opt.model.parameters())


def test_without_the_cap_the_variance_winds_up() -> None:
    """max_variance=None, factor_decay 0.9: the unexcited P_A entry grows like 0.9^-t."""
    beta = 0.9
    opt, trace = _windup_run(250, factor_decay=beta, max_variance=None)
    assert trace[-1] > 1e10
    for t in (10, 100, 249):
        assert trace[t] >= beta ** -(t + 1) * (1 - 1e-5)
        assert trace[t] / trace[t - 1] == pytest.approx(1 / beta, rel=1e-4)


# ------------------------------------------------------------------- state_dict round trip


def _make_sketching(model: nn.Module) -> RKalman:
    return RKalman(model, lr=0.1, rho=0.2, momentum=0.9, weight_decay=1e-3, kalman_rank=4,
                   factor_every=2, seed=5)


def _roundtrip(drop_rng: bool) -> bool:
    """Train, checkpoint, train on; True when a restored copy retraces the steps bit for bit."""
    torch.manual_seed(21)
    make_model = lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.LayerNorm(5), nn.Linear(5, 4))  # noqa: E731
    model = make_model()
    opt = _make_sketching(model)
    batches = [(torch.randn(12, 6), torch.randint(0, 4, (12,))) for _ in range(11)]
    for x, y in batches[:5]:
        opt.step(_ce(model, x, y))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for x, y in batches[5:]:
        opt.step(_ce(model, x, y))
    buf.seek(0)
    ckpt = torch.load(buf)
    if drop_rng:
        ckpt["opt"]["grng"].pop("rng")
    torch.manual_seed(999)
    model2 = make_model()
    model2.load_state_dict(ckpt["model"])
    opt2 = _make_sketching(model2)
    opt2.load_state_dict(ckpt["opt"])
    for x, y in batches[5:]:
        opt2.step(_ce(model2, x, y))
    assert opt2.steps == opt.steps == 11
    same = all(torch.equal(p1, p2) for p1, p2 in zip(model.parameters(), model2.parameters()))
    for l1, l2 in zip(opt.layers, opt2.layers):
        for key in ("PA", "PG"):
            same = same and torch.equal(opt.layer_state(l1)[key], opt2.layer_state(l2)[key])
    return same


def test_state_dict_round_trip_resumes_bit_for_bit_with_sketch() -> None:
    assert _roundtrip(drop_rng=False)
    # control: without the sketch generator's state the trajectory differs
    assert not _roundtrip(drop_rng=True)


# ------------------------------------------------------------------------ argument checks


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"rho": -0.1}, "rho"),
        ({"rho": float("nan")}, "rho"),
        ({"kalman_rank": 0}, "kalman_rank"),
        ({"kalman_rank": 2.5}, "kalman_rank"),
        ({"prior_precision": 0.0}, "prior_precision"),
        ({"prior_precision": -1.0}, "prior_precision"),
        ({"process_noise": -1e-3}, "process_noise"),
        ({"factor_decay": 0.0}, "factor_decay"),
        ({"factor_decay": 1.0}, "factor_decay"),
        ({"factor_decay": float("nan")}, "factor_decay"),
        ({"max_variance": 0.0}, "max_variance"),
        ({"lr": -0.1}, "lr"),
        ({"momentum": -0.5}, "momentum"),
        ({"factor_every": 0}, "factor_every"),
        ({"backend": "cuda"}, "backend"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        RKalman(nn.Linear(3, 2), **kwargs)


def test_bad_rho_in_a_param_group_raises() -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="rho"):
        RKalman(model, param_groups=[{"params": list(model.parameters()), "rho": -1.0}])
