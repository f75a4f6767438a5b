"""The Triton kernels on a CUDA device at large sizes (256..8192), fp32 and bf16 inputs.

Same checks as tests/test_triton_kernels.py (loaded from that file): the kernel's error against
a float64 reference is at most 2x that of the reference op in the same precision (+ 2 ulp of the
largest entry), symmetric outputs are exactly symmetric, fresh outputs start as NaN. Skipped
(by tests/conftest.py) without CUDA.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

_spec = importlib.util.spec_from_file_location(
    "_triton_kernel_checks", Path(__file__).with_name("test_triton_kernels.py"))
checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(checks)

poisoned = checks.poisoned
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,m", [(256, 256), (1000, 777), (4097, 1024), (8192, 2048)])
@pytest.mark.parametrize("beta", [0.0, 0.95])
def test_factor_update_gpu(d: int, m: int, dtype: torch.dtype, beta: float) -> None:
    """M <- beta M + alpha X^T X at large sizes (beta = 0 on a NaN M), exactly symmetric."""
    checks.check_factor_update("cuda", (), d, m, dtype, beta, noncontig=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_factor_update_gpu_batched_noncontiguous(dtype: torch.dtype) -> None:
    """Eight strided 512 x 512 factors in one launch."""
    checks.check_factor_update("cuda", (8,), 512, 300, dtype, 0.9, noncontig=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("diagonal_a", [False, True])
@pytest.mark.parametrize("d_g,d_a", [(256, 256), (1000, 4097), (8192, 2048)])
def test_eigen_apply_gpu(poisoned: None, d_g: int, d_a: int, dtype: torch.dtype,
                         diagonal_a: bool) -> None:
    """Damped eigen-inverse application, full and diagonal A, NaN-poisoned outputs."""
    checks.check_eigen_apply("cuda", d_g, d_a, dtype, diagonal_a, noncontig=d_g == 1000)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [256, 1000, 4097, 8192])
def test_newton_schulz_gpu(poisoned: None, d: int, dtype: torch.dtype) -> None:
    """X (2I - M X) and its input residual ||I - M X||_F."""
    checks.check_newton_schulz("cuda", d, dtype, noncontig=d == 1000)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,k", [(256, 32), (1000, 64), (4097, 128), (8192, 256)])
def test_kalman_update_gpu(d: int, k: int, dtype: torch.dtype) -> None:
    """P <- P/beta + qI - W W^T, exactly symmetric."""
    checks.check_kalman_update("cuda", d, k, dtype, 1e-4, noncontig=d == 1000)
