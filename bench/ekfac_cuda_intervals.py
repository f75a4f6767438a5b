"""Steps to target of EKFAC at longer fold / refresh intervals and with the CholeskyQR3 refresh
(on the CPU): the evidence behind EKFAC's CUDA defaults.

    python bench/ekfac_cuda_intervals.py [--tasks transformer,cnn,mlp] [--seeds 3]

The cost model (docs/performance.md) prices EKFAC's fold every F steps, its basis refresh every
T steps and the refresh's orthonormalization (Householder QR, or CholeskyQR3: GEMMs, the tensor
cores' work); this script measures what each costs in steps against EKFAC's CPU defaults
(F = 1, T = 10, Householder), as ``bench/cuda_intervals.py`` did for K-FAC: every setting of
:data:`SETTINGS` trains the demo tasks' budgets (``bench/amortization.py``'s phase 1: the demo's
learning rates, validation split, seeds from its first) and is judged against the first by
amortization's rule (:func:`amortization.keeps_accuracy`). Steps are deterministic, independent
of the machine's load. Writes ``bench/results/ekfac_cuda_intervals.md``.
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

#: (F, T, qr); the first is the reference (EKFAC's CPU defaults)
SETTINGS: tuple[tuple[int, int, str], ...] = (
    (1, 10, "householder"), (2, 20, "cholesky"), (4, 20, "cholesky"), (4, 50, "cholesky"),
    (4, 100, "cholesky"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="transformer,cnn,mlp")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    table = am.load_hparams(am.HPARAMS_PATH)
    t0 = time.perf_counter()
    lines = ["# EKFAC's intervals and refresh QR against its CPU defaults: steps to target "
             "(`python bench/ekfac_cuda_intervals.py`)", "",
             "Written by the script (module docstring). Steps to target are deterministic; the "
             "machine was shared (2 cores), which changes only the wall time.", "",
             *(f"- {k}: {v}" for k, v in run_header(1).items()),
             f"- command: python bench/ekfac_cuda_intervals.py "
             f"{' '.join(sys.argv[1:] if argv is None else argv)}", ""]
    for task in args.tasks.split(","):
        results = []
        for f, t, qr in SETTINGS:
            config = am.Config("ekfac", f, t)
            results.append(am.Result(task, config, {**am.demo_hparams(task, config, table),
                                                    "qr": qr}))
        am.train_all(task, results, list(range(am.FIRST_SEED, am.FIRST_SEED + args.seeds)), None,
                     am.log)
        default = results[0]
        lines += [f"## {task} (target {am.TASKS[task].target}, evaluated every "
                  f"{am.EVAL_EVERY[task]} steps; {args.seeds} seeds)", "",
                  "| setting | steps to target per seed | median | final (median) | keeps accuracy |",
                  "|---|---|---|---|---|"]
        for res in results:
            keeps, why = am.keeps_accuracy(res, default)
            verdict = "reference (CPU defaults)" if res is default else (
                "yes" if keeps else f"no ({why})")
            lines.append(f"| F{res.config.factor_every} T{res.config.inverse_every} "
                         f"{res.hp['qr']} | {res.steps_to_target()} | {res.median_steps():g} | "
                         f"{am.TASKS[task].format(res.median_final())} | {verdict} |")
        lines.append("")
        print("\n".join(lines[-len(results) - 5:]), flush=True)
    lines.append(f"Wall time {time.perf_counter() - t0:.0f} s.")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ekfac_cuda_intervals.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
