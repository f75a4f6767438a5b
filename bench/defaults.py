"""The defaults benchmark: every optimizer at its defaults, only the learning rate swept.

    python bench/defaults.py                          # all tasks, 3 seeds (2 on the transformer)
    python bench/defaults.py --tasks mlp --seeds 1 --max-steps 8 --out /tmp/d --no-hparams

Each optimizer of the demo (grng.demo.optimizers.SPECS: grng's, torch's and the peers Sophia,
SOAP and PSGD-Kron) trains each demo task (grng.demo.tasks.TASKS) at its defaults with each of
its three learning rates (base / 3, base, 3 base) and every seed, evaluated on the validation
split (grng.demo.sweep). Writes, under ``--out`` (default bench/results):

- ``defaults.csv``: rows of the one benchmark schema (grng.benchmark.schema), one quantity per
  row per (task, optimizer, lr): final validation metric (median, p20/p80 over seeds), failed
  runs, steps and seconds to the task's target (median over the seeds that reached it; ``n``
  says how many), ms per step, final full-batch gradient norm;
- ``defaults.md``: the tables, the speed and final choices of learning rate, and the two target
  checks (no grng optimizer diverges; RING and R-Kalman at their best learning rate reach the
  target in fewer steps and no more seconds than AdamW, Sophia, SOAP and PSGD-Kron);
- ``grng/demo/hparams.json`` (unless ``--no-hparams``): the learning rate the demo uses for each
  task and optimizer (best median final validation metric).

Timings are training time only on one torch thread; the machine's load average is recorded at
the start and the end, since other jobs share the CPU.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grng.benchmark.schema import (Row, environment, load_text, replace_rows,  # noqa: E402
                                   run_header)
from grng.demo.optimizers import OPTIMIZERS, SPECS  # noqa: E402
from grng.demo.sweep import (HPARAMS_PATH, Cell, best_for_final, best_for_speed,  # noqa: E402
                             cells_of, hparams_table, run_sweep, save_hparams, sweep_meta)
from grng.demo.tasks import TASKS  # noqa: E402

SUITE = "defaults"
GRNG_KEYS = tuple(k for k, spec in SPECS.items() if spec.family == "grng")
CHALLENGERS = ("ring", "rkalman")
PEERS = ("adamw", "sophia", "soap", "psgd")
DEFAULT_SEEDS = {"cnn": [100, 101, 102], "mlp": [100, 101, 102], "transformer": [100, 101]}


def _quantiles(values: list[float]) -> tuple[float | None, float | None, float | None]:
    """(p50, p20, p80) of the values (None when empty)."""
    if not values:
        return None, None, None
    s = sorted(values)

    def q(f: float) -> float:
        pos = f * (len(s) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    return statistics.median(s), q(0.2), q(0.8)


def rows_of(cells: list[Cell], env: dict[str, str], config: str) -> list[Row]:
    """The benchmark rows of every cell (module docstring)."""
    rows = []
    for c in cells:
        task = TASKS[c.task]
        base = dict(suite=SUITE, name=f"{c.task}/{c.optimizer}", provider=SPECS[c.optimizer].label,
                    x_name="lr", x_value=f"{c.lr:g}", dtype="float32", config=config, **env)
        if c.unavailable:
            rows.append(Row(metric="unavailable", unit="runs", p50=float(len(c.runs)),
                            n=len(c.runs), **{**base, "config": config + "; " + c.runs[0].message}))
            continue
        n = len(c.runs)
        unit = "%" if task.metric == "acc" else "bpc"
        scale = 100.0 if task.metric == "acc" else 1.0
        p50, p20, p80 = _quantiles([scale * v for v in c.final()])
        rows.append(Row(metric=f"final_val_{task.metric}", unit=unit, p50=p50, p20=p20, p80=p80,
                        n=len(c.final()), **base))
        rows.append(Row(metric="failed_runs", unit="runs", p50=float(c.failed), n=n, **base))
        hits = [t for t in c.to_target() if t is not None]
        target = f"target {task.level_name(task.target)}"
        for i, (metric, unit_t) in enumerate((("steps_to_target", "steps"),
                                              ("seconds_to_target", "s"))):
            p50, p20, p80 = _quantiles([h[i] for h in hits])
            rows.append(Row(metric=metric, unit=unit_t, p50=p50, p20=p20, p80=p80, n=len(hits),
                            **{**base, "config": f"{config}; {target}; reached {len(hits)}/{n}"}))
        p50, p20, p80 = _quantiles([1000.0 * r.wall_s / r.steps for r in c.runs if r.steps])
        rows.append(Row(metric="step_time", unit="ms", p50=p50, p20=p20, p80=p80, n=n, **base))
        p50, p20, p80 = _quantiles([r.grad_norm for r in c.runs if math.isfinite(r.grad_norm)])
        rows.append(Row(metric="final_grad_norm", unit="", p50=p50, p20=p20, p80=p80, n=n, **base))
    return rows


def _fmt(x: float, digits: int = 2) -> str:
    return "—" if not math.isfinite(x) else f"{x:.{digits}f}"


def task_table(cells: list[Cell], task_key: str) -> list[str]:
    """The Markdown table of one task: every optimizer and learning rate."""
    task = TASKS[task_key]
    lines = [f"| Optimizer | lr | final val {task.metric} (median) | failed | steps→target | "
             f"s→target | ms/step |", "|---|---|---|---|---|---|---|"]
    for key in OPTIMIZERS:
        for c in cells_of(cells, task_key, key):
            if c.unavailable:
                lines.append(f"| {SPECS[key].label} | {c.lr:g} | — | — | — | — | — "
                             f"({c.runs[0].message}) |")
                continue
            steps, secs = c.median_to_target()
            reached = sum(t is not None for t in c.to_target())
            frac = "" if reached == len(c.runs) else f" ({reached}/{len(c.runs)})"
            lines.append(
                f"| {SPECS[key].label} | {c.lr:g} | {task.format(c.median_final())} | "
                f"{c.failed}/{len(c.runs)} | {_fmt(steps, 0)}{frac if reached else ''} | "
                f"{_fmt(secs)}{frac if reached else ''} | {_fmt(c.ms_per_step(), 1)} |")
    return lines


def target_checks(cells: list[Cell], tasks: list[str]) -> list[str]:
    """The two targets of docs/defaults.md, checked cell by cell, as Markdown lines."""
    lines = ["### Target 1: no grng optimizer diverges at its defaults, at any swept lr", ""]
    bad = [c for c in cells if c.optimizer in GRNG_KEYS and c.failed]
    if bad:
        lines += [f"- **does not hold**: {c.task} / {SPECS[c.optimizer].label} lr={c.lr:g}: "
                  f"{c.diverged} diverged, {c.failed - c.diverged} errors of {len(c.runs)}"
                  for c in bad]
    else:
        n = sum(len(c.runs) for c in cells if c.optimizer in GRNG_KEYS)
        lines.append(f"- **holds**: 0 of {n} runs of K-FAC, RING, RENG, R-Kalman, F-GR and SAM "
                     "diverged or failed.")
    lines += ["", "### Target 2: RING and R-Kalman at their best lr reach the target in fewer "
              "steps AND no more seconds than AdamW, Sophia, SOAP and PSGD-Kron", "",
              "Best lr = the lr whose every seed reached the target in the fewest median steps "
              "(ties: seconds).", "",
              "| Task | Optimizer | best lr | steps | s | " +
              " | ".join(SPECS[p].label for p in PEERS) + " | holds |",
              "|---|---|---|---|---|" + "---|" * len(PEERS) + "---|"]
    for task_key in tasks:
        peer_best = {p: best_for_speed(cells_of(cells, task_key, p)) for p in PEERS}
        for key in CHALLENGERS:
            mine = best_for_speed(cells_of(cells, task_key, key))
            verdicts, cols = [], []
            for p in PEERS:
                other = peer_best[p]
                if other is None:
                    avail = not all(c.unavailable for c in cells_of(cells, task_key, p))
                    cols.append("never" if avail else "n/a")
                    verdicts.append(mine is not None if avail else True)
                    continue
                s2, t2 = other.median_to_target()
                cols.append(f"{s2:.0f} / {t2:.2f} s (lr {other.lr:g})")
                if mine is None:
                    verdicts.append(False)
                else:
                    s1, t1 = mine.median_to_target()
                    verdicts.append(s1 < s2 and t1 <= t2)
            if mine is None:
                head = "— | never | —"
            else:
                s1, t1 = mine.median_to_target()
                head = f"{mine.lr:g} | {s1:.0f} | {t1:.2f}"
            lines.append(f"| {task_key} | {SPECS[key].label} | {head} | " + " | ".join(cols) +
                         f" | {'yes' if all(verdicts) else 'no'} |")
    return lines


def write_markdown(path: Path, cells: list[Cell], tasks: list[str], seeds: dict[str, list[int]],
                   machine: dict[str, str], elapsed: float) -> None:
    text = ["# Defaults benchmark (`python bench/defaults.py`)", "",
            "Every optimizer at its defaults; only the learning rate swept (base/3, base, 3 base). "
            "Metrics on the **validation** split; medians over seeds; seconds are training time "
            "only, on one torch thread, while other jobs shared the CPU (load below). "
            "Written by the script; see docs/defaults.md for the reading.", ""]
    text += [f"- {k}: {v}" for k, v in machine.items()]
    text += [f"- seeds: {seeds}", f"- total wall time: {elapsed:.0f} s", ""]
    for task_key in tasks:
        task = TASKS[task_key]
        text += [f"## {task_key} ({task.dataset}, {task.epochs} epoch(s) of batch "
                 f"{task.batch_size}; target {task.level_name(task.target)} on validation)", ""]
        text += task_table(cells, task_key) + [""]
        choice = ["| Optimizer | speed lr | final lr |", "|---|---|---|"]
        for key in OPTIMIZERS:
            mine = cells_of(cells, task_key, key)
            if not mine:
                continue
            s, f = best_for_speed(mine), best_for_final(mine)
            choice.append(f"| {SPECS[key].label} | {'—' if s is None else f'{s.lr:g}'} | "
                          f"{'—' if f is None else f'{f.lr:g}'} |")
        text += ["Learning rate chosen per optimizer (speed: fewest steps to target with every "
                 "seed there; final: best median final metric, used by the demo):", ""]
        text += choice + [""]
    text += ["## Targets", ""] + target_checks(cells, tasks) + [""]
    path.write_text("\n".join(text) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds per task (default: 3 on digits, 2 on the transformer)")
    p.add_argument("--max-steps", type=int, default=None, help="cap every run (smoke tests)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--no-hparams", action="store_true",
                   help="do not write grng/demo/hparams.json")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = [t for t in args.tasks.split(",") if t]
    optimizers = [o for o in args.optimizers.split(",") if o]
    unknown = [t for t in tasks if t not in TASKS] + [o for o in optimizers if o not in SPECS]
    if unknown:
        raise SystemExit(f"unknown task or optimizer: {unknown}")
    seeds = {t: (DEFAULT_SEEDS[t] if args.seeds is None else list(range(100, 100 + args.seeds)))
             for t in tasks}
    load_start = os.getloadavg()
    start = time.perf_counter()
    cells = run_sweep(tasks, optimizers, seeds, max_steps=args.max_steps,
                      log=lambda line: print(line, flush=True))
    elapsed = time.perf_counter() - start
    load_end = os.getloadavg()
    loads = load_text(load_start, load_end)
    env = environment("cpu")
    config = (f"defaults; validation split; seeds {len(next(iter(seeds.values())))}+; "
              f"max_steps {args.max_steps}; {loads}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "defaults.csv", out / "defaults.md"
    replace_rows(csv_path, rows_of(cells, env, config))
    machine = {**run_header(args.threads), "grng": env["grng"], "load": loads}
    write_markdown(md_path, cells, tasks, seeds, machine, elapsed)
    if not args.no_hparams:
        save_hparams(hparams_table(cells, sweep_meta(seeds, args.max_steps)), HPARAMS_PATH)
    print(f"wrote {csv_path}, {md_path}" + ("" if args.no_hparams else f", {HPARAMS_PATH}"))
    print(f"total {elapsed:.0f} s; {loads}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
