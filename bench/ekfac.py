"""EKFAC's measurements (issue 21): the basis refresh's cost, and the demo tasks against peers.

    python bench/ekfac.py refresh                 # eigh vs one subspace step at d = 768, 3072
    python bench/ekfac.py tasks --seeds 3         # the demo's tasks: EKFAC vs AdamW, K-FAC, SOAP,
                                                  # Muon (and PSGD-Kron, Sophia on the transformer)
    python bench/ekfac.py tasks --set scaling --tasks transformer mlp cnn --name ekfac_scaling
    python bench/ekfac.py tasks --set gr --split test --tasks transformer mlp cnn --name ekfac_gr
    python bench/ekfac.py tasks --set levers --tasks transformer --name ekfac_levers
    python bench/ekfac.py tasks --set time --tasks transformer --seeds 5 --name ekfac_time
    python bench/ekfac.py tasks --set warmup --tasks transformer mlp cnn --name ekfac_warmup
    python bench/ekfac.py tasks --set grid --tasks transformer mlp cnn --name ekfac_grid
    python bench/ekfac.py step                    # ms per step: batched vs one block at a time
    python bench/ekfac.py hparams                 # EKFAC's defaults sweep into hparams.json
    python bench/ekfac.py hparams --optimizers muon   # Muon's (added with EKFAC)

``refresh``: per factor size d, the time of one refresh of one dense factor M (float32, SPD
with a decaying spectrum) by eigh and by one step of warm-started subspace iteration (the basis
of the factor one refresh earlier, M_prev = M with a 5% EMA drift, as start; Householder QR and
CholeskyQR3, EKFAC's ``qr`` choices), and the second
moment's re-projection into the new basis (W = (Q_new^T Q_old)^2, then W v for a d x d v); and
how far each result is from diagonalizing M: ||offdiag(Q^T M Q)||_F / ||M||_F.
``tasks``: runs of grng.demo.train.train_run evaluated on the validation split (``--split
test``: the test split), seeds interleaved (seed outermost, configuration innermost), each
configuration of the set ``--set`` (optimizer, fixed hyperparameters) the steps and seconds to
the task's target and the final metric (median over seeds).
``step``: ms per training step (forward, backward, step) on the demo's character transformer
(batch 16 x 32) of AdamW (lr 1e-2), EKFAC at its defaults, and EKFAC with every unit (block or
Adam parameter) updated and applied alone (the batching off), rounds interleaved
(``ekfac_step.csv`` / ``.md``).
Writes schema rows (grng.benchmark.schema) to ``bench/results/ekfac_refresh.csv`` /
``ekfac_tasks.csv`` and a Markdown summary next to them. One torch thread; the machine is shared
(the load averages are recorded).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from grng.benchmark.schema import Row, environment, load_text, replace_rows, run_header  # noqa: E402
from grng.precondition.eigenbasis import rotation, subspace_step  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

#: (label, demo optimizer key, hyperparameters) compared on each task, per named set
_PEERS = [("AdamW lr 1e-2", "adamw", {"lr": 1e-2}),
          ("SOAP lr 1e-2", "soap", {"lr": 1e-2})]
_ADAM_0 = {"lr": 1e-2, "betas": [0.9, 0.999], "rho_rel": 0.0}  # the first release's defaults
_SHIPPED = {"lr": 1e-2, "betas": [0.9, 0.95], "rho_rel": 0.2}  # the defaults now
CONFIGS: dict[str, dict[str, list[tuple[str, str, dict]]]] = {
    # the first comparison (bench/results/ekfac_tasks.md)
    "peers": {
        "transformer": [("EKFAC lr 1e-2", "ekfac", {"lr": 1e-2}),
                        ("EKFAC lr 1e-2, carry keep", "ekfac", {"lr": 1e-2, "carry": "keep"}),
                        ("EKFAC lr 3e-3", "ekfac", {"lr": 3e-3}),
                        ("AdamW lr 1e-2", "adamw", {"lr": 1e-2}),
                        ("AdamW lr 3e-3", "adamw", {"lr": 3e-3}),
                        ("K-FAC defaults", "kfac", {"lr": 1e-2}),
                        ("SOAP lr 1e-2", "soap", {"lr": 1e-2}),
                        ("Muon lr 1e-2", "muon", {"lr": 1e-2, "adjust_lr_fn": "match_rms_adamw"})],
        "mlp": [("EKFAC lr 1e-2", "ekfac", {"lr": 1e-2}),
                ("EKFAC lr 3e-3", "ekfac", {"lr": 3e-3}),
                ("AdamW lr 1e-2", "adamw", {"lr": 1e-2}),
                ("AdamW lr 3e-3", "adamw", {"lr": 3e-3}),
                ("K-FAC defaults", "kfac", {"lr": 1e-2}),
                ("SOAP lr 1e-2", "soap", {"lr": 1e-2}),
                ("Muon lr 1e-2", "muon", {"lr": 1e-2, "adjust_lr_fn": "match_rms_adamw"})],
    },
    # the two scalings, the betas and the relative GR term (bench/results/ekfac_scaling.md)
    "scaling": {task: [
        ("EKFAC Adam scaling, betas (0.9, 0.999), rho_rel 0", "ekfac", _ADAM_0),
        ("EKFAC Fisher scaling (damping 1e-3)", "ekfac", {**_ADAM_0, "scaling": "fisher"}),
        ("EKFAC Adam, rho_rel 0.2", "ekfac", {**_ADAM_0, "rho_rel": 0.2}),
        ("EKFAC Adam, betas (0.9, 0.95)", "ekfac", {**_SHIPPED, "rho_rel": 0.0}),
        ("EKFAC Adam, betas (0.9, 0.95), rho_rel 0.2", "ekfac", _SHIPPED),
        *_PEERS] + ([] if task == "transformer" else [("K-FAC defaults", "kfac", {"lr": 1e-2})])
        for task in ("transformer", "mlp", "cnn")},
    # step-cost levers at the shipped defaults (bench/results/ekfac_levers.md)
    "levers": {task: [("EKFAC defaults", "ekfac", _SHIPPED),
                      ("EKFAC defaults, factor_every 2", "ekfac", {**_SHIPPED, "factor_every": 2}),
                      ("EKFAC defaults, factor_every 2, inverse_every 20", "ekfac",
                       {**_SHIPPED, "factor_every": 2, "inverse_every": 20}),
                      _PEERS[0]] for task in ("transformer", "mlp", "cnn")},
    # the relative GR term's effect at the shipped defaults (bench/results/ekfac_gr.md)
    # wall-clock time to the target on a quiet machine (bench/results/ekfac_time.md): EKFAC at
    # its defaults against AdamW and Muon at their best lr, nothing else running
    "time": {"transformer": [("EKFAC defaults", "ekfac", {"lr": 1e-2}), _PEERS[0],
                             ("Muon lr 1e-2", "muon", {"lr": 1e-2,
                                                       "adjust_lr_fn": "match_rms_adamw"})]},
    # CPU intervals: folds every factor_every steps, bases every inverse_every (steps to the
    # target must not get worse on any task; bench/results/ekfac_intervals.md)
    "intervals": {task: [("EKFAC defaults", "ekfac", {"lr": 1e-2}),
                         *[(f"EKFAC factor_every {f}", "ekfac", {"lr": 1e-2, "factor_every": f})
                           for f in (2, 3, 4)],
                         ("EKFAC factor_every 2, inverse_every 20", "ekfac",
                          {"lr": 1e-2, "factor_every": 2, "inverse_every": 20})]
                  for task in ("transformer", "mlp", "cnn")},
    # factor_every 2 against 1 on the time set's five seeds (bench/results/ekfac_intervals5.md)
    "intervals5": {"transformer": [("EKFAC factor_every 1", "ekfac",
                                    {"lr": 1e-2, "factor_every": 1}),
                                   ("EKFAC factor_every 2", "ekfac",
                                    {"lr": 1e-2, "factor_every": 2})]},
    # bases every 20 steps (half the refreshes) at factor_every 1 (bench/results/
    # ekfac_inverse20.md; the defaults' steps are in ekfac_intervals.md and ekfac_intervals5.md)
    "inverse20": {task: [("EKFAC inverse_every 20", "ekfac", {"lr": 1e-2, "inverse_every": 20})]
                  for task in ("transformer", "mlp", "cnn")},
    "gr": {task: [(f"EKFAC defaults, rho_rel {r:g}", "ekfac", {**_SHIPPED, "rho_rel": r})
                  for r in (0.0, 0.1, 0.2, 0.4)] for task in ("transformer", "mlp", "cnn")},
    # the bases refreshed at every step of the first 30 (the default then, refresh_warmup=30; picked
    # on the Hugging Face GPT-2 and Llama, bench/results/hf_lm_diagnosis.md) against no warmup
    # (the earlier default) on the demo's tasks (bench/results/ekfac_warmup.md)
    "warmup": {task: [("EKFAC defaults", "ekfac", _SHIPPED),
                      *[(f"EKFAC defaults, refresh_warmup {w}", "ekfac",
                         {**_SHIPPED, "refresh_warmup": w, "refresh_warmup_schedule": "every"})
                        for w in (0, 10)]]
               for task in ("transformer", "mlp", "cnn")},
    # sparser warmups: 20 steps, or the 30 at geometric gaps (11 refreshes; bench/results/
    # ekfac_warmup_screen.md, with the Hugging Face models' losses)
    "warmup_screen": {task: [("EKFAC defaults", "ekfac", _SHIPPED),
                             ("EKFAC defaults, refresh_warmup 20", "ekfac",
                              {**_SHIPPED, "refresh_warmup": 20,
                               "refresh_warmup_schedule": "every"}),
                             ("EKFAC defaults, geometric warmup", "ekfac",
                              {**_SHIPPED, "refresh_warmup_schedule": "geometric",
                               "refresh_warmup_growth": 0.3})]
                      for task in ("transformer", "mlp", "cnn")},
    # EKFAC's original (Fisher) scaling on the digits models at each lr of the grid, with
    # K-FAC's defaults (bench/results/ekfac_fisher.md; the scaling the README's table names
    # for them, read by bench/ekfac_targets.py)
    "fisher": {task: [*[(f"EKFAC fisher lr {lr:g}", "ekfac", {"lr": lr, "scaling": "fisher"})
                        for lr in (3e-3, 1e-2, 3e-2)],
                      ("K-FAC defaults", "kfac", {"lr": 1e-2})]
               for task in ("mlp", "cnn")},
    # denser geometric warmups: gaps of 10% / 15% of the step (19 / 16 of the first 30 steps;
    # bench/results/ekfac_growth_screen.md, with the Hugging Face models' losses)
    "growth_screen": {task: [("EKFAC defaults", "ekfac", _SHIPPED),
                             *[(f"EKFAC defaults, geometric warmup growth {r:g}", "ekfac",
                                {**_SHIPPED, "refresh_warmup_schedule": "geometric",
                                 "refresh_warmup_growth": r}) for r in (0.1, 0.15)]]
                      for task in ("transformer", "mlp", "cnn")},
    # the time set's A/B of the refresh warmups: every step of the 30 (the default before) and
    # the geometric gaps of 10% of the step (the default now), against AdamW, interleaved on a
    # quiet machine (bench/results/ekfac_time_growth.md)
    "time_growth": {"transformer": [("EKFAC every-step warmup", "ekfac",
                                     {"lr": 1e-2, "refresh_warmup_schedule": "every"}),
                                    ("EKFAC geometric warmup growth 0.1", "ekfac",
                                     {"lr": 1e-2, "refresh_warmup_schedule": "geometric",
                                      "refresh_warmup_growth": 0.1}), _PEERS[0]]},
    # the fold period F at the fold's per-step decay (factor_decay ** F per fold, every step of
    # the refresh warmup): F = 3 is the CPU default (bench/results/ekfac_factor_every.md)
    "factor_every": {task: [(f"EKFAC factor_every {f}", "ekfac", {"lr": 1e-2, "factor_every": f})
                            for f in (1, 2, 3, 4)] for task in ("transformer", "mlp", "cnn")},
    # how the second moment follows a new basis at the current defaults: reprojected (the
    # default) or kept (bench/results/ekfac_carry.md; the recurrent models' in issue 25's)
    "carry": {task: [(f"EKFAC carry {c}", "ekfac", {"lr": 1e-2, "carry": c})
                     for c in ("reproject", "keep")] for task in ("transformer", "mlp", "cnn")},
    # issue 21's step targets at the current defaults (bench/results/ekfac_grid.md, read
    # by bench/ekfac_targets.py): EKFAC's defaults against AdamW and SOAP (and Muon on the
    # language task) at each lr of 3e-3, 1e-2, 3e-2, so their best lr is a row
    "grid": {task: [("EKFAC defaults", "ekfac", {"lr": 1e-2}),
                    *[(f"{label} lr {lr:g}", key, {**fixed, "lr": lr})
                      for label, key, fixed in
                      [("AdamW", "adamw", {}), ("SOAP", "soap", {})] +
                      ([("Muon", "muon", {"adjust_lr_fn": "match_rms_adamw"})]
                       if task == "transformer" else [])
                      for lr in (3e-3, 1e-2, 3e-2)]]
             for task in ("transformer", "mlp", "cnn")},
}


def peer_configs(task_key: str) -> list[tuple[str, str, dict]]:
    """PSGD-Kron and Sophia on the language task (issue 21 item 5), built as the demo builds
    them (grng.demo.optimizers.SPECS: Sophia's Hessian estimate every 10 steps), at lr 3e-3
    (the top of the defaults sweep's grid, where it chose both) and 1e-2 (the next on the
    1-3-10 grid); appended to :data:`CONFIGS`' rows of that task."""
    from grng.demo.optimizers import SPECS

    if task_key != "transformer":
        return []
    return [(f"{SPECS[key].label} lr {tag}", key, {**SPECS[key].fixed, "lr": lr})
            for key in ("psgd", "sophia") for lr, tag in ((3e-3, "3e-3"), (1e-2, "1e-2"))]



def _configs(name: str, task_key: str) -> list[tuple[str, str, dict]]:
    """The rows of set ``name`` on a task: :data:`CONFIGS`' (plus :func:`peer_configs` in the
    "peers" set)."""
    return CONFIGS[name][task_key] + (peer_configs(task_key) if name == "peers" else [])

def _spd(d: int, seed: int) -> torch.Tensor:
    """X^T X / n with n = 2d rows whose scales decay (a factor-like spectrum), float32."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2 * d, d, generator=g) * torch.logspace(0, -2, d)
    return (X.T @ X / (2 * d)).float()


def _off_diagonal(M: torch.Tensor, Q: torch.Tensor) -> float:
    D = Q.T @ M @ Q
    return float((D - torch.diag(D.diagonal())).norm() / M.norm())


def _timed(fn, reps: int) -> tuple[list[float], object]:
    out, times = None, []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(1000.0 * (time.perf_counter() - t))
    return times, out


def _stats(times: list[float]) -> dict:
    s = sorted(times)
    q = lambda f: s[min(len(s) - 1, round(f * (len(s) - 1)))]  # noqa: E731
    return dict(p50=statistics.median(s), p20=q(0.2), p80=q(0.8), n=len(s))


def refresh(args: argparse.Namespace) -> None:
    load_start = os.getloadavg()
    env = environment("cpu")
    rows, lines = [], []
    for d in args.sizes:
        reps = 5 if d <= 1024 else 3
        prev = _spd(d, 0)
        M = 0.95 * prev + 0.05 * _spd(d, 1)
        Q_prev = torch.linalg.eigh(prev).eigenvectors.flip(-1)
        v = torch.rand(d, d)
        t_eigh, Q_eigh = _timed(lambda: torch.linalg.eigh(M).eigenvectors.flip(-1), reps)
        t_sub, Q_sub = _timed(lambda: subspace_step(M, Q_prev), reps)
        t_chol, Q_chol = _timed(lambda: subspace_step(M, Q_prev, "cholesky"), reps)
        t_carry, _ = _timed(lambda: rotation(Q_sub, Q_prev) ** 2 @ v, reps)
        base = dict(suite="ekfac_refresh", x_name="d", x_value=str(d), dtype="float32", **env)
        cfg = (f"one dense factor, SPD, spectrum decaying 1e4; warm start: the basis of the "
               f"factor before a 5% EMA drift; torch threads {torch.get_num_threads()}; "
               "machine shared")
        for provider, times, Q in (("eigh", t_eigh, Q_eigh), ("subspace", t_sub, Q_sub),
                                   ("subspace cholesky", t_chol, Q_chol),
                                   ("reproject v", t_carry, None)):
            rows.append(Row(name=f"refresh/d{d}", provider=provider, metric="time", unit="ms",
                            config=cfg, **_stats(times), **base))
            if Q is not None:
                rows.append(Row(name=f"refresh/d{d}", provider=provider, metric="offdiag",
                                unit="||offdiag(Q^T M Q)||/||M||", p50=_off_diagonal(M, Q),
                                config=cfg, **base))
        start = _off_diagonal(M, Q_prev)
        eigh_ms, sub_ms, chol_ms = (statistics.median(t) for t in (t_eigh, t_sub, t_chol))
        lines.append(f"| {d} | {eigh_ms:.0f} | {sub_ms:.0f} | {eigh_ms / sub_ms:.1f}x | "
                     f"{chol_ms:.0f} | {eigh_ms / chol_ms:.1f}x | "
                     f"{statistics.median(t_carry):.0f} | {start:.1e} | "
                     f"{_off_diagonal(M, Q_sub):.1e} | {_off_diagonal(M, Q_chol):.1e} | "
                     f"{_off_diagonal(M, Q_eigh):.1e} |")
        print(lines[-1], flush=True)
    loads = load_text(load_start, os.getloadavg())
    replace_rows(RESULTS / "ekfac_refresh.csv", rows)
    head = run_header(torch.get_num_threads())
    text = ["# EKFAC basis refresh: eigh vs one warm-started subspace step "
            "(`python bench/ekfac.py refresh`)", "",
            *[f"- {k}: {v}" for k, v in head.items()], f"- {loads} (machine shared)", "",
            "Per refresh of one dense d x d factor, float32, median ms: eigh, one subspace "
            "step with Householder QR (the CPU default, `qr=\"householder\"`) and with shifted "
            "CholeskyQR3 in float64 (`qr=\"cholesky\"`, the CUDA default). off-diagonal: "
            "||offdiag(Q^T M Q)||_F / ||M||_F of the previous basis (the start), one subspace "
            "step from it (each QR), and eigh.", "",
            "| d | eigh ms | subspace step (Householder) ms | eigh / it | subspace step "
            "(CholeskyQR3) ms | eigh / it | re-project v ms | off-diag start | after "
            "Householder step | after CholeskyQR3 step | eigh |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            *lines]
    (RESULTS / "ekfac_refresh.md").write_text("\n".join(text) + "\n")


def tasks(args: argparse.Namespace) -> None:
    from grng.demo.tasks import TASKS, load_data
    from grng.demo.train import level_key, train_run

    warnings.simplefilter("ignore")
    load_start = os.getloadavg()
    env = environment("cpu")
    seeds = list(range(100, 100 + args.seeds))
    split = {"val": "validation", "test": "test"}[args.split]
    runs: dict[tuple[str, str], list] = {}
    for seed in seeds:
        for task_key in args.tasks:
            task = TASKS[task_key]
            data = load_data(task.dataset)
            for label, key, hp in _configs(args.set, task_key):
                r = train_run(task_key, key, hp, data.train, getattr(data, args.split),
                              seed=seed,
                              epochs=task.epochs, batch_size=task.batch_size,
                              eval_every=task.eval_every, progress=False)
                runs.setdefault((task_key, label), []).append(r)
                hit = r.reached.get(level_key(task.target))
                print(f"{task_key} {label} seed {seed}: {r.status} final "
                      f"{task.format(r.final_metric)} target at {hit and hit[0]} "
                      f"{1000 * r.wall_s / max(r.steps, 1):.1f} ms/step", flush=True)
    loads = load_text(load_start, os.getloadavg())
    rows, text = [], []
    for task_key in args.tasks:
        task = TASKS[task_key]
        text += [f"## {task_key} (target {task.level_name(task.target)} on {split})", "",
                 f"| optimizer | steps to target (median; reached) | s to target | final {split} "
                 f"{task.metric} (median) | ms/step | diverged |", "|---|---|---|---|---|---|"]
        for label, key, hp in _configs(args.set, task_key):
            rs = runs[(task_key, label)]
            hits = [r.reached.get(level_key(task.target)) for r in rs]
            steps = [h[0] for h in hits if h]
            secs = [h[1] for h in hits if h]
            finals = [r.final_metric for r in rs if math.isfinite(r.final_metric)]
            ms = [1000 * r.wall_s / r.steps for r in rs if r.steps]
            bad = sum(r.status != "ok" for r in rs)
            med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
            scale = 100.0 if task.metric == "acc" else 1.0
            base = dict(suite="ekfac_tasks", name=f"{task_key}/{key}", provider=label,
                        x_name="lr", x_value=f"{hp['lr']:g}", dtype="float32",
                        config=f"{json.dumps(hp)}; seeds {seeds}; {split} split; {loads}",
                        **env)
            rows += [Row(metric="steps_to_target", unit="steps", p50=med(steps) if steps else None,
                         n=len(steps), **base),
                     Row(metric="seconds_to_target", unit="s", p50=med(secs) if secs else None,
                         n=len(secs), **base),
                     Row(metric=f"final_{args.split}_{task.metric}",
                         unit="%" if scale == 100 else "bpc",
                         p50=scale * med(finals) if finals else None, n=len(finals), **base),
                     Row(metric="step_time", unit="ms", p50=med(ms), n=len(ms), **base),
                     Row(metric="failed_runs", unit="runs", p50=float(bad), n=len(rs), **base)]
            text.append(f"| {label} | {med(steps):.0f} ({len(steps)}/{len(rs)}) | "
                        f"{med(secs):.2f} | {task.format(med(finals))} | {med(ms):.1f} | "
                        f"{bad}/{len(rs)} |")
        text.append("")
    name = args.name
    replace_rows(RESULTS / f"{name}.csv", rows)
    head = run_header(torch.get_num_threads())
    (RESULTS / f"{name}.md").write_text("\n".join(
        [f"# EKFAC on the demo's tasks (`python bench/ekfac.py tasks`)", "",
         *[f"- {k}: {v}" for k, v in head.items()], f"- seeds: {seeds}",
         f"- {loads} (machine shared: seconds and ms/step are noisy)", "",
         f"Evaluated on the {split} split; every configuration at its library defaults but "
         "the hyperparameters named (its row's config in the .csv); runs interleaved (seed "
         "outermost).", "", *text]) + "\n")


def step(args: argparse.Namespace) -> None:
    import torch.nn.functional as F

    import grng
    from grng.benchmark.costmodel import count_ops
    from grng.demo.models import make_model
    from grng.demo.tasks import load_data
    from grng.precondition.adam import DiagonalAdam
    from grng.precondition.eigenbasis import EigenbasisPreconditioner

    warnings.simplefilter("ignore")
    load_start = os.getloadavg()
    train = load_data("text").train
    batches = [(train.x[k * 16:(k + 1) * 16], train.y[k * 16:(k + 1) * 16]) for k in range(40)]

    def alone(*unit):  # every unit its own batch: the per-unit loop
        return None

    setups = {"AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2),
              "EKFAC (defaults, batched)": lambda m: grng.EKFAC(m),
              "EKFAC (defaults, factor_every 2)": lambda m: grng.EKFAC(m, factor_every=2),
              "EKFAC (one unit at a time)": lambda m: grng.EKFAC(m)}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    runs = {}
    for label, make in setups.items():
        torch.manual_seed(0)
        model = make_model("transformer")
        runs[label] = (model, make(model))
    times: dict[str, list[float]] = {label: [] for label in setups}
    real = EigenbasisPreconditioner._layout, DiagonalAdam._layout
    for r in range(args.rounds):
        for label, (model, opt) in runs.items():
            one = "one unit" in label
            EigenbasisPreconditioner._layout = alone if one else real[0]
            DiagonalAdam._layout = staticmethod(alone if one else real[1])
            for k in range(args.steps):
                x, y = batches[(r * args.steps + k) % len(batches)]
                t = clock()
                opt.zero_grad()
                out = model(x)
                F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
                opt.step()
                if r > 0:  # round 0 warms up (first bases by eigh)
                    times[label].append(1000.0 * (clock() - t))
    ops = {}  # aten ops dispatched per optimizer step, over 20 more steps (two refreshes)
    for label, (model, opt) in runs.items():
        one = "one unit" in label
        EigenbasisPreconditioner._layout = alone if one else real[0]
        DiagonalAdam._layout = staticmethod(alone if one else real[1])

        def loss(i: int, model=model) -> torch.Tensor:
            x, y = batches[i % len(batches)]
            out = model(x)
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

        ops[label] = count_ops(model, opt, loss, 20)[1]
    EigenbasisPreconditioner._layout, DiagonalAdam._layout = real[0], staticmethod(real[1])
    loads = load_text(load_start, os.getloadavg())
    env = environment("cpu")
    adamw = statistics.median(times["AdamW"])
    rows, lines = [], []
    for label, ts in times.items():
        st = _stats(ts)
        rows.append(Row(suite="ekfac_step", name="step/transformer", provider=label,
                        metric="time", unit="ms", x_name="steps", x_value=str(len(ts)),
                        dtype="float32",
                        config=f"demo transformer, batch 16 x 32; clock {args.clock}; {loads}",
                        **st, **env))
        rows.append(Row(suite="ekfac_step", name="step/transformer", provider=label,
                        metric="ops", unit="aten ops per step", x_name="steps", x_value="20",
                        dtype="float32", p50=ops[label], config="demo transformer", **env))
        lines.append(f"| {label} | {st['p50']:.1f} | {st['p20']:.1f} | {st['p80']:.1f} | "
                     f"{st['p50'] / adamw:.2f} | {ops[label]:.0f} |")
        print(lines[-1], flush=True)
    replace_rows(RESULTS / f"{args.name}.csv", rows)
    head = run_header(torch.get_num_threads())
    what = ("CPU time of this process (1 thread; robust to other jobs on a shared machine, not "
            "to their cache and core contention)" if args.clock == "cpu" else "wall-clock")
    (RESULTS / f"{args.name}.md").write_text("\n".join(
        [f"# EKFAC's step cost on the demo transformer (`python bench/ekfac.py step --clock "
         f"{args.clock} --name {args.name}`)", "",
         *[f"- {k}: {v}" for k, v in head.items()], f"- {loads} (machine shared)", "",
         f"- clock: {what}", "",
         f"ms per training step (forward, backward, optimizer step), {args.rounds - 1} rounds "
         f"of {args.steps} steps after one warm-up round, the configurations interleaved round "
         "by round (refresh steps included, every 10th).", "",
         "ops: aten ops dispatched by one optimizer step (mean over 20 steps; the forward and "
         "backward are the same for all).", "",
         "| configuration | ms/step p50 | p20 | p80 | / AdamW | ops per step |",
         "|---|---|---|---|---|---|",
         *lines]) + "\n")


def hparams(args: argparse.Namespace) -> None:
    """Some optimizers' part of the defaults sweep (bench/defaults.py's protocol and seeds; EKFAC
    and Muon, added after the full sweep): their rows to ``defaults_<keys>.csv`` and their
    entries into grng/demo/hparams.json (the other optimizers' entries are kept)."""
    import defaults  # bench/defaults.py

    from grng.demo.sweep import (HPARAMS_PATH, hparams_table, load_hparams, run_sweep,
                                 save_hparams, sweep_meta)

    warnings.simplefilter("ignore")
    seeds = {t: defaults.DEFAULT_SEEDS[t] for t in args.tasks}
    load_start = os.getloadavg()
    cells = run_sweep(args.tasks, args.optimizers, seeds,
                      log=lambda line: print(line, flush=True))
    loads = load_text(load_start, os.getloadavg())
    config = (f"defaults; validation split; seeds {seeds}; only {args.optimizers} "
              f"(bench/ekfac.py hparams); {loads}")
    replace_rows(RESULTS / f"defaults_{'_'.join(args.optimizers)}.csv",
                 defaults.rows_of(cells, environment("cpu"), config))
    mine = hparams_table(cells, sweep_meta(seeds, None))
    table = load_hparams(HPARAMS_PATH)
    for task, entries in mine["models"].items():
        table["models"][task].update(entries)
    for key in args.optimizers:
        table["meta"][key] = {"added_by": "bench/ekfac.py hparams", **mine["meta"]}
    save_hparams(table, HPARAMS_PATH)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("refresh")
    r.add_argument("--sizes", type=int, nargs="+", default=[768, 3072])
    t = sub.add_parser("tasks")
    t.add_argument("--tasks", nargs="+", default=["transformer", "mlp"])
    t.add_argument("--seeds", type=int, default=3)
    t.add_argument("--name", default="ekfac_tasks")
    t.add_argument("--set", choices=list(CONFIGS), default="peers")
    t.add_argument("--split", choices=["val", "test"], default="val")
    st = sub.add_parser("step")
    st.add_argument("--rounds", type=int, default=11)
    st.add_argument("--steps", type=int, default=20)
    st.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    st.add_argument("--name", default="ekfac_step")
    h = sub.add_parser("hparams")
    h.add_argument("--tasks", nargs="+", default=["cnn", "mlp", "transformer"])
    h.add_argument("--optimizers", nargs="+", default=["ekfac"])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    {"refresh": refresh, "tasks": tasks, "step": step, "hparams": hparams}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
