"""The Triton kernels compute element offsets in 64-bit: index x stride past 2^31 stays exact.

A d x d matrix has offsets up to d^2, past 2^31 from d = 46341; in 32-bit arithmetic those wrap
to negative numbers and the kernels would read and write gigabytes before the tensor. Two
checks, both of which fail with 32-bit offsets:

* the offset helpers themselves (``_tiles.block_range``, ``_tiles.stride64``), run in a tiny
  kernel whose products are 2^32 and more, against exact Python integers;
* every op on views whose row stride S < 2^31 is an int32 kernel argument while 2 S > 2^31:
  3 x 3 matrices whose third row lies 8 GiB (fp32) past the first, carved out of one buffer
  that is allocated but, except for the few pages these views touch, never written (the OS
  backs untouched pages with nothing, so this needs little real memory on the CPU; on a GPU it
  allocates 12 GiB). The results must equal the same kernels' results on contiguous copies.
  This check runs in a subprocess: a kernel with 32-bit offsets would access memory 8 GiB below
  the buffer, a segmentation fault or silent corruption that must fail this test, not kill or
  poison the test session.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from grng.ops import dispatch  # noqa: E402

if not (torch.cuda.is_available() or dispatch.interpreter_enabled()):
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from grng.kernels import _tiles  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _offsets_kernel(out_ptr, block, stride, BLOCK: tl.constexpr, STEP: tl.constexpr):
    """out[:BLOCK] = block_range(block, BLOCK) * stride; out[BLOCK] = STEP * stride64(stride)."""
    tl.store(out_ptr + tl.arange(0, BLOCK), _tiles.block_range(block, BLOCK) * stride)
    tl.store(out_ptr + BLOCK, STEP * _tiles.stride64(stride))


@pytest.mark.parametrize("block,stride", [(2**20, 2**12 + 3), (46341 // 4, 46341), (3, 1)])
def test_offset_helpers_are_64_bit(block: int, stride: int) -> None:
    """(block * 4 + i) * stride and 64 * stride equal the exact integers (2^32 and more wrap in int32)."""
    out = torch.zeros(5, dtype=torch.int64, device=DEVICE)
    _offsets_kernel[(1,)](out, block, stride, BLOCK=4, STEP=64)
    expected = [(block * 4 + i) * stride for i in range(4)] + [64 * stride]
    assert out.tolist() == expected


_FAR_VIEWS = textwrap.dedent('''
    import importlib.util, math, sys
    dev, root, kernels = sys.argv[1:4]
    sys.path.insert(0, root)

    class KernelsFinder:  # the parent's grng.kernels, installed or not (setup.py maps kernels/)
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name != "grng.kernels":
                return None
            return importlib.util.spec_from_file_location(
                name, kernels + "/__init__.py", submodule_search_locations=[kernels])

    sys.meta_path.insert(0, KernelsFinder)
    import torch
    from grng import ops
    from grng.kernels import _tiles

    S = 2**30 + 2**10          # an int32 stride; row 2 of a view starts at 2 S > 2^31
    try:
        bufs = {torch.float32: torch.empty(2 * S + 256, dtype=torch.float32, device=dev),
                torch.bfloat16: torch.empty(2 * S + 256, dtype=torch.bfloat16, device=dev)}
    except RuntimeError as err:  # no address space for the buffer: nothing to test here
        print("SKIP", err)
        sys.exit(0)
    slots = {torch.float32: 0, torch.bfloat16: 0}

    def far(rows, cols, dtype, fill=None):
        """A rows x cols view with row stride S (rows <= 3) in the next free slot, filled."""
        base = slots[dtype] * 8
        slots[dtype] += 1
        v = bufs[dtype].as_strided((rows, cols), (S, 1), base)
        v.copy_(torch.randn(rows, cols, device=dev) if fill is None else fill)
        return v

    def spd(d):
        A = torch.randn(d, d, device=dev)
        return A @ A.T / d + torch.eye(d, device=dev)

    def same(far_out, near_out, what):
        torch.testing.assert_close(far_out, near_out, msg=lambda m: what + ": " + m)

    d = 3
    # factor_update: M rows and X rows far apart; then X columns far apart (X = far.T)
    for X in (far(d, d, torch.bfloat16), far(d, d, torch.bfloat16).T):
        M0 = spd(d)
        M = far(d, d, torch.float32, M0)
        near = M0.clone()
        ops.factor_update(M, X, 0.5, 0.9, backend="triton")
        ops.factor_update(near, X.contiguous(), 0.5, 0.9, backend="triton")
        same(M, near, "factor_update")

    # fresh kernel outputs are far views too, poisoned with NaN so an unwritten element shows
    _tiles.new_output = lambda shape, dtype, device: far(*shape, dtype, torch.full(shape, math.nan))
    V = far(d, d, torch.bfloat16)
    QG = far(d, d, torch.float32, torch.linalg.qr(torch.randn(d, d, device=dev))[0]).T
    QA = far(d, d, torch.float32, torch.linalg.qr(torch.randn(d, d, device=dev))[0])
    lG, lA = torch.rand(d, device=dev), torch.rand(d, device=dev)
    out = ops.eigen_apply(V, QG, lG, QA, lA, 1e-2, backend="triton")
    near = ops.eigen_apply(V.contiguous(), QG.contiguous(), lG, QA.contiguous(), lA, 1e-2,
                           backend="triton")
    same(out.clone(), near.clone(), "eigen_apply")

    M = far(d, d, torch.bfloat16, spd(d))
    X = far(d, d, torch.bfloat16, torch.linalg.inv(M.float())).T
    X_far, r_far = ops.newton_schulz_step(M, X, backend="triton")
    X_near, r_near = ops.newton_schulz_step(M.contiguous(), X.contiguous(), backend="triton")
    same(X_far.clone(), X_near.clone(), "newton_schulz_step")
    same(r_far, r_near, "newton_schulz residual")

    P0 = torch.linalg.inv(spd(d))
    P0 = 0.5 * (P0 + P0.T)
    P = far(d, d, torch.float32, P0)
    H = far(2, d, torch.bfloat16)
    near = P0.clone()
    ops.kalman_update(P, H, 7.0, 0.95, 1e-3, backend="triton")
    ops.kalman_update(near, H.contiguous(), 7.0, 0.95, 1e-3, backend="triton")
    same(P, near, "kalman_update")
    print("OK")
''')


def test_every_op_on_views_past_2_31() -> None:
    """factor_update, eigen_apply, newton_schulz_step, kalman_update on 3 x 3 views whose rows
    (or columns) lie 2^30 + 2^10 elements apart equal the same ops on contiguous copies."""
    import grng
    args = [DEVICE, str(Path(grng.__file__).parents[1]), str(Path(_tiles.__file__).parent)]
    proc = subprocess.run([sys.executable, "-c", _FAR_VIEWS, *args], capture_output=True,
                          text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines and lines[-1].startswith("SKIP"):
        pytest.skip(f"cannot reserve the 12 GiB buffer here: {lines[-1]}")
    assert proc.returncode == 0, (f"exit status {proc.returncode} (-11: segmentation fault, a "
                                  f"wrapped 32-bit offset)\n{proc.stdout}\n{proc.stderr[-3000:]}")
    assert lines and lines[-1] == "OK"
