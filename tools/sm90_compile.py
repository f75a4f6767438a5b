"""Compile grng's Triton kernels for an H100 (sm_90) on a machine without a GPU.

``triton.compile`` of an ``ASTSource`` with ``GPUTarget("cuda", 90, 32)`` runs Triton's whole
CUDA pipeline (TTIR, TTGIR, LLVM, PTX, and ptxas to a cubin) with no device; Triton's wheel
ships ptxas. Each compiled variant is then put through ``ptxas -v`` once more to read its
registers, spill bytes and shared memory. Run ``python tools/sm90_compile.py`` (prints one
row per variant, exit status 1 when one spills or fails); ``tests/test_triton_sm90.py`` runs it
and is skipped when ptxas is missing.

Kernels: the multi-tensor masked update (``grng.kernels.fused_update``) in both phases and
with every optional term on and off, at the launch sizes a GPU uses.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

SM90 = ("cuda", 90, 32)


@dataclass
class Compiled:
    """One kernel variant compiled for sm_90: ptxas's resource use and the cubin's size."""

    name: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    cubin_bytes: int


def ptxas() -> str | None:
    """The ptxas Triton uses (its wheel's, or TRITON_PTXAS_PATH), or None when there is none."""
    try:
        import triton
        path = triton.knobs.nvidia.ptxas.path
    except Exception:  # noqa: BLE001 - no triton or no CUDA backend: nothing to compile with
        return None
    return path if path and os.access(path, os.X_OK) else None


def compile_sm90(name: str, fn, signature: dict[str, str], constexprs: dict[str, object],
                 num_warps: int = 4) -> Compiled:
    """``fn`` (a ``@triton.jit`` function) compiled for sm_90 with ``signature`` (argument ->
    Triton type, "constexpr" for the ``constexprs``); raises what Triton or ptxas raises."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v
                                                           for k, v in constexprs.items()})
    kernel = triton.compile(src, target=GPUTarget(*SM90), options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(kernel.asm["ptx"])
        log = subprocess.run([ptxas(), "-v", "-arch=sm_90a", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    spills = number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads")
    return Compiled(name, number(r"Used (\d+) registers"), spills, kernel.metadata.shared,
                    len(kernel.asm["cubin"]))


def masked_update_variants() -> list[Compiled]:
    """The masked update kernel: reduce and apply phases, all optional terms on, and off."""
    from grng.kernels import fused_update

    kernel = fused_update._masked_update_kernel
    signature = {"table_ptr": "*i64", "n_tensors": "i32", "dot_ptr": "*fp64", "bad_ptr": "*i32",
                 "ok_in_ptr": "*u8", "ok_out_ptr": "*u8", "lr": "fp32", "momentum": "fp32",
                 "decay": "fp32", "rho": "fp32", "clip_over_lr2": "fp32"}
    flags = ("CLIP", "HAS_RHO", "HAS_MOMENTUM", "HAS_DECAY")
    out = []
    for phase in (0, 1):
        for on in (True, False):
            constexprs = {"PHASE": phase, **{f: on for f in flags}, "ROW_LEN": fused_update.ROW,
                          "BLOCK": fused_update._BLOCK, "MAX_PROGRAMS": fused_update._MAX_PROGRAMS}
            name = f"masked_update PHASE={phase} {'all terms' if on else 'no optional term'}"
            out.append(compile_sm90(name, kernel, {**signature, **{k: "constexpr" for k in constexprs}},
                                    constexprs))
    return out


def main() -> int:
    """Compile every variant and print its resources; 1 when one fails or spills."""
    if ptxas() is None:
        print("no ptxas (Triton's CUDA backend is not installed): nothing compiled")
        return 1
    rows = masked_update_variants()
    for r in rows:
        print(f"{r.name:45s} sm_90: {r.registers:3d} registers, {r.spill_bytes} spill bytes, "
              f"{r.shared_bytes} B shared, cubin {r.cubin_bytes} B")
    return 1 if any(r.spill_bytes for r in rows) else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
