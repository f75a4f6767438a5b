"""The Triton backend against the reference ops, on small odd shapes (CPU: Triton's interpreter).

The accuracy rule for every op: the kernel's max error against a float64 reference is at most
twice the error of the reference op run in the same precision, plus a slack of two units in the
last place of the output's largest entry. Symmetric outputs must be exactly symmetric; fresh
outputs are poisoned with NaN (through ``grng.kernels._tiles.new_output``) so that an element
the kernels fail to write shows up. The check functions take a device and sizes; the GPU file
(tests/test_triton_gpu.py) runs them at large sizes.

Besides: the dots' precision (TF32 for fp32 only when torch allows it, bf16/fp16 operands on the
tensor cores) is chosen once per call on the host and reaches every launch; odd sizes (1, 123,
769: a bias column) launch exactly what round sizes do; the autotune keys hold feature sizes
and a coarse row-count class, so a new batch size does not re-tune. Stacked blocks (a leading
batch dimension B, any layout) take the launches of one block, B on grid axis 1 and never in an
autotune key, each block equal bit for bit to the 2-D kernel's result, 64-bit batch offsets.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import Tensor

pytest.importorskip("triton")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import grng.ops as ops  # noqa: E402
from grng.ops import dispatch, reference, registry  # noqa: E402
from grng.ops.errors import BackendUnavailable, FactorizationError  # noqa: E402

if not (torch.cuda.is_available() or dispatch.interpreter_enabled()):
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from grng.kernels import (_tiles, adam_moments, eigen_apply, factor_update, fused_update,  # noqa: E402
                          kalman_update, newton_schulz)
from grng.ops import masked  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_within_rule(out: Tensor, ref_same: Tensor, ref64: Tensor) -> None:
    """|out - ref64|_max <= 2 |ref_same - ref64|_max + 2 ulp(out dtype) * |ref64|_max."""
    err = float((out.double() - ref64).abs().max()) if out.numel() else 0.0
    ref_err = float((ref_same.double() - ref64).abs().max()) if out.numel() else 0.0
    scale = float(ref64.abs().max()) if out.numel() else 0.0
    slack = 2.0 * torch.finfo(out.dtype).eps * scale
    assert math.isfinite(err), "kernel output has non-finite entries"
    assert err <= 2.0 * ref_err + slack, f"kernel error {err:.3e} vs reference error {ref_err:.3e}"


def strided(t: Tensor) -> Tensor:
    """The same values as ``t`` in a non-contiguous view (a column slice of a wider buffer)."""
    buf = torch.empty(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype, device=t.device)
    buf[..., 1:t.shape[-1] + 1] = t
    return buf[..., 1:t.shape[-1] + 1]


def random_spd(d: int, device: str) -> Tensor:
    """A random, well-conditioned SPD matrix (fp32) that is exactly symmetric."""
    A = torch.randn(d, d, device=device)
    return reference.symmetrize_from_upper(A @ A.T / d + torch.eye(d, device=device))


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh kernel outputs start as NaN, so an unwritten element fails the test."""
    monkeypatch.setattr(_tiles, "new_output",
                        lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype,
                                                                device=device))


def check_factor_update(device: str, batch: tuple[int, ...], d: int, m: int,
                        x_dtype: torch.dtype, beta: float, noncontig: bool) -> None:
    """Triton M <- beta M + alpha X^T X: rule, exact symmetry, beta == 0 never reads (NaN) M."""
    alpha = 0.37
    X = torch.randn(*batch, m, d, device=device).to(x_dtype)
    M0 = torch.randn(*batch, d, d, device=device)
    M0 = reference.symmetrize_from_upper(M0)
    if noncontig:
        X = X.transpose(-2, -1).contiguous().transpose(-2, -1)
        M = strided(M0.clone())
    else:
        M = M0.clone()
    if beta == 0.0:
        M.fill_(math.nan)
    out = ops.factor_update(M, X, alpha, beta, backend="triton")
    assert out is M
    ref_same = reference.factor_update(M0.clone(), X, alpha, beta)
    ref64 = reference.factor_update(M0.double(), X.double(), alpha, beta)
    assert_within_rule(M, ref_same, ref64)
    assert torch.equal(M, M.transpose(-2, -1))


def check_eigen_apply(device: str, d_g: int, d_a: int, v_dtype: torch.dtype, diagonal_a: bool,
                      noncontig: bool, q_dtype: torch.dtype = torch.float32) -> None:
    """Triton damped eigen-inverse application against the reference (clamped eigenvalues);
    eigenvectors and eigenvalues in ``q_dtype``."""
    V = torch.randn(d_g, d_a, device=device).to(v_dtype)
    QG = torch.linalg.qr(torch.randn(d_g, d_g, device=device))[0].to(q_dtype)
    QA = (None if diagonal_a else
          torch.linalg.qr(torch.randn(d_a, d_a, device=device))[0].to(q_dtype))
    lG = (torch.rand(d_g, device=device) * 2.0 - 0.2).to(q_dtype)  # some negatives: clamped at 0
    lA = (torch.rand(d_a, device=device) * 2.0 - 0.2).to(q_dtype)
    damping = 1e-2
    if noncontig:
        V, QG = strided(V), QG.T.contiguous().T
        QA = None if QA is None else strided(QA)
    out = ops.eigen_apply(V, QG, lG, QA, lA, damping, backend="triton")
    ref_same = reference.eigen_apply(V, QG, lG, QA, lA, damping)
    ref64 = reference.eigen_apply(V.double(), QG.double(), lG.double(),
                                  None if QA is None else QA.double(), lA.double(), damping)
    assert out.shape == V.shape and out.dtype == ref_same.dtype
    assert_within_rule(out, ref_same, ref64)


def check_newton_schulz(device: str, d: int, dtype: torch.dtype, noncontig: bool) -> None:
    """Triton X (2I - M X): rule on X_next, residual = ||I - M X||_F of the input X."""
    M = random_spd(d, device)
    X = torch.linalg.inv(M) + 0.05 * torch.randn(d, d, device=device) / math.sqrt(d)
    M, X = M.to(dtype), X.to(dtype)
    if noncontig:
        M, X = strided(M), X.T.contiguous().T
    X_next, res = ops.newton_schulz_step(M, X, backend="triton")
    ref_same, _ = reference.newton_schulz_step(M, X)
    ref64, _ = reference.newton_schulz_step(M.double(), X.double())
    assert X_next.dtype == dtype and X_next.shape == (d, d)
    assert_within_rule(X_next, ref_same, ref64)
    R64 = torch.eye(d, dtype=torch.float64, device=device) - M.double() @ X.double()
    true_res = float(torch.linalg.matrix_norm(R64))
    rtol = 1e-4 if dtype == torch.float32 and _tiles.dot_precision(dtype) == "ieee" else 1e-2
    assert res.dim() == 0
    assert abs(float(res) - true_res) <= rtol * true_res + 1e-6 * math.sqrt(d)


def check_kalman_update(device: str, d: int, k: int, h_dtype: torch.dtype, q: float,
                        noncontig: bool) -> None:
    """Triton P <- P/beta + qI - W W^T: rule and exact symmetry."""
    r, beta = 7.0, 0.95
    P0 = reference.symmetrize_from_upper(torch.linalg.inv(random_spd(d, device)))
    H = torch.randn(k, d, device=device).to(h_dtype)
    P = strided(P0.clone()) if noncontig else P0.clone()
    if noncontig:
        H = H.T.contiguous().T
    out = ops.kalman_update(P, H, r, beta, q, backend="triton")
    assert out is P
    ref_same = reference.kalman_update(P0.clone(), H, r, beta, q)
    ref64 = reference.kalman_update(P0.double(), H.double(), r, beta, q)
    assert_within_rule(P, ref_same, ref64)
    assert torch.equal(P, P.T)


def test_triton_backend_registered() -> None:
    """The triton backend is live and dispatch resolves all four ops to it."""
    assert ops.backends()["triton"].startswith("live")
    M, X = torch.zeros(3, 3, device=DEVICE), torch.randn(2, 3, device=DEVICE)
    assert dispatch.resolve("factor_update", "triton", M, X, 1.0, 0.0) is factor_update.factor_update
    assert dispatch.resolve("eigen_apply", "triton", M, M, M[0], M, M[0], 0.1) is eigen_apply.eigen_apply
    assert dispatch.resolve("newton_schulz_step", "triton", M, M) is newton_schulz.newton_schulz_step
    assert dispatch.resolve("kalman_update", "triton", M, X, 1.0, 1.0, 0.0) is kalman_update.kalman_update


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,m", [(1, 1), (7, 3), (33, 40), (123, 17), (64, 96)])
@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_factor_update(d: int, m: int, x_dtype: torch.dtype, beta: float) -> None:
    """M <- beta M + alpha X^T X at odd sizes, fp32 and bf16 X, beta = 0 on a NaN M."""
    check_factor_update(DEVICE, (), d, m, x_dtype, beta, noncontig=False)


@pytest.mark.parametrize("beta", [0.0, 0.9])
@pytest.mark.parametrize("d,m", [(7, 5), (45, 33)])
def test_factor_update_noncontiguous(d: int, m: int, beta: float) -> None:
    """Strided M (a column slice) and column-major X."""
    check_factor_update(DEVICE, (), d, m, torch.float32, beta, noncontig=True)


def test_factor_update_many_tiles() -> None:
    """d = 257: a 9 x 9 tile grid (45 upper tiles) exercises the tile-index mapping."""
    check_factor_update(DEVICE, (), 257, 4, torch.float32, 0.5, noncontig=False)


@pytest.mark.parametrize("batch,noncontig", [((3,), False), ((2, 2), True), ((2, 3), False)])
@pytest.mark.parametrize("beta", [0.0, 0.8])
def test_factor_update_batched(batch: tuple[int, ...], noncontig: bool, beta: float) -> None:
    """Many factors of one size in one launch (M: (..., d, d), X: (..., m, d))."""
    check_factor_update(DEVICE, batch, 35, 9, torch.bfloat16, beta, noncontig)


def test_factor_update_batched_permuted_output() -> None:
    """A batch of factors whose storage cannot be flattened in place is updated via a copy."""
    d, m = 9, 4
    M0 = reference.symmetrize_from_upper(torch.randn(2, 3, d, d, device=DEVICE))
    M = M0.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    X = torch.randn(2, 3, m, d, device=DEVICE)
    ops.factor_update(M, X, 0.5, 0.9, backend="triton")
    ref64 = reference.factor_update(M0.double(), X.double(), 0.5, 0.9)
    assert_within_rule(M, reference.factor_update(M0.clone(), X, 0.5, 0.9), ref64)
    assert torch.equal(M, M.transpose(-2, -1))


@settings(max_examples=8, deadline=None)
@given(d=st.integers(1, 130), m=st.integers(1, 40), beta=st.sampled_from([0.0, 0.5]))
def test_factor_update_any_size(d: int, m: int, beta: float) -> None:
    """Any d in 1..130 and m in 1..40 (masking of partial tiles)."""
    check_factor_update(DEVICE, (), d, m, torch.float32, beta, noncontig=False)


def test_unsupported_inputs_fall_back() -> None:
    """fp64 factors: forcing triton raises BackendUnavailable; auto uses the reference."""
    M = torch.zeros(5, 5, dtype=torch.float64, device=DEVICE)
    X = torch.randn(3, 5, dtype=torch.float64, device=DEVICE)
    with pytest.raises(BackendUnavailable):
        ops.factor_update(M, X, 1.0, 0.0, backend="triton")
    torch.testing.assert_close(ops.factor_update(M, X, 1.0, 0.0, backend="auto"), X.T @ X)


@pytest.mark.parametrize("v_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("diagonal_a", [False, True])
@pytest.mark.parametrize("d_g,d_a", [(1, 1), (7, 5), (33, 70), (123, 45)])
def test_eigen_apply(poisoned: None, d_g: int, d_a: int, v_dtype: torch.dtype,
                     diagonal_a: bool) -> None:
    """Damped eigen-inverse application, full and diagonal A, fp32 and bf16 V, NaN-poisoned outputs."""
    check_eigen_apply(DEVICE, d_g, d_a, v_dtype, diagonal_a, noncontig=False)


@pytest.mark.parametrize("diagonal_a", [False, True])
def test_eigen_apply_noncontiguous(poisoned: None, diagonal_a: bool) -> None:
    """Strided V, Q_A and column-major Q_G."""
    check_eigen_apply(DEVICE, 37, 21, torch.float32, diagonal_a, noncontig=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [1, 7, 33, 123])
def test_newton_schulz(poisoned: None, d: int, dtype: torch.dtype) -> None:
    """X (2I - M X) and ||I - M X||_F in fp32 and bf16, NaN-poisoned outputs."""
    check_newton_schulz(DEVICE, d, dtype, noncontig=False)


def test_newton_schulz_noncontiguous(poisoned: None) -> None:
    """Strided M and column-major X."""
    check_newton_schulz(DEVICE, 41, torch.float32, noncontig=True)


def test_newton_schulz_inverse_converges() -> None:
    """The iteration built on the Triton step converges to M^-1 like the reference."""
    M = random_spd(20, DEVICE)
    result = ops.newton_schulz_inverse(M, backend="triton")
    assert result.converged
    torch.testing.assert_close(result.inverse, torch.linalg.inv(M), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("h_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,k", [(1, 1), (7, 3), (33, 5), (123, 20)])
@pytest.mark.parametrize("q", [0.0, 1e-3])
def test_kalman_update(d: int, k: int, h_dtype: torch.dtype, q: float) -> None:
    """P <- P/beta + qI - W W^T with and without process noise, fp32 and bf16 H."""
    check_kalman_update(DEVICE, d, k, h_dtype, q, noncontig=False)


def test_kalman_update_noncontiguous() -> None:
    """Strided P and column-major H."""
    check_kalman_update(DEVICE, 29, 6, torch.float32, 1e-3, noncontig=True)


def test_kalman_update_rejects_indefinite_innovation() -> None:
    """A negative observation noise makes S indefinite: FactorizationError, P untouched."""
    P = torch.eye(6, device=DEVICE)
    H = torch.randn(2, 6, device=DEVICE)
    with pytest.raises(FactorizationError):
        ops.kalman_update(P, H, -1e6, 1.0, 0.0, backend="triton")
    assert torch.equal(P, torch.eye(6, device=DEVICE))


# ------------------------------------------------------- precision, odd sizes, autotune keys

# every op the Triton backend implements (the registry's list; small_call must know each)
OPS = [op for op in registry.SPECS if dispatch.implementation(op, "triton") is not None]
KERNELS = {"sym_update": factor_update._sym_update_kernel,
           "gemm_damped": eigen_apply._gemm_damped_kernel,
           "ns_residual": newton_schulz._residual_kernel,
           "ns_update": newton_schulz._update_kernel,
           "masked_update": fused_update._masked_update_kernel,
           "adam_moments": adam_moments._adam_moments_kernel}
Launch = tuple[str, dict, tuple[int, ...]]


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[Launch]:
    """Every kernel launch is recorded as (kernel, its arguments by name, its grid at the
    kernel's first config, or its fixed grid) instead of run."""
    log: list[Launch] = []
    for name, kernel in KERNELS.items():
        def record(*args, grid, warmup, name=name, kernel=kernel, **kwargs) -> None:
            """Log one launch of ``kernel``."""
            fixed = isinstance(grid, tuple)
            log.append((name, {**dict(zip(kernel.arg_names, args)), **kwargs},
                        grid if fixed else tuple(grid(kernel.configs[0].kwargs))))
        monkeypatch.setattr(kernel, "run", record)
    return log


@pytest.fixture
def torch_precision() -> Iterator[None]:
    """torch's fp32 matmul precision settings (CUDA and CPU) are restored after the test."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        matmuls = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
        saved = [m.fp32_precision for m in matmuls]
        yield
        for m, value in zip(matmuls, saved):
            m.fp32_precision = value
    else:
        before = torch.get_float32_matmul_precision()
        yield
        torch.set_float32_matmul_precision(before)


@pytest.fixture
def gpu_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the interpreter, in-kernel fp32 -> bf16 casts round to nearest even as compiled
    kernels do (the interpreter truncates, which alone doubles a bf16 rounding error)."""
    if not dispatch.interpreter_enabled():
        return
    import triton.language as tl
    from triton.runtime import interpreter
    truncating = interpreter._convert_float

    def nearest_even(data: np.ndarray, src: object, dst: object, rounding: object) -> np.ndarray:
        """The bf16 bits of fp32 ``data`` rounded to nearest even; other casts as before."""
        if src == tl.float32 and dst == tl.bfloat16:
            rounded = torch.from_numpy(np.array(data, dtype=np.float32)).to(torch.bfloat16)
            return rounded.view(torch.int16).numpy().view(np.uint16)
        return truncating(data, src, dst, rounding)

    monkeypatch.setattr(interpreter, "_convert_float", nearest_even)


def small_call(op: str, n: int, dtype: torch.dtype) -> Callable[[], object]:
    """A call of ``op``'s Triton launcher at size n, its low-precision operand in ``dtype``
    (X, the eigenvectors, M and X, H)."""
    x = torch.randn(n, n, device=DEVICE)
    spd = random_spd(n, DEVICE)
    if op == "factor_update":
        return lambda: factor_update.factor_update(torch.zeros(n, n, device=DEVICE), x.to(dtype),
                                                   1.0, 0.5)
    if op == "eigen_apply":
        Q, lam = torch.linalg.qr(x)[0].to(dtype), torch.rand(n, device=DEVICE).to(dtype)
        return lambda: eigen_apply.eigen_apply(x, Q, lam, Q, lam, 0.1)
    if op == "newton_schulz_step":
        return lambda: newton_schulz.newton_schulz_step(spd.to(dtype),
                                                        torch.linalg.inv(spd).to(dtype))
    if op == "kalman_update":
        return lambda: kalman_update.kalman_update(torch.linalg.inv(spd), x[:2].to(dtype),
                                                   1.0, 0.9, 1e-3)
    ok = torch.ones((), dtype=torch.bool, device=DEVICE)
    if op == "factor_update_masked":
        return lambda: factor_update.factor_update_masked(torch.zeros(n, n, device=DEVICE),
                                                          x.to(dtype), 1.0, 0.5, ok)
    if op == "fused_update_masked":
        v = torch.randn(n, device=DEVICE)
        return lambda: fused_update.fused_update_masked([x.clone(), v.clone()], [x, v], [x, v],
                                                        None, 0.1, 0.0, 0.0, 0.1, 1e-3, ok)
    if op == "newton_schulz_masked":
        return lambda: newton_schulz.newton_schulz_masked(spd.to(dtype),
                                                          torch.linalg.inv(spd).to(dtype), 2, 1e-3)
    if op == "kalman_update_masked":
        return lambda: kalman_update.kalman_update_masked(torch.linalg.inv(spd), x[:2].to(dtype),
                                                          1.0, 0.9, 1e-3)
    if op == "adam_moments_masked":
        ones = torch.ones((), device=DEVICE)
        return lambda: adam_moments.adam_moments_masked(x.to(dtype), x.to(dtype), (x * x).to(dtype),
                                                        0.9, 0.999, ones, ones, 1e-8, ok)
    pytest.fail(f"small_call has no call of the Triton op {op!r}: add one")


def test_tf32_allowed_reads_torch_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    """TF32 iff torch's fp32_precision (or, inherited, the global one) is "tf32"; on a torch
    without it, iff allow_tf32 or a float32 matmul precision of "high" / "medium"."""
    def new_api(matmul: str, default: str) -> bool:
        cuda = SimpleNamespace(matmul=SimpleNamespace(fp32_precision=matmul))
        monkeypatch.setattr(torch, "backends", SimpleNamespace(fp32_precision=default, cuda=cuda))
        return _tiles.tf32_allowed()

    assert new_api("tf32", "none") and new_api("none", "tf32")
    assert not (new_api("ieee", "tf32") or new_api("none", "none"))

    def legacy(allow: bool, precision: str) -> bool:
        monkeypatch.setattr(torch, "backends", SimpleNamespace(
            cuda=SimpleNamespace(matmul=SimpleNamespace(allow_tf32=allow))))
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: precision)
        return _tiles.tf32_allowed()

    assert legacy(True, "highest") and legacy(False, "high") and legacy(False, "medium")
    assert not legacy(False, "highest")


def test_tf32_allowed_follows_torch(torch_precision: None) -> None:
    """Against this torch: off at "highest", on after allow_tf32 = True, "high" or "medium"."""
    for setting, on in [("highest", False), ("high", True), ("medium", True), ("highest", False)]:
        torch.set_float32_matmul_precision(setting)
        assert _tiles.tf32_allowed() is on
    torch.backends.cuda.matmul.allow_tf32 = True
    assert _tiles.tf32_allowed()
    torch.backends.cuda.matmul.allow_tf32 = False
    assert not _tiles.tf32_allowed()


def test_dot_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    """The interpreter always multiplies exactly ("ieee"); on a GPU bf16/fp16 operands are
    "native" (tensor cores) and fp32 ones "tf32" only when torch allows it."""
    if dispatch.interpreter_enabled():
        assert {_tiles.dot_precision(dt) for dt in (torch.float32, torch.bfloat16)} == {"ieee"}
    monkeypatch.setattr(_tiles, "interpreter_enabled", lambda: False)
    for allowed, fp32 in [(False, "ieee"), (True, "tf32")]:
        monkeypatch.setattr(_tiles, "tf32_allowed", lambda allowed=allowed: allowed)
        assert _tiles.dot_precision(torch.float32) == fp32
        assert {_tiles.dot_precision(dt) for dt in (torch.bfloat16, torch.float16)} == {"native"}


# a masked op runs its unmasked op's launchers (or, the masked update, no dot at all): the
# precision of those launches is checked through the unmasked op
UNMASKED_OPS = [op for op in OPS if not op.endswith("_masked")]


@pytest.mark.parametrize("op", UNMASKED_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tf32", [False, True])
def test_launches_get_the_chosen_precision(launches: list[Launch], monkeypatch: pytest.MonkeyPatch,
                                           op: str, dtype: torch.dtype, tf32: bool) -> None:
    """As on a GPU: the precision is chosen once per call and every launch gets it: "native" for
    bf16 operands (the Kalman W stays fp32), else "tf32" / "ieee" as torch's setting says."""
    monkeypatch.setattr(_tiles, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(_tiles, "tf32_allowed", lambda: tf32)
    choose = _tiles.dot_precision
    chosen: list[str] = []
    monkeypatch.setattr(_tiles, "dot_precision", lambda dt: chosen.append(choose(dt)) or chosen[-1])
    small_call(op, 9, dtype)()
    fp32 = "tf32" if tf32 else "ieee"
    want = "native" if dtype == torch.bfloat16 and op != "kalman_update" else fp32
    assert chosen == [want]
    assert launches and all(args["PRECISION"] == want for _, args, _ in launches)


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("diagonal_a", [False, True])
def test_eigen_apply_low_precision_eigenvectors(poisoned: None, gpu_rounding: None,
                                                q_dtype: torch.dtype, v_dtype: torch.dtype,
                                                diagonal_a: bool) -> None:
    """bf16/fp16 eigenvectors (inverse_dtype=torch.bfloat16): the rule against the reference in
    that dtype; the output is in it."""
    check_eigen_apply(DEVICE, 33, 70, v_dtype, diagonal_a, noncontig=False, q_dtype=q_dtype)


def test_eigen_apply_bf16_eigenvectors_odd_strided(poisoned: None, gpu_rounding: None) -> None:
    """bf16 eigenvectors at odd sizes, strided V and Q_A, column-major Q_G."""
    check_eigen_apply(DEVICE, 123, 45, torch.float32, False, noncontig=True, q_dtype=torch.bfloat16)


def test_eigen_apply_supports_low_precision_eigenvectors() -> None:
    """bf16/fp16 eigenvectors and eigenvalues are taken (Q_A in Q_G's dtype); float64 ones, or
    Q_A in another dtype than Q_G, go to the reference."""
    V, Q, lam = (torch.randn(5, 5, device=DEVICE), torch.eye(5, device=DEVICE),
                 torch.ones(5, device=DEVICE))
    for dt in (torch.bfloat16, torch.float16):
        assert eigen_apply.supports(V, Q.to(dt), lam.to(dt), Q.to(dt), lam.to(dt), 0.1)
        assert eigen_apply.supports(V.to(dt), Q.to(dt), lam.to(dt), None, lam.to(dt), 0.1)
    assert not eigen_apply.supports(V, Q.to(torch.bfloat16), lam, Q, lam, 0.1)
    assert not eigen_apply.supports(V, Q.double(), lam.double(), Q.double(), lam.double(), 0.1)


@pytest.mark.parametrize("op", OPS)
def test_odd_sizes_launch_the_round_size_path(launches: list[Launch], op: str) -> None:
    """d = 1, 123 and 769 (a bias column) launch the same kernels with the same compile-time
    switches (bool / str constexprs) as d = 768: one masked tiled path, no special case for
    sizes off a tile multiple."""
    def path(n: int) -> list[tuple[str, dict]]:
        launches.clear()
        small_call(op, n, torch.float32)()
        return [(name, {k: v for k, v in args.items() if isinstance(v, (bool, str))})
                for name, args, _ in launches]

    assert path(1) == path(123) == path(769) == path(768) != []


@pytest.mark.parametrize("d", [1, 123, 769])
def test_odd_sizes_noncontiguous(poisoned: None, d: int) -> None:
    """Sizes a bias column makes, strided and column-major inputs: the factor update (bf16 X)
    and the eigen-apply (d_A = d)."""
    check_factor_update(DEVICE, (), d, 3, torch.bfloat16, 0.9, noncontig=True)
    check_eigen_apply(DEVICE, 3, d, torch.float32, False, noncontig=True)


@pytest.mark.parametrize("d", [1, 123])
def test_odd_sizes_noncontiguous_small(poisoned: None, d: int) -> None:
    """Newton-Schulz (bf16) and the Kalman update at odd sizes, strided and column-major inputs
    (their kernels are the ones above; d = 769 would only add interpreter seconds)."""
    check_newton_schulz(DEVICE, d, torch.bfloat16, noncontig=True)
    check_kalman_update(DEVICE, d, 2, torch.float32, 1e-3, noncontig=True)


def test_autotune_keys_leave_out_the_row_count() -> None:
    """No autotune key holds a row (batch) count: the factor update keys on d and the row
    count's class; every key holds the dots' precision, and the GEMMs' keys the true output
    sizes beside the padded ones (an unaligned output prunes other tiles)."""
    assert factor_update._sym_update_kernel.keys == ["d", "m_class", "READ_M", "PRECISION"]
    assert eigen_apply._gemm_damped_kernel.keys == ["M", "N", "K", "M_out", "N_out", "SCALE",
                                                    "PRECISION"]
    for kernel in (newton_schulz._residual_kernel, newton_schulz._update_kernel):
        assert kernel.keys == ["d", "d_out", "PRECISION"]
    assert {factor_update.rows_class(m) for m in range(1, 5000)} == {32, 64, 128, 256, 512}


def test_batch_size_change_keeps_the_autotune_key(launches: list[Launch]) -> None:
    """Batches of 40 and 64 rows get the factor update's autotune key of each other, 200 rows
    another; below 32 and above 512 rows the key is one per side."""
    def key(m: int) -> tuple:
        launches.clear()
        factor_update.factor_update(torch.zeros(33, 33, device=DEVICE),
                                    torch.randn(m, 33, device=DEVICE), 1.0, 0.0)
        (_, args, _), = launches
        return tuple(args[k] for k in factor_update._sym_update_kernel.keys)

    assert key(40) == key(64) != key(200)
    assert key(1) == key(32) and key(600) == key(5000)


@pytest.mark.gpu
def test_tf32_within_rule_on_gpu(torch_precision: None, poisoned: None) -> None:
    """With TF32 allowed (the torch reference then uses it too) every op keeps the rule."""
    torch.set_float32_matmul_precision("high")
    assert _tiles.dot_precision(torch.float32) == "tf32"
    check_factor_update(DEVICE, (), 123, 40, torch.float32, 0.9, noncontig=False)
    check_eigen_apply(DEVICE, 123, 45, torch.float32, False, noncontig=True)
    check_newton_schulz(DEVICE, 123, torch.float32, noncontig=False)
    check_kalman_update(DEVICE, 123, 20, torch.float32, 1e-3, noncontig=False)


# ------------------------------------------------- stacked blocks: one call on a batch dimension

def restack(t: Tensor, layout: str) -> Tensor:
    """The values of the stack ``t`` (B, ...) in a layout: "contiguous"; "colmajor" (each block
    a transposed view); "sliced" (every other entry of a stack twice as long, each block a
    column slice of wider rows); "batch_inner" (the batch index strides between a block's rows)."""
    if layout == "contiguous":
        return t.clone()
    if layout == "colmajor":
        return t.transpose(-2, -1).contiguous().transpose(-2, -1)
    if layout == "sliced":
        buf = torch.full((2 * t.shape[0], *t.shape[1:-1], t.shape[-1] + 3), math.nan,
                         dtype=t.dtype, device=t.device)
        buf[::2, ..., 1:t.shape[-1] + 1] = t
        return buf[::2, ..., 1:t.shape[-1] + 1]
    assert layout == "batch_inner"
    return t.transpose(0, 1).contiguous().transpose(0, 1)


def check_eigen_apply_batched(device: str, B: int, d_g: int, d_a: int, v_dtype: torch.dtype,
                              diagonal_a: bool, layouts: tuple[str, str, str],
                              q_dtype: torch.dtype = torch.float32) -> None:
    """B stacked blocks in one Triton call, V, Q_G, Q_A in ``layouts`` (eigenvalues sliced
    unless all are contiguous): the rule per block, and each block equal bit for bit to the
    2-D kernel's result on it."""
    damping = 1e-2
    V = restack(torch.randn(B, d_g, d_a, device=device).to(v_dtype), layouts[0])
    QG = restack(torch.linalg.qr(torch.randn(B, d_g, d_g, device=device))[0].to(q_dtype), layouts[1])
    QA = (None if diagonal_a else
          restack(torch.linalg.qr(torch.randn(B, d_a, d_a, device=device))[0].to(q_dtype), layouts[2]))
    vectors = "contiguous" if set(layouts) == {"contiguous"} else "sliced"
    lG = restack((torch.rand(B, d_g, device=device) * 2.0 - 0.2).to(q_dtype), vectors)
    lA = restack((torch.rand(B, d_a, device=device) * 2.0 - 0.2).to(q_dtype), vectors)
    out = ops.eigen_apply(V, QG, lG, QA, lA, damping, backend="triton")
    ref_same = reference.eigen_apply(V, QG, lG, QA, lA, damping)
    ref64 = reference.eigen_apply(V.double(), QG.double(), lG.double(),
                                  None if QA is None else QA.double(), lA.double(), damping)
    assert out.shape == V.shape and out.dtype == ref_same.dtype
    for b in range(B):
        assert_within_rule(out[b], ref_same[b], ref64[b])
        alone = eigen_apply.eigen_apply(V[b], QG[b], lG[b], None if QA is None else QA[b], lA[b],
                                        damping)
        assert torch.equal(out[b], alone)


def check_factor_update_batched(device: str, B: int, d: int, m: int, x_dtype: torch.dtype,
                                beta: float, layouts: tuple[str, str]) -> None:
    """B stacked factors updated in one Triton call, M and X in ``layouts``: the rule per
    factor, exact symmetry, ``beta == 0`` on a NaN M."""
    alpha = 0.37
    M0 = reference.symmetrize_from_upper(torch.randn(B, d, d, device=device))
    X = restack(torch.randn(B, m, d, device=device).to(x_dtype), layouts[1])
    M = restack(M0, layouts[0])
    if beta == 0.0:
        M.fill_(math.nan)
    assert ops.factor_update(M, X, alpha, beta, backend="triton") is M
    ref_same = reference.factor_update(M0.clone(), X, alpha, beta)
    ref64 = reference.factor_update(M0.double(), X.double(), alpha, beta)
    for b in range(B):
        assert_within_rule(M[b], ref_same[b], ref64[b])
    assert torch.equal(M, M.transpose(-2, -1))


@pytest.mark.parametrize("B,d_g,d_a,v_dtype,diagonal_a,layouts", [
    (3, 17, 33, torch.float32, False, ("contiguous",) * 3),
    (3, 33, 17, torch.bfloat16, True, ("contiguous",) * 3),
    (1, 1, 1, torch.float32, False, ("contiguous",) * 3),
    (1, 33, 1, torch.bfloat16, False, ("sliced", "colmajor", "batch_inner")),
    (3, 1, 17, torch.float32, True, ("batch_inner", "sliced", "contiguous")),
    (3, 17, 33, torch.float32, False, ("sliced", "colmajor", "batch_inner")),
    (3, 33, 17, torch.bfloat16, False, ("batch_inner", "sliced", "colmajor")),
])
def test_eigen_apply_batched(poisoned: None, B: int, d_g: int, d_a: int, v_dtype: torch.dtype,
                             diagonal_a: bool, layouts: tuple[str, str, str]) -> None:
    """Stacked blocks (B = 1, 3; sizes 1, 17, 33; fp32 and bf16 V; full and diagonal A;
    contiguous, column-major, sliced and batch-inner operands), NaN-poisoned outputs."""
    check_eigen_apply_batched(DEVICE, B, d_g, d_a, v_dtype, diagonal_a, layouts)


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("diagonal_a", [False, True])
def test_eigen_apply_batched_low_precision_eigenvectors(poisoned: None, gpu_rounding: None,
                                                        q_dtype: torch.dtype,
                                                        diagonal_a: bool) -> None:
    """Stacked bf16/fp16 eigenvectors and eigenvalues, sliced and column-major operands."""
    check_eigen_apply_batched(DEVICE, 3, 17, 33, torch.float32, diagonal_a,
                              ("sliced", "colmajor", "batch_inner"), q_dtype=q_dtype)


@pytest.mark.parametrize("B,d,m,x_dtype,beta,layouts", [
    (1, 17, 5, torch.float32, 0.9, ("contiguous", "contiguous")),
    (3, 1, 1, torch.bfloat16, 0.0, ("contiguous", "contiguous")),
    (3, 33, 17, torch.bfloat16, 0.9, ("sliced", "colmajor")),
    (3, 17, 40, torch.float32, 0.0, ("batch_inner", "sliced")),
    (1, 33, 9, torch.float32, 0.9, ("colmajor", "batch_inner")),
])
def test_factor_update_batched_layouts(B: int, d: int, m: int, x_dtype: torch.dtype, beta: float,
                                       layouts: tuple[str, str]) -> None:
    """Stacked factors (B = 1, 3; d = 1, 17, 33; fp32 and bf16 X) in place in every layout:
    sliced stacks, transposed blocks, the batch index between rows."""
    check_factor_update_batched(DEVICE, B, d, m, x_dtype, beta, layouts)


def test_supports_stacked_blocks() -> None:
    """Batched inputs of the documented shapes are taken (one leading batch dimension, the
    same B everywhere; Q_A may be None); mixed batching, two batch dimensions, float64 or a
    wrong size are refused, and dispatch then reports triton as not accepting them."""
    B, d_g, d_a = 2, 5, 3
    V = torch.randn(B, d_g, d_a, device=DEVICE)
    QG, QA = torch.randn(B, d_g, d_g, device=DEVICE), torch.randn(B, d_a, d_a, device=DEVICE)
    lG, lA = torch.rand(B, d_g, device=DEVICE), torch.rand(B, d_a, device=DEVICE)
    assert eigen_apply.supports(V, QG, lG, QA, lA, 0.1)
    assert eigen_apply.supports(V, QG, lG, None, lA, 0.1)
    assert eigen_apply.supports(V[:1], QG[:1], lG[:1], QA[:1], lA[:1], 0.1)
    assert ops.accepts("eigen_apply", "triton", V, QG, lG, QA, lA, 0.1)
    refused = [(V, QG[0], lG, QA, lA), (V, QG, lG[0], QA, lA), (V, QG, lG, QA[0], lA),
               (V, QG, lG, QA, lA[0]), (V, QG, lG, QA[:1], lA), (V[:1], QG, lG, QA, lA),
               (V[0], QG, lG, QA, lA), (V, QG, lG, QG, lA),
               (V[None], QG[None], lG[None], QA[None], lA[None]),
               (V.double(), QG.double(), lG.double(), QA.double(), lA.double()),
               (V, QG, lG, QA.to(torch.bfloat16), lA)]
    for args in refused:
        assert not eigen_apply.supports(*args, 0.1), [tuple(a.shape) for a in args]
    assert not ops.accepts("eigen_apply", "triton", V, QG[0], lG, QA, lA, 0.1)
    M, X = torch.zeros(B, d_g, d_g, device=DEVICE), torch.randn(B, 4, d_g, device=DEVICE)
    assert factor_update.supports(M, X, 1.0, 0.0)
    for M_, X_ in [(M, X[0]), (M[0], X), (M, X[:1]), (M[..., :4], X), (M.double(), X.double())]:
        assert not factor_update.supports(M_, X_, 1.0, 0.0)


def test_stacked_blocks_take_the_2d_launches(launches: list[Launch]) -> None:
    """B stacked blocks make the launches of one block (eigen_apply 4, factor_update 1), each
    covering all B blocks on grid axis 1 with the autotune key of a single block: a new number
    of stacked blocks does not re-tune."""
    def calls(B: int | None) -> list[tuple[str, tuple, tuple[int, ...]]]:
        launches.clear()
        lead = () if B is None else (B,)
        V, Q, lam = (torch.randn(*lead, 9, 9, device=DEVICE), torch.randn(*lead, 9, 9, device=DEVICE),
                     torch.rand(*lead, 9, device=DEVICE))
        eigen_apply.eigen_apply(V, Q, lam, Q, lam, 0.1)
        factor_update.factor_update(torch.zeros(*lead, 9, 9, device=DEVICE),
                                    torch.randn(*lead, 40, 9, device=DEVICE), 1.0, 0.5)
        return [(name, tuple(args[k] for k in KERNELS[name].keys), grid)
                for name, args, grid in launches]

    one, single, three = calls(None), calls(1), calls(3)
    assert [name for name, _, _ in one] == ["gemm_damped"] * 4 + ["sym_update"]
    for launch_1, launch_b1, launch_b3 in zip(one, single, three, strict=True):
        assert launch_1 == launch_b1
        assert launch_b3[:2] == launch_1[:2] and launch_b3[2] == (launch_1[2][0], 3)


def test_batches_past_the_grid_limit_are_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """More stacked blocks than grid axis 1 takes (here 2) run in several launches of at most
    that many: the same results bit for bit."""
    B, d = 5, 9
    V, lam = torch.randn(B, d, d, device=DEVICE), torch.rand(B, d, device=DEVICE)
    Q = torch.linalg.qr(torch.randn(B, d, d, device=DEVICE))[0]
    M0 = reference.symmetrize_from_upper(torch.randn(B, d, d, device=DEVICE))
    X = torch.randn(B, 4, d, device=DEVICE)

    def run() -> tuple[Tensor, ...]:
        return (eigen_apply.eigen_apply(V, Q, lam, Q, lam, 0.1),
                eigen_apply.eigen_apply(V, Q, lam, None, lam, 0.1),
                factor_update.factor_update(M0.clone(), X, 0.5, 0.9),
                *newton_schulz.newton_schulz_step(M0, V))

    whole = run()
    monkeypatch.setattr(_tiles, "MAX_GRID_BATCH", 2)
    assert _tiles.batch_chunks(B) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    for split, one_launch in zip(run(), whole, strict=True):
        assert torch.equal(split, one_launch)


# ------------------------------------------------- sync-free (masked) ops: the multi-tensor update

#: per parameter: shape, dtype of theta and g, dtype of d and buf, layout ("contiguous",
#: "colmajor": all four transposed alike, "sliced": g and d strided views, "mixed": d laid out
#: unlike theta)
FUSED_CASES = [((17, 33), torch.float32, torch.float32, "contiguous"),
               ((1,), torch.bfloat16, torch.bfloat16, "contiguous"),
               ((5, 3, 7), torch.float16, torch.float16, "colmajor"),
               ((300,), torch.bfloat16, torch.float32, "contiguous"),
               ((0, 4), torch.float32, torch.float32, "contiguous"),
               ((33, 17), torch.float32, torch.float32, "sliced"),
               ((9, 40), torch.bfloat16, torch.float32, "mixed")]


def fused_inputs(device: str, wide: bool = False) -> tuple[list[Tensor], ...]:
    """(params, grads, directions, buffers) of :data:`FUSED_CASES` (float64 when ``wide``),
    reproducible across calls."""
    gen = torch.Generator().manual_seed(7)
    groups: tuple[list[Tensor], ...] = ([], [], [], [])
    for shape, low, role_dt, layout in FUSED_CASES:
        for k, dt in enumerate((low, low, role_dt, role_dt)):
            t = torch.randn(shape, generator=gen).to(dt).to(device)
            t = t.double() if wide else t
            if layout == "colmajor":
                t = t.transpose(0, -1).contiguous().transpose(0, -1)
            if (layout == "sliced" and k in (1, 2)) or (layout == "mixed" and k == 2):
                t = strided(t) if layout == "sliced" else t.T.contiguous().T
            groups[k].append(t)
    return groups


@pytest.mark.parametrize("coefficients", [(0.1, 0.9, 1e-2, 0.3, 1e-4), (0.1, 0.0, 0.0, 0.0, None),
                                          (0.05, 0.9, 0.0, 0.0, 10.0)])
def test_fused_update_masked_many_tensors(gpu_rounding: None,
                                          coefficients: tuple[float, ...]) -> None:
    """Parameters of several shapes (sizes 0, 1, odd) and dtypes (fp32, bf16, fp16; bf16 theta
    with fp32 d and buf), contiguous, column-major, sliced and mixed layouts, in one call: each
    tensor within the rule against the reference (the clip active, inactive, or none), and the
    same flag."""
    params, grads, dirs, bufs = fused_inputs(DEVICE)
    ok = fused_update.fused_update_masked(params, grads, dirs, bufs, *coefficients,
                                          torch.tensor(True, device=DEVICE))
    same = fused_inputs(DEVICE)
    ok_same = masked.fused_update_masked(*same, *coefficients, torch.tensor(True, device=DEVICE))
    wide = fused_inputs(DEVICE, wide=True)
    masked.fused_update_masked(*wide, *coefficients, torch.tensor(True, device=DEVICE))
    assert ok.dtype == torch.bool and ok.dim() == 0 and bool(ok) and bool(ok_same)
    written = params + (bufs if coefficients[1] != 0.0 else [])
    for got, ref_same, ref64 in zip(written, same[0] + same[3], wide[0] + wide[3]):
        assert got.dtype == ref_same.dtype and got.stride() == ref_same.stride()
        assert_within_rule(got, ref_same, ref64)


@pytest.mark.parametrize("poison", ["ok", "nan_direction", "inf_gradient"])
def test_fused_update_masked_skip_writes_nothing(poison: str) -> None:
    """ok False, a NaN direction element in the last parameter, or an infinite gradient (rho
    != 0, so d + rho g is not finite): no tensor of the call changes, bit for bit, and the
    returned flag is False."""
    params, grads, dirs, bufs = fused_inputs(DEVICE)
    ok = torch.tensor(poison != "ok", device=DEVICE)
    if poison == "nan_direction":
        dirs[-1][4, 2] = math.nan
    if poison == "inf_gradient":
        grads[1][0] = math.inf
    before = [t.clone() for t in params + bufs]
    flag = fused_update.fused_update_masked(params, grads, dirs, bufs, 0.1, 0.9, 1e-2, 0.3, 1e-4, ok)
    assert not bool(flag)
    for got, old in zip(params + bufs, before, strict=True):
        assert torch.equal(got, old)


def test_fused_update_masked_is_two_launches(launches: list[Launch]) -> None:
    """All parameters of a call (several shapes and dtypes) take ONE reduce launch and ONE apply
    launch of one kernel over one table with a row per non-empty parameter; the same grid."""
    params, grads, dirs, bufs = fused_inputs(DEVICE)
    fused_update.fused_update_masked(params, grads, dirs, bufs, 0.1, 0.9, 1e-2, 0.3, 1e-4,
                                     torch.tensor(True, device=DEVICE))
    assert [(name, args["PHASE"]) for name, args, _ in launches] == [("masked_update", 0),
                                                                    ("masked_update", 1)]
    (_, reduce, grid0), (_, apply, grid1) = launches
    assert grid0 == grid1 and reduce["table_ptr"] is apply["table_ptr"]
    table = reduce["table_ptr"]
    assert reduce["n_tensors"] == len(FUSED_CASES) - 1 == table.shape[0]  # the empty one: no row
    dtype_codes = {int(c) for c in table[:, 6:10].flatten()}
    assert dtype_codes == {0, 1, 2}  # fp32, bf16 and fp16 in the one launch


@pytest.mark.parametrize("block,programs", [(16, 1), (32, 2), (256, 64)])
def test_fused_update_masked_chunking(monkeypatch: pytest.MonkeyPatch, gpu_rounding: None,
                                      block: int, programs: int) -> None:
    """Other chunk sizes and program counts (one program walking every chunk; more programs
    than chunks) give results within the rule too."""
    monkeypatch.setattr(fused_update, "_BLOCK_INTERPRET", block)
    monkeypatch.setattr(fused_update, "_MAX_PROGRAMS_INTERPRET", programs)
    monkeypatch.setattr(fused_update, "_BLOCK", block)
    monkeypatch.setattr(fused_update, "_MAX_PROGRAMS", programs)
    assert fused_update.launch_sizes() == (block, programs)
    test_fused_update_masked_many_tensors(None, (0.1, 0.9, 1e-2, 0.3, 1e-4))


def test_fused_update_masked_supports() -> None:
    """fp32/bf16/fp16 per role are taken; float64, a shape mismatch, a missing buffer with
    momentum, or a non-bool / non-scalar flag are refused."""
    p = [torch.randn(3, 4, device=DEVICE), torch.randn(5, device=DEVICE).bfloat16()]
    g = [t.clone() for t in p]
    ok = torch.tensor(True, device=DEVICE)
    coef = (0.1, 0.9, 0.0, 0.0, None)
    assert fused_update.supports(p, g, g, g, *coef, ok)
    assert fused_update.supports(p, g, g, None, 0.1, 0.0, 0.0, 0.0, None, ok)
    refused = [(p, g, g, None, *coef, ok), (p, g, g, g[:1], *coef, ok),
               (p, g, [g[0].T, g[1]], g, *coef, ok), (p, g, g, g, *coef, ok.float()),
               (p, g, g, g, *coef, ok[None]), ([p[0].double()], [g[0]], [g[0]], [g[0]], *coef, ok)]
    for args in refused:
        assert not fused_update.supports(*args)


def test_masked_newton_and_kalman_launch_the_step_kernels(launches: list[Launch]) -> None:
    """newton_schulz_masked: ``iterations`` Triton steps (residual + update), each covering
    the whole stack on grid axis 1; kalman_update_masked: one symmetric-update launch; no other
    kernel."""
    M = random_spd(9, DEVICE)
    newton_schulz.newton_schulz_masked(torch.stack([M, M]), torch.stack([M, M]), 3, 1e-3)
    steps = [(name, grid[1]) for name, _, grid in launches]
    assert steps == [("ns_residual", 2), ("ns_update", 2)] * 3
    launches.clear()
    kalman_update.kalman_update_masked(torch.linalg.inv(M), torch.randn(2, 9, device=DEVICE),
                                       1.0, 0.9, 1e-3)
    assert [name for name, _, _ in launches] == ["sym_update"]


@pytest.mark.parametrize("B,d,dtype,layouts", [
    (3, 17, torch.float32, ("contiguous", "contiguous")),
    (3, 33, torch.bfloat16, ("sliced", "colmajor")),
    (1, 1, torch.float32, ("batch_inner", "sliced")),
    (2, 33, torch.float32, ("colmajor", "batch_inner")),
])
def test_newton_schulz_step_batched(poisoned: None, B: int, d: int, dtype: torch.dtype,
                                    layouts: tuple[str, str]) -> None:
    """A stack of B matrices in one call (the launches of one matrix): each X_next and residual
    equal bit for bit to the 2-D launcher's on that matrix, which keeps the rule."""
    M = restack(torch.stack([random_spd(d, DEVICE) for _ in range(B)]).to(dtype), layouts[0])
    X = restack((torch.linalg.inv(M.float()) + 0.05 * torch.randn(B, d, d, device=DEVICE)
                 / math.sqrt(d)).to(dtype), layouts[1])
    X_next, res = newton_schulz.newton_schulz_step(M, X)
    assert X_next.shape == (B, d, d) and res.shape == (B,) and res.dtype == dtype
    for b in range(B):
        alone, alone_res = newton_schulz.newton_schulz_step(M[b], X[b])
        assert torch.equal(X_next[b], alone) and torch.equal(res[b], alone_res)
    check_newton_schulz(DEVICE, d, dtype, noncontig=True)
