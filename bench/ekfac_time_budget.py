"""What EKFAC's time to 3.7 bpc on the demo transformer is made of, against AdamW's (issue 21's
time target: at most 1.3x AdamW's at its best lr).

    python bench/ekfac_time_budget.py [--rounds 3]   # writes bench/results/ekfac_time_budget.md

Each round trains, from the same initialization and batches (the demo's loop, seed 100, one
torch thread, CPU time of each ``stepper.step``), EKFAC at its defaults for the 125 steps it
needs to reach 3.7 bpc, EKFAC folding every step (``factor_every=1``, the default before) for
the same 125, and AdamW at lr 1e-2 for its 225 (bench/results/ekfac_time.md). An EKFAC step is a
refresh step when its schedule refreshes the bases (``EKFAC.refresh_due``). Reported, medians
over the rounds: the steady step (the mean of the other steps from step 30, folding or not),
the refresh's extra cost (the median refresh step after step 0 minus the steady step), their
counts, the totals, the total without the refreshes' extra cost (total - refreshes x extra), and the
refreshes the 1.3x bar leaves at that extra cost: (1.3 x AdamW's total - the total without
them) / extra.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grng.benchmark.schema import load_text, run_header  # noqa: E402

RESULTS = ROOT / "bench" / "results"
EKFAC_STEPS, ADAMW_STEPS, BAR = 125, 225, 1.3  # steps to 3.7 bpc (ekfac_time.md); the target
#: (label, demo optimizer key, hyperparameters, steps)
RUNS = [("EKFAC defaults", "ekfac", {"lr": 1e-2}, EKFAC_STEPS),
        ("EKFAC factor_every 1", "ekfac", {"lr": 1e-2, "factor_every": 1}, EKFAC_STEPS),
        ("AdamW lr 1e-2", "adamw", {"lr": 1e-2}, ADAMW_STEPS)]


def step_times(key: str, hp: dict, steps: int) -> tuple[list[float], object]:
    """CPU ms of each of ``steps`` training steps of the demo transformer (seed 100), and the
    stepper's optimizer."""
    from grng.demo.models import make_model
    from grng.demo.optimizers import make_stepper
    from grng.demo.tasks import TASKS, load_data

    task, train = TASKS["transformer"], load_data("text").train
    torch.manual_seed(100)
    model = make_model("transformer")
    stepper = make_stepper(key, model, hp, seed=100,
                           batch_size=task.batch_size * train.y[0].numel())
    order = torch.Generator().manual_seed(10_100)
    perm = torch.randperm(len(train), generator=order)
    out = []
    for s in range(steps):
        idx = perm[s * task.batch_size:(s + 1) * task.batch_size]
        xb, yb = train.x[idx], train.y[idx]
        t = time.process_time()
        stepper.step(xb, yb)
        out.append(1000.0 * (time.process_time() - t))
    return out, stepper.optimizer


def _spread(mine: list[dict], adamw: list[dict]) -> str:
    """min-max over the rounds of each round's total over that round's AdamW total."""
    ratios = [m["total"] / a["total"] for m, a in zip(mine, adamw)]
    return f"rounds {min(ratios):.2f}-{max(ratios):.2f}x"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    start = os.getloadavg()
    per: dict[str, list[dict]] = {label: [] for label, *_ in RUNS}
    for _ in range(args.rounds):
        for label, key, hp, steps in RUNS:
            ms, opt = step_times(key, hp, steps)
            row = {"total": sum(ms)}
            if key == "ekfac":
                due = [opt.refresh_due(s) for s in range(steps)]
                steady = statistics.fmean([t for s, t in enumerate(ms) if s >= 30 and not due[s]])
                refresh = [t for s, t in enumerate(ms) if s > 0 and due[s]]
                extra = statistics.median(refresh) - steady
                row.update(steady=steady, extra=extra, refreshes=sum(due))
            per[label].append(row)
    loads = load_text(start, os.getloadavg())
    med = {label: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
           for label, rows in per.items()}
    adamw = med["AdamW lr 1e-2"]["total"]
    lines = ["# EKFAC's time to 3.7 bpc, decomposed (`python bench/ekfac_time_budget.py`)", "",
             *[f"- {k}: {v}" for k, v in run_header(1).items()],
             f"- {args.rounds} rounds, seed 100, CPU time per step; {loads}", "",
             __doc__.split("\n\n")[2].replace("\n", " ").replace("``", "`")
             .replace(":func:", ""), "",
             f"AdamW lr 1e-2, {ADAMW_STEPS} steps: **{adamw / 1000:.2f} s** "
             f"({adamw / ADAMW_STEPS:.1f} ms per step).", "",
             "| EKFAC | steady step ms (x AdamW's) | refreshes in 125 steps | extra ms per refresh "
             "| total s | x AdamW's time | without the refreshes' extra | refreshes the 1.3x bar "
             "leaves |",
             "|---|---|---|---|---|---|---|---|"]
    for label in ("EKFAC defaults", "EKFAC factor_every 1"):
        m = med[label]
        base = m["total"] - m["refreshes"] * m["extra"]
        budget = (BAR * adamw - base) / m["extra"]
        lines.append(f"| {label} | {m['steady']:.1f} ({m['steady'] / (adamw / ADAMW_STEPS):.2f}x)"
                     f" | {m['refreshes']:.0f} | {m['extra']:.1f} | {m['total'] / 1000:.2f} | "
                     f"{m['total'] / adamw:.2f}x ({_spread(per[label], per['AdamW lr 1e-2'])}) | "
                     f"{base / adamw:.2f}x | "
                     f"{max(budget, 0.0):.0f} |")
    (RESULTS / "ekfac_time_budget.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
