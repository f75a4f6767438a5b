"""Steps to target of K-FAC's CUDA defaults against longer fold / refresh intervals (on the CPU).

    python bench/cuda_intervals.py [--tasks transformer,cnn] [--seeds 3]

The CUDA defaults (``grng.optim.device_defaults.CUDA``: Cholesky refreshes) take their
intervals from the cost model (docs/performance.md); a longer interval is cheaper per step there,
and this script measures what it costs in steps against the previous CUDA default, F = 2,
T = 20: every setting of :data:`SETTINGS` trains the demo tasks' budgets (bench/amortization.py's phase 1: the demo's learning rates, validation
split, seeds from its first), and each is judged against the CUDA default by amortization's rule
(:func:`amortization.keeps_accuracy`). Steps are deterministic, independent of the machine's
load. Writes ``bench/results/cuda_intervals.md``.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import amortization as am  # noqa: E402

from grng.benchmark.schema import run_header  # noqa: E402
from grng.optim import device_defaults  # noqa: E402

#: (F, T) with the CUDA default's inverse; the first is the reference (the CUDA default before
#: F = 4 was chosen from this measurement)
SETTINGS: tuple[tuple[int, int], ...] = ((2, 20), (2, 40), (4, 20), (4, 40))


def report(argv: list[str] | None, script: str, title: str, out_name: str,
           results: Callable[[str, dict], list[am.Result]], label: Callable[[am.Result], str],
           reference: str) -> int:
    """Train each task's ``results(task, hparams table)`` (the first is the reference), judge
    each against it by amortization's rule and write ``bench/results/<out_name>``."""
    ap = argparse.ArgumentParser(description=title)
    ap.add_argument("--tasks", default="transformer,cnn,mlp")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    table = am.load_hparams(am.HPARAMS_PATH)
    t0 = time.perf_counter()
    lines = [f"# {title} (`python bench/{script}`)", "",
             "Written by the script (module docstring). Steps to target are deterministic; the "
             "machine was shared (2 cores), which changes only the wall time.", "",
             *(f"- {k}: {v}" for k, v in run_header(1).items()),
             f"- command: python bench/{script} {' '.join(sys.argv[1:] if argv is None else argv)}",
             ""]
    for task in args.tasks.split(","):
        runs = results(task, table)
        am.train_all(task, runs, list(range(am.FIRST_SEED, am.FIRST_SEED + args.seeds)), None,
                     am.log)
        default = runs[0]
        lines += [f"## {task} (target {am.TASKS[task].target}, evaluated every "
                  f"{am.EVAL_EVERY[task]} steps; {args.seeds} seeds)", "",
                  "| setting | steps to target per seed | median | final (median) | keeps accuracy |",
                  "|---|---|---|---|---|"]
        for res in runs:
            keeps, why = am.keeps_accuracy(res, default)
            verdict = reference if res is default else ("yes" if keeps else f"no ({why})")
            lines.append(f"| {label(res)} | {res.steps_to_target()} | {res.median_steps():g} | "
                         f"{am.TASKS[task].format(res.median_final())} | {verdict} |")
        lines.append("")
        print("\n".join(lines[-len(runs) - 5:]), flush=True)
    lines.append(f"Wall time {time.perf_counter() - t0:.0f} s.")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / out_name).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    inverse = device_defaults.CUDA.inverse
    return report(
        argv, "cuda_intervals.py",
        "K-FAC's CUDA default intervals against longer ones: steps to target", "cuda_intervals.md",
        lambda task, table: [am.Result(task, c, am.demo_hparams(task, c, table))
                             for c in (am.Config("kfac", f, t, inverse) for f, t in SETTINGS)],
        lambda res: f"F{res.config.factor_every} T{res.config.inverse_every} {inverse}",
        "reference")


if __name__ == "__main__":
    raise SystemExit(main())
