"""The multi-tensor masked update kernel compiles for an H100 (sm_90) without a GPU and does
not spill (tools/sm90_compile.py: ``triton.compile`` of an ``ASTSource`` with
``GPUTarget("cuda", 90, 32)``, then ``ptxas -v``). Run in a subprocess without
TRITON_INTERPRET (under the interpreter ``@triton.jit`` gives functions Triton cannot compile);
skipped when there is no ptxas."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sm90_compile", ROOT / "tools" / "sm90_compile.py")
sm90_compile = sys.modules["sm90_compile"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sm90_compile)


@pytest.mark.skipif(sm90_compile.ptxas() is None, reason="no ptxas (Triton's CUDA backend)")
def test_masked_update_compiles_for_sm90_without_spills() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "sm90_compile.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line for line in run.stdout.splitlines() if "sm_90:" in line]
    assert len(rows) == 4 and all(" 0 spill bytes" in row for row in rows), run.stdout


@pytest.mark.skipif(sm90_compile.ptxas() is None, reason="no ptxas (Triton's CUDA backend)")
def test_masked_fold_uses_tensor_cores_on_sm90() -> None:
    """The device gate's fold (``sym_update`` with the flag in its store masks) compiles for
    sm_90 in every Hopper config, on tensor cores (wgmma) for fp32 rows under TF32 and for bf16
    rows, and each dtype has a config without spills within sm_90's 227 KiB of shared memory
    (the larger tiles spill, as the unmasked kernel's do: pruning them is issue 22's)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "sm90_compile.py"), "--fold"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith("masked_fold")]
    assert len(rows) == 10 and all(row.endswith("tensor cores") for row in rows), run.stdout
    for dtype in ("fp32", "bf16"):
        clean = [row for row in rows if row.startswith(f"masked_fold {dtype}")
                 and " 0 spill bytes" in row
                 and int(row.split(" B shared")[0].rsplit(" ", 1)[1]) <= 227 * 1024]
        assert clean, run.stdout
