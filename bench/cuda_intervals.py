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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import amortization as am  # noqa: E402

from grng.benchmark.schema import run_header  # noqa: E402
from grng.optim import device_defaults  # noqa: E402

#: (F, T) with the CUDA default's inverse; the first is the reference (the CUDA default before
#: F = 4 was chosen from this measurement)
SETTINGS: tuple[tuple[int, int], ...] = ((2, 20), (2, 40), (4, 20), (4, 40))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="transformer,cnn,mlp")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    table = am.load_hparams(am.HPARAMS_PATH)
    t0 = time.perf_counter()
    lines = ["# K-FAC's CUDA default intervals against longer ones: steps to target "
             "(`python bench/cuda_intervals.py`)", "",
             "Written by the script (module docstring). Steps to target are deterministic; the "
             "machine was shared (2 cores), which changes only the wall time.", "",
             *(f"- {k}: {v}" for k, v in run_header(1).items()),
             f"- command: python bench/cuda_intervals.py {' '.join(sys.argv[1:] if argv is None else argv)}",
             ""]
    inverse = device_defaults.CUDA.inverse
    for task in args.tasks.split(","):
        results = [am.Result(task, c, am.demo_hparams(task, c, table))
                   for c in (am.Config("kfac", f, t, inverse) for f, t in SETTINGS)]
        am.train_all(task, results, list(range(am.FIRST_SEED, am.FIRST_SEED + args.seeds)), None,
                     am.log)
        default = results[0]
        lines += [f"## {task} (target {am.TASKS[task].target}, evaluated every "
                  f"{am.EVAL_EVERY[task]} steps; {args.seeds} seeds)", "",
                  "| setting | steps to target per seed | median | final (median) | keeps accuracy |",
                  "|---|---|---|---|---|"]
        for res in results:
            keeps, why = am.keeps_accuracy(res, default)
            verdict = "reference" if res is default else ("yes" if keeps else f"no ({why})")
            lines.append(f"| F{res.config.factor_every} T{res.config.inverse_every} {inverse} | "
                         f"{res.steps_to_target()} | {res.median_steps():g} | "
                         f"{am.TASKS[task].format(res.median_final())} | {verdict} |")
        lines.append("")
    lines.append(f"Wall time {time.perf_counter() - t0:.0f} s.")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cuda_intervals.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
