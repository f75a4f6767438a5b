"""The Triton backend against the reference ops, on small odd shapes (CPU: Triton's interpreter).

The accuracy rule for every op: the kernel's max error against a float64 reference is at most
twice the error of the reference op run in the same precision, plus a slack of two units in the
last place of the output's largest entry. Symmetric outputs must be exactly symmetric; fresh
outputs are poisoned with NaN (through ``grng.kernels._tiles.new_output``) so that an element
the kernels fail to write shows up. The check functions take a device and sizes; the GPU file
(tests/test_triton_gpu.py) runs them at large sizes.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

pytest.importorskip("triton")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import grng.ops as ops  # noqa: E402
from grng.ops import dispatch, reference  # noqa: E402
from grng.ops.errors import BackendUnavailable, FactorizationError  # noqa: E402

if not (torch.cuda.is_available() or dispatch.interpreter_enabled()):
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from grng.kernels import _tiles  # noqa: E402

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
                      noncontig: bool) -> None:
    """Triton damped eigen-inverse application against the reference (clamped eigenvalues)."""
    V = torch.randn(d_g, d_a, device=device).to(v_dtype)
    QG = torch.linalg.qr(torch.randn(d_g, d_g, device=device))[0]
    QA = None if diagonal_a else torch.linalg.qr(torch.randn(d_a, d_a, device=device))[0]
    lG = torch.rand(d_g, device=device) * 2.0 - 0.2  # some negatives: clamped at 0
    lA = torch.rand(d_a, device=device) * 2.0 - 0.2
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
    rtol = 1e-4 if dtype == torch.float32 else 1e-2
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
    from grng.kernels import eigen_apply, factor_update, kalman_update, newton_schulz
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
