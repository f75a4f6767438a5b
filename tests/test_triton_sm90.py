"""Every Triton kernel an op launches compiles for an H100 (sm_90) without a GPU, in every
precision (exact fp32, TF32, bf16) and every autotune config its pruning keeps, at the widths
768/3072 and the bias-augmented 769/3073 (tools/sm90_compile.py: the real launches recorded,
specialized as Triton's JIT would, ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``, then
``ptxas -v``): no variant spills or needs more than sm_90's 227 KiB of shared memory, every TF32
and bf16 dot uses tensor cores, and the odd widths load their operands as 768 does. Run in a
subprocess without TRITON_INTERPRET (under the interpreter ``@triton.jit`` gives functions
Triton cannot compile); skipped when there is no ptxas. Marked slow (146 compiles, in parallel
on every core; much faster again from Triton's on-disk cache): ``make test`` runs it,
``make test-fast`` does not.

Also here, in the interpreter: the launchers' padding of odd widths, and that the CUDA
defaults' precision reaches the kernels' dots as TF32.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from grng.kernels import _tiles  # noqa: E402
from grng.optim import device_defaults  # noqa: E402
from grng.optim.precision import matmul_precision  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sm90_compile", ROOT / "tools" / "sm90_compile.py")
sm90_compile = sys.modules["sm90_compile"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sm90_compile)

GEMMS = ("_sym_update_kernel", "_gemm_damped_kernel", "_residual_kernel", "_update_kernel")


@pytest.mark.slow
@pytest.mark.skipif(sm90_compile.ptxas() is None, reason="no ptxas (Triton's CUDA backend)")
def test_every_kernel_compiles_for_sm90_on_the_fast_path(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    report = tmp_path / "sm90.json"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "sm90_compile.py"), "--check",
                          "--json", str(report)], env=env, capture_output=True, text=True,
                         timeout=1800)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["counts"] == {**data["counts"], "spilling": 0, "over_shared": 0,
                              "without_tensor_cores": 0, "odd_off_path": 0}, run.stdout[-6000:]
    rows = data["rows"]
    kinds = {(r["name"].split()[0], r["precision"], r["odd"]) for r in rows}
    # every GEMM kernel in every precision at both width classes; the masked update too
    assert {(k, p, odd) for k in GEMMS for p in ("ieee", "tf32", "native")
            for odd in (False, True)} <= kinds, sorted(kinds)
    assert any(r["name"].startswith("_masked_update_kernel") for r in rows)
    assert any(r["name"].startswith("_adam_moments_kernel") for r in rows)  # EKFAC's moments
    assert any(r["name"].startswith("_sym_update_kernel") and "MASKED=True" in r["name"]
               for r in rows)  # the device gate's fold
    for r in rows:
        if r["precision"] in ("tf32", "native"):
            assert r["tensor_cores"], r
        if r["precision"] == "native" and r["name"].split()[0] in GEMMS:
            assert 16 in r["copy_widths"], r  # bf16 rows in 16-byte pipelined copies


def test_aligned_rows_pad_odd_widths_with_zeros() -> None:
    """An aligned X is used as it is; an odd width (or stride) gets a zero-padded copy."""
    X = torch.randn(2, 5, 32)
    same, width = _tiles.aligned_rows(X)
    assert same is X and width == 32
    odd = torch.randn(2, 5, 17)
    copy, width = _tiles.aligned_rows(odd)
    assert width == 32 and copy.shape == (2, 5, 32) and copy.stride(-2) == 32
    assert torch.equal(copy[..., :17], odd) and not copy[..., 17:].any()
    strided, width = _tiles.aligned_rows(torch.randn(5, 40)[:, :32])
    assert width == 32 and strided.stride() == (32, 1)


def test_padded_matrices_keep_aligned_layouts() -> None:
    """Multiples of 16 in either layout (a column-major eigh basis) stay as they are; an odd side
    pads both sides with zeros; intermediate buffers are padded and zero outside r x c."""
    Q = torch.randn(32, 32).mT
    assert _tiles.padded_matrices(Q) is Q
    V = torch.randn(3, 16, 17)
    P = _tiles.padded_matrices(V)
    assert P.shape == (3, 16, 32) and torch.equal(P[..., :17], V) and not P[..., 17:].any()
    buf = _tiles.padded_buffer((2, 17, 33), torch.float32, torch.device("cpu"))
    assert buf.shape == (2, 32, 48) and not buf.any()
    assert _tiles.padded_buffer((16, 32), torch.float32, torch.device("cpu")).shape == (16, 32)


def test_cuda_default_precision_reaches_the_dots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled (not interpreted), fp32 dots run on TF32 tensor cores inside the optimizer's
    matmul_precision at the CUDA defaults' precision, exact fp32 outside it; bf16 natively."""
    monkeypatch.setattr(_tiles, "interpreter_enabled", lambda: False)
    assert device_defaults.CUDA.precision == "tf32"
    assert _tiles.dot_precision(torch.float32) == "ieee"
    with matmul_precision(device_defaults.CUDA.precision):
        assert _tiles.dot_precision(torch.float32) == "tf32"
        assert _tiles.dot_precision(torch.bfloat16) == "native"
    assert _tiles.dot_precision(torch.float32) == "ieee"
    with matmul_precision(device_defaults.CPU.precision):
        assert _tiles.dot_precision(torch.float32) == "ieee"
