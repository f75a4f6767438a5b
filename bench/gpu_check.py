"""One prepared GPU run: environment, CUDA build, ceilings, correctness, kernel timings, whole steps.

    python3 bench/gpu_check.py --out bench/results/gpu_check_$(date +%F)    # a bare GPU machine
    python3 bench/gpu_check.py --cpu --out /tmp/gpu_check                   # CI: tiny, interpreter

Stages, in this order (``--stages`` takes a comma list of them):

1. ``env``: device, driver, CUDA, torch, triton, nvcc versions and ``grng.backends()``;
2. ``build``: ``pip install --no-deps --no-index --no-build-isolation -e .`` against the host
   torch (builds ``grng.ops._C`` in place, CUDA sources included, for this GPU's architecture only;
   log in ``build.log``), then checks that every op of the ext backend (the registry's) has a
   CUDA kernel; meanwhile
   (best effort, on the idle cores) processes run every Triton op and a micro-GPT step once to
   fill Triton's on-disk compile cache, so later stages do not compile one config at a time;
3. ``ceilings``: device-to-device copy bandwidth; torch.matmul rate in fp32, tf32 and bf16;
4. ``correct``: every op x backend (triton, ext) x (fp32, bf16) x size x layout against the
   float64 reference T with the project's rule max|B - T| <= 2 max|R - T| + 2 eps sqrt(K) max|T|
   (B the backend's output, R the reference op run in the same low precision, K the reduction
   length), fresh outputs NaN-poisoned, symmetric outputs exactly symmetric; then the
   GPU-marked tests (``pytest -m gpu``) and, on CUDA, the device-aware step and offset tests;
5. ``kernels``: each op x provider (reference, triton, ext) x size x dtype: median time (CUDA
   events, warm-up, rotating random inputs), TFLOP/s, fraction of stage 3's GEMM rate, speed-up
   over the reference, and which backends win at every size of a dtype (the AUTO_ORDER rule,
   decided per dtype), and for each entry of ``AUTO_ORDER['cuda']`` (predicted by the cost
   model, never measured) "confirmed" or "REMOVE" per dtype (:func:`auto_order_verdicts`); then the inverse candidates at n = 768, 2304, 3072 and 4096 (eigh, the
   Cholesky inverse, warm-started Newton-Schulz to convergence and in 3 fixed sync-free steps);
6. ``step``: a whole training step on a GPT-2-small-sized model (12 layers, width 768, tied
   head, vocabulary 50257, bf16 autocast, sequence 512), in the order a short window must keep:
   AdamW, the sync-free K-FAC newton step and the host path (``sync_free=False``) it is judged
   against, K-FAC at the device's defaults and EKFAC on every backend, then K-FAC eigen, R-Kalman,
   RING and K-FAC newton on the other backends: median step time, ratio to AdamW, peak memory,
   the most host syncs of one ``opt.step()`` over a refresh period (0 expected for newton and
   R-Kalman; an eigen refresh synchronizes), and beside every row the cost model's prediction
   (``grng.benchmark.costmodel`` for this GPU: step ms, x AdamW, measured / predicted), so that
   the first run calibrates the model.

Each stage runs in its own child process (a crash or a broken CUDA context stays inside it),
after the previous one, with a share of the time left proportional to its weight; a stage that
reaches its share starts no new item and is killed if it overruns it by ``GRACE_S``. The run
stops itself at ``--budget`` seconds (default 480) and always ends by printing the stage table.
Rows go to ``OUT/gpu_check.csv`` in grng's benchmark schema (:mod:`grng.benchmark.schema`);
``OUT/summary.md`` holds the details and the same table; ``OUT/gpu_check.log`` every stage's
output; ``OUT/stages.json`` each stage's status and notes. Exit status 0 when every selected
stage finished ok (or was skipped with a reason), 1 otherwise.

``--cpu``: tiny sizes, Triton under its interpreter (TRITON_INTERPRET=1, set before anything
imports a kernel: checked, never timed), the build stage skipped.

Ceilings and timings come from ``grng.benchmark`` (``ceilings``, ``kernels``, ``timing``), the op
checks from ``grng.verify.check_ops``, the optimizers from ``grng.optim.cases``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import importlib.abc
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
KERNELS = ROOT / "kernels"

STAGES = ("env", "build", "ceilings", "correct", "kernels", "step")
# Share of the remaining time each stage may use (its weight over the weights still to run).
WEIGHTS = {"env": 0.2, "build": 2.5, "ceilings": 0.3, "correct": 3.0, "kernels": 3.0, "step": 3.0}
GRACE_S = 30.0      # a stage past its share is killed this much later (never past the budget)
RESERVE_S = 4.0     # kept for writing the summary
CSV_NAME = "gpu_check.csv"

MAX_FACTOR = 16384  # largest dense Kronecker factor side the step stage builds (1 GiB in fp32)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes and repetitions of one mode (GPU or --cpu)."""

    gemm_n: int
    check_sizes: tuple[int, ...]
    kernel_sizes: tuple[int, ...]
    inverse_sizes: tuple[int, ...]
    warmup: int
    reps: int
    gpt: dict[str, int]
    batch: int
    seq: int
    inverse_every: int
    step_warmup: int


GPU_PLAN = Plan(gemm_n=4096, check_sizes=(1, 123, 769, 3072), kernel_sizes=(769, 3072, 4096),
                inverse_sizes=(768, 2304, 3072, 4096), warmup=5, reps=30,
                gpt=dict(vocab=50257, context=512, width=768, heads=12, layers=12),
                batch=8, seq=512, inverse_every=10, step_warmup=3)
CPU_PLAN = Plan(gemm_n=256, check_sizes=(1, 7, 33), kernel_sizes=(33,), inverse_sizes=(32, 64),
                warmup=1, reps=3, gpt=dict(vocab=64, context=16, width=16, heads=2, layers=1),
                batch=2, seq=16, inverse_every=2, step_warmup=1)


# ----------------------------------------------------------------------------- imports

class _KernelsFinder(importlib.abc.MetaPathFinder):
    """Finds ``grng.kernels`` in the checkout's ``kernels/`` (setup.py's package_dir) when grng
    is not installed; an installed grng's own finder answers first."""

    def find_spec(self, fullname: str, path: Any, target: Any = None):  # noqa: ANN201
        if fullname != "grng.kernels":
            return None
        return importlib.util.spec_from_file_location(
            fullname, KERNELS / "__init__.py", submodule_search_locations=[str(KERNELS)])


def ensure_importable() -> None:
    """Make ``import grng`` (this checkout) and ``import grng.kernels`` work, installed or not."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if str(BENCH) not in sys.path:
        sys.path.append(str(BENCH))
    if not any(isinstance(f, _KernelsFinder) for f in sys.meta_path):
        sys.meta_path.append(_KernelsFinder())


# ----------------------------------------------------------------------------- ops and backends
# Taken from the op registry and the dispatch, so a new op or backend needs no edit here.

def providers() -> tuple[str, ...]:
    """The op backends timed and stepped: ``grng.ops.dispatch.BACKENDS`` without "auto"
    (reference first)."""
    ensure_importable()
    from grng.ops import dispatch
    return tuple(b for b in dispatch.BACKENDS if b != "auto")


def fast_backends() -> tuple[str, ...]:
    """The backends checked against the reference: every provider but the reference."""
    return tuple(b for b in providers() if b != "reference")


def backend_ops(backend: str) -> tuple[str, ...]:
    """The ops ``backend`` implements itself, in the registry's order (grng.ops.registry.SPECS);
    empty when its module does not load."""
    ensure_importable()
    from grng.ops import dispatch, registry
    dispatch.backends()  # imports the triton and ext backends, which register their ops
    return tuple(op for op in registry.SPECS if dispatch.implementation(op, backend) is not None)


def bench_ops() -> tuple[str, ...]:
    """Timed ops: every op of the Triton backend and the fused update of every step (eigh, too
    slow for 25 repetitions at 4096, is timed apart; cholesky_inverse and batched_spd_inverse are
    not on a per-step path at these sizes)."""
    return tuple(dict.fromkeys((*backend_ops("triton"), "fused_update")))


# ----------------------------------------------------------------------------- stage child

@dataclasses.dataclass
class Report:
    """What a stage tells the parent: status, one-line notes for the table, markdown details."""

    path: Path
    status: str = "running"
    notes: list[str] = dataclasses.field(default_factory=list)
    details: list[str] = dataclasses.field(default_factory=list)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def save(self) -> None:
        """Write the report (after every item, so a killed stage leaves what it had)."""
        data = {"status": self.status, "notes": self.notes, "details": self.details,
                "info": self.info}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.replace(self.path)

    def note(self, text: str) -> None:
        print(f"  note: {text}", flush=True)
        self.notes.append(text)
        self.save()


@dataclasses.dataclass
class Ctx:
    """One stage's run: where to write, which device, until when to start new items."""

    out: Path
    cpu: bool
    device: str
    deadline: float          # time.time() after which the stage starts no new item
    hard: float              # time.time() at which the parent kills the stage
    plan: Plan
    report: Report
    cut: bool = False        # an item was left out because the deadline passed

    def expired(self) -> bool:
        """True (and remembered) once the stage's share of the budget is used."""
        if time.time() >= self.deadline:
            self.cut = True
        return self.cut

    def left(self) -> float:
        return self.deadline - time.time()

    def cap(self) -> float:
        """Seconds a grandchild process (pip, pytest) may run: it is killed by this stage
        before the parent kills the stage."""
        return self.hard - 3.0 - time.time()

    def emit(self, rows: Iterable) -> None:
        """Append rows to the run's CSV at once (a later kill keeps them)."""
        from grng.benchmark.schema import append_rows
        append_rows(self.out / CSV_NAME, list(rows))


ROW_DEVICE = ["cpu"]  # the device this stage measures (set by run_child), named in every row


def row(stage: str, name: str, provider: str, metric: str, unit: str, value: float | None,
        **fields: Any):
    """A schema Row of this run (suite ``gpu_check.<stage>``), environment filled in."""
    from grng.benchmark.schema import Row, environment
    return Row(suite=f"gpu_check.{stage}", name=name, provider=provider, metric=metric, unit=unit,
               p50=value, **{**environment(ROW_DEVICE[0]), **fields})


def ms_row(stage: str, name: str, provider: str, metric: str, stats: Any, **fields: Any):
    """A Row of a time distribution in ms (p50, p20, p80, n) from a Stats in seconds."""
    return row(stage, name, provider, metric, "ms", stats.p50 * 1e3, p20=stats.p20 * 1e3,
               p80=stats.p80 * 1e3, n=stats.n, **fields)


def sync(device: str) -> None:
    """Wait for the device (CUDA) to finish the queued work."""
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- stages

def stage_env(ctx: Ctx) -> None:
    """Versions, device and grng.backends()."""
    import torch

    import grng
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "torch_cuda": torch.version.cuda, "grng": grng.__version__}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as err:  # noqa: BLE001 - reported, not fatal
        info["triton"] = f"unavailable: {err}"
    if ctx.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1))
        smi = _run_quiet(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        info["driver"] = smi.strip() or "nvidia-smi unavailable"
        ctx.emit([row("env", "device", "torch", "memory", "GiB", p.total_memory / 2**30),
                  row("env", "device", "torch", "multiprocessors", "count",
                      float(p.multi_processor_count))])
    else:
        info.update(device=f"cpu {platform.machine()}", cores=os.cpu_count())
    from torch.utils import cpp_extension
    nvcc = shutil.which("nvcc") or (cpp_extension.CUDA_HOME and
                                    str(Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"))
    info["cuda_home"] = cpp_extension.CUDA_HOME
    info["nvcc"] = (_run_quiet([nvcc, "--version"]).strip().splitlines() or ["?"])[-1] \
        if nvcc and Path(nvcc).exists() else "not found"
    info["backends"] = grng.backends()
    ctx.report.info = info
    for k, v in info.items():
        print(f"  {k}: {v}", flush=True)
    ctx.report.notes.append(f"{info['device']}; torch {info['torch']} (CUDA {info['torch_cuda']}); "
                            f"triton {info['triton']}; nvcc {info['nvcc']}"
                            + (f"; driver {info['driver']}" if "driver" in info else ""))
    ctx.report.notes.append("backends: " + ", ".join(f"{k} {v}" for k, v in info["backends"].items()))
    ctx.report.status = "ok"


def run_capped(cmd: list[str], cap: float, sink: Callable[[str], object],
               env: dict[str, str] | None = None) -> int | None:
    """Run ``cmd`` in its own process group, each output line to ``sink``; kill the whole group
    after ``cap`` seconds. Returns the exit status, or None when it was killed."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(max(cap, 1.0), kill)
    timer.start()
    for line in proc.stdout:  # type: ignore[union-attr]
        sink(line)
    rc = proc.wait()
    timer.cancel()
    return None if killed.is_set() else rc


def _run_quiet(cmd: list[str]) -> str:
    """stdout of a short command, '' when it cannot run."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


_PROBE = """
import json, sys
sys.path.insert(0, {bench!r})
import gpu_check
gpu_check.ensure_importable()
import torch
out = {{}}
try:
    import grng.ops.ext
    from grng.ops import dispatch, registry
    # an op the ext backend implements without a grng_ext op of its name counts as missing
    out = {{op: hasattr(torch.ops.grng_ext, op)
               and torch._C._dispatch_has_kernel_for_dispatch_key("grng_ext::" + op, "CUDA")
           for op in registry.SPECS if dispatch.implementation(op, "ext") is not None}}
except Exception as err:
    out = {{"error": type(err).__name__ + ": " + str(err).splitlines()[0]}}
print(json.dumps(out))
"""


def probe_ext() -> dict[str, Any]:
    """In a fresh process: which ops of the ext backend (those it implements in the registry)
    have a CUDA kernel ({'error': ...} if the extension does not load)."""
    code = _PROBE.format(bench=str(BENCH))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env=dict(os.environ, GRNG_EXT_COMPILE="0"))
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


class LockedLog:
    """A log file that several threads append lines to."""

    def __init__(self, path: Path) -> None:
        self.fh = path.open("w")
        self.lock = threading.Lock()

    def write(self, text: str) -> None:
        with self.lock:
            self.fh.write(text)
            self.fh.flush()


def stage_build(ctx: Ctx) -> None:
    """Build grng.ops._C against the host torch and probe its CUDA ops; meanwhile, on the cores the
    build leaves idle, fill Triton's on-disk compile cache for the later stages."""
    log = LockedLog(ctx.out / "build.log")
    pool, jobs = start_warmup(ctx, log)
    try:
        build_ext(ctx, log)
    finally:
        finish_warmup(ctx, pool, jobs)


def build_ext(ctx: Ctx, log: LockedLog) -> None:
    """``pip install -e .`` (else ``setup.py build_ext --inplace``) for this GPU's architecture;
    status ok when every grng_ext op then has a CUDA kernel."""
    import torch
    before = probe_ext()
    if before and all(has is True for has in before.values()):
        ctx.report.note("grng.ops._C already loads with CUDA kernels for every op: not rebuilt")
        ctx.report.status = "ok"
        return
    major, minor = torch.cuda.get_device_capability(0)
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=f"{major}.{minor}", GRNG_CUDA="1",
               MAX_JOBS=str(os.cpu_count() or 4))
    for so in [*(ROOT / "grng").glob("_C*.so"), *(ROOT / "grng" / "ops").glob("_C*.so")]:
        so.unlink()
        ctx.report.note(f"removed a stale {so.name} before building")
    attempts = [[sys.executable, "-m", "pip", "install", "-v", "--no-deps", "--no-index",
                 "--no-build-isolation", "-e", str(ROOT)],
                [sys.executable, "setup.py", "build_ext", "--inplace"]]
    t0 = time.time()
    warnings_seen: list[str] = []

    def sink(line: str) -> None:
        log.write(line)
        if "[grng] WARNING:" in line:
            warnings_seen.append(line.split("WARNING:", 1)[1].strip())

    for cmd in attempts:
        log.write(f"$ {' '.join(cmd)}\n")
        rc = run_capped(cmd, ctx.cap(), sink, env)
        if rc is None:
            ctx.report.note(f"`{' '.join(cmd[1:4])}` killed at the stage's time cap")
            ctx.cut = True
            break
        if rc == 0:
            ctx.report.note(f"built with `{' '.join(cmd[1:3])} ...` in {time.time() - t0:.0f} s"
                            f" for sm_{major}{minor} (log: build.log)")
            break
        ctx.report.note(f"`{' '.join(cmd[1:4])}` exited {rc}")
    for warn in warnings_seen[:3]:
        ctx.report.note("build warning: " + warn[:200])
    ctx.emit([row("build", "grng.ops._C", "nvcc", "wall_time", "s", time.time() - t0,
                  config=f"TORCH_CUDA_ARCH_LIST={major}.{minor}")])
    after = probe_ext()
    ctx.report.info["cuda_ops"] = after
    missing = [op for op, has in after.items() if has is not True]
    if missing or not after:
        ctx.report.note(f"no CUDA kernel for {missing}: {after.get('error', 'see build.log')}")
        ctx.report.status = "failed"
    else:
        ctx.report.note(f"CUDA kernels registered for {', '.join(after)}")
        ctx.report.status = "ok"


# Triton specializes integer arguments on == 1 and on divisibility by 16: one n per class.
WARM_SIZES = (1, 32, 33)
# A micro GPT whose factor sides and row counts fall in the classes of the step stage's GPT-2
# small (width 768 -> 16, 769 -> 17, 3073 -> 65, vocabulary 50257 -> 65, 4096 tokens -> 32).
WARM_GPT = dict(vocab=65, context=16, width=16, heads=2, layers=1)


def warm_jobs() -> list[str]:
    """The warm-up jobs: every Triton op x dtype x WARM_SIZES, and a micro-GPT step of K-FAC and
    R-Kalman through the triton backend (RING runs K-FAC's kernels)."""
    return ([f"{op}:{dt}:{n}" for n in WARM_SIZES for op in backend_ops("triton")
             for dt in ("float32", "bfloat16")] + ["step:kfac", "step:rkalman"])


def start_warmup(ctx: Ctx, log: LockedLog) -> tuple[Any, list]:
    """Start the warm-up jobs, each in its own process, a few at a time (best effort: Triton
    compiles each autotune config of each specialization once; the compiled kernels land in its
    on-disk cache, which every later stage reads; the noisy tunings are not kept)."""
    from concurrent.futures import ThreadPoolExecutor
    env = dict(os.environ, TRITON_CACHE_AUTOTUNING="0")

    def job(name: str) -> int | None | str:
        if ctx.cap() < 10:
            return "not started"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--warm", name] + (
            ["--cpu"] if ctx.cpu else [])
        return run_capped(cmd, ctx.cap(), lambda line: log.write(f"[warm {name}] {line}"), env)

    pool = ThreadPoolExecutor(max(1, (os.cpu_count() or 4) - 4))
    return pool, [(name, pool.submit(job, name)) for name in warm_jobs()]


def finish_warmup(ctx: Ctx, pool: Any, jobs: list) -> None:
    """Wait for the warm-up jobs (each is killed at the stage's cap) and note how they went."""
    t0 = time.time()
    pool.shutdown(wait=True)
    results = {name: f.result() for name, f in jobs}
    failed = [n for n, rc in results.items() if rc not in (0, None, "not started")]
    cut = [n for n, rc in results.items() if rc is None or rc == "not started"]
    ctx.report.note(f"Triton warm-up: {sum(rc == 0 for rc in results.values())}/{len(jobs)} jobs "
                    f"done ({time.time() - t0:.0f} s after the build)"
                    + (f"; failed: {', '.join(failed)} (build.log)" if failed else "")
                    + (f"; cut: {len(cut)}" if cut else ""))


def warm(jobs: str, cpu: bool) -> int:
    """Run each job once so that Triton compiles (and autotunes) what it runs: ``op:dtype:n``
    is grng.verify's check of that op (every layout) on the triton backend at n; ``step:opt``
    two micro-GPT (WARM_GPT) steps of that optimizer through the triton backend."""
    ensure_importable()
    import torch

    import grng.kernels  # noqa: F401 - registers the Triton implementations (not the ext build)
    from grng.verify import check_ops
    device = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
    for job in jobs.split(","):
        kind, *rest = job.split(":")
        t0 = time.time()
        if kind == "step":
            warm_step(rest[0], device)
            what = "2 steps"
        else:
            checks = check_ops(device, backends=("triton",), dtypes=(rest[0],),
                               sizes=(int(rest[1]),), ops=(kind,))
            ran = [c for c in checks if c.passed is not None]  # not the layouts it refuses
            what = f"{sum(bool(c.passed) for c in ran)}/{len(ran)} checks passed"
        print(f"warm {job}: {what} in {time.time() - t0:.1f} s", flush=True)
    return 0


def warm_step(opt_name: str, device: str) -> None:
    """Two steps of ``opt_name`` (triton backend, inverses every step) on the micro GPT."""
    import torch

    import models
    cfg = models.GPTConfig(**WARM_GPT)
    with torch.device(device):
        model = models.GPT(cfg)
    opt = make_optimizer(opt_name, model, "triton", inverse_every=1)
    idx = torch.randint(0, cfg.vocab, (2, cfg.context + 1), device=device)
    for _ in range(2):
        forward_backward(model, opt, idx[:, :-1], idx[:, 1:], device)
        opt.step()


def forward_backward(model: Any, opt: Any, x: Any, y: Any, device: str) -> None:
    """Zeroed gradients, then the cross entropy of model(x) (bf16 autocast) against y, backward."""
    import torch
    import torch.nn.functional as F
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        logits = model(x)
    F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()


def stage_ceilings(ctx: Ctx) -> None:
    """Copy bandwidth and torch.matmul rates (fp32, tf32, bf16) at n = plan.gemm_n."""
    from grng.benchmark.ceilings import copy_bandwidth, gemm_rate
    n = ctx.plan.gemm_n
    jobs: list[tuple[str, Callable[[], Any]]] = [("copy", lambda: copy_bandwidth(ctx.device))]
    for dtype, tf32 in (("float32", False), ("float32", True), ("bfloat16", False)):
        if tf32 and ctx.device != "cuda":
            ctx.report.notes.append("tf32: the CPU has none, not measured")
            continue
        jobs.append((f"gemm {dtype}{' tf32' if tf32 else ''}",
                     lambda d=dtype, t=tf32: gemm_rate(ctx.device, d, n, tf32=t)))
    parts = []
    for label, measure_it in jobs:
        if ctx.expired():
            break
        r = measure_it()
        ctx.emit([r])
        parts.append(f"{label} {r.p50:.4g} {r.unit}")
        print(f"  {label}: {r.p50:.4g} {r.unit}", flush=True)
    ctx.report.notes.append("; ".join(parts) + f" (GEMM n = {n})")
    ctx.report.status = "ok"


def gemm_rates(out: Path, n: int) -> dict[tuple[str, int], float]:
    """{(dtype, n): TFLOP/s} of torch.matmul without TF32 from this run's ceilings rows."""
    from grng.benchmark.schema import read_rows
    path = out / CSV_NAME
    if not path.exists():
        return {}
    return {(r.dtype, n): r.p50 for r in read_rows(path)
            if r.suite == "ceilings" and r.name == "gemm" and r.provider == "torch.matmul"
            and r.x_value == str(n) and r.p50}


def stage_correct(ctx: Ctx) -> None:
    """Op checks against the float64 reference (smallest sizes first, so a cut loses the
    largest), then the GPU-marked (and, on CUDA, device-aware) tests."""
    from grng.ops import dispatch
    from grng.verify import check_ops
    dispatch.backends()  # imports the triton and ext backends, which register their ops
    op_deadline = time.time() + 0.55 * ctx.left()
    checks = []
    for n in ctx.plan.check_sizes:
        batch = check_ops(ctx.device, backends=fast_backends(), dtypes=("float32", "bfloat16"),
                          sizes=(n,), seed=0, deadline=time.monotonic() + op_deadline - time.time())
        ctx.emit(check_rows(batch))  # per size, so that a kill keeps the sizes done
        ran = [c for c in batch if c.passed is not None]
        ctx.report.note(f"n = {n}: {sum(bool(c.passed) for c in ran)}/{len(ran)} op checks passed"
                        + (f", {len(batch) - len(ran)} not run" if len(batch) > len(ran) else ""))
        checks += batch
    summarize_checks(ctx, checks)
    ran = [c for c in checks if c.passed is not None]
    if any(c.note.startswith("skipped: deadline") for c in checks):
        ctx.report.note("op checks stopped at their share of the stage")
        ctx.cut = True
    # nothing run is a failure unless the budget cut it (then the stage is "cut short")
    ok = (bool(ran) or ctx.cut) and all(c.passed for c in ran)
    ok &= run_pytests(ctx)
    ctx.report.status = "ok" if ok else "failed"


def case_size(c: Any) -> int:
    """n of a check's case ("n=769 strided" -> 769)."""
    m = re.search(r"n=(\d+)", c.shape)
    return int(m.group(1)) if m else 0


def check_rows(checks: list) -> list:
    """Rows error, ref_error (relative to max|T|) and passed (1/0) of each check that ran."""
    rows = []
    for c in checks:
        if c.passed is None:
            continue
        kw = dict(x_name="case", x_value=c.shape, dtype=c.dtype, config=c.note[:300])
        rows += [row("correct", c.op, c.backend, "error", "rel", c.error, **kw),
                 row("correct", c.op, c.backend, "ref_error", "rel", c.ref_error, **kw),
                 row("correct", c.op, c.backend, "passed", "bool", float(c.passed), **kw)]
    return rows


def summarize_checks(ctx: Ctx, checks: list) -> None:
    """Notes per backend (passed / ran, the worst err/ref_err at the largest size), the first
    failures, and a details table of the checks that failed or did not run."""
    for backend in sorted({c.backend for c in checks}):
        cs = [c for c in checks if c.backend == backend]
        ran = [c for c in cs if c.passed is not None]
        # err / ref_err where the reference's own error (not the rounding floor) sets the bar
        big = max((case_size(c) for c in ran), default=0)
        worst = max((c for c in ran if c.ratio is not None and case_size(c) == big),
                    key=lambda c: c.ratio, default=None)
        ctx.report.notes.append(
            f"{backend}: {sum(bool(c.passed) for c in ran)}/{len(ran)} op checks passed"
            + (f" ({len(cs) - len(ran)} not run)" if len(cs) > len(ran) else "")
            + (f", worst err/ref_err {worst.ratio:.2g} ({worst.op} {worst.dtype} {worst.shape})"
               if worst else ""))
    for c in [c for c in checks if c.passed is False][:5]:
        ctx.report.note(f"FAILED {c.op}/{c.backend}/{c.dtype}/{c.shape}: {c.note[:200]}")

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.2e}"

    shown = [c for c in checks if not c.passed][:60]
    ctx.report.details.append(f"{sum(bool(c.passed) for c in checks)} of {len(checks)} op checks "
                              "passed (every check: the `passed` rows of the CSV)"
                              + ("; the others:" if shown else "."))
    if shown:
        ctx.report.details += ["", "| op | backend | dtype | case | error | ref error | verdict | "
                               "note |", "|---|---|---|---|---|---|---|---|"]
    ctx.report.details += [
        f"| {c.op} | {c.backend} | {c.dtype} | {c.shape} | {fmt(c.error)} | {fmt(c.ref_error)} | "
        f"{'**FAIL**' if c.passed is False else 'not run'} | {c.note.replace('|', '/')[:120]} |"
        for c in shown]


_PYTEST_BOOT = ("import sys; sys.path.insert(0, {bench!r}); import gpu_check; "
                "gpu_check.ensure_importable(); import pytest; sys.exit(pytest.main(sys.argv[1:]))")


def run_pytests(ctx: Ctx) -> bool:
    """On CUDA the device-aware tests (whole steps per backend, 64-bit offsets), then
    ``pytest -m gpu`` over the files that hold GPU-marked tests; each capped by the stage's time
    left. False when a test failed (a run cut by the cap marks the stage cut, not failed)."""
    gpu_files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                       if "mark.gpu" in p.read_text())
    runs = [("gpu", ["-m", "gpu", *gpu_files])]
    if ctx.device == "cuda":
        runs.insert(0, ("device", ["tests/test_backend_steps.py", "tests/test_triton_offsets.py"]))
    else:
        ctx.report.notes.append("device-aware tests (test_backend_steps, test_triton_offsets) run "
                                "in the CPU suite, not here")
    ok = True
    for name, args in runs:
        left = ctx.cap()
        if left < 10:
            ctx.report.note(f"pytest {name}: no time left, not run")
            ctx.cut = True
            continue
        xml = ctx.out / f"pytest_{name}.xml"
        xml.unlink(missing_ok=True)
        cmd = [sys.executable, "-c", _PYTEST_BOOT.format(bench=str(BENCH)), "-v", "-rfE",
               "-p", "no:cacheprovider", f"--junitxml={xml}", *args]
        print(f"  $ pytest {' '.join(args)}  (cap {left:.0f} s)", flush=True)
        seen = {"PASSED": 0, "FAILED": 0, "ERROR": 0, "SKIPPED": 0}

        def echo(line: str, seen: dict[str, int] = seen) -> None:
            print("    " + line.rstrip(), flush=True)
            m = re.search(r"::\S+ (PASSED|FAILED|ERROR|SKIPPED)", line)
            if m:
                seen[m.group(1)] += 1

        t0 = time.time()
        rc = run_capped(cmd, left, echo)
        took = time.time() - t0
        counts = junit_counts(xml) if xml.exists() and rc is not None else None
        if counts is None:
            ctx.report.note(f"pytest {name}: killed at its cap after {took:.0f} s; so far "
                            + ", ".join(f"{v} {k.lower()}" for k, v in seen.items() if v))
            ctx.cut = True
            ok &= seen["FAILED"] == 0 and seen["ERROR"] == 0
            continue
        text = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
        ctx.report.notes.append(f"pytest {name} ({took:.0f} s): {text or 'nothing collected'}")
        ctx.emit([row("correct", f"pytest -m {name}" if name == "gpu" else "pytest device",
                      "pytest", f"tests_{k}", "count", float(v), config=" ".join(args)[:200])
                  for k, v in counts.items()])
        ok &= counts["failed"] == 0 and counts["errors"] == 0 and rc in (0, 5)
        ctx.report.save()
    return ok


def junit_counts(path: Path) -> dict[str, int] | None:
    """{passed, failed, errors, skipped} from a pytest junit XML, None if unreadable."""
    try:
        suite = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    if suite is None:
        return None
    total, failed, errors, skipped = (int(suite.get(k, 0)) for k in
                                      ("tests", "failures", "errors", "skipped"))
    return {"passed": total - failed - errors - skipped, "failed": failed, "errors": errors,
            "skipped": skipped}


def stage_kernels(ctx: Ctx) -> None:
    """Op timings per provider (grng.benchmark.kernels.run), then the inverse candidates (eigh,
    Cholesky, warm-started Newton-Schulz) at every size of ``plan.inverse_sizes``."""
    from grng.benchmark.kernels import run
    plan = ctx.plan
    rates = gemm_rates(ctx.out, plan.gemm_n)
    if not rates:
        ctx.report.notes.append(f"no GEMM rate at n = {plan.gemm_n} from the ceilings stage: "
                                "measured here")
    deadline = ctx.deadline - 0.3 * ctx.left()  # the rest is for the inverse candidates
    rows = run(ctx.device, providers(), plan.kernel_sizes, ("float32", "bfloat16"), ops=bench_ops(),
               deadline=time.monotonic() + deadline - time.time(), gemm_rates=rates,
               warmup=plan.warmup, reps=plan.reps, log=lambda line: print("  " + line, flush=True))
    ctx.emit(rows)
    if time.time() >= deadline:
        ctx.report.note("kernel timings stopped at their share")
        ctx.cut = True
    summarize_kernels(ctx, rows)
    for n in plan.inverse_sizes:
        if ctx.expired():
            ctx.report.note(f"inverse candidates from n = {n} on: not timed (stage share used)")
            break
        inverse_candidates(ctx, n)
    ctx.report.status = "ok"


def auto_order_wins(speed: dict[tuple[str, str, int, str], float]) -> list[str]:
    """Per op and dtype, the backends faster than the reference at every measured size of that
    dtype (``speed``: (op, provider, n, dtype) -> speed-up): the rule by which
    grng.ops.dispatch.AUTO_ORDER['cuda'] may list a backend, decided per dtype so that a bf16
    win (tensor cores) is not hidden by an fp32 loss, nor the reverse."""
    wins = []
    for op in dict.fromkeys(k[0] for k in speed):
        for dtype in sorted({k[3] for k in speed if k[0] == op}):
            for prov in fast_backends():
                pts = [v for (o, p, _, t), v in speed.items() if (o, p, t) == (op, prov, dtype)]
                if pts and min(pts) > 1.0:
                    wins.append(f"{op}/{dtype}: {prov} (x{min(pts):.2f}-{max(pts):.2f})")
    return wins


def auto_order_verdicts(speed: dict[tuple[str, str, int, str], float],
                        order: dict[str, tuple[str, ...]]) -> list[str]:
    """For each (op, backend) that ``order`` (grng.ops.dispatch.AUTO_ORDER['cuda'], whose
    entries the cost model predicted) lists, per measured dtype: "confirmed" where the backend
    beats the reference at every measured size of that dtype (:func:`auto_order_wins`' rule),
    "REMOVE" where it does not (take the entry out of AUTO_ORDER['cuda'], or restrict its
    ``supports`` to the dtypes it wins), "not timed" where no point was measured."""
    out = []
    for op, backends in order.items():
        for backend in backends:
            dtypes = sorted({t for (o, p, _, t) in speed if (o, p) == (op, backend)})
            if not dtypes:
                out.append(f"{op}/{backend}: not timed")
            for dtype in dtypes:
                pts = [v for (o, p, _, t), v in speed.items() if (o, p, t) == (op, backend, dtype)]
                verdict = "confirmed" if min(pts) > 1.0 else "REMOVE"
                out.append(f"{op}/{backend}/{dtype}: {verdict} (x{min(pts):.2f}-{max(pts):.2f})")
    return out


def summarize_kernels(ctx: Ctx, rows: list) -> None:
    """Details: the time and speed-up table; notes: which backends beat the reference at every
    measured point of a dtype (:func:`auto_order_wins`: the measurement by which
    grng.ops.dispatch.AUTO_ORDER['cuda'] lists them, after the correct stage passed them), and
    whether each entry the cost model put there is confirmed (:func:`auto_order_verdicts`)."""
    def key(r: Any) -> tuple[str, str, int, str]:
        return r.name, r.provider, int(r.x_value), r.dtype

    speed = {key(r): r.p50 for r in rows if r.suite == "kernels" and r.metric == "speedup"}
    times = {key(r): r for r in rows if r.suite == "kernels" and r.metric == "time"}
    ctx.report.details += ["| op | provider | n | dtype | median ms (p20-p80) | x reference |",
                           "|---|---|---|---|---|---|"]
    ctx.report.details += [f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {r.p50:.4g} ({r.p20:.4g}-"
                           f"{r.p80:.4g}) | {speed.get(k, float('nan')):.3g} |"
                           for k, r in sorted(times.items())]
    wins = auto_order_wins(speed)
    ctx.report.notes.append(f"{len(times)} timings; faster than the reference at every measured "
                            f"point of a dtype: {', '.join(wins) or 'none'}")
    from grng.ops.dispatch import AUTO_ORDER
    verdicts = auto_order_verdicts(speed, AUTO_ORDER["cuda"])
    ctx.report.notes.append("AUTO_ORDER['cuda'] (predicted by the cost model) against these "
                            f"timings: {', '.join(verdicts) or 'no entries'}")


#: fixed Newton-Schulz steps of the sync-free warm-started inverse timed beside eigh
WARM_ITERATIONS = 3


def inverse_candidates(ctx: Ctx, n: int) -> None:
    """Time the refresh candidates on one SPD M (n x n, fp32): eigh, the Cholesky inverse and
    Newton-Schulz warm-started at X0 = (M + E)^-1 with E symmetric, ||E||_F ~ 0.1 (the previous
    refresh's inverse): to convergence, and :data:`WARM_ITERATIONS` fixed sync-free steps."""
    import torch

    from grng import ops
    from grng.benchmark.timing import measure
    torch.manual_seed(0)
    A = torch.randn(n, n, device=ctx.device)
    M = A @ A.T / n + torch.eye(n, device=ctx.device)
    M = 0.5 * (M + M.T)
    G = torch.randn(n, n, device=ctx.device)
    X0 = torch.linalg.inv(M + (G + G.T) * (0.05 / n))
    kw = dict(x_name="n", x_value=str(n), dtype="float32")
    st = measure(lambda m: ops.eigh(m, backend="reference"), lambda: (M,), device=ctx.device,
                 warmup=1, reps=3)
    ctx.emit([ms_row("kernels", "eigh", "reference", "time", st, config="torch.linalg.eigh",
                     **kw)])
    parts = [f"eigh {st.p50 * 1e3:.4g} ms"]
    candidates = [("cholesky_inverse", "reference", "M = L L^T, L^-T L^-1",
                   lambda m, x: ops.cholesky_inverse(m, backend="reference"))]
    for backend in ("reference", "triton"):
        if backend == "triton" and ctx.cpu:
            parts.append("Newton-Schulz/triton: not timed in the interpreter")
            continue
        res = ops.newton_schulz_inverse(M, X0, backend=backend)
        candidates += [
            ("newton_schulz_inverse_warm", backend,
             f"X0 = (M + E)^-1, ||E||_F ~ 0.1; {res.iterations} iterations, converged "
             f"{res.converged}, rms residual {res.residual:.1e}",
             lambda m, x, b=backend: ops.newton_schulz_inverse(m, x, backend=b)),
            ("newton_schulz_masked_warm", backend,
             f"X0 = (M + E)^-1, ||E||_F ~ 0.1; {WARM_ITERATIONS} fixed sync-free steps",
             lambda m, x, b=backend: ops.newton_schulz_masked(m, x, WARM_ITERATIONS, 1e-3,
                                                              backend=b))]
    for name, backend, cfg, fn in candidates:
        if ctx.expired():
            break
        st_c = measure(fn, lambda: (M, X0), device=ctx.device, warmup=1, reps=5)
        ctx.emit([ms_row("kernels", name, backend, "time", st_c, config=cfg, **kw),
                  row("kernels", name, backend, "speedup_vs_eigh", "x", st.p50 / st_c.p50,
                      config=cfg, **kw)])
        parts.append(f"{name}/{backend} {st_c.p50 * 1e3:.4g} ms (x{st.p50 / st_c.p50:.2g} vs eigh)")
    ctx.report.note(f"n = {n}: " + "; ".join(parts))


def make_optimizer(name: str, model: Any, backend: str, inverse_every: int):
    """The optimizer under test: its case of grng.optim.cases with bench/step_time.py's
    hyperparameters."""
    from grng.optim.cases import CASES
    curv = dict(backend=backend, kl_clip=1e-3)
    hp = {"adamw": ("adamw", dict(lr=1e-3)),
          # the device's defaults (grng.optim.device_defaults: on CUDA Cholesky every 20, TF32)
          "kfac-default": ("kfac-eigen", dict(lr=0.01, damping=0.1, momentum=0.9, inverse=None,
                                              **curv)),
          "ekfac": ("ekfac", dict(lr=0.01, **curv)),
          "kfac": ("kfac-eigen", dict(lr=0.01, damping=0.1, momentum=0.9, inverse="eigen",
                                      inverse_every=inverse_every, **curv)),
          "kfac-newton": ("kfac-newton", dict(lr=0.01, damping=0.1, momentum=0.9,
                                              inverse_every=inverse_every, **curv)),
          # the host-branching step on CUDA, against which the sync-free default is judged
          "kfac-newton-host": ("kfac-newton", dict(lr=0.01, damping=0.1, momentum=0.9,
                                                   inverse_every=inverse_every, sync_free=False,
                                                   **curv)),
          "ring": ("ring", dict(lr=0.01, damping=0.1, rho=0.1, momentum=0.9,
                                inverse_every=inverse_every, **curv)),
          "rkalman": ("rkalman", dict(lr=0.01, rho=0.1, momentum=0.9, **curv))}
    case, kw = hp[name]
    return CASES[case].make(model, **kw)


def factor_summary(model: Any) -> tuple[str, int]:
    """(what grng builds for ``model``: blocks, largest dense factor, diagonal factors; the
    largest dense factor's side)."""
    from grng.curvature.blocks import find_blocks
    found = find_blocks(model)
    dense, diag = [], []
    for name, layer in zip(found.names, found.layers):
        # each side's structure says whether it is kept as a vector (an embedding's A, a side
        # above max_factor_dim)
        for side, structure in (("G", layer.g_factor), ("A", layer.a_factor)):
            (diag if structure.diagonal else dense).append((structure.dim, f"{name} {side}"))
    big = max(dense)
    text = (f"{len(found.layers)} Kronecker blocks; largest dense factor {big[0]} ({big[1]})")
    if diag:
        text += "; diagonal: " + ", ".join(f"{w} {d}" for d, w in diag)
    return text, big[0]


def step_configs() -> list[tuple[str, str]]:
    """(optimizer, backend) in the order the step stage runs them, the ones a short window must
    not lose first: AdamW (every ratio's denominator), the sync-free step against the host path
    it is judged against, the device's defaults (K-FAC, and EKFAC at its defaults) on every
    backend, then the other members."""
    first = [("adamw", "-"), ("kfac-newton", "reference"), ("kfac-newton-host", "reference")]
    defaults = [(o, b) for o in ("kfac-default", "ekfac") for b in providers()]
    rest = [(o, b) for o in ("kfac", "rkalman", "ring", "kfac-newton") for b in providers()]
    return list(dict.fromkeys(first + defaults + rest))


def cost_device(ctx: Ctx) -> Any:
    """The cost model's device for this run: the data-sheet GPU named like the CUDA device (H100
    when none matches, said in a note), or this CPU measured at small sizes (``--cpu``)."""
    import torch

    from grng.benchmark import costmodel
    if ctx.device != "cuda":
        return costmodel.measure_cpu(torch.get_num_threads(), sizes=(64, 128), gemm_size=256)
    name = torch.cuda.get_device_name().lower()
    key = next((k for k in costmodel.DEVICES if k in name), None)
    if key is None:
        ctx.report.note(f"cost model: no figures for {name!r}; predicting for an H100")
    return costmodel.DEVICES[key or "h100"]


def step_config(opt_name: str, backend: str, opt: Any) -> Any:
    """The cost model's StepConfig of the optimizer ``opt`` built for (opt_name, backend): its
    family, inverse, F, T, precision and sync-free flag as constructed; the update fused when a
    kernel backend runs it (and EKFAC's masked moment step, its refresh's QR as built)."""
    from grng.benchmark import costmodel
    if opt_name == "adamw":
        return costmodel.StepConfig(family="adamw")
    family = {"kfac-default": "kfac", "kfac-newton": "kfac", "kfac-newton-host": "kfac",
              "ring": "ring", "rkalman": "rkalman", "ekfac": "ekfac"}.get(opt_name, "kfac")
    inverse = getattr(getattr(opt, "inverse", None), "name", "eigen")
    return costmodel.StepConfig(
        family=family, inverse=inverse, factor_every=getattr(opt, "factor_every", 1),
        inverse_every=getattr(opt, "inverse_every", 1),
        precision=getattr(opt, "precision", "fp32"),
        sync_free=bool(getattr(opt, "sync_free", False)),
        fused_update=backend in ("triton", "ext"),
        qr=getattr(getattr(opt, "block", None), "qr", "householder"),
        moments_kernel=backend in ("triton", "ext"))


def predict_step(ctx: Ctx, device: Any, config: Any) -> Any:
    """The cost model's prediction of one step of ``config`` on the step stage's GPT."""
    from grng.benchmark import costmodel
    g = ctx.plan.gpt
    shape = costmodel.gpt_shape(g["layers"], g["width"], g["vocab"], ctx.plan.seq, ctx.plan.batch,
                                model_precision="bf16")
    return costmodel.predict(shape, config, device)


def stage_step(ctx: Ctx) -> None:
    """Whole training steps (bf16 autocast) of AdamW and each curvature optimizer x backend."""
    import torch

    import models
    plan = ctx.plan
    cfg = models.GPTConfig(**plan.gpt)
    dev = ctx.device
    configs = step_configs()
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        idx = torch.randint(0, cfg.vocab, (plan.batch, plan.seq + 1), generator=gen).to(dev)
        batches.append((idx[:, :-1], idx[:, 1:]))
    steps = plan.inverse_every  # every inverse_every consecutive steps hold one inverse refresh
    ctx.report.notes.append(f"GPT {plan.gpt}, tied head, batch {plan.batch} x {plan.seq}, "
                            f"bf16 autocast, inverse_every {plan.inverse_every}, "
                            f"{plan.step_warmup} warm-up + {steps} timed steps")
    with torch.device("meta"):
        text, largest = factor_summary(models.GPT(cfg))
    ctx.report.notes.append(text)
    if largest > MAX_FACTOR:
        configs = configs[:1]
        ctx.report.notes.append(f"a {largest} x {largest} factor ({largest ** 2 * 4 / 2**30:.1f} GiB "
                                "in fp32, several per block) is too big: curvature optimizers not run")
    ctx.report.save()
    adamw: dict[str, float] = {}
    device = cost_device(ctx)
    ctx.report.notes.append(f"predictions: grng.benchmark.costmodel on {device.name}")
    ctx.report.details += ["| optimizer | backend | full step ms (p20-p80) | mean ms | x AdamW | "
                           "opt.step ms | peak MiB | max host syncs per opt.step | "
                           "predicted ms | predicted x AdamW | measured / predicted |",
                           "|---|---|---|---|---|---|---|---|---|---|---|"]
    ok = True
    for opt_name, backend in configs:
        if ctx.expired():
            ctx.report.note(f"{opt_name}/{backend} and later: not run (stage share used)")
            break
        print(f"  {opt_name}/{backend}", flush=True)
        try:
            res = time_steps(ctx, cfg, opt_name, backend, batches, steps)
        except Exception as err:  # noqa: BLE001 - recorded; the next configuration still runs
            traceback.print_exc()
            ctx.report.note(f"{opt_name}/{backend}: {type(err).__name__}: "
                            f"{str(err).splitlines()[0][:200]}")
            ok = False
            continue
        finally:
            gc.collect()
            if dev == "cuda":
                torch.cuda.empty_cache()
        if opt_name == "adamw":
            adamw = {"p50": res["full"].p50, "mean": res["mean"]}
        res["predicted"] = predict_step(ctx, device, res["config"])
        record_step(ctx, opt_name, backend, res, adamw)
    ctx.report.status = "ok" if ok else "failed"


def time_steps(ctx: Ctx, cfg: Any, opt_name: str, backend: str, batches: list, steps: int) -> dict:
    """Warm-up steps, then ``steps`` timed steps (full and opt.step alone), the most host syncs
    of one opt.step over ``inverse_every`` more (CUDA), peak memory (CUDA)."""
    import torch

    import models
    from grng.benchmark.timing import stats_of
    dev = ctx.device
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    with torch.device(dev):
        model = models.GPT(cfg)
    opt = make_optimizer(opt_name, model, "reference" if backend == "-" else backend,
                         ctx.plan.inverse_every)
    config = step_config(opt_name, backend, opt)

    def fb(i: int) -> None:
        forward_backward(model, opt, *batches[i % len(batches)], dev)

    t0 = time.perf_counter()
    for i in range(ctx.plan.step_warmup):
        fb(i)
        opt.step()
    sync(dev)
    warm_s = time.perf_counter() - t0
    full, only = [], []
    for i in range(steps):
        if dev == "cuda":
            e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            e[0].record()
            fb(i)
            e[1].record()
            opt.step()
            e[2].record()
            torch.cuda.synchronize()
            full.append(e[0].elapsed_time(e[2]) * 1e-3)
            only.append(e[1].elapsed_time(e[2]) * 1e-3)
        else:
            a = time.perf_counter()
            fb(i)
            b = time.perf_counter()
            opt.step()
            c = time.perf_counter()
            full.append(c - a)
            only.append(c - b)
    syncs = None
    if dev == "cuda":  # the most host syncs of one opt.step over a refresh period (sync_free is
        syncs = 0      # on by default on CUDA; an eigen refresh still synchronizes)
        for i in range(ctx.plan.inverse_every):
            fb(steps + i)
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    opt.step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            syncs = max(syncs, sum("synchroniz" in str(w.message) for w in caught))
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else None
    skipped = getattr(opt, "skipped_steps", 0)
    return {"full": stats_of(full), "only": stats_of(only), "mean": statistics.fmean(full),
            "warm": warm_s, "syncs": syncs, "peak": peak, "skipped": skipped, "config": config}


def record_step(ctx: Ctx, opt_name: str, backend: str, res: dict, adamw: dict[str, float]) -> None:
    """Rows, a details line and (for skipped steps) a note for one optimizer x backend."""
    kw = dict(x_name="model", x_value="gpt", dtype="bfloat16-autocast",
              config=f"{ctx.plan.gpt}; batch {ctx.plan.batch} x {ctx.plan.seq}")
    rows = [ms_row("step", opt_name, backend, "full_step_time", res["full"], **kw),
            ms_row("step", opt_name, backend, "optimizer_step_time", res["only"], **kw),
            row("step", opt_name, backend, "full_step_time_mean", "ms", res["mean"] * 1e3,
                n=res["full"].n, **kw),
            row("step", opt_name, backend, "warmup_time", "s", res["warm"],
                n=ctx.plan.step_warmup, **kw)]
    ratio = res["full"].p50 / adamw["p50"] if adamw else None
    if ratio is not None:
        rows += [row("step", opt_name, backend, "ratio_vs_adamw", "x", ratio, **kw),
                 row("step", opt_name, backend, "ratio_vs_adamw_mean", "x",
                     res["mean"] / adamw["mean"], **kw)]
    if res["peak"] is not None:
        rows.append(row("step", opt_name, backend, "peak_memory", "MiB", res["peak"], **kw))
    if res["syncs"] is not None:
        rows.append(row("step", opt_name, backend, "host_syncs", "count", float(res["syncs"]),
                        n=1, **kw))
    pred = res["predicted"]
    pkw = {**kw, "config": f"{kw['config']}; {pred.device}; {res['config']}"}
    rows += [row("step", opt_name, backend, "predicted_step_time", "ms", pred.seconds * 1e3, **pkw),
             row("step", opt_name, backend, "predicted_ratio_vs_adamw", "x", pred.ratio, **pkw),
             row("step", opt_name, backend, "measured_over_predicted", "x",
                 res["full"].p50 / pred.seconds, **pkw)]
    print(f"  {opt_name}/{backend}: measured {res['full'].p50 * 1e3:.4g} ms"
          f"{'' if ratio is None else f' (x{ratio:.2f} AdamW)'}, predicted "
          f"{pred.seconds * 1e3:.4g} ms (x{pred.ratio:.2f} AdamW) on {pred.device}", flush=True)
    ctx.emit(rows)
    if res["skipped"]:
        ctx.report.note(f"{opt_name}/{backend}: {res['skipped']} steps skipped (non-finite): "
                        "timings are of the skip path")
    f = res["full"]
    ratio_s = "-" if ratio is None else f"{ratio:.2f}"
    peak_s = "-" if res["peak"] is None else f"{res['peak']:.0f}"
    syncs_s = "-" if res["syncs"] is None else str(res["syncs"])
    ctx.report.details.append(
        f"| {opt_name} | {backend} | {f.p50 * 1e3:.1f} ({f.p20 * 1e3:.1f}-{f.p80 * 1e3:.1f}) | "
        f"{res['mean'] * 1e3:.1f} | {ratio_s} | {res['only'].p50 * 1e3:.2f} | {peak_s} | "
        f"{syncs_s} | {pred.seconds * 1e3:.1f} | {pred.ratio:.2f} | "
        f"{res['full'].p50 / pred.seconds:.2f} |")
    ctx.report.save()


STAGE_FNS: dict[str, Callable[[Ctx], None]] = {
    "env": stage_env, "build": stage_build, "ceilings": stage_ceilings, "correct": stage_correct,
    "kernels": stage_kernels, "step": stage_step}


def run_child(name: str, out: Path, cpu: bool, deadline: float, hard: float) -> int:
    """Run one stage in this process; its report goes to ``out/.stage_<name>.json``."""
    ensure_importable()
    report = Report(out / f".stage_{name}.json")
    report.save()
    import torch
    device = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
    ROW_DEVICE[0] = device
    if cpu:
        torch.set_num_threads(1)  # tiny problems; steadier on a shared CPU (as tests/conftest.py)
    ctx = Ctx(out, cpu, device, deadline, hard, CPU_PLAN if cpu else GPU_PLAN, report)
    try:
        STAGE_FNS[name](ctx)
    except Exception as err:  # noqa: BLE001 - the stage fails, the run goes on
        traceback.print_exc()
        report.status = "error"
        report.notes.append(f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                            if str(err) else type(err).__name__)
    if ctx.cut and report.status == "ok":
        report.status = "cut short by the budget"
    report.save()
    return 0 if report.status == "ok" else 1


# ----------------------------------------------------------------------------- parent

@dataclasses.dataclass
class Outcome:
    """A stage's line in the summary table."""

    status: str
    seconds: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)
    details: list[str] = dataclasses.field(default_factory=list)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def spawn(name: str, args: argparse.Namespace, deadline: float, hard: float,
          log: Any) -> Outcome:
    """Run stage ``name`` in a child process, echoing its output; kill it at ``hard``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--out", str(args.out),
           "--deadline", repr(deadline), "--hard", repr(hard)] + (["--cpu"] if args.cpu else [])
    t0 = time.time()
    tail: list[str] = []

    def sink(line: str) -> None:
        log.write(f"[{name}] {line}")
        print(f"[{name}] {line}", end="", flush=True)
        tail[:] = (tail + [line.rstrip()])[-5:]

    rc = run_capped(cmd, hard - time.time(), sink)
    took = time.time() - t0
    path = args.out / f".stage_{name}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    path.unlink(missing_ok=True)
    out = Outcome(data.get("status", "error"), took, data.get("notes", []),
                  data.get("details", []), data.get("info", {}))
    if rc is None:
        out.status = "cut short by the budget"
        out.notes.append(f"killed at {took:.0f} s (its share ran out)")
    elif rc != 0 and out.status in ("running", "ok"):
        out.status = "error"
        out.notes.append(f"exit status {rc}: " + " / ".join(t for t in tail if t)[-300:])
    return out


def orchestrate(args: argparse.Namespace) -> int:
    """Run the selected stages in order within the budget; write and print the summary."""
    t_start = time.time()
    end = t_start + args.budget - RESERVE_S
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.cpu:
        os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")  # later stages reuse the tuning
    os.environ["PYTHONUNBUFFERED"] = "1"
    selected = [s for s in STAGES if s in args.stages]
    outcomes: dict[str, Outcome] = {}
    with (args.out / "gpu_check.log").open("a") as log:
        log.write(f"# gpu_check {dt.datetime.now().isoformat(timespec='seconds')} {sys.argv}\n")
        for name in STAGES:
            if name not in selected:
                outcomes[name] = Outcome("skipped", notes=["not in --stages"])
                continue
            if name == "build" and args.cpu:
                outcomes[name] = Outcome("skipped", notes=[
                    "--cpu: no CUDA build here (the CPU extension comes from `make test`'s "
                    "editable install)"])
                continue
            now = time.time()
            if end - now < 5:
                outcomes[name] = Outcome("cut short by the budget", notes=["not started: budget spent"])
                continue
            later = [s for s in selected[selected.index(name):] if not (s == "build" and args.cpu)]
            share = (end - now) * WEIGHTS[name] / sum(WEIGHTS[s] for s in later)
            deadline = now + share
            hard = min(deadline + GRACE_S, end)
            print(f"=== {name}: share {share:.0f} s (budget left {end - now:.0f} s)", flush=True)
            try:
                outcomes[name] = spawn(name, args, deadline, hard, log)
            except Exception as err:  # noqa: BLE001 - the next stages and the summary still run
                outcomes[name] = Outcome("error", time.time() - now,
                                         [f"could not run the stage: {type(err).__name__}: {err}"])
    total = time.time() - t_start
    write_csv_stage_rows(args.out, outcomes)
    table = summary_table(outcomes, total, args.budget)
    (args.out / "stages.json").write_text(json.dumps(
        {k: dataclasses.asdict(v) for k, v in outcomes.items()}, indent=1, default=str))
    (args.out / "summary.md").write_text(summary_markdown(outcomes, table, args))
    for name, o in outcomes.items():
        if o.details:
            print(f"\n## {name}\n" + "\n".join(o.details))
    print("\n" + table, flush=True)
    bad = [o for o in outcomes.values() if o.status not in ("ok", "skipped")]
    return 1 if bad else 0


def write_csv_stage_rows(out: Path, outcomes: dict[str, Outcome]) -> None:
    """One wall-time row per stage that ran (config = its status); best effort."""
    try:
        ensure_importable()
        from grng.benchmark.schema import Row, append_rows
        rows = [Row(suite="gpu_check", name=name, provider="gpu_check", metric="wall_time",
                    unit="s", p50=o.seconds, config=o.status)
                for name, o in outcomes.items() if o.seconds]
        append_rows(out / CSV_NAME, rows)
    except Exception as err:  # noqa: BLE001 - the summary must still be printed
        print(f"could not write stage rows: {err}", flush=True)


def summary_table(outcomes: dict[str, Outcome], total: float, budget: float) -> str:
    """The stage table: stage | status | seconds | notes."""
    lines = [f"gpu_check summary ({total:.0f} s of a {budget:.0f} s budget)", "",
             "| stage | status | s | notes |", "|---|---|---|---|"]
    for name, o in outcomes.items():
        notes = "; ".join(n.replace("|", "/").replace("\n", " ") for n in o.notes)
        lines.append(f"| {name} | {o.status} | {o.seconds:.0f} | {notes} |")
    return "\n".join(lines)


def summary_markdown(outcomes: dict[str, Outcome], table: str, args: argparse.Namespace) -> str:
    """summary.md: when, where, the per-stage details, then the stage table."""
    info = outcomes.get("env", Outcome("")).info
    head = [f"# gpu_check {dt.date.today().isoformat()}{' (--cpu)' if args.cpu else ''}", "",
            f"`{' '.join(sys.argv)}`", ""]
    if info:
        head += [f"- {k}: {v}" for k, v in info.items()] + [""]
    for name, o in outcomes.items():
        if o.details:
            head += [f"## {name}", "", *o.details, ""]
    return "\n".join(head + [table, ""])


def main(argv: list[str] | None = None) -> int:
    """Parse the flags; run the whole check, or (``--child``) one stage."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        default=BENCH / "results" / f"gpu_check_{dt.date.today().isoformat()}")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma list among {','.join(STAGES)} (run in that order)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run")
    parser.add_argument("--cpu", action="store_true",
                        help="tiny sizes on the CPU, Triton interpreted, no CUDA build")
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--hard", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--warm", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything here or in a child imports a kernel
    if args.warm:
        return warm(args.warm, args.cpu)
    args.out = args.out.resolve()
    if args.child:
        return run_child(args.child, args.out, args.cpu, args.deadline, args.hard)
    args.stages = [s for s in args.stages.split(",") if s]
    unknown = set(args.stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {','.join(STAGES)}")
    if not args.cpu:
        import torch  # no CUDA context is created here: is_available() asks NVML
        if not torch.cuda.is_available():
            parser.error("no CUDA device here: run with --cpu")
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
