"""The defaults sweep: every optimizer at its defaults, only the learning rate swept.

For each task (:data:`grng.demo.tasks.TASKS`), optimizer (:data:`grng.demo.optimizers.SPECS`),
each of the optimizer's three learning rates and each seed, one run trains on the train split
and is evaluated on the **validation** split (the test split is never used here). The runs are
interleaved (seed, task, learning rate, then optimizer innermost) so that a change of machine
load spreads over every optimizer instead of landing on one. ``bench/defaults.py`` runs it,
writes the benchmark rows and the summary, and stores the learning rates the demo uses in
``grng/demo/hparams.json`` (:func:`hparams_table`).

Per (task, optimizer, lr) cell: the final validation metric (median over seeds), how many
runs diverged or failed, and steps and seconds to the task's target (median over the seeds that
got there). The *speed* choice of lr is the one whose every seed reached the target in the
fewest median steps (ties: fewer seconds); the *final* choice is the one with the best median
final metric among cells where no run diverged or failed.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grng.demo.optimizers import SPECS, iter_specs, unavailable_reason
from grng.demo.tasks import TASKS, Task, load_data
from grng.demo.train import RunResult, level_key, train_run

HPARAMS_PATH = Path(__file__).with_name("hparams.json")


@dataclass
class Cell:
    """The runs of one (task, optimizer, learning rate) over the seeds."""

    task: str
    optimizer: str
    lr: float
    runs: list[RunResult]

    @property
    def spec_task(self) -> Task:
        return TASKS[self.task]

    @property
    def unavailable(self) -> bool:
        return bool(self.runs) and all(r.status == "unavailable" for r in self.runs)

    @property
    def failed(self) -> int:
        """Runs that diverged or raised."""
        return sum(r.status in ("diverged", "error") for r in self.runs)

    @property
    def diverged(self) -> int:
        return sum(r.status == "diverged" for r in self.runs)

    def final(self) -> list[float]:
        return [r.final_metric for r in self.runs if math.isfinite(r.final_metric)]

    def to_target(self) -> list[tuple[float, float] | None]:
        """(steps, seconds) to the task's target per run; None where it never got there."""
        key = level_key(self.spec_task.target)
        return [tuple(r.reached[key]) if r.reached.get(key) else None for r in self.runs]

    @property
    def all_reached(self) -> bool:
        return bool(self.runs) and self.failed == 0 and all(t is not None for t in self.to_target())

    def median_final(self) -> float:
        vals = self.final()
        return statistics.median(vals) if vals and self.failed == 0 else float("nan")

    def median_to_target(self) -> tuple[float, float]:
        """Median (steps, seconds) over the runs that reached the target (NaN when none did)."""
        hits = [t for t in self.to_target() if t is not None]
        if not hits:
            return float("nan"), float("nan")
        return statistics.median(h[0] for h in hits), statistics.median(h[1] for h in hits)

    def ms_per_step(self) -> float:
        vals = [1000.0 * r.wall_s / r.steps for r in self.runs if r.steps]
        return statistics.median(vals) if vals else float("nan")


def run_sweep(tasks: Iterable[str], optimizers: Iterable[str], seeds: dict[str, list[int]], *,
              max_steps: int | None = None, device: str = "cpu", progress: bool = False,
              log: Callable[[str], None] | None = None) -> list[Cell]:
    """Every (task, optimizer, lr, seed) run, interleaved (module docstring); one Cell per
    (task, optimizer, lr). ``seeds`` maps a task to its seeds; ``max_steps`` caps each run."""
    tasks, specs = list(tasks), iter_specs(optimizers)
    cells = {(t, s.key, lr): Cell(t, s.key, lr, []) for t in tasks for s in specs for lr in s.lrs}
    rounds = max(len(seeds[t]) for t in tasks)
    for i in range(rounds):
        for task_key in tasks:
            if i >= len(seeds[task_key]):
                continue
            task, seed = TASKS[task_key], seeds[task_key][i]
            data = load_data(task.dataset).to(device)
            for j in range(3):
                for spec in specs:
                    hp = spec.candidates()[j]
                    run = train_run(task_key, spec.key, hp, data.train, data.val, seed=seed,
                                    epochs=task.epochs, batch_size=task.batch_size,
                                    eval_every=task.eval_every, max_steps=max_steps,
                                    device=device, progress=progress,
                                    desc=f"{task_key}/{spec.label} lr={hp['lr']:g} s{seed}")
                    cells[(task_key, spec.key, hp["lr"])].runs.append(run)
                    if log is not None:
                        log(f"  {task_key:11s} {spec.label:12s} lr={hp['lr']:<7g} seed {seed}: "
                            f"{task.metric} {task.format(run.final_metric)}, {run.status}, "
                            f"{run.wall_s:.1f} s")
    return list(cells.values())


def cells_of(cells: list[Cell], task: str, optimizer: str) -> list[Cell]:
    return [c for c in cells if c.task == task and c.optimizer == optimizer]


def best_for_speed(cells: list[Cell]) -> Cell | None:
    """The cell (of one task and optimizer) whose every run reached the target in the fewest
    median steps, ties broken by seconds; None when no learning rate got every run there."""
    ok = [c for c in cells if c.all_reached]
    return min(ok, key=lambda c: c.median_to_target()) if ok else None


def best_for_final(cells: list[Cell]) -> Cell | None:
    """The cell with the best median final metric among those without failed runs."""
    best = None
    for c in cells:
        if c.unavailable or c.failed or not c.final():
            continue
        if best is None or c.spec_task.better(c.median_final(), best.median_final()):
            best = c
    return best


def hparams_table(cells: list[Cell], meta: dict[str, Any]) -> dict[str, Any]:
    """What ``grng/demo/hparams.json`` stores: per task and optimizer the fixed values with the
    learning rate of :func:`best_for_final` (None when every learning rate failed)."""
    models: dict[str, Any] = {}
    for task in dict.fromkeys(c.task for c in cells):
        models[task] = {}
        for key in dict.fromkeys(c.optimizer for c in cells if c.task == task):
            mine = cells_of(cells, task, key)
            best = best_for_final(mine)
            reason = unavailable_reason(key) if all(c.unavailable for c in mine) else None
            models[task][key] = {
                "label": SPECS[key].label,
                "chosen": None if best is None else {**SPECS[key].fixed, "lr": best.lr},
                "val_metric": None if best is None else best.median_final(),
                "status": "unavailable" if reason else "chosen" if best else "every lr failed",
                "reason": reason,
                "sweep": {f"{c.lr:g}": {"val_metric": c.median_final(), "failed": c.failed,
                                        "runs": len(c.runs)} for c in mine},
            }
    return {"meta": meta, "models": models}


def sweep_meta(seeds: dict[str, list[int]], max_steps: int | None) -> dict[str, Any]:
    """The settings and machine a sweep ran with (stored with its hyperparameter table)."""
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else ""
    return {
        "selected_on": "validation",
        "criterion": "best median final validation metric over the seeds, among learning rates "
                     "where no run diverged or failed",
        "seeds": seeds, "max_steps": max_steps,
        "tasks": {k: {"epochs": t.epochs, "batch_size": t.batch_size, "target": t.target,
                      "metric": t.metric} for k, t in TASKS.items() if k in seeds},
        "lrs": {s.key: list(s.lrs) for s in SPECS.values()},
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "load_average_at_end": load,
    }


def clean_json(obj: Any) -> Any:
    """JSON without NaN / inf (they become null)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    return obj


def save_hparams(table: dict[str, Any], path: str | Path = HPARAMS_PATH) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean_json(table), indent=1) + "\n")
    return path


def load_hparams(path: str | Path = HPARAMS_PATH) -> dict[str, Any] | None:
    """The stored table, or None when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    return json.loads(path.read_text())


def hparams_for(table: dict[str, Any] | None, model: str, optimizer: str) -> tuple[dict[str, Any], str]:
    """(hyperparameters, where they come from) for one task and optimizer: the swept learning
    rate from the table, else the default (middle) learning rate."""
    entry = (table or {}).get("models", {}).get(model, {}).get(optimizer)
    if entry and entry.get("chosen"):
        return dict(entry["chosen"]), "defaults, lr from the validation sweep"
    return SPECS[optimizer].defaults(), "defaults (lr not swept)"
