"""Compile grng's Triton kernels for an H100 (sm_90) on a machine without a GPU.

``triton.compile`` of an ``ASTSource`` with ``GPUTarget("cuda", 90, 32)`` runs Triton's whole
CUDA pipeline (TTIR, TTGIR, LLVM, PTX, and ptxas to a cubin) with no device; Triton's wheel
ships ptxas. Each compiled variant is then put through ``ptxas -v`` once more to read its
registers, spill bytes and shared memory. Run ``python tools/sm90_compile.py [--newton]``
(prints one row per variant, exit status 1 when one fails or the masked update spills);
``tests/test_triton_sm90.py`` runs it without ``--newton`` (about 30 s; the Newton-Schulz
configs take minutes) and is skipped when ptxas is missing; ``--fold`` adds the masked fold.

``--fold``: the masked fold (the ``sym_update`` kernel with the device flag), every Hopper
config, fp32 rows on TF32 and bf16 rows; fails unless each uses tensor cores (wgmma), spills
reported. Kernels: the multi-tensor masked update (``grng.kernels.fused_update``) in both phases and
with every optional term on and off, at the launch sizes a GPU uses (these must not spill);
with ``--newton`` also the batched Newton-Schulz step's two kernels
(``grng.kernels.newton_schulz``) in every Hopper autotune config, fp32 ("ieee") and bf16
("native") operands, strides as runtime ints (spills reported, not failed: the 2-D kernels
spilled as much before they were batched, and pruning spilling configs is issue 22).
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
    tensor_cores: bool = False  # the PTX holds wgmma (Hopper's warpgroup tensor-core MMA)


def ptxas() -> str | None:
    """The ptxas Triton uses (its wheel's, or TRITON_PTXAS_PATH), or None when there is none."""
    try:
        import triton
        path = triton.knobs.nvidia.ptxas.path
    except Exception:  # noqa: BLE001 - no triton or no CUDA backend: nothing to compile with
        return None
    return path if path and os.access(path, os.X_OK) else None


def compile_sm90(name: str, fn, signature: dict[str, str], constexprs: dict[str, object],
                 num_warps: int = 4, num_stages: int = 3) -> Compiled:
    """``fn`` (a ``@triton.jit`` function) compiled for sm_90 with ``signature`` (argument ->
    Triton type, "constexpr" for the ``constexprs``); raises what Triton or ptxas raises."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v
                                                           for k, v in constexprs.items()})
    kernel = triton.compile(src, target=GPUTarget(*SM90), options={"num_warps": num_warps,
                                                                    "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(kernel.asm["ptx"])
        cubin = str(Path(tmp) / "kernel.cubin")
        log = subprocess.run([ptxas(), "-v", "-arch=sm_90a", str(ptx), "-o", cubin],
                             capture_output=True, text=True, check=True).stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    spills = number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads")
    return Compiled(name, number(r"Used (\d+) registers"), spills, kernel.metadata.shared,
                    len(kernel.asm["cubin"]), "wgmma" in kernel.asm["ptx"])


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
            full = {**signature, **{k: "constexpr" for k in constexprs}}
            out.append(compile_sm90(name, kernel, full, constexprs))
    return out


def masked_fold_variants() -> list[Compiled]:
    """The masked fold (``grng.kernels.factor_update``'s ``sym_update`` kernel with the device
    flag in its store masks, reading M), every Hopper config, fp32 rows on TF32 tensor cores and
    bf16 rows ("native"): the device gate's fold on CUDA."""
    from grng.kernels import _tiles, factor_update

    kernel = factor_update._sym_update_kernel.fn
    out = []
    for dtype, precision in (("fp32", "tf32"), ("bf16", "native")):
        signature = {a: "constexpr" for a in kernel.arg_names}
        signature.update({"m_ptr": "*fp32", "x_ptr": f"*{dtype}", "ok_ptr": "*i1",
                          "alpha": "fp32", "beta": "fp32", "diag": "fp32"})
        signature.update({a: "i32" for a in kernel.arg_names if a in ("d", "m", "m_class")
                          or a.startswith("s_")})
        for config in _tiles._SYM_HOPPER:
            constexprs = {"READ_M": True, "MASKED": True, "PRECISION": precision,
                          **config.kwargs}
            tile = "x".join(str(v) for v in config.kwargs.values())
            out.append(compile_sm90(f"masked_fold {dtype} {tile} w{config.num_warps}", kernel,
                                    signature, constexprs, config.num_warps, config.num_stages))
    return out


def newton_schulz_variants() -> list[Compiled]:
    """The batched Newton-Schulz residual and update kernels, every Hopper config, fp32 / bf16."""
    from grng.kernels import _tiles, newton_schulz

    out = []
    for kind, kernel in (("residual", newton_schulz._residual_kernel),
                         ("update", newton_schulz._update_kernel)):
        for dtype, precision in (("fp32", "ieee"), ("bf16", "native")):
            # the matrices in dtype, the residual partials fp32, sizes and strides runtime ints
            signature = {a: ("*fp32" if a == "part_ptr" else f"*{dtype}") if a.endswith("_ptr")
                         else "i32" if a == "d" or a.startswith("s_") else "constexpr"
                         for a in kernel.fn.arg_names}
            for config in _tiles._GEMM_HOPPER:
                constexprs = {"PRECISION": precision, **config.kwargs}
                tile = "x".join(str(v) for v in config.kwargs.values())
                out.append(compile_sm90(f"ns_{kind} {dtype} {tile} w{config.num_warps}",
                                        kernel.fn, signature, constexprs, config.num_warps,
                                        config.num_stages))
    return out


def main(argv: list[str]) -> int:
    """Compile every variant and print its resources; 1 when one fails or the masked update
    spills."""
    if ptxas() is None:
        print("no ptxas (Triton's CUDA backend is not installed): nothing compiled")
        return 1
    masked = masked_update_variants()
    folds = masked_fold_variants() if "--fold" in argv else []
    for r in masked + folds + (newton_schulz_variants() if "--newton" in argv else []):
        print(f"{r.name:45s} sm_90: {r.registers:3d} registers, {r.spill_bytes} spill bytes, "
              f"{r.shared_bytes} B shared, cubin {r.cubin_bytes} B"
              f"{', tensor cores' if r.tensor_cores else ''}")
    return 1 if any(r.spill_bytes for r in masked) or not all(r.tensor_cores for r in folds) else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main(sys.argv[1:]))
