"""Compile every Triton kernel grng's ops launch for an H100 (sm_90) on a machine without a GPU.

``triton.compile`` of an ``ASTSource`` with ``GPUTarget("cuda", 90, 32)`` runs Triton's whole
CUDA pipeline (TTIR, TTGIR, LLVM, PTX, and ptxas to a cubin) with no device; Triton's wheel
ships ptxas. The launches are the real ones: each op's launcher runs on CPU
tensors of the shapes a GPT-2-sized model gives it (768 and 3072 wide, the bias-augmented 769
and 3073; fp32 at exact-fp32 and at TF32 precision, bf16), with its kernels replaced by
recorders, and every recorded launch is specialized as Triton's JIT would on a GPU (integer
arguments divisible by 16 and 16-byte aligned pointers marked, a stride of 1 made a constant)
for every autotune config the kernel's pruning keeps (``--all-configs``: every config listed).
Variants that specialize alike (768 and 3072) compile once.

Per variant it reads, from the PTX and ``ptxas -v`` (run as Triton runs it): registers, spill
bytes (stores + loads), shared memory (Triton's dynamic plus any static), tensor-core
instructions (``wgmma`` or ``mma``), and how the dot operands reach shared memory: the widths of
the ``cp.async`` copies (16 bytes: vectorized and pipelined; 4: pipelined, element by element;
none: loads through registers, unpipelined). The checks (``--check``, exit status 1 when one
fails): no kept variant spills or needs more than sm_90's 227 KiB of shared memory, every TF32
and bf16 dot uses tensor cores, and every variant at an odd width takes the operand copies of
its 768-wide twin. ``--json PATH`` writes the rows and counts, ``--compare A.json B.json ...``
tabulates such reports (bench/results/sm90_compile.md), ``--only TEXT`` compiles the variants
whose name has TEXT. Compiles run in parallel (``--jobs``, default: every core; Triton's
on-disk cache makes a rerun fast); ``tests/test_triton_sm90.py`` runs ``--check``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

SM90 = ("cuda", 90, 32)
#: the most shared memory one block may use on sm_90 (227 KiB)
SM90_SHARED = 232448


@dataclass(frozen=True)
class Job:
    """One kernel variant to compile: where its ``@triton.jit`` function lives, how it was
    specialized (Triton's signature, constexprs and attributes) and the launch options."""

    name: str
    module: str
    attr: str
    signature: tuple
    constexprs: tuple
    attrs: tuple
    options: tuple
    precision: str
    odd: bool
    twin: str  # the key shared with the variant of the other width class

    def key(self) -> tuple:
        """What the compiled code depends on (768 and 3072 share it)."""
        return (self.module, self.attr, self.signature, self.constexprs, self.attrs, self.options)


@dataclass
class Compiled:
    """One kernel variant compiled for sm_90: its resources and instructions of interest."""

    name: str
    precision: str
    odd: bool
    twin: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    tensor_cores: bool
    copy_widths: tuple[int, ...]

    def problems(self) -> list[str]:
        """What this variant violates of the checks (besides the odd-size comparison)."""
        out = []
        if self.spill_bytes:
            out.append(f"spills {self.spill_bytes} B")
        if self.shared_bytes > SM90_SHARED:
            out.append(f"needs {self.shared_bytes} B shared")
        if self.precision in ("tf32", "native") and not self.tensor_cores:
            out.append("no tensor cores")
        return out


def ptxas() -> str | None:
    """The ptxas Triton uses (its wheel's, or TRITON_PTXAS_PATH), or None when there is none."""
    try:
        import triton
        path = triton.knobs.nvidia.ptxas.path
    except Exception:  # noqa: BLE001 - no triton or no CUDA backend: nothing to compile with
        return None
    return path if path and os.access(path, os.X_OK) else None


# ---------------------------------------------------------------- capturing the real launches

class _Recorder:
    """Stands in for a kernel object (``@triton.jit`` or ``@triton.autotune``): records each
    ``kernel[grid](*args, **kwargs)`` instead of launching."""

    def __init__(self, kernel, module: str, attr: str, log: list) -> None:
        self.kernel, self.module, self.attr, self.log = kernel, module, attr, log

    def __getitem__(self, grid) -> Callable:
        def launch(*args, **kwargs) -> None:
            self.log.append((self, args, kwargs))
        return launch


#: (module, attribute) of every kernel object an op's launcher calls
KERNELS = (("grng.kernels.factor_update", "_sym_update_kernel"),
           ("grng.kernels.eigen_apply", "_gemm_damped_kernel"),
           ("grng.kernels.newton_schulz", "_residual_kernel"),
           ("grng.kernels.newton_schulz", "_update_kernel"),
           ("grng.kernels.fused_update", "_masked_update_kernel"),
           ("grng.kernels.adam_moments", "_adam_moments_kernel"))


@contextlib.contextmanager
def _recording(log: list) -> Iterator[None]:
    """Inside: the kernels of :data:`KERNELS` are recorders appending to ``log``."""
    saved = []
    for module, attr in KERNELS:
        mod = importlib.import_module(module)
        saved.append((mod, attr, getattr(mod, attr)))
        setattr(mod, attr, _Recorder(getattr(mod, attr), module, attr, log))
    try:
        yield
    finally:
        for mod, attr, kernel in saved:
            setattr(mod, attr, kernel)


def _launch_cases(d_out: int, d_in: int, dtype, log: list) -> None:
    """Run every op's launcher once on CPU tensors of a d_out x d_in layer (inputs ``dtype``)."""
    import torch

    from grng.kernels import (adam_moments, eigen_apply, factor_update, fused_update, kalman_update,
                              newton_schulz)

    tokens = 1024
    for d in (d_out, d_in):
        M = torch.empty(d, d)
        for beta in (0.0, 0.95):  # the first fold never reads M
            factor_update._factor_update(M, torch.empty(tokens, d, dtype=dtype), 0.05, beta)
        # the device gate's fold: the same kernel with the flag in its store masks
        factor_update._factor_update_masked(M, torch.empty(tokens, d, dtype=dtype), 0.05, 0.95,
                                            torch.ones((), dtype=torch.bool))
        X = torch.empty(2, d, d, dtype=dtype)  # two stacked blocks of one shape
        newton_schulz._newton_schulz_step(torch.empty(2, d, d, dtype=dtype), X)
    # eigenbases as torch.linalg.eigh returns them: column-major
    QG, QA = (torch.empty(n, n, dtype=dtype).mT for n in (d_out, d_in))
    V = torch.empty(d_out, d_in)
    eigen_apply._eigen_apply(V, QG, torch.ones(d_out), QA, torch.ones(d_in), 1e-3)
    eigen_apply._eigen_apply(V, QG, torch.ones(d_out), None, torch.ones(d_in), 1e-3)
    if dtype == torch.float32:  # R-Kalman keeps float32 (k = 10 outputs observed)
        P = torch.eye(d_in)
        kalman_update._kalman_update(P, torch.randn(10, d_in), 1.0, 0.99, 1e-4)
    params = [torch.empty(d_out, d_in, dtype=dtype), torch.empty(d_out, dtype=dtype)]
    grads = [torch.empty_like(p) for p in params]
    for momentum, kl_clip in ((0.9, 1e-3), (0.0, None)):
        fused_update._fused_update_masked(params, grads, grads, grads, 0.1, momentum, 1e-4, 0.0,
                                          kl_clip, torch.ones((), dtype=torch.bool))
    # EKFAC's masked moment step in the eigenbasis: a stack of two blocks, one count each
    Vb = torch.empty(2, d_out, d_in, dtype=dtype)
    adam_moments._adam_moments_masked(Vb, torch.empty_like(Vb), torch.empty_like(Vb), 0.9, 0.999,
                                      torch.ones(2), torch.ones(2), 1e-8,
                                      torch.ones((), dtype=torch.bool))


def _freeze(value):
    """``value`` as a hashable, picklable tuple tree."""
    if isinstance(value, dict):
        return tuple(sorted((repr(k) if not isinstance(k, (str, tuple)) else k, _freeze(v))
                            for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _jit(kernel):
    """The ``JITFunction`` under autotuner / heuristics wrappers."""
    from triton.runtime.jit import JITFunction
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def jobs(all_configs: bool = False) -> list[Job]:
    """Every variant the ops launch at the widths 768/3072/769/3073 and precisions fp32 (exact
    and TF32) and bf16, each kept autotune config (all listed with ``all_configs``)."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import create_function_from_signature

    from grng.optim.precision import matmul_precision

    backend = make_backend(GPUTarget(*SM90))
    out: dict[tuple, Job] = {}
    for odd, (d_out, d_in) in ((False, (768, 3072)), (True, (769, 3073))):
        for dtype, tf32 in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, False)):
            log: list = []
            with _recording(log), matmul_precision("tf32" if tf32 else "fp32"):
                _launch_cases(d_out, d_in, dtype, log)
            for rec, args, kwargs in log:
                jit = _jit(rec.kernel)
                configs = [None]
                if isinstance(rec.kernel, Autotuner):
                    rec.kernel.nargs = dict(zip(rec.kernel.arg_names, args))
                    configs = (rec.kernel.configs if all_configs
                               else rec.kernel.prune_configs(kwargs))
                    rec.kernel.nargs = None
                binder = create_function_from_signature(jit.signature, jit.params, backend)
                for config in configs:
                    full = {**kwargs, **(config.all_kwargs() if config else {})}
                    bound, spec, opts = binder(*args, **full)
                    options, sig, constexprs, attrs = jit._pack_args(backend, full, bound, spec,
                                                                     opts)
                    precision = str(full.get("PRECISION", "n/a"))
                    tile = "x".join(str(full[k]) for k in full if k.startswith("BLOCK"))
                    shape = ",".join(f"{a}={full.get(a, bound[a])}"
                                     for a in ("READ_M", "MASKED", "SCALE", "PHASE") if a in bound)
                    name = (f"{rec.attr} {str(dtype)[6:]} {precision} {tile} w{options.num_warps}"
                            f" s{options.num_stages} {shape}".rstrip())
                    opt = {k: options.__dict__[k] for k in ("num_warps", "num_stages", "num_ctas")}
                    job = Job(name, rec.module, rec.attr, _freeze(sig), _freeze(
                        {k: getattr(v, "value", v) for k, v in constexprs.items()}),
                        _freeze(attrs), _freeze(opt), precision, odd,
                        twin=f"{rec.attr} {str(dtype)[6:]} {precision} {tile} "
                             f"w{options.num_warps} s{options.num_stages} {shape}"
                             f" {_freeze(sig)}")
                    out.setdefault(job.key(), job)
    return list(out.values())


# ------------------------------------------------------------------------------- compiling

def compile_job(job: Job) -> Compiled:
    """Compile ``job`` for sm_90 and read its resources (in a worker process)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit(getattr(importlib.import_module(job.module), job.attr))
    signature = dict(job.signature)
    constexprs = {k: v for k, v in job.constexprs}
    attrs = {k: [list(a) for a in v] for k, v in job.attrs}
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                            target=GPUTarget(*SM90), options=dict(job.options))
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:  # ptxas -v again, as Triton runs it, for its log
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        log = subprocess.run([ptxas(), "-lineinfo", "-v", "--regAllocOptLevel=2",
                              "--gpu-name=sm_90a", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    widths = sorted({int(w, 0) for w in re.findall(
        r"cp\.async\.c[ag]\.shared\.global[^;]*?, (0x[0-9a-f]+|\d+)", ptx)})
    if "cp.async.bulk" in ptx:
        widths.append(128)  # TMA
    return Compiled(job.name, job.precision, job.odd, job.twin, number(r"Used (\d+) registers"),
                    number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads"),
                    kernel.metadata.shared + number(r"(\d+) bytes smem"),
                    bool(re.search(r"\b(wgmma|mma)\.", ptx)), tuple(widths))


def compile_all(todo: list[Job], workers: int, progress: Callable[[Compiled], object] = print
                ) -> list[Compiled]:
    """Every job compiled, ``workers`` at a time (in this process when 1); ``progress`` gets
    each result as it comes (Triton's on-disk cache makes a second run fast)."""
    out = []
    with contextlib.ExitStack() as stack:
        results = map(compile_job, todo)
        if workers > 1:
            results = stack.enter_context(ProcessPoolExecutor(workers)).map(compile_job, todo)
        for r in results:
            progress(r)
            out.append(r)
    return out


def off_path(rows: list[Compiled]) -> list[Compiled]:
    """Odd-width variants whose operand copies differ from their 768-wide twin's."""
    aligned = {r.twin: r.copy_widths for r in rows if not r.odd}
    return [r for r in rows if r.odd and aligned.get(r.twin, r.copy_widths) != r.copy_widths]


def counts(rows: list[Compiled]) -> dict[str, int]:
    """How many variants compiled, spill, exceed shared memory, lack tensor cores (TF32/bf16),
    and take another operand path at an odd width than at 768."""
    return {"variants": len(rows),
            "spilling": sum(r.spill_bytes > 0 for r in rows),
            "over_shared": sum(r.shared_bytes > SM90_SHARED for r in rows),
            "without_tensor_cores": sum(r.precision in ("tf32", "native") and not r.tensor_cores
                                        for r in rows),
            "odd_off_path": len(off_path(rows))}


def compare(paths: list[Path]) -> str:
    """A markdown table of the counts of several ``--json`` reports (a column each) and, per
    kernel and precision, the variants that fail a check in each."""
    reports = [json.loads(p.read_text()) for p in paths]
    lines = ["| count | " + " | ".join(p.stem for p in paths) + " |",
             "|---|" + "---|" * len(paths)]
    for key in reports[0]["counts"]:
        lines.append(f"| {key} | " + " | ".join(str(r["counts"][key]) for r in reports) + " |")
    lines += ["", "| kernel / precision | " + " | ".join(p.stem for p in paths) + " |",
              "|---|" + "---|" * len(paths)]
    groups = sorted({(row["name"].split()[0], row["precision"])
                     for r in reports for row in r["rows"]})
    for kernel, precision in groups:
        cells = []
        for r in reports:
            rows = [Compiled(**{**row, "copy_widths": tuple(row["copy_widths"])})
                    for row in r["rows"]]
            strays = {id(x) for x in off_path(rows)}
            mine = [x for x in rows if (x.name.split()[0], x.precision) == (kernel, precision)]
            bad = [x for x in mine if x.problems() or id(x) in strays]
            cells.append(f"{len(bad)} of {len(mine)} fail")
        lines.append(f"| {kernel} {precision} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(r: Compiled, problems: list[str]) -> str:
    """One line: the variant, its width class, resources, tensor cores, copies, problems."""
    return (f"{r.name:64s} {'odd' if r.odd else '768'} {r.registers:3d} reg {r.spill_bytes:5d} B "
            f"spill {r.shared_bytes:6d} B shared tc={int(r.tensor_cores)} "
            f"cp.async={list(r.copy_widths)}{'  FAIL: ' + '; '.join(problems) if problems else ''}")


def main(argv: list[str]) -> int:
    """Compile, print a row per variant and the counts; with --check, 1 when a check fails."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all-configs", action="store_true", help="ignore the configs' pruning")
    parser.add_argument("--check", action="store_true", help="exit 1 when a check fails")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, help="write the rows and counts here")
    parser.add_argument("--only", default="", help="compile only variants whose name has this")
    parser.add_argument("--compare", type=Path, nargs="+", metavar="JSON",
                        help="print a markdown table of these --json reports, compile nothing")
    args = parser.parse_args(argv)
    if args.compare:
        print(compare(args.compare))
        return 0
    if ptxas() is None:
        print("no ptxas (Triton's CUDA backend is not installed): nothing compiled")
        return 1
    rows = compile_all([j for j in jobs(args.all_configs) if args.only in j.name], args.jobs,
                       lambda r: print(describe(r, r.problems()), flush=True))
    strays = off_path(rows)
    for r in strays:
        print(describe(r, ["odd width leaves the 768 path"]))
    failed = any(r.problems() for r in rows) or bool(strays)
    summary = counts(rows)
    print("counts:", json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps({"counts": summary, "rows": [asdict(r) for r in rows]},
                                        indent=1))
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main(sys.argv[1:]))
