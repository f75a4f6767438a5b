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


# the start of each subprocess script: the parent's grng and grng.kernels, installed or not
# (setup.py maps kernels/ to grng.kernels)
_PREAMBLE = textwrap.dedent('''
    import importlib.util, math, sys
    dev, root, kernels = sys.argv[1:4]
    sys.path.insert(0, root)

    class KernelsFinder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name != "grng.kernels":
                return None
            return importlib.util.spec_from_file_location(
                name, kernels + "/__init__.py", submodule_search_locations=[kernels])

    sys.meta_path.insert(0, KernelsFinder)
''')

_FAR_VIEWS = _PREAMBLE + textwrap.dedent('''
    import torch
    from grng import ops
    from grng.kernels import _tiles, eigen_apply, newton_schulz
    _tiles.PAD_ODD_SIDES = False  # no padded copies: the far views reach the kernels

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

    # fresh kernel outputs are far views too, poisoned with NaN so an unwritten element shows;
    # they share the inputs' buffer, which a custom op refuses as an output aliasing an input,
    # so the launchers behind the grng_triton ops are called directly
    _tiles.new_output = lambda shape, dtype, device: far(*shape, dtype, torch.full(shape, math.nan))
    V = far(d, d, torch.bfloat16)
    QG = far(d, d, torch.float32, torch.linalg.qr(torch.randn(d, d, device=dev))[0]).T
    QA = far(d, d, torch.float32, torch.linalg.qr(torch.randn(d, d, device=dev))[0])
    lG, lA = torch.rand(d, device=dev), torch.rand(d, device=dev)
    out = eigen_apply._eigen_apply(V, QG, lG, QA, lA, 1e-2)
    near = eigen_apply._eigen_apply(V.contiguous(), QG.contiguous(), lG, QA.contiguous(), lA, 1e-2)
    same(out.clone(), near.clone(), "eigen_apply")

    M = far(d, d, torch.bfloat16, spd(d))
    X = far(d, d, torch.bfloat16, torch.linalg.inv(M.float())).T
    X_far, r_far = newton_schulz._newton_schulz_step(M, X)
    X_near, r_near = newton_schulz._newton_schulz_step(M.contiguous(), X.contiguous())
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
    _run_far(_FAR_VIEWS, "12 GiB")


_FAR_BATCH = _PREAMBLE + textwrap.dedent('''
    import torch
    from grng.kernels import _tiles, eigen_apply, factor_update, newton_schulz
    _tiles.PAD_ODD_SIDES = False  # no padded copies: the far views reach the kernels

    S = 2**30 + 2**10  # an int32 batch stride; batch entry 2 starts at 2 S > 2^31
    try:
        buf = torch.empty(2 * S + 4096, dtype=torch.float32, device=dev)
    except RuntimeError as err:  # no address space for the buffer: nothing to test here
        print("SKIP", err)
        sys.exit(0)
    used = [0]

    def far(fill):
        """A copy of the stack ``fill`` (3, ...) whose batch entries lie S elements apart."""
        inner = fill[0].contiguous().stride()
        v = buf.as_strided(fill.shape, (S, *inner), used[0])
        used[0] += fill[0].numel()
        v.copy_(fill)
        return v

    d = 3
    V = far(torch.randn(3, d, d, device=dev))
    QG = far(torch.linalg.qr(torch.randn(3, d, d, device=dev))[0])
    QA = far(torch.linalg.qr(torch.randn(3, d, d, device=dev))[0])
    lG, lA = far(torch.rand(3, d, device=dev)), far(torch.rand(3, d, device=dev))
    near = eigen_apply.eigen_apply(V.contiguous(), QG.contiguous(), lG.contiguous(),
                                   QA.contiguous(), lA.contiguous(), 1e-2)
    # the intermediates and the output are far stacks too, poisoned with NaN (in the inputs'
    # buffer: the launcher behind the custom op, which refuses outputs aliasing an input)
    _tiles.new_output = lambda shape, dtype, device: far(torch.full(shape, math.nan, device=dev))
    out = eigen_apply._eigen_apply(V, QG, lG, QA, lA, 1e-2)
    torch.testing.assert_close(out.clone(), near, msg=lambda m: "eigen_apply: " + m)

    M0 = torch.randn(3, d, d, device=dev)
    M0 = M0 @ M0.transpose(1, 2)
    M, X = far(M0), far(torch.randn(3, 5, d, device=dev))
    factor_update.factor_update(M, X, 0.5, 0.9)
    near = factor_update.factor_update(M0.clone(), X.contiguous(), 0.5, 0.9)
    torch.testing.assert_close(M.clone(), near, msg=lambda m: "factor_update: " + m)

    A = far(M0 + 3.0 * torch.eye(d, device=dev))
    X = far(torch.linalg.inv(A.clone()))
    X_far, r_far = newton_schulz._newton_schulz_step(A, X)  # R and X_next far stacks too
    X_near, r_near = newton_schulz._newton_schulz_step(A.contiguous(), X.contiguous())
    torch.testing.assert_close(X_far.clone(), X_near.clone(), msg=lambda m: "newton_schulz: " + m)
    torch.testing.assert_close(r_far, r_near, msg=lambda m: "newton_schulz residual: " + m)
    print("OK")
''')


def test_batch_offsets_past_2_31() -> None:
    """Stacks of three 3 x 3 blocks whose batch stride S is an int32 while 2 S > 2^31 (an 8 GiB
    mostly untouched buffer): eigen_apply and the Newton-Schulz step (inputs, intermediates and
    outputs far) and factor_update equal the same kernels on contiguous stacks. In a subprocess: a wrapped
    32-bit batch offset is a segmentation fault or silent corruption that must fail this test."""
    _run_far(_FAR_BATCH, "8 GiB")


def _run_far(script: str, size: str) -> None:
    """Run a far-offset script in a subprocess: it prints OK, or SKIP when the buffer cannot be
    reserved; a wrapped 32-bit offset is a crash (-11) or a mismatch, either fails the test."""
    import grng
    args = [DEVICE, str(Path(grng.__file__).parents[1]), str(Path(_tiles.__file__).parent)]
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                          text=True, timeout=300, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines and lines[-1].startswith("SKIP"):
        pytest.skip(f"cannot reserve the {size} buffer here: {lines[-1]}")
    assert proc.returncode == 0, (f"exit status {proc.returncode} (-11: segmentation fault, a "
                                  f"wrapped 32-bit offset)\n{proc.stdout}\n{proc.stderr[-3000:]}")
    assert lines and lines[-1] == "OK"
