"""``python -m grng.demo`` / ``grng-demo``: every optimizer on digits, a table, a report, a plot."""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from grng.demo.data import load_digits_splits
from grng.demo.models import MODELS
from grng.demo.optimizers import OPTIMIZERS, SPECS
from grng.demo.search import (HPARAMS_PATH, clean_json, hparams_for, load_hparams, save_hparams,
                              search_hparams)
from grng.demo.train import summarize, train_run

DEFAULT_SEEDS, DEFAULT_EPOCHS = 2, 6
FULL_SEEDS, FULL_EPOCHS = 5, 20
BATCH_SIZE, EVAL_EVERY = 64, 4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="grng-demo",
        description="Train a small CNN and an MLP on scikit-learn's digits with SGD, AdamW, "
                    "K-FAC, RING, RENG, R-Kalman, F-GR, SAM (and Sophia when sophia-opt is "
                    "installed); print a table and write a report, a PNG and raw results.")
    p.add_argument("--full", action="store_true",
                   help=f"longer run: {FULL_SEEDS} seeds, {FULL_EPOCHS} epochs (unless given)")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"number of seeds (default {DEFAULT_SEEDS}; seeds are 0..N-1)")
    p.add_argument("--epochs", type=int, default=None, help=f"epochs (default {DEFAULT_EPOCHS})")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--eval-every", type=int, default=EVAL_EVERY,
                   help="evaluate on the test set every N steps (curves only)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default=None, help="results folder (default results/demo-<timestamp>)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of cnn,mlp")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                   help="comma-separated subset of " + ",".join(OPTIMIZERS))
    p.add_argument("--hparams", default=str(HPARAMS_PATH), help="hyperparameter table (JSON)")
    p.add_argument("--search", action="store_true",
                   help="run the validation-split grid search and write --hparams, then stop")
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
    device = _device(args.device)
    models = _subset(args.models, MODELS, "models")
    optimizers = _subset(args.optimizers, OPTIMIZERS, "optimizers")
    seeds = args.seeds if args.seeds is not None else (FULL_SEEDS if args.full else DEFAULT_SEEDS)
    epochs = args.epochs if args.epochs is not None else (FULL_EPOCHS if args.full else DEFAULT_EPOCHS)
    if seeds < 1 or epochs < 1 or args.batch_size < 1 or args.eval_every < 1:
        raise SystemExit("--seeds, --epochs, --batch-size and --eval-every must be >= 1")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("results") / f"demo-{stamp}"
    out.mkdir(parents=True, exist_ok=True)

    data = load_digits_splits().to(device)
    hp_table = load_hparams(args.hparams)
    if hp_table is None:
        print(f"note: {args.hparams} not found; using grid midpoints (run --search to tune)")
    seed_list = list(range(seeds))
    runs, summaries = [], []
    used: dict[tuple[str, str], tuple[dict, str]] = {}
    for model in models:
        for key in optimizers:
            hp, source = hparams_for(hp_table, model, key)
            used[(model, key)] = (hp, source)
            mine = []
            for seed in seed_list:
                r = train_run(model, key, hp, data.train, data.test, seed=seed, epochs=epochs,
                              batch_size=args.batch_size, eval_every=args.eval_every,
                              device=device, progress=not args.no_progress,
                              desc=f"{model}/{SPECS[key].label} seed {seed}")
                mine.append(r)
                if r.status == "unavailable":
                    break
                acc = f"{100 * r.final_acc:.1f} %" if r.final_acc == r.final_acc else "—"
                line = (f"  {model:3s} {SPECS[key].label:12s} seed {seed}: test acc {acc}, "
                        f"{r.steps} steps, {r.wall_s:.1f} s, {r.status}")
                if r.status != "ok":
                    line += f" ({r.message.splitlines()[0]})"
                print(line, flush=True)
            if mine[0].status == "unavailable":
                print(f"  {model:3s} {SPECS[key].label:12s}: {mine[0].message}", flush=True)
            runs += mine
            summaries.append(summarize(mine))

    table_md = report.markdown_table(summaries)
    png = out / "curves.png"
    report.plot_curves(png, runs, models, optimizers)
    total = time.perf_counter() - start
    n_train = len(data.train)
    settings = {
        "command": " ".join(["python -m grng.demo"] + sys.argv[1:]) if sys.argv else "grng.demo",
        "seeds": seeds, "seed_list": seed_list, "epochs": epochs, "batch_size": args.batch_size,
        "steps_per_epoch": max(1, n_train // args.batch_size), "eval_every": args.eval_every,
        "sizes": (n_train, len(data.val), len(data.test)), "device": device,
    }
    machine = report.machine_info(device)
    report.write_markdown(out / "report.md", table_md=table_md, summaries=summaries, runs=runs,
                          hp_table=hp_table, used=used, settings=settings, machine=machine,
                          total_s=total, png_name=png.name)
    raw = {"settings": settings, "machine": machine, "summaries": summaries,
           "runs": [r.to_json() for r in runs]}
    (out / "results.json").write_text(json.dumps(clean_json(raw), indent=1, default=str) + "\n")
    print()
    print(table_md)
    problems = [r for r in runs if r.status not in ("ok", "unavailable")]
    for r in problems:
        print(f"! {r.model}/{SPECS[r.optimizer].label} seed {r.seed}: {r.status}: "
              f"{r.message.splitlines()[0]}")
    print(f"\nwall time {total:.1f} s; report: {out / 'report.md'}; curves: {png}")
    print(f"results folder: {out}")
    return out


def run_search(args: argparse.Namespace) -> dict[str, Any]:
    """--search: the grid search on train/validation, written to --hparams."""
    device = _device(args.device)
    data = load_digits_splits().to(device)
    epochs = args.epochs if args.epochs is not None else DEFAULT_EPOCHS
    start = time.perf_counter()
    # Only the train and validation splits are handed over: the test split stays here.
    table = search_hparams(data.train, data.val,
                           models=_subset(args.models, MODELS, "models"),
                           optimizers=_subset(args.optimizers, OPTIMIZERS, "optimizers"),
                           epochs=epochs, batch_size=args.batch_size, device=device,
                           progress=not args.no_progress,
                           log=lambda line: print(line, flush=True))
    table["meta"]["search_wall_s"] = round(time.perf_counter() - start, 1)
    path = save_hparams(table, args.hparams)
    for model, entries in table["models"].items():
        for key, entry in entries.items():
            hp = entry.get("chosen")
            val = entry.get("val_acc")
            val_text = f"val acc {100 * val:.1f} %" if isinstance(val, float) else entry["status"]
            print(f"{model:3s} {SPECS[key].label:12s} {val_text}: {hp}")
    print(f"search took {table['meta']['search_wall_s']} s; wrote {path}")
    return table


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif torch.device(args.device).type == "cpu":
        torch.set_num_threads(1)
    if args.search:
        run_search(args)
    else:
        run_demo(args)
    return 0
