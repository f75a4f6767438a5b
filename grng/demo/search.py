"""Hyperparameter search on the VALIDATION split (the test split is never passed in here).

For each model and optimizer, every candidate of the optimizer's grid
(:data:`grng.demo.optimizers.SPECS`) trains once from seed :data:`SEARCH_SEED` (a seed the
demo runs do not use by default) with the same epochs and batch size as the default demo run,
and is scored by its final validation accuracy, ties broken by the lower validation loss.
Candidates that diverge or fail are never chosen. RING and RENG take the damping chosen for
K-FAC and search only lr and rho. The result is written to ``grng/demo/hparams.json`` by
``python -m grng.demo --search``; the default demo run reads it.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from grng.demo.data import Split
from grng.demo.models import MODELS
from grng.demo.optimizers import SPECS, iter_specs, unavailable_reason
from grng.demo.train import train_run

SEARCH_SEED = 1000
HPARAMS_PATH = Path(__file__).with_name("hparams.json")


def _score(run) -> tuple[float, float]:
    """Higher is better: (validation accuracy, -validation loss); failed runs rank last."""
    if run.status != "ok" or not math.isfinite(run.final_acc):
        return (-math.inf, -math.inf)
    loss = run.final_loss if math.isfinite(run.final_loss) else math.inf
    return (run.final_acc, -loss)


def search_hparams(
    train: Split,
    val: Split,
    *,
    models: tuple[str, ...] | list[str] = MODELS,
    optimizers: list[str] | None = None,
    epochs: int = 5,
    batch_size: int = 64,
    seed: int = SEARCH_SEED,
    device: str = "cpu",
    progress: bool = True,
    max_steps: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Grid search on (train, val) only; returns the table that ``hparams.json`` stores.
    ``log`` receives one line per candidate."""
    table: dict[str, Any] = {
        "meta": {
            "selected_on": "validation",
            "criterion": "final validation accuracy, ties broken by lower validation loss",
            "train_size": len(train), "val_size": len(val),
            "epochs": epochs, "batch_size": batch_size, "seed": seed, "max_steps": max_steps,
            "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "python": platform.python_version(),
            "search_space": {s.key: {"grid": {k: list(v) for k, v in s.grid.items()},
                                     "fixed": s.fixed,
                                     "inherit": list(s.inherit[1]) if s.inherit else [],
                                     "inherit_from": s.inherit[0] if s.inherit else None}
                             for s in iter_specs(optimizers)},
        },
        "models": {},
    }
    for model_name in models:
        chosen: dict[str, Any] = {}
        for spec in iter_specs(optimizers):
            entry: dict[str, Any] = {"label": spec.label}
            reason = unavailable_reason(spec.key)
            if reason is not None:
                entry.update(status="not searched", reason=reason, chosen=None, candidates=[])
                chosen[spec.key] = entry
                continue
            inherited = None
            if spec.inherit is not None:
                parent = chosen.get(spec.inherit[0], {}).get("chosen")
                source = parent or SPECS[spec.inherit[0]].defaults()
                inherited = {k: source[k] for k in spec.inherit[1]}
            candidates = []
            best, best_score = None, (-math.inf, -math.inf)
            for i, hp in enumerate(spec.candidates(inherited)):
                run = train_run(model_name, spec.key, hp, train, val, seed=seed, epochs=epochs,
                                batch_size=batch_size, eval_every=10 ** 9, device=device,
                                progress=progress, max_steps=max_steps,
                                desc=f"search {model_name}/{spec.label} {i + 1}")
                candidates.append({"hparams": hp, "val_acc": run.final_acc,
                                   "val_loss": run.final_loss, "status": run.status,
                                   "message": run.message.splitlines()[0] if run.message else ""})
                if log is not None:
                    acc = f"{100 * run.final_acc:.1f} %" if math.isfinite(run.final_acc) else "—"
                    log(f"  search {model_name} {spec.label}: "
                        f"{', '.join(f'{k}={hp[k]}' for k in spec.grid)}: val acc {acc} "
                        f"({run.status}, {run.wall_s:.1f} s)")
                score = _score(run)
                if score > best_score:
                    best, best_score = hp, score
            entry.update(status="searched" if best is not None else "all candidates failed",
                         chosen=best, val_acc=best_score[0] if best else None,
                         val_loss=-best_score[1] if best else None, candidates=candidates)
            chosen[spec.key] = entry
        table["models"][model_name] = chosen
    return table


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
    """The stored search table, or None when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    return json.loads(path.read_text())


def hparams_for(table: dict[str, Any] | None, model: str, optimizer: str) -> tuple[dict[str, Any], str]:
    """(hyperparameters, where they come from) for one model and optimizer."""
    entry = (table or {}).get("models", {}).get(model, {}).get(optimizer)
    if entry and entry.get("chosen"):
        return dict(entry["chosen"]), "validation search"
    return SPECS[optimizer].defaults(), "grid midpoint (not searched)"
