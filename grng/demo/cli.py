"""``python -m grng.demo`` / ``grng-demo``: every optimizer on digits and on text, a table per
task, a report with the paper's claims as measured, a plot."""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from grng.demo.models import MODELS
from grng.demo.optimizers import OPTIMIZERS, SPECS
from grng.demo.sweep import HPARAMS_PATH, clean_json, hparams_for, load_hparams
from grng.demo.tasks import TASKS, load_data
from grng.demo.train import summarize, train_run

DEFAULT_SEEDS = {"cnn": 2, "mlp": 2, "transformer": 1}
FULL_SEEDS = 5


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="grng-demo",
        description="Train a CNN and an MLP on scikit-learn's digits and a character-level "
                    "transformer on the Python standard library's source with SGD, AdamW, "
                    "K-FAC, RING, RENG, R-Kalman, F-GR, SAM, Sophia, SOAP and PSGD-Kron at their "
                    "defaults (learning rate from bench/defaults.py's validation sweep); print "
                    "a table per task and write a report, a PNG and raw results.")
    p.add_argument("--full", action="store_true", help=f"{FULL_SEEDS} seeds on every task")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds per task (default: 2 on digits, 1 on the transformer; seeds 0..N-1)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs on every task (default: the task's, 6 on digits, 1 on text)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default=None, help="results folder (default results/demo-<timestamp>)")
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated subset of " + ",".join(MODELS))
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                   help="comma-separated subset of " + ",".join(OPTIMIZERS))
    p.add_argument("--hparams", default=str(HPARAMS_PATH),
                   help="learning-rate table (JSON, written by bench/defaults.py)")
    p.add_argument("--max-steps", type=int, default=None, help="cap every run (smoke tests)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 on CPU: the models are tiny, so more threads "
                        "do not help, and one thread keeps timings stable on a shared CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _subset(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise SystemExit(f"unknown {what}: {', '.join(bad) or '(none)'}; choose from {', '.join(allowed)}")
    return items


def _device(name: str) -> str:
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available in this torch build / machine")
    return str(dev)


def run_demo(args: argparse.Namespace) -> Path:
    """The demo proper; returns the results folder."""
    from grng.demo import report

    start = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    device = _device(args.device)
    models = _subset(args.models, MODELS, "models")
    optimizers = _subset(args.optimizers, OPTIMIZERS, "optimizers")
    if (args.seeds is not None and args.seeds < 1) or (args.epochs is not None and args.epochs < 1):
        raise SystemExit("--seeds and --epochs must be >= 1")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("results") / f"demo-{stamp}"
    out.mkdir(parents=True, exist_ok=True)

    hp_table = load_hparams(args.hparams)
    if hp_table is None:
        print(f"note: {args.hparams} not found; every optimizer uses its default learning rate")
    runs, summaries = [], []
    used: dict[tuple[str, str], tuple[dict, str]] = {}
    settings: dict[str, Any] = {"tasks": {}}
    for model in models:
        task = TASKS[model]
        data = load_data(task.dataset).to(device)
        n_seeds = args.seeds or (FULL_SEEDS if args.full else DEFAULT_SEEDS[model])
        epochs = args.epochs or task.epochs
        seed_list = list(range(n_seeds))
        settings["tasks"][model] = {
            "dataset": task.dataset, "seeds": seed_list, "epochs": epochs,
            "batch_size": task.batch_size, "steps_per_epoch": max(1, len(data.train) // task.batch_size),
            "eval_every": task.eval_every, "sizes": (len(data.train), len(data.val), len(data.test)),
            "metric": task.metric, "thresholds": list(task.thresholds), "target": task.target}
        for key in optimizers:
            hp, source = hparams_for(hp_table, model, key)
            used[(model, key)] = (hp, source)
            mine = []
            for seed in seed_list:
                r = train_run(model, key, hp, data.train, data.test, seed=seed, epochs=epochs,
                              batch_size=task.batch_size, eval_every=task.eval_every,
                              max_steps=args.max_steps, device=device,
                              progress=not args.no_progress,
                              desc=f"{model}/{SPECS[key].label} seed {seed}")
                mine.append(r)
                if r.status == "unavailable":
                    break
                line = (f"  {model:11s} {SPECS[key].label:12s} seed {seed}: test {task.metric} "
                        f"{task.format(r.final_metric)}, {r.steps} steps, {r.wall_s:.1f} s, "
                        f"{r.status}")
                if r.status != "ok":
                    line += f" ({r.message.splitlines()[0]})"
                print(line, flush=True)
            if mine[0].status == "unavailable":
                print(f"  {model:11s} {SPECS[key].label:12s}: {mine[0].message}", flush=True)
            runs += mine
            summaries.append(summarize(mine))

    png = out / "curves.png"
    report.plot_curves(png, runs, models, optimizers)
    total = time.perf_counter() - start
    settings["command"] = " ".join(["python -m grng.demo"] + sys.argv[1:]) if sys.argv else "grng.demo"
    settings["device"] = device
    machine = report.machine_info(device, load_start)
    tables = {m: report.markdown_table([s for s in summaries if s["model"] == m]) for m in models}
    report.write_markdown(out / "report.md", tables=tables, summaries=summaries, runs=runs,
                          hp_table=hp_table, used=used, settings=settings, machine=machine,
                          total_s=total, png_name=png.name)
    raw = {"settings": settings, "machine": machine, "summaries": summaries,
           "runs": [r.to_json() for r in runs]}
    (out / "results.json").write_text(json.dumps(clean_json(raw), indent=1, default=str) + "\n")
    print()
    for m in models:
        print(f"{m} ({TASKS[m].dataset}, test {TASKS[m].metric_name}):")
        print(tables[m])
        print()
    for line in report.claims(summaries, models):
        print(line)
    problems = [r for r in runs if r.status not in ("ok", "unavailable")]
    for r in problems:
        print(f"! {r.model}/{SPECS[r.optimizer].label} seed {r.seed}: {r.status}: "
              f"{r.message.splitlines()[0]}")
    print(f"\nwall time {total:.1f} s; report: {out / 'report.md'}; curves: {png}")
    print(f"results folder: {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif torch.device(args.device).type == "cpu":
        torch.set_num_threads(1)
    run_demo(args)
    return 0
