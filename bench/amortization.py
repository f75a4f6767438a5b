"""Amortization benchmark: does folding and refreshing the curvature less often keep time-to-accuracy?

    python bench/amortization.py                        # all tasks (about 15 min on 2 loaded cores)
    python bench/amortization.py --tasks mlp,cnn --seeds 3 --rounds 5
    python bench/amortization.py --quick --out /tmp/a   # smoke test: the MLP, a tiny grid

Issue 16 ("A fast step") allows amortization of a curvature step, ``factor_every`` F (fold the
Kronecker factors every F steps), ``inverse_every`` T (refresh the inverses every T steps) and
``inverse`` ("eigen": four GEMMs to apply; "cholesky": two, with factored Tikhonov damping), if
time-to-accuracy stays intact. On the demo's three tasks (:data:`grng.demo.tasks.TASKS`: data,
models, budgets and targets) and at the demo's learning rates (``grng/demo/hparams.json``), K-FAC,
RING and R-Kalman (F only: it has no inverse) run the library default and amortized settings;
AdamW is the reference. Two phases per task:

1. *Steps to target* (deterministic, independent of the machine's load): every configuration and
   seed trains the task's budget with :func:`grng.demo.train.train_run`, scored on the validation
   split every :data:`EVAL_EVERY` steps (finer than the demo's own interval, so that a few steps
   more or less show); the steps until the target is first reached and the final metric.
2. *ms per step*: one model and optimizer per configuration, all on the same minibatches, stepped
   round-robin in this process on one torch thread (the order rotates every round). Each round
   times, per configuration, one *period*: the least common multiple of every F and T in the task's
   grid, so each timed block holds its share of folds and refreshes (a per-step median would
   skip the periodic steps, which are the cost being amortized). ms/step is the median over rounds
   of the block mean; ratios to AdamW and to the default are medians of per-round ratios, so both
   sides of a ratio ran under the same load.

Seconds to target = median steps to target x ms/step. Writes ``amortization.csv`` (rows of the one
benchmark schema, :mod:`grng.benchmark.schema`, suite "amortization") and ``amortization.md`` (one
table per task and a reading: which settings keep time-to-accuracy by the rule of
:func:`keeps_accuracy`, and which one would be the new default) under ``--out``.
"""
from __future__ import annotations

import argparse
import inspect
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grng.benchmark.schema import (Row, environment, load_text, replace_rows,  # noqa: E402
                                   run_header)
from grng.demo.models import make_model  # noqa: E402
from grng.demo.optimizers import SPECS, make_stepper  # noqa: E402
from grng.demo.sweep import HPARAMS_PATH, hparams_for, load_hparams  # noqa: E402
from grng.demo.tasks import TASKS, Task, load_data  # noqa: E402
from grng.demo.train import RunResult, level_key, train_run  # noqa: E402
from grng.optim import device_defaults  # noqa: E402
from grng.optim.kfac import KFAC  # noqa: E402
from grng.optim.rkalman import RKalman  # noqa: E402

SUITE = "amortization"
KNOBS = ("factor_every", "inverse_every", "inverse")


def _signature_default(cls: type, name: str) -> Any:
    """The constructor's default of ``name``; None there means the device's default
    (grng.optim.device_defaults): the CPU's, where this benchmark runs."""
    default = inspect.signature(cls.__init__).parameters[name].default
    return getattr(device_defaults.CPU, name) if default is None else default


# The library defaults, read from the constructors (RING forwards these keywords to KFAC).
DEFAULT_KNOBS: dict[str, dict[str, Any]] = {
    "kfac": {k: _signature_default(KFAC, k) for k in KNOBS},
    "ring": {k: _signature_default(KFAC, k) for k in KNOBS},
    "rkalman": {"factor_every": _signature_default(RKalman, "factor_every")},
    "adamw": {},
}

# The (F, T, inverse) settings of K-FAC and RING and the F of R-Kalman compared, per task; the
# first is the library default of grng 0.2 (F1 T10 eigen), kept when the default changes. grid()
# puts the current default first and drops a setting equal to it. The transformer is the slowest
# task: fewer settings, the ones the digits tasks make candidates.
KRON_SETTINGS: dict[str, tuple[tuple[int, int, str], ...]] = {
    "mlp": ((1, 10, "eigen"), (2, 10, "eigen"), (4, 10, "eigen"), (1, 20, "eigen"),
            (1, 40, "eigen"), (1, 10, "cholesky"), (2, 20, "eigen"), (2, 20, "cholesky"),
            (4, 40, "cholesky")),
    "cnn": ((1, 10, "eigen"), (2, 10, "eigen"), (4, 10, "eigen"), (1, 20, "eigen"),
            (1, 40, "eigen"), (1, 10, "cholesky"), (2, 20, "eigen"), (2, 20, "cholesky"),
            (4, 40, "cholesky")),
    "transformer": ((1, 10, "eigen"), (2, 10, "eigen"), (4, 10, "eigen"), (1, 20, "eigen"),
                    (2, 20, "cholesky")),
}
KALMAN_SETTINGS: dict[str, tuple[int, ...]] = {"mlp": (1, 2, 4), "cnn": (1, 2, 4),
                                               "transformer": (1, 2, 4)}
# The transformer's RING runs only these: the settings that kept accuracy on both digits tasks in
# a first run (its K-FAC also runs a longer refresh period and the 2-GEMM inverse).
RING_TRANSFORMER = ((1, 10, "eigen"), (2, 10, "eigen"), (4, 10, "eigen"))
QUICK_KRON = ((1, 10, "eigen"), (2, 4, "cholesky"))
QUICK_KALMAN = (1, 2)

DEFAULT_SEEDS = {"mlp": 5, "cnn": 5, "transformer": 3}
FIRST_SEED = 100  # the defaults benchmark's first seed
# Validation every 2 steps on digits (the demo: 4) and 10 on the transformer (the demo: 25).
EVAL_EVERY = {"mlp": 2, "cnn": 2, "transformer": 10}
# Final-metric tolerance of keeps_accuracy: 2 of the 359 validation digits; 0.02 bits per char.
FINAL_TOLERANCE = {"acc": 2 / 359, "bpc": 0.02}


@dataclass(frozen=True)
class Config:
    """One optimizer with its amortization knobs (None: the knob does not apply)."""

    optimizer: str  # a key of grng.demo.optimizers.SPECS
    factor_every: int | None = None
    inverse_every: int | None = None
    inverse: str | None = None

    @property
    def knobs(self) -> dict[str, Any]:
        """The keywords this configuration passes to the optimizer's constructor."""
        return {k: getattr(self, k) for k in KNOBS if getattr(self, k) is not None}

    @property
    def is_default(self) -> bool:
        return self.knobs == DEFAULT_KNOBS[self.optimizer]

    @property
    def setting(self) -> str:
        """``F2 T20 cholesky``; ``F2`` for R-Kalman; empty for AdamW."""
        parts = []
        if self.factor_every is not None:
            parts.append(f"F{self.factor_every}")
        if self.inverse_every is not None:
            parts.append(f"T{self.inverse_every}")
        if self.inverse is not None:
            parts.append(self.inverse)
        return " ".join(parts)

    @property
    def label(self) -> str:
        return f"{SPECS[self.optimizer].label} {self.setting}".strip()

    @property
    def periods(self) -> tuple[int, ...]:
        return tuple(v for v in (self.factor_every, self.inverse_every) if v is not None)


def default_config(optimizer: str) -> Config:
    return Config(optimizer, **DEFAULT_KNOBS[optimizer])


def grid(task: str, quick: bool = False) -> list[Config]:
    """AdamW, then per optimizer its library default followed by the other settings of ``task``."""
    kron = QUICK_KRON if quick else KRON_SETTINGS[task]
    ring = QUICK_KRON if quick else (RING_TRANSFORMER if task == "transformer" else kron)
    kalman = QUICK_KALMAN if quick else KALMAN_SETTINGS[task]
    settings: dict[str, list[Config]] = {
        "kfac": [Config("kfac", f, t, inv) for f, t, inv in kron],
        "ring": [Config("ring", f, t, inv) for f, t, inv in ring],
        "rkalman": [Config("rkalman", f) for f in kalman],
    }
    out = [default_config("adamw")]
    for optimizer in ("kfac", "ring", "rkalman"):
        out.append(default_config(optimizer))
        out += [c for c in settings[optimizer] if not c.is_default]
    return out


def demo_hparams(task: str, config: Config, table: dict[str, Any] | None) -> dict[str, Any]:
    """The demo's hyperparameters for the task and optimizer (its learning rate from the
    validation sweep), plus the configuration's knobs."""
    hp, _ = hparams_for(table, task, config.optimizer)
    return {**hp, **config.knobs}


@dataclass
class Result:
    """Everything measured for one (task, configuration)."""

    task: str
    config: Config
    hp: dict[str, Any]  # the optimizer's keywords: demo_hparams
    runs: list[RunResult] = field(default_factory=list)
    block_ms: list[float] = field(default_factory=list)  # ms/step of each timing round
    ratio_adamw: list[float] = field(default_factory=list)  # per round, same-round AdamW
    ratio_default: list[float] = field(default_factory=list)  # per round, same-round default
    timing_nonfinite: int = 0  # non-finite losses met while timing (would make steps cheaper)

    @property
    def spec_task(self) -> Task:
        return TASKS[self.task]

    @property
    def lr(self) -> float:
        return float(self.hp["lr"])

    @property
    def failed(self) -> int:
        return sum(r.status in ("diverged", "error") for r in self.runs)

    def steps_to_target(self) -> list[int | None]:
        key = level_key(self.spec_task.target)
        return [None if r.reached.get(key) is None else int(r.reached[key][0]) for r in self.runs]

    @property
    def reached(self) -> int:
        return sum(s is not None for s in self.steps_to_target())

    def median_steps(self) -> float:
        """Median steps to target over the seeds that reached it (NaN when none did)."""
        hits = [s for s in self.steps_to_target() if s is not None]
        return float(statistics.median(hits)) if hits else float("nan")

    def finals(self) -> list[float]:
        return [r.final_metric for r in self.runs if math.isfinite(r.final_metric)]

    def median_final(self) -> float:
        vals = self.finals()
        return statistics.median(vals) if vals and not self.failed else float("nan")

    def ms_per_step(self) -> float:
        return statistics.median(self.block_ms) if self.block_ms else float("nan")

    def seconds_to_target(self) -> float:
        return self.median_steps() * self.ms_per_step() / 1000.0

    def seconds_ratio(self, adamw: Result) -> float:
        """Seconds to target over AdamW's, taken under the same load: the ratio of median steps
        times the median per-round ms/step ratio."""
        return self.median_steps() / adamw.median_steps() * _median(self.ratio_adamw)


def quantiles(values: Iterable[float]) -> tuple[float | None, float | None, float | None]:
    """(p50, p20, p80) of the finite values, linear interpolation (None when there are none)."""
    s = sorted(v for v in values if math.isfinite(v))
    if not s:
        return None, None, None

    def q(f: float) -> float:
        pos = f * (len(s) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    return statistics.median(s), q(0.2), q(0.8)


def train_all(task_key: str, results: list[Result], seeds: list[int], max_steps: int | None,
              log: Callable[[str], None]) -> None:
    """Phase 1: every configuration and seed trains the task's budget (seeds outermost)."""
    task = TASKS[task_key]
    data = load_data(task.dataset)
    for seed in seeds:
        for res in results:
            run = train_run(task_key, res.config.optimizer, res.hp, data.train, data.val, seed=seed,
                            epochs=task.epochs, batch_size=task.batch_size,
                            eval_every=EVAL_EVERY[task_key], max_steps=max_steps, progress=False)
            res.runs.append(run)
            steps = res.steps_to_target()[-1]
            log(f"  {task_key:11s} {res.config.label:26s} seed {seed}: {run.status}, "
                f"{task.metric} {task.format(run.final_metric)}, target at "
                f"{'never' if steps is None else steps}")


def minibatches(task: Task, seed: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` training minibatches in the order train_run draws them, cycling the epochs."""
    train = load_data(task.dataset).train
    n, bs = len(train), min(task.batch_size, len(train))
    per_epoch = max(n // bs, 1)
    order = torch.Generator().manual_seed(10_000 + seed)
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    while len(out) < count:
        perm = torch.randperm(n, generator=order)
        for b in range(min(per_epoch, count - len(out))):
            idx = perm[b * bs:(b + 1) * bs]
            out.append((train.x[idx], train.y[idx]))
    return out


def time_all(task_key: str, results: list[Result], *, seed: int, rounds: int, warmup: int,
             log: Callable[[str], None]) -> int:
    """Phase 2: ms/step of every configuration, interleaved (module docstring); returns the
    period (steps per timed block)."""
    task = TASKS[task_key]
    period = math.lcm(1, *(p for r in results for p in r.config.periods))
    batches = minibatches(task, seed, warmup + rounds * period)
    targets_per_batch = min(task.batch_size, len(load_data(task.dataset).train))
    steppers = []
    for res in results:
        torch.manual_seed(seed)
        model = make_model(task_key)
        steppers.append(make_stepper(res.config.optimizer, model, res.hp, seed=seed,
                                     batch_size=targets_per_batch * batches[0][1][0].numel()))

    def block(i: int, start: int, length: int) -> float:
        """Steps ``length`` minibatches from ``start`` with configuration i; seconds taken."""
        t0 = time.perf_counter()
        for xb, yb in batches[start:start + length]:
            if not math.isfinite(float(steppers[i].step(xb, yb))):
                results[i].timing_nonfinite += 1
        return time.perf_counter() - t0

    for i in range(len(results)):
        block(i, 0, warmup)
    adamw = next(i for i, r in enumerate(results) if r.config.optimizer == "adamw")
    defaults = {r.config.optimizer: i for i, r in enumerate(results) if r.config.is_default}
    for r in range(rounds):
        order = list(range(len(results)))
        order = order[r % len(order):] + order[:r % len(order)]
        seconds = [0.0] * len(results)
        for i in order:
            seconds[i] = block(i, warmup + r * period, period)
        for i, res in enumerate(results):
            res.block_ms.append(1000.0 * seconds[i] / period)
            res.ratio_adamw.append(seconds[i] / seconds[adamw])
            res.ratio_default.append(seconds[i] / seconds[defaults[res.config.optimizer]])
        log(f"  {task_key}: timing round {r + 1}/{rounds} of {period} steps per configuration, "
            f"AdamW {1000.0 * seconds[adamw] / period:.2f} ms/step")
    return period


def keeps_accuracy(res: Result, default: Result) -> tuple[bool, str]:
    """Whether ``res`` keeps the default's time-to-accuracy within noise, and why not.

    Rule: no failed run; at least as many seeds reach the target; median steps to target at most
    the default's plus max(one evaluation interval, 10 %); median final metric no worse than the
    default's by more than :data:`FINAL_TOLERANCE` (2 validation digits; 0.02 bits per char).
    """
    task = res.spec_task
    if res.failed:
        return False, f"{res.failed} failed"
    if res.reached < default.reached:
        return False, f"target {res.reached}/{len(res.runs)}"
    if default.reached:
        slack = max(EVAL_EVERY[res.task], 0.1 * default.median_steps())
        if res.median_steps() > default.median_steps() + slack:
            return False, "steps"
    tol = FINAL_TOLERANCE[task.metric]
    loss = (default.median_final() - res.median_final() if task.higher_is_better
            else res.median_final() - default.median_final())
    if not loss <= tol:
        return False, "final"
    return True, ""


def default_of(results: list[Result], res: Result) -> Result:
    return next(r for r in results if r.task == res.task and r.config.optimizer ==
                res.config.optimizer and r.config.is_default)


def adamw_of(results: list[Result], task: str) -> Result:
    return next(r for r in results if r.task == task and r.config.optimizer == "adamw")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rows_of(results: list[Result], env: dict[str, str], config: str) -> list[Row]:
    """The benchmark rows: per (task, configuration) steps and seconds to target, final metric,
    failed runs, ms/step and its ratios to AdamW and to the default."""
    rows = []
    for res in results:
        task = res.spec_task
        base = dict(suite=SUITE, name=f"{res.task}/{res.config.optimizer}",
                    provider=SPECS[res.config.optimizer].label, x_name="setting",
                    x_value=res.config.setting or "default", dtype="float32", **env)
        n = len(res.runs)
        extra = f"{config}; lr {res.lr:g}; target {task.level_name(task.target)}"
        hits = [float(s) for s in res.steps_to_target() if s is not None]
        p50, p20, p80 = quantiles(hits)
        reached = f"{extra}; reached {len(hits)}/{n}"
        rows.append(Row(metric="steps_to_target", unit="steps", p50=p50, p20=p20, p80=p80,
                        n=len(hits), config=reached, **base))
        secs = res.seconds_to_target()
        rows.append(Row(metric="seconds_to_target", unit="s",
                        p50=secs if math.isfinite(secs) else None, n=len(hits),
                        config=f"{reached}; median steps x ms/step", **base))
        scale, unit = (100.0, "%") if task.metric == "acc" else (1.0, "bpc")
        p50, p20, p80 = quantiles(scale * v for v in res.finals())
        rows.append(Row(metric=f"final_val_{task.metric}", unit=unit, p50=p50, p20=p20, p80=p80,
                        n=len(res.finals()), config=extra, **base))
        rows.append(Row(metric="failed_runs", unit="runs", p50=float(res.failed), n=n,
                        config=extra, **base))
        timing = f"{extra}; interleaved; non-finite losses while timing {res.timing_nonfinite}"
        for metric, unit_t, values in (("step_time", "ms", res.block_ms),
                                       ("step_time_ratio_adamw", "x", res.ratio_adamw),
                                       ("step_time_ratio_default", "x", res.ratio_default)):
            p50, p20, p80 = quantiles(values)
            rows.append(Row(metric=metric, unit=unit_t, p50=p50, p20=p20, p80=p80,
                            n=len(values), config=timing, **base))
    return rows


def _fmt(x: float, digits: int) -> str:
    return "—" if not math.isfinite(x) else f"{x:.{digits}f}"


def task_table(results: list[Result], task_key: str) -> list[str]:
    """The Markdown table of one task."""
    task = TASKS[task_key]
    mine = [r for r in results if r.task == task_key]
    adamw = adamw_of(results, task_key)
    lines = [f"| Optimizer | lr | setting | steps→target (reached) | final val {task.metric} | "
             "ms/step | × AdamW | × default | s→target | s→target ÷ AdamW's | keeps accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in mine:
        if res.config.optimizer == "adamw":
            verdict = "reference"
        elif res.config.is_default:
            verdict = "default"
        else:
            ok, why = keeps_accuracy(res, default_of(results, res))
            verdict = "yes" if ok else f"no ({why})"
        ratio_default = ("1" if res.config.optimizer == "adamw" or res.config.is_default
                         else _fmt(_median(res.ratio_default), 2))
        lines.append(
            f"| {SPECS[res.config.optimizer].label} | {res.lr:g} | {res.config.setting or '—'} | "
            f"{_fmt(res.median_steps(), 0)} ({res.reached}/{len(res.runs)}) | "
            f"{task.format(res.median_final())} | {_fmt(res.ms_per_step(), 2)} | "
            f"{_fmt(_median(res.ratio_adamw), 2)} | {ratio_default} | "
            f"{_fmt(res.seconds_to_target(), 3)} | "
            f"{_fmt(res.seconds_ratio(adamw), 2)} | {verdict} |")
    return lines


def _steps_change(cell: Result, default: Result) -> str:
    """``18→20`` (median steps to target, default then this cell)."""
    return f"{_fmt(default.median_steps(), 0)}→{_fmt(cell.median_steps(), 0)}"


def _paired_change(cell: Result, default: Result) -> str:
    """Steps to target of ``cell`` minus the default's, seed by seed (same initialization and
    minibatches): ``+2, 0, -2``; ``never`` where either run missed the target."""
    return ", ".join("never" if a is None or b is None else f"{a - b:+d}" if a != b else "0"
                     for a, b in zip(cell.steps_to_target(), default.steps_to_target(), strict=True))


def recommendation(results: list[Result], optimizers: tuple[str, ...]) -> list[str]:
    """The reading for ``optimizers`` (which share their knobs) as Markdown lines: every setting
    run for all of them on every task, ranked (those keeping accuracy everywhere first, then by
    the geometric mean over tasks and optimizers of the ms/step ratio to the default), and the
    fastest setting that keeps accuracy everywhere and cuts ms/step as the recommended default,
    with its numbers next to the default's."""
    tasks = list(dict.fromkeys(r.task for r in results))
    present = [o for o in optimizers if any(r.config.optimizer == o for r in results)]
    if not present:
        return []
    names = " and ".join(SPECS[o].label for o in present)
    cells = {(r.task, r.config.optimizer, r.config.setting): r for r in results}
    default = default_config(present[0]).setting
    settings = [s for s in dict.fromkeys(r.config.setting for r in results
                                         if r.config.optimizer == present[0])
                if s != default and all((t, o, s) in cells for t in tasks for o in present)]
    ranked = []
    for s in settings:
        mine = [cells[(t, o, s)] for t in tasks for o in present]
        kept = [keeps_accuracy(r, default_of(results, r)) for r in mine]
        geo = math.exp(statistics.fmean(math.log(_median(r.ratio_default)) for r in mine))
        steps = "; ".join(f"{t} " + " / ".join(_steps_change(cells[(t, o, s)],
                                                              cells[(t, o, default)])
                                                for o in present) for t in tasks)
        lost = [f"{r.task}/{SPECS[r.config.optimizer].label} ({why})"
                for r, (ok, why) in zip(mine, kept, strict=True) if not ok]
        ranked.append((not lost, geo, s, steps, lost))
    ranked.sort(key=lambda x: (not x[0], x[1]))
    lines = [f"**{names}** (default {default}). Steps to target, default→setting, per task "
             f"({' / '.join(SPECS[o].label for o in present)}):", ""]
    for ok, geo, s, steps, lost in ranked:
        lines.append(f"- {s}: ms/step × {geo:.2f} of the default; steps {steps}; " +
                     ("keeps accuracy everywhere" if ok else "loses: " + ", ".join(lost)))
    lines.append("")
    winners = [x for x in ranked if x[0] and x[1] < 1.0]
    if not winners:
        lines.append(f"No amortized setting of {names} keeps accuracy on every task while cutting "
                     f"ms/step: keep the default ({default}).")
        return lines
    _, geo, best, _, _ = winners[0]
    lines += [f"Recommended as the new default by this rule: **{best}** (ms/step × {geo:.2f} of "
              f"the default {default}):", "",
              "| Task | Optimizer | steps→target | Δ steps per seed | final | ms/step | "
              "ms/step × AdamW | s→target | s→target ÷ AdamW's |",
              "|---|---|---|---|---|---|---|---|---|"]
    ratios = []
    for t in tasks:
        adamw = adamw_of(results, t)
        for o in present:
            new, old = cells[(t, o, best)], cells[(t, o, default)]
            task = TASKS[t]
            ratios.append(_median(new.ratio_adamw))
            lines.append(
                f"| {t} | {SPECS[o].label} | {_steps_change(new, old)} | "
                f"{_paired_change(new, old)} | {task.format(old.median_final())} → {task.format(new.median_final())} | "
                f"{_fmt(old.ms_per_step(), 2)} → {_fmt(new.ms_per_step(), 2)} | "
                f"{_fmt(_median(old.ratio_adamw), 2)} → {_fmt(_median(new.ratio_adamw), 2)} | "
                f"{_fmt(old.seconds_to_target(), 3)} → {_fmt(new.seconds_to_target(), 3)} | "
                f"{_fmt(old.seconds_ratio(adamw), 2)} → {_fmt(new.seconds_ratio(adamw), 2)} |")
    met = sum(r <= 1.5 for r in ratios)
    lines += ["", f"With {best} a step costs {min(ratios):.2f}–{max(ratios):.2f} × AdamW's: the "
              f"issue's ≤ 1.5 × is met in {met} of {len(ratios)} task/optimizer cells."]
    return lines


def write_markdown(path: Path, results: list[Result], machine: dict[str, str],
                   timing_notes: dict[str, str]) -> None:
    tasks = list(dict.fromkeys(r.task for r in results))
    text = [
        "# Amortization benchmark (`python bench/amortization.py`)", "",
        "K-FAC, RING and R-Kalman at the library default and amortized settings on the demo's "
        "tasks, at the demo's learning rates (`grng/demo/hparams.json`), AdamW as the reference. "
        "Setting `F2 T20 cholesky` = `factor_every=2, inverse_every=20, inverse=\"cholesky\"` "
        "(R-Kalman has only F). Steps to target and final metric: median over seeds on the "
        "**validation** split (the steps are deterministic and do not depend on the machine's "
        "load), evaluated every 2 steps on digits and 10 on the transformer (the demo: 4 and "
        "25, so the defaults' steps differ slightly from bench/results/defaults.md); `(k/n)`: "
        "seeds that reached the target. ms/step: one training step (forward, "
        "backward, optimizer), every configuration of a task stepped round-robin in one process "
        "on the same minibatches, one torch thread, median over rounds of the mean over one "
        "period of steps (so folds and refreshes are counted). **Other jobs loaded the CPU (load "
        "averages below), so the absolute ms are inflated by that load; the ratios (× AdamW, × "
        "default) are medians of per-round ratios, each taken under the same load.** "
        "s→target = median steps to target × ms/step; s→target ÷ AdamW's = the ratio of median "
        "steps × the ms/step ratio to AdamW (same load). Written by the script.", ""]
    text += [f"- {k}: {v}" for k, v in machine.items()]
    text += [""]
    for t in tasks:
        task = TASKS[t]
        text += [f"## {t} ({task.dataset}, {task.epochs} epoch(s) of batch {task.batch_size}; "
                 f"target {task.level_name(task.target)} on validation, evaluated every "
                 f"{EVAL_EVERY[t]} steps)", "", timing_notes[t], ""]
        text += task_table(results, t) + [""]
    text += ["## Reading", "",
             "A setting *keeps accuracy* on a task when no run fails, at least as many seeds "
             "reach the target as with the default, its median steps to target are at most the "
             "default's plus max(one evaluation interval, 10 %), and its median final metric is "
             "no worse than the default's by more than 2 validation digits (0.56 points) or 0.02 "
             "bits per character. It qualifies as a new default when it keeps accuracy on every "
             "task for every optimizer it applies to and cuts ms/step; the fastest such setting is "
             "recommended. Two facts of the schedule help read the tables: the inverses are "
             "computed at step 0 and then every T steps, so with T = 20 or 40 the early steps, "
             "where the target is reached on digits, use the inverse of the first minibatch's "
             "factors; and `cholesky` is not only a cheaper application: it damps each factor "
             "separately (factored Tikhonov, (A + π√λ I) ⊗ (G + √λ/π I)) instead of the "
             "Kronecker product exactly (A ⊗ G + λ I), a different preconditioner.", ""]
    text += recommendation(results, ("kfac", "ring")) + [""]
    text += recommendation(results, ("rkalman",)) + [""]
    path.write_text("\n".join(text) + "\n")


def code_version(root: Path) -> str:
    """The git commit of the checkout at ``root`` (whose grng this process imported), with a
    warning when grng/ has uncommitted changes; "unknown" outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        commit, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "grng")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" with uncommitted changes under grng/" if dirty else "")


def log(line: str) -> None:
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default=None, help="comma-separated (default: all; --quick: mlp)")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds per task (default: 5 on digits, 3 on the transformer; "
                        "--quick: 1)")
    p.add_argument("--rounds", type=int, default=None,
                   help="timing rounds per task (default: 15 on digits, 10 on the "
                        "transformer; --quick: 2)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per configuration")
    p.add_argument("--max-steps", type=int, default=None, help="cap every training run")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: a tiny grid, 1 seed, 12 steps, 2 timing rounds")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = [t for t in (args.tasks or ("mlp" if args.quick else ",".join(TASKS))).split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"unknown task: {unknown}")
    max_steps = 12 if args.quick and args.max_steps is None else args.max_steps
    warmup = 2 if args.quick else args.warmup
    table = load_hparams(HPARAMS_PATH)

    load_start = os.getloadavg()
    start = time.perf_counter()
    results: list[Result] = []
    timing_notes: dict[str, str] = {}
    seeds_used: dict[str, int] = {}
    for t in tasks:
        n_seeds = args.seeds or (1 if args.quick else DEFAULT_SEEDS[t])
        rounds = args.rounds or (2 if args.quick else 10 if t == "transformer" else 15)
        seeds_used[t] = n_seeds
        mine = [Result(t, c, demo_hparams(t, c, table))
                for c in grid(t, quick=args.quick)]
        results += mine
        t0 = time.perf_counter()
        train_all(t, mine, list(range(FIRST_SEED, FIRST_SEED + n_seeds)), max_steps, log)
        train_s = time.perf_counter() - t0
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        period = time_all(t, mine, seed=FIRST_SEED, rounds=rounds, warmup=warmup, log=log)
        load_after = os.getloadavg()
        timing_notes[t] = (
            f"Seeds {n_seeds}; training runs {train_s:.0f} s. Timing: {rounds} rounds of "
            f"{period} steps per configuration after {warmup} warm-up steps, "
            f"{time.perf_counter() - t0:.0f} s; load average (1 min) "
            f"{load_before[0]:.1f} at its start, {load_after[0]:.1f} at its end.")
        nonfinite = [r.config.label for r in mine if r.timing_nonfinite]
        if nonfinite:
            timing_notes[t] += f" Non-finite losses while timing: {', '.join(nonfinite)}."
    elapsed = time.perf_counter() - start
    load_end = os.getloadavg()
    loads = load_text(load_start, load_end)
    env = environment("cpu")
    config = f"validation split; seeds {seeds_used}; max_steps {max_steps}; {loads}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "amortization.csv", out / "amortization.md"
    replace_rows(csv_path, rows_of(results, env, config))
    machine = {**run_header(args.threads),
               "grng": f"{env['grng']}, commit {code_version(ROOT)}", "load": loads,
               "command": " ".join(["python bench/amortization.py",
                                    *(sys.argv[1:] if argv is None else argv)]),
               "total wall time": f"{elapsed:.0f} s"}
    write_markdown(md_path, results, machine, timing_notes)
    print(f"wrote {csv_path}, {md_path}")
    print(f"total {elapsed:.0f} s; {loads}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
