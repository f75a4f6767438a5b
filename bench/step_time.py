"""Step time and peak memory of every optimizer on the in-repo models, relative to AdamW.

For each (model, optimizer, backend): the median (p20, p80) time of a full training step
(forward, backward, optimizer) and of the optimizer step alone, and the peak memory; the ratio
to AdamW is taken from the same run. Each configuration runs in its own subprocess, so peak
memory is that process's high-water mark (CPU: ru_maxrss, minus the idle interpreter's; CUDA:
torch.cuda.max_memory_allocated). GPU timing uses CUDA events after a warm-up.

Rows of grng's benchmark schema (:mod:`grng.benchmark.schema`, suite ``step_time``: name = the
optimizer, provider = the backend, x = the model; metrics ``full_step`` and ``optimizer_step``
in ms, ``peak_memory`` in MB, each also ``..._vs_adamw``) append to
``bench/results/step_time.csv``, and a Markdown summary and plot of this run are written beside it.

    python bench/step_time.py --models mlp,resnet,gpt --device cpu
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402

from grng.benchmark.schema import Row, append_rows, environment  # noqa: E402
from grng import make_closure  # noqa: E402
from grng.optim.cases import CASES  # noqa: E402

SUITE = "step_time"
RESULTS = Path(__file__).resolve().parent / "results"

OPTIMIZERS = ["sgd", "adamw", "kfac", "ring", "reng-fd", "rkalman", "fgr-sgd", "bgr-sgd", "db-sgd"]
CURVATURE = {"kfac", "ring", "reng-fd", "rkalman"}


def make_model(name: str, gpt_size: str) -> tuple[nn.Module, Callable[[torch.Generator, str], tuple]]:
    """A model and a batch sampler (random data of the model's shape, never zeros)."""
    if name == "mlp":
        return models.mlp(), lambda g, dev: (torch.randn(128, 784, generator=g).to(dev),
                                             torch.randint(0, 10, (128,), generator=g).to(dev))
    if name == "resnet":
        return models.resnet(), lambda g, dev: (torch.randn(32, 3, 32, 32, generator=g).to(dev),
                                                torch.randint(0, 10, (32,), generator=g).to(dev))
    cfg = models.GPT_SIZES[gpt_size]

    def tokens(g: torch.Generator, dev: str) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, cfg.vocab, (8, cfg.context + 1), generator=g).to(dev)
        return idx[:, :-1], idx[:, 1:]
    return models.GPT(cfg), tokens


def loss_fn(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Cross entropy over classes (or tokens)."""
    out = model(x)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


# the bench's names -> cases of grng.optim.cases (the table the tests and the demo use)
CASE_OF = {"sgd": "sgd", "adamw": "adamw", "kfac": "kfac-eigen", "ring": "ring",
           "reng-fd": "reng-forward", "rkalman": "rkalman", "fgr-sgd": "fgr-sgd",
           "bgr-sgd": "bgr-sgd", "db-sgd": "db-sgd"}


def make_optimizer(name: str, model: nn.Module, backend: str, inverse_every: int):
    """The optimizer under test with fixed, stable hyperparameters (timing only; a run that
    skips steps would time the cheap skip path, so the child reports skipped steps)."""
    curv = dict(backend=backend, inverse_every=inverse_every, kl_clip=1e-3)
    hp = {"sgd": dict(lr=0.01, momentum=0.9), "adamw": dict(lr=1e-3),
          "kfac": dict(lr=0.01, damping=0.1, momentum=0.9, **curv),
          "ring": dict(lr=0.01, damping=0.1, rho=0.1, momentum=0.9, **curv),
          "reng-fd": dict(lr=0.01, damping=0.1, rho=0.01, epsilon=0.01, **curv),
          "rkalman": dict(lr=0.01, rho=0.1, momentum=0.9, kl_clip=1e-3, backend=backend)
          }.get(name, dict(lr=0.01, momentum=0.9, gamma=0.01, epsilon=0.01))
    return CASES[CASE_OF[name]].make(model, **hp)


def needs_closure(name: str) -> bool:
    return CASES[CASE_OF[name]].two_pass


class Clock:
    """Wall time on CPU, CUDA events on GPU; returns milliseconds."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def time(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def measure(args: argparse.Namespace) -> dict:
    """Run one configuration in this process; return its timings and peak memory."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model, batch = make_model(args.model, args.gpt_size)
    model.to(args.device)
    opt = make_optimizer(args.optimizer, model, args.backend, args.inverse_every)
    clock = Clock(args.device)
    batches = [batch(gen, args.device) for _ in range(4)]
    full, step_only = [], []
    total = args.warmup + args.steps
    for i in range(total):
        x, y = batches[i % len(batches)]
        closure = lambda: loss_fn(model, x, y)  # noqa: E731
        if needs_closure(args.optimizer):
            ms = clock.time(lambda: opt.step(make_closure(opt, closure)))
            t_step = None
        else:
            def full_step() -> None:
                opt.zero_grad()
                closure().backward()
            t_fb = clock.time(full_step)
            t_step = clock.time(opt.step)
            ms = t_fb + t_step
        if i >= args.warmup:
            full.append(ms)
            if t_step is not None:
                step_only.append(t_step)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - args.baseline_rss_mb
    skipped = getattr(opt, "skipped_steps", 0)
    return {"full": full, "step": step_only, "peak_mem_mb": peak, "skipped": skipped}


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80)."""
    if not xs:
        return float("nan"), float("nan"), float("nan")
    q = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) > 1 else [xs[0]] * 9
    return statistics.median(xs), q[1], q[7]


def run_child(args: argparse.Namespace, model: str, opt: str, backend: str) -> dict | None:
    cmd = [sys.executable, __file__, "--child", "--model", model, "--optimizer", opt,
           "--backend", backend, "--device", args.device, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--gpt-size", args.gpt_size,
           "--inverse-every", str(args.inverse_every),
           "--baseline-rss-mb", str(args.baseline_rss_mb)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  {model}/{opt}/{backend} failed: {proc.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def baseline_rss() -> float:
    """High-water RSS (MB) of an interpreter that has imported torch and grng only."""
    code = "import resource, torch, grng; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,resnet,gpt")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--backends", default="reference,auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--gpt-size", default="tiny", choices=sorted(models.GPT_SIZES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--inverse-every", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--optimizer", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="reference", help=argparse.SUPPRESS)
    parser.add_argument("--baseline-rss-mb", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return

    args.baseline_rss_mb = 0.0 if args.device.startswith("cuda") else baseline_rss()
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)")
    today = dt.date.today().isoformat()
    rows: list[dict] = []
    for model in args.models.split(","):
        results: dict[tuple[str, str], dict] = {}
        for opt in args.optimizers.split(","):
            for backend in (args.backends.split(",") if opt in CURVATURE else ["-"]):
                print(f"{model:7s} {opt:9s} {backend:9s}", end=" ", flush=True)
                res = run_child(args, model, opt, "reference" if backend == "-" else backend)
                if res is None:
                    continue
                if res["skipped"]:
                    print(f"skipped {res['skipped']} steps (diverged): not recorded")
                    continue
                results[(opt, backend)] = res
                print(f"full {quantiles(res['full'])[0]:8.2f} ms  peak {res['peak_mem_mb']:8.1f} MB")
        adamw = results.get(("adamw", "-"))
        ref_full = quantiles(adamw["full"])[0] if adamw else float("nan")
        ref_step = quantiles(adamw["step"])[0] if adamw else float("nan")
        ref_mem = adamw["peak_mem_mb"] if adamw else float("nan")
        for (opt, backend), res in results.items():
            for metric, xs, ref in (("full_step", res["full"], ref_full),
                                    ("optimizer_step", res["step"], ref_step)):
                if not xs:
                    continue
                med, p20, p80 = quantiles(xs)
                rows.append(dict(model=model, optimizer=opt, backend=backend, metric=metric,
                                 median_ms=round(med, 4), p20_ms=round(p20, 4), p80_ms=round(p80, 4),
                                 n=len(xs),
                                 peak_mem_mb=round(res["peak_mem_mb"], 1),
                                 ratio_vs_adamw=round(med / ref, 3),
                                 device=device_name, torch_version=torch.__version__, date=today))
            rows.append(dict(model=model, optimizer=opt, backend=backend, metric="peak_memory",
                             median_ms="", p20_ms="", p80_ms="",
                             peak_mem_mb=round(res["peak_mem_mb"], 1),
                             ratio_vs_adamw=round(res["peak_mem_mb"] / ref_mem, 3) if ref_mem else "",
                             device=device_name, torch_version=torch.__version__, date=today))
    config = (f"steps={args.steps}, warmup={args.warmup}, inverse_every={args.inverse_every}, "
              f"gpt_size={args.gpt_size}")
    write(rows, args.out, config, environment(args.device))


def schema_rows(rows: list[dict], config: str, env: dict[str, str]) -> list[Row]:
    """This run's rows in grng's benchmark schema (device named as in the Markdown summary)."""
    out = []
    for r in rows:
        common = dict(suite=SUITE, name=r["optimizer"], provider=r["backend"], x_name="model",
                      x_value=r["model"], dtype="float32", device=r["device"], torch=env["torch"],
                      triton=env["triton"], grng=env["grng"], config=config)
        if r["metric"] == "peak_memory":
            out.append(Row(metric="peak_memory", unit="MB", p50=r["peak_mem_mb"], **common))
        else:
            out.append(Row(metric=r["metric"], unit="ms", p50=r["median_ms"], p20=r["p20_ms"],
                           p80=r["p80_ms"], n=r["n"], **common))
        if r["ratio_vs_adamw"] != "":
            out.append(Row(metric=f"{r['metric']}_vs_adamw", unit="x", p50=r["ratio_vs_adamw"],
                           **common))
    return out


def write(rows: list[dict], out: Path, config: str, env: dict[str, str]) -> None:
    """Append rows to step_time.csv; write step_time.md and step_time.png from this run."""
    out.mkdir(parents=True, exist_ok=True)
    append_rows(out / "step_time.csv", schema_rows(rows, config, env))
    full = [r for r in rows if r["metric"] == "full_step"]
    lines = [f"# Step time and memory ({rows[0]['device']}, torch {rows[0]['torch_version']}, "
             f"{rows[0]['date']})", "",
             "| model | optimizer | backend | full step ms (p20-p80) | x AdamW | optimizer step ms | peak MB |",
             "|---|---|---|---|---|---|---|"]
    for r in full:
        step = next((s for s in rows if s["metric"] == "optimizer_step" and s["model"] == r["model"]
                     and s["optimizer"] == r["optimizer"] and s["backend"] == r["backend"]), None)
        lines.append(f"| {r['model']} | {r['optimizer']} | {r['backend']} | {r['median_ms']:.2f} "
                     f"({r['p20_ms']:.2f}-{r['p80_ms']:.2f}) | {r['ratio_vs_adamw']:.2f} | "
                     f"{step['median_ms'] if step else '—'} | {r['peak_mem_mb']} |")
    (out / "step_time.md").write_text("\n".join(lines) + "\n")
    plot(full, out / "step_time.png")


def plot(full: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model_names = sorted({r["model"] for r in full})
    fig, axes = plt.subplots(1, len(model_names), figsize=(5 * len(model_names), 4), squeeze=False)
    for ax, model in zip(axes[0], model_names):
        rs = [r for r in full if r["model"] == model]
        labels = [f"{r['optimizer']}\n{r['backend']}" for r in rs]
        ax.bar(range(len(rs)), [r["ratio_vs_adamw"] for r in rs])
        ax.axhline(1.0, color="gray", linestyle="--")
        ax.set_xticks(range(len(rs)), labels, rotation=90, fontsize=7)
        ax.set_title(f"{model}: full step / AdamW")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
