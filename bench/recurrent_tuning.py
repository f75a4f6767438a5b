"""Issue 25, second target: do K-FAC and the eigenbasis member (EKFAC) reach AdamW's 50-step
eval loss in fewer steps with the recurrent / depthwise Kronecker blocks than with the
diagonal fallback, each variant at its own tuned settings?

1. ``sweep`` (seed 0 only): for the byte-level LSTM and GRU language models (and the depthwise
   CNN), a small grid per optimizer and variant ("blocks": the recurrent layers in Kronecker
   blocks; "diagonal": their helper switched off, as before issue 25): K-FAC (eigen,
   inverse_every 5) lr x damping, without and with the KL clip, EKFAC lr. The score is the
   number of steps to AdamW's 50-step eval loss (eval every 5 steps, at most 100), ties broken
   by the eval loss at step 50. Every run is a CSV row; points already in ``--sweep-csv`` files
   are not rerun.
2. ``final`` (seeds 0, 1, 2): each variant at the best setting over the given sweep CSVs (seeds
   1 and 2 were not seen by the sweep; a task without sweep rows: K-FAC at the settings of
   ``bench/time_to_target.py``, EKFAC at its defaults), or every variant at ``--settings``
   (e.g. K-FAC's library defaults).
3. ``grid``: every setting of ``PAIRED`` (K-FAC's grid; EKFAC's lrs at both carries) at every
   given seed, the two variants at the same setting and seed: the comparison that depends on no
   one chosen setting (``bench/issue25_targets.py`` counts the pairs).

One thread; steps, not seconds, are compared. The data, models, AdamW settings and the eval
are those of ``bench/time_to_target.py`` (``--bn-eval batch``: the digits CNN evaluated with
BatchNorm on the validation batch's statistics instead of its running ones, AdamW's target
included; bench/results/recurrent_kfac_diagnosis.md).

    python bench/recurrent_tuning.py sweep --csv bench/results/recurrent_tuning_sweep.csv
    python bench/recurrent_tuning.py final --sweep-csv bench/results/recurrent_tuning_sweep.csv \
        --csv bench/results/recurrent_tuning_final.csv
    python bench/recurrent_tuning.py final --optimizers K-FAC --csv FINAL.csv \
        --settings '{"lr": 0.01, "damping": 0.001, "kl_clip": 0.001}'
    python bench/recurrent_tuning.py grid --tasks LSTM --seeds 0 1 2 3 4 --csv GRID.csv
    python bench/recurrent_tuning.py report --sweep-csv SWEEP.csv ... --csv FINAL.csv ...
    python bench/recurrent_tuning.py resolutions --csv FINAL.csv FINAL_EVAL1.csv  # side by side
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import time_to_target as ttt  # noqa: E402
from coverage import stdlib_text, windows  # noqa: E402
from grng.demo.data import load_digits_splits  # noqa: E402

# K-FAC: with the damping d above most factor eigenvalues the step is about (lr / d) times
# the gradient (and the diagonal fallback's g / (D + d) is then SGD at lr / d), so the learning
# rates scale with d
GRIDS = {
    "K-FAC": [dict(lr=0.4, damping=0.1), dict(lr=0.8, damping=0.1),
              dict(lr=0.02, damping=0.01), dict(lr=0.05, damping=0.01),
              dict(lr=0.005, damping=0.001), dict(lr=0.01, damping=0.001),
              # added after the first pass: the GRU with blocks diverged at every setting above
              # but the first, and lr 0.2 at damping 0.1 had reached the target before
              dict(lr=0.1, damping=0.1), dict(lr=0.2, damping=0.1),
              # the KL clip (the library's default kl_clip=1e-3, and 1e-2): the blocks' first
              # steps overshoot while G grows by 1e3 (bench/results/recurrent_kfac_diagnosis.md)
              *(dict(s, kl_clip=clip) for clip in (1e-3, 1e-2) for s in (
                  dict(lr=0.01, damping=0.001), dict(lr=0.03, damping=0.001),
                  dict(lr=0.05, damping=0.01), dict(lr=0.4, damping=0.1))),
              # added after the clipped final: the LSTM's blocks tied the fallback at its best
              # clipped point, whose lr (0.03) and clip (1e-2) were at the grid's edge
              dict(lr=0.1, damping=0.001, kl_clip=1e-2), dict(lr=0.01, damping=0.001, kl_clip=3e-2),
              dict(lr=0.03, damping=0.001, kl_clip=3e-2), dict(lr=0.1, damping=0.001, kl_clip=3e-2)],
    "EKFAC": [dict(lr=0.003), dict(lr=0.01),
              dict(lr=0.03)],  # added after the first pass: 0.01 was the best, at the edge
}
#: the ``grid`` stage's settings: K-FAC's whole grid; EKFAC's lrs at both carries ("keep" is the
#: one the README names for recurrent models)
PAIRED = {"K-FAC": GRIDS["K-FAC"],
          "EKFAC": [dict(s, carry=carry) for carry in ("reproject", "keep")
                    for s in GRIDS["EKFAC"]]}
FIELDS = ["stage", "task", "seed", "optimizer", "variant", "settings", "target", "steps",
          "eval_at_50", "curve", "error"]


def _load() -> None:
    torch.set_num_threads(1)
    ttt._TEXT.update(stdlib_text())
    ttt._EVAL = windows(ttt._TEXT["valid"], 64, torch.Generator().manual_seed(1234))
    ttt._DIGITS = load_digits_splits()


def _row(stage: str, task: str, seed: int, optimizer: str, variant: str, settings: dict,
         target: float) -> dict:
    error = ""
    try:
        curve = ttt.run(task, seed, optimizer, off=variant == "diagonal", settings=settings,
                        until=target)
    except RuntimeError as err:  # recorded (a failing optimizer), not a stopped benchmark
        curve, error = {}, f"{type(err).__name__}: {str(err).splitlines()[0]}"
    steps = ttt.steps_to(curve, target)
    return dict(stage=stage, task=task, seed=seed, optimizer=optimizer, variant=variant,
                settings=repr(settings), target=f"{target:.4f}", steps=steps or "",
                eval_at_50=f"{curve.get(ttt.TARGET_STEP, float('nan')):.4f}",
                curve=" ".join(f"{s}:{v:.4f}" for s, v in sorted(curve.items())), error=error)


def _score(row: dict) -> tuple[float, float]:
    steps = float(row["steps"]) if row["steps"] else float("inf")
    return steps, float(row["eval_at_50"]) if row["eval_at_50"] != "nan" else float("inf")


def _write(path: Path, rows: list[dict], fields: list[str] = FIELDS) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        w.writerows(rows)


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def sweep(path: Path, tasks: list[str], optimizers: list[str], known: list[Path]) -> None:
    """Every grid point of every task on seed 0 (points already in ``path`` are kept, those in
    ``known`` not rerun)."""
    rows = _read(path)
    done = {(r["task"], r["optimizer"], r["variant"], r["settings"])
            for r in rows + [r for p in known for r in _read(p)]}
    for task in tasks:
        target = ttt.run(task, 0, "AdamW")[ttt.TARGET_STEP]
        for optimizer in optimizers:
            for variant, settings in itertools.product(("blocks", "diagonal"), GRIDS[optimizer]):
                if (task, optimizer, variant, repr(settings)) in done:
                    continue
                rows.append(_row("sweep", task, 0, optimizer, variant, settings, target))
                print(rows[-1]["task"], optimizer, variant, settings, rows[-1]["steps"],
                      rows[-1]["eval_at_50"], flush=True)
                _write(path, rows)


def best(paths: list[Path]) -> dict[tuple[str, str, str], dict]:
    """(task, optimizer, variant) -> the best settings of the sweeps."""
    out: dict[tuple[str, str, str], tuple] = {}
    for row in (r for p in paths for r in _read(p)):
        key = (row["task"], row["optimizer"], row["variant"])
        if key not in out or _score(row) < out[key][0]:
            out[key] = (_score(row), row["settings"])
    return {k: eval(v[1]) for k, v in out.items()}  # noqa: S307 (our own repr of a dict)


def final(path: Path, sweep_paths: list[Path], tasks: list[str], seeds: list[int],
          optimizers: list[str], fixed: dict | None = None) -> None:
    """Each (task, optimizer, variant) at the best settings of the sweeps, or every one at
    ``fixed``."""
    chosen = best(sweep_paths or [])
    rows: list[dict] = []
    for task, seed in itertools.product(tasks, seeds):
        target = ttt.run(task, seed, "AdamW")[ttt.TARGET_STEP]
        for optimizer, variant in itertools.product(optimizers, ("blocks", "diagonal")):
            settings = fixed if fixed is not None else chosen.get((task, optimizer, variant), {})
            rows.append(_row("final", task, seed, optimizer, variant, settings, target))
            print(task, seed, optimizer, variant, settings, rows[-1]["steps"],
                  rows[-1]["eval_at_50"], flush=True)
            _write(path, rows)


def grid(path: Path, tasks: list[str], seeds: list[int], optimizers: list[str]) -> None:
    """Every ``PAIRED`` setting at every seed, both variants at the same setting (rows already
    in ``path`` are kept, not rerun)."""
    rows = _read(path)
    done = {(r["task"], r["seed"], r["optimizer"], r["variant"], r["settings"]) for r in rows}
    for task, seed in itertools.product(tasks, seeds):
        target = None
        for optimizer in optimizers:
            for settings, variant in itertools.product(PAIRED[optimizer], ("blocks", "diagonal")):
                if (task, str(seed), optimizer, variant, repr(settings)) in done:
                    continue
                if target is None:
                    target = ttt.run(task, seed, "AdamW")[ttt.TARGET_STEP]
                rows.append(_row("grid", task, seed, optimizer, variant, settings, target))
                print(task, seed, optimizer, variant, settings, rows[-1]["steps"],
                      rows[-1]["eval_at_50"], flush=True)
                _write(path, rows)


def _steps(row: dict) -> str:
    if row.get("error"):
        return f"error: {row['error']}"
    return row.get("steps") or "> 100"


def report(sweep_paths: list[Path], final_paths: list[Path]) -> str:
    """The sweep and final tables (markdown) from the CSVs."""
    sweep_rows = [r for p in sweep_paths for r in _read(p)]
    final_rows = [r for p in final_paths for r in _read(p)]
    lines = ["## Sweep (seed 0): steps to AdamW's 50-step eval loss (empty: not within 100)", "",
             "| task | optimizer | settings | blocks: steps | blocks: eval @ 50 | diagonal: steps "
             "| diagonal: eval @ 50 |", "|---|---|---|---|---|---|---|"]
    cells: dict[tuple[str, str, str], dict[str, dict]] = {}
    for r in sweep_rows:
        cells.setdefault((r["task"], r["optimizer"], r["settings"]), {})[r["variant"]] = r
    for (task, optimizer, settings), v in cells.items():
        b, d = v.get("blocks", {}), v.get("diagonal", {})
        lines.append(f"| {task} | {optimizer} | {settings} | {b.get('steps', '?') or '-'} | "
                     f"{b.get('eval_at_50', '?')} | {d.get('steps', '?') or '-'} | "
                     f"{d.get('eval_at_50', '?')} |")
    lines += ["", "## Final (seeds 0, 1, 2; each variant at its best sweep setting)", "",
              "| task | seed | AdamW eval @ 50 (target) | optimizer | blocks: steps (settings) | "
              "diagonal: steps (settings) | blocks: eval @ 50 | diagonal: eval @ 50 |",
              "|---|---|---|---|---|---|---|---|"]
    pairs: dict[tuple[str, str, str], dict[str, dict]] = {}
    for r in final_rows:
        pairs.setdefault((r["task"], r["seed"], r["optimizer"]), {})[r["variant"]] = r
    for (task, seed, optimizer), v in pairs.items():
        b, d = v.get("blocks", {}), v.get("diagonal", {})
        lines.append(f"| {task} | {seed} | {b.get('target', d.get('target', '?'))} | {optimizer} | "
                     f"{_steps(b)} ({b.get('settings', '?')}) | "
                     f"{_steps(d)} ({d.get('settings', '?')}) | "
                     f"{b.get('eval_at_50', '?')} | {d.get('eval_at_50', '?')} |")
    return "\n".join(lines) + "\n"


def _count(pairs: list[tuple[int, int]]) -> str:
    """'blocks fewer on a, more on b, tied on c of n seeds' over (blocks, diagonal) steps."""
    fewer = sum(b < d for b, d in pairs)
    more = sum(b > d for b, d in pairs)
    return (f"blocks fewer on {fewer}, more on {more}, tied on {len(pairs) - fewer - more} of "
            f"{len(pairs)} seeds")


def resolutions(coarse: Path, fine: Path) -> str:
    """Two ``final`` CSVs of one optimizer at two eval resolutions (the bench's, every step) side
    by side, per task and seed, and what they say (counted, medians): the blocks against the
    diagonal fallback in steps to the target and in the eval loss at step 50."""
    runs = {(r["task"], r["seed"], r["variant"], which): r
            for which, path in (("coarse", coarse), ("fine", fine)) for r in _read(path)}
    keys = sorted({(t, s) for t, s, _, _ in runs}, key=lambda k: (k[0] != "LSTM", k[0], int(k[1])))
    lines = ["| model | seed | blocks: steps (bench's eval) | diagonal: steps (bench's eval) | "
             "blocks: steps (eval every step) | diagonal: steps (every step) | blocks eval @50 | "
             "diagonal eval @50 |", "|---|---|---|---|---|---|---|---|"]
    for task, seed in keys:
        r = {(v, w): runs[(task, seed, v, w)] for v in ("blocks", "diagonal")
             for w in ("coarse", "fine")}
        lines.append(f"| {task} | {seed} | {_steps(r['blocks', 'coarse'])} | "
                     f"{_steps(r['diagonal', 'coarse'])} | {_steps(r['blocks', 'fine'])} | "
                     f"{_steps(r['diagonal', 'fine'])} | {r['blocks', 'coarse']['eval_at_50']} | "
                     f"{r['diagonal', 'coarse']['eval_at_50']} |")
    lines += ["", "Reading (counted from the CSVs): steps to the target, blocks against the "
              "diagonal fallback,"]
    lower = total = 0
    for which, name in (("coarse", "the bench's eval"), ("fine", "eval every step")):
        for task in dict.fromkeys(t for t, _ in keys):
            seeds = [s for t, s in keys if t == task]
            pairs = [(int(runs[(task, s, "blocks", which)]["steps"] or 101),
                      int(runs[(task, s, "diagonal", which)]["steps"] or 101)) for s in seeds]
            med = [statistics.median(x) for x in zip(*pairs)]
            lines.append(f"- {task}, {name}: median {med[0]:g} vs {med[1]:g}; {_count(pairs)}.")
    for task, seed in keys:
        total += 1
        lower += (float(runs[(task, seed, "blocks", "coarse")]["eval_at_50"])
                  < float(runs[(task, seed, "diagonal", "coarse")]["eval_at_50"]))
    lines.append(f"- Eval loss at step 50 lower with the blocks on {lower} of {total} runs.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("sweep", "final", "grid", "report", "resolutions"))
    parser.add_argument("--csv", type=Path, nargs="+", required=True,
                        help="the output CSV (report: the final CSVs)")
    parser.add_argument("--sweep-csv", type=Path, nargs="+",
                        help="sweep CSVs (final: the settings are the best over all of them; "
                        "sweep: their points are not rerun)")
    parser.add_argument("--tasks", nargs="+")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", type=json.loads,
                        help='final: every variant at these settings (JSON, e.g. K-FAC\'s '
                        'defaults \'{"lr": 0.01, "damping": 0.001, "kl_clip": 0.001}\')')
    parser.add_argument("--eval-every", type=int, default=ttt.EVAL_EVERY,
                        help="steps between evals (the target's resolution; default %(default)s)")
    parser.add_argument("--bn-eval", choices=("running", "batch"), default="running",
                        help="digits CNN: BatchNorm on its running statistics in the eval (the "
                        "default) or on the validation batch's own")
    parser.add_argument("--optimizers", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    args = parser.parse_args(argv)
    if args.stage == "report":
        print(report(args.sweep_csv or [], args.csv))
        return
    if args.stage == "resolutions":
        print(resolutions(*args.csv), end="")
        return
    _load()
    ttt.EVAL_EVERY = args.eval_every
    ttt.BN_EVAL[0] = args.bn_eval
    if args.stage == "grid":
        grid(args.csv[0], args.tasks or ["LSTM", "GRU", "digits CNN"], args.seeds,
             args.optimizers)
    elif args.stage == "sweep":
        sweep(args.csv[0], args.tasks or ["LSTM", "GRU"], args.optimizers, args.sweep_csv or [])
    else:
        final(args.csv[0], args.sweep_csv, args.tasks or ["LSTM", "GRU", "digits CNN"],
              args.seeds, args.optimizers, args.settings)


if __name__ == "__main__":
    main()
