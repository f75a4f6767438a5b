"""Small Hugging Face language models from configs (issue 21): EKFAC against AdamW, Muon, SOAP
and K-FAC on a GPT-2 and a Llama trained on the standard library's characters.

    python bench/hf_lm.py --jobs 3            # both models, 3 seeds: bench/results/hf_lm.{csv,md}
    python bench/hf_lm.py --models gpt2 --seeds 1 --steps 20 --name hf_lm_smoke   # a quick look
    python bench/hf_lm.py --configs "EKFAC defaults" --seeds 2 --first-seed 103   # some more
    python bench/hf_lm.py --configs "EKFAC defaults" --replace --jobs 2   # EKFAC's new defaults

Models (transformers' classes built from configs, nothing downloaded), both 2 layers of width
64 with 4 attention heads, a 64-character context and grng.demo.text's 98-symbol alphabet:

* ``gpt2``: ``GPT2LMHeadModel`` (MLP 256, learned positions, dropout 0, head tied to the token
  embedding);
* ``llama``: ``LlamaForCausalLM`` (SwiGLU MLP 176, rotary positions, 4 key/value heads, untied
  head).

Data: grng.demo.text's splits in 64-character windows; 300 steps of 16 windows are one epoch of
the train text (no window twice), validation is 256 windows (16,384 characters). Each run is
grng.demo.train.train_run (the demo's loop: per seed the same initialization and batch order
for every optimizer) with the validation loss (mean cross-entropy per character, nats) taken at
steps 100 and 300. The optimizers are built as the demo builds them
(grng.demo.optimizers.make_stepper): AdamW over an lr grid 1e-3 to 3e-2, torch.optim.Muon
(``match_rms_adamw``; AdamW on embeddings, norms, biases and the head), SOAP (heavyball, eager)
at 1e-2 and 3e-2, K-FAC and EKFAC at their library defaults (no argument, so a rerun measures
whatever the defaults are then), EKFAC at 3e-3 and EKFAC with ``refresh_warmup=0`` (its bases
refreshed every 10 steps from the first, the default before issue 21's Hugging Face work) and
``refresh_warmup=10`` (a third of the warmup's refreshes: it loses SOAP's loss at 100 steps). The
committed results ran the grids on seed 100 and each grid's best (with Muon, K-FAC and EKFAC's defaults) on seeds 100-102 (``--configs``
and the resume below); the default invocation runs every configuration on every seed. Runs are queued seed outermost, then model, then optimizer
(``--jobs`` runs that many at a time, each a process of one torch thread). The machine is
shared (load averages recorded), so ms/step is noisy.

Each finished run is appended to ``bench/results/<name>_runs.jsonl`` (what ran, its losses,
ms/step, the load); a run already there is not run again, so an interrupted or partial run
(``--configs``, ``--seeds``, ``--first-seed``) is completed by running again. From all of
them it writes schema rows (grng.benchmark.schema, medians over the seeds) to
``<name>.csv`` and a Markdown summary ``<name>.md``; the README's tables read the CSV
(tools/readme_numbers.py).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grng.benchmark.schema import Row, environment, replace_rows  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SEQ_LEN, BATCH, STEPS, EVAL_EVERY = 64, 16, 300, 100
REPORTED = (100, 300)  # the steps whose validation loss the tables and the CSV give

#: (label, demo optimizer key, hyperparameters): the lr grids of AdamW (1e-3 to 3e-2) and SOAP
#: (around its best on the demo's transformer, 1e-2), Muon at that transformer's best lr,
#: K-FAC and EKFAC at their defaults, EKFAC at AdamW's best lr on GPT-2 (3e-3), and EKFAC
#: without the refresh warmup (the default before it: bench/results/hf_lm_diagnosis.md)
CONFIGS: list[tuple[str, str, dict]] = [
    ("AdamW lr 1e-3", "adamw", {"lr": 1e-3}),
    ("AdamW lr 3e-3", "adamw", {"lr": 3e-3}),
    ("AdamW lr 1e-2", "adamw", {"lr": 1e-2}),
    ("AdamW lr 3e-2", "adamw", {"lr": 3e-2}),
    ("Muon lr 1e-2", "muon", {"lr": 1e-2}),
    ("SOAP lr 1e-2", "soap", {"lr": 1e-2}),
    ("SOAP lr 3e-2", "soap", {"lr": 3e-2}),
    ("K-FAC defaults", "kfac", {}),
    ("EKFAC defaults", "ekfac", {}),
    ("EKFAC lr 3e-3", "ekfac", {"lr": 3e-3}),
    # folds every step, the CPU default before F = 3 (bench/results/ekfac_factor_every.md)
    ("EKFAC factor_every 1", "ekfac", {"factor_every": 1}),
    # the second moment kept, not reprojected, at a basis change (better on the recurrent LMs:
    # bench/results/recurrent_ekfac_keep.md)
    ("EKFAC carry keep", "ekfac", {"carry": "keep"}),
    ("EKFAC refresh_warmup 0", "ekfac", {"refresh_warmup": 0}),
    ("EKFAC refresh_warmup 10", "ekfac",
     {"refresh_warmup": 10, "refresh_warmup_schedule": "every"}),
    # sparser warmups (bench/results/ekfac_warmup_screen.md): 20 steps, or 30 at geometric gaps
    ("EKFAC refresh_warmup 20", "ekfac",
     {"refresh_warmup": 20, "refresh_warmup_schedule": "every"}),
    ("EKFAC geometric warmup", "ekfac",
     {"refresh_warmup_schedule": "geometric", "refresh_warmup_growth": 0.3}),
    # denser geometric warmups, gaps of 10% / 15% of the step (bench/results/
    # ekfac_growth_screen.md)
    *[(f"EKFAC geometric warmup growth {r:g}", "ekfac",
       {"refresh_warmup_schedule": "geometric", "refresh_warmup_growth": r}) for r in (0.1, 0.15)],
]


class CausalLM(nn.Module):
    """A Hugging Face causal LM as the demo's models are: token ids (N, T) -> logits (N, T, V)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, x: Tensor) -> Tensor:
        return self.lm(input_ids=x).logits


def build(model: str) -> CausalLM:
    """The model named ``model`` ("gpt2" or "llama"; module docstring), freshly initialized."""
    import transformers

    from grng.demo.text import VOCAB_SIZE

    if model == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB_SIZE, n_positions=SEQ_LEN, n_embd=64, n_layer=2, n_head=4,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
            attn_implementation="sdpa")
        return CausalLM(transformers.GPT2LMHeadModel(config))
    if model == "llama":
        config = transformers.LlamaConfig(
            vocab_size=VOCAB_SIZE, max_position_embeddings=SEQ_LEN, hidden_size=64,
            intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, bos_token_id=0, eos_token_id=0, pad_token_id=None,
            attn_implementation="sdpa")
        return CausalLM(transformers.LlamaForCausalLM(config))
    raise ValueError(f"model must be 'gpt2' or 'llama', got {model!r}")


def _hp(key: str, hp: dict) -> dict:
    """The demo's fixed protocol of ``key`` (Muon's match_rms_adamw) under ``hp``."""
    from grng.demo.optimizers import SPECS

    return {**SPECS[key].fixed, **hp}


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def loss_at(run, step: int) -> float:
    """A run's validation loss at ``step`` (NaN when it stopped before)."""
    return run.curve_loss[run.curve_step.index(step)] if step in run.curve_step else math.nan


def best_of(configs: list[tuple[str, str, dict]], final: Callable[[str], float]
            ) -> dict[str, str]:
    """{optimizer key: the label of its configuration with the lowest ``final`` loss}."""
    best: dict[str, str] = {}
    for label, key, _ in configs:
        if key not in best or final(label) < final(best[key]):
            best[key] = label
    return best


def one_run(model: str, key: str, hp: dict, seed: int, steps: int):
    """One training run (grng.demo.train.train_run) of ``model`` with optimizer ``key``, in
    one torch thread; returns its RunResult."""
    from grng.demo.tasks import Task
    from grng.demo.text import load_text_splits
    from grng.demo.train import train_run

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    data = load_text_splits(sizes=(STEPS * BATCH * SEQ_LEN, 256 * SEQ_LEN, 256 * SEQ_LEN),
                            seq_len=SEQ_LEN)
    task = Task("hf_lm", "text", "bpc", (3.7,), 3.7, epochs=1, batch_size=BATCH,
                eval_every=min(EVAL_EVERY, steps), grad_rows=64)
    return train_run(model, key, _hp(key, hp), data.train, data.val, seed=seed, epochs=1,
                     batch_size=BATCH, eval_every=task.eval_every, max_steps=steps,
                     progress=False, task=task, build=lambda: build(model))


def record(model: str, label: str, key: str, hp: dict, seed: int, steps: list[int], r) -> dict:
    """One run as a JSON line of ``<name>_runs.jsonl``: what ran and what it gave."""
    return {"model": model, "label": label, "key": key, "hp": _hp(key, hp), "seed": seed,
            "steps": steps[-1], "status": r.status, "message": r.message[:200],
            "val_loss": {str(s): loss_at(r, s) for s in steps},
            "ms_per_step": 1000 * r.wall_s / r.steps if r.steps else None,
            "load_end": os.getloadavg()[0], **environment("cpu"),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"])
    p.add_argument("--configs", nargs="+", help="labels of CONFIGS to run (default: all)")
    p.add_argument("--seeds", type=int, default=3, help="how many seeds, from --first-seed")
    p.add_argument("--first-seed", type=int, default=100)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time, each a process of one torch thread (ms/step is then "
                        "measured with the runs sharing the machine)")
    p.add_argument("--name", default="hf_lm")
    p.add_argument("--out", type=Path, default=RESULTS, help="the folder of the result files")
    p.add_argument("--replace", action="store_true",
                   help="run the chosen runs again even where recorded (their old records are "
                        "dropped): e.g. --configs 'EKFAC defaults' --replace after EKFAC's "
                        "defaults changed")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    configs = [c for c in CONFIGS if args.configs is None or c[0] in args.configs]
    if args.configs and len(configs) != len(args.configs):
        p.error(f"--configs: unknown {sorted(set(args.configs) - {c[0] for c in CONFIGS})}")
    steps = sorted({min(s, args.steps) for s in (*REPORTED, args.steps)})
    raw = args.out / f"{args.name}_runs.jsonl"
    done = list(map(json.loads, raw.read_text().splitlines())) if raw.exists() else []
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    if args.replace:
        chosen = {(seed, model, label, args.steps) for seed in seeds for model in args.models
                  for label, _, _ in configs}
        done = [d for d in done if (d["seed"], d["model"], d["label"], d["steps"]) not in chosen]
        raw.write_text("".join(json.dumps(d) + "\n" for d in done))
    have = {(d["seed"], d["model"], d["label"], d["steps"]) for d in done}
    plan = [(seed, model, label, key, hp) for seed in seeds for model in args.models
            for label, key, hp in configs if (seed, model, label, args.steps) not in have]
    print(f"{len(plan)} runs to do ({len(have)} in {raw.name} already)", flush=True)
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(one_run, model, key, hp, seed, args.steps): item
                   for item in plan for seed, model, _, key, hp in [item]}
        for fut in as_completed(futures):
            seed, model, label, key, hp = futures[fut]
            rec = record(model, label, key, hp, seed, steps, fut.result())
            with raw.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            print(f"{model} {label} seed {seed}: {rec['status']} " + " ".join(
                f"@{s} {v:.3f}" for s, v in rec["val_loss"].items())
                + f" {rec['ms_per_step'] or math.nan:.1f} ms/step {rec['message'][:80]}",
                flush=True)
            report(args, raw)
    if raw.exists():
        report(args, raw)  # (also when every run was there already)
    return 0


def report(args: argparse.Namespace, raw: Path) -> None:
    """The CSV and the summary of every run of ``args.steps`` steps in ``raw`` (read again:
    other invocations may have appended runs)."""
    mine = [d for d in map(json.loads, raw.read_text().splitlines()) if d["steps"] == args.steps]
    if mine:
        write(args.out, args.name, rows_of(mine), mine)


def rows_of(records: list[dict]) -> list[Row]:
    """Per (model, configuration) of the run ``records``: the validation loss at each step
    they were read (median, min as p20, max as p80, over the runs that got there), ms/step,
    failed runs; the config cell says the seeds and the load averages at the runs' ends."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for d in records:
        groups.setdefault((d["model"], d["label"]), []).append(d)
    order = {label: i for i, (label, _, _) in enumerate(CONFIGS)}
    rows = []
    for (model, label), rs in sorted(groups.items(),
                                     key=lambda g: (g[0][0], order.get(g[0][1], len(order)))):
        first = rs[0]
        n_params = sum(p.numel() for p in build(model).parameters())
        loads = [d["load_end"] for d in rs if d["load_end"] is not None] or [math.nan]
        base = dict(suite="hf_lm", name=f"{model}/{first['key']}", provider=label,
                    dtype="float32", device=first["device"], torch=first["torch"],
                    triton=first["triton"], grng=first["grng"],
                    timestamp=max((d["timestamp"] for d in rs if d["timestamp"]), default=""),
                    config=f"{json.dumps(first['hp'])}; {n_params} parameters; seeds "
                           f"{sorted(d['seed'] for d in rs)}; {first['steps']} steps; validation "
                           f"split; load average (1 min) at the runs' ends {min(loads):.1f}-"
                           f"{max(loads):.1f}")
        for s in first["val_loss"]:
            losses = sorted(v for v in (d["val_loss"][s] for d in rs) if math.isfinite(v))
            rows.append(Row(metric="val_loss", unit="nats", x_name="step", x_value=s,
                            p50=_median(losses) if losses else None,
                            p20=losses[0] if losses else None,
                            p80=losses[-1] if losses else None, n=len(losses), **base))
        ms = [d["ms_per_step"] for d in rs if d["ms_per_step"]]
        rows += [Row(metric="step_time", unit="ms", p50=_median(ms), n=len(ms), **base),
                 Row(metric="failed_runs", unit="runs",
                     p50=float(sum(d["status"] != "ok" for d in rs)), n=len(rs), **base)]
    return rows


def best_runs(configs: dict[str, dict[str, Row]], last: str) -> dict[str, str]:
    """{optimizer key: its configuration with the lowest median ``last`` loss} among those
    with every run finished and as many runs as any of that optimizer's configurations (a
    grid point run on fewer seeds does not compete)."""
    key_of = {label: m["failed_runs"].name.split("/")[1] for label, m in configs.items()}
    most = {key: max(m["failed_runs"].n for label, m in configs.items() if key_of[label] == key)
            for key in key_of.values()}
    full = {label: m[last].p50 for label, m in configs.items()
            if m[last].p50 is not None and m[last].n == m["failed_runs"].n == most[key_of[label]]}
    return best_of([(label, key_of[label], {}) for label in configs],
                   lambda label: full.get(label, math.inf))


def write(out: Path, name: str, rows: list[Row], records: list[dict]) -> None:
    """``rows`` as ``<out>/<name>.csv`` and their Markdown summary as ``<out>/<name>.md``: per
    model every configuration's losses, ms/step, runs and seeds, and each optimizer's best."""
    replace_rows(out / f"{name}.csv", rows)
    cells: dict[str, dict[str, dict[str, Row]]] = {}
    for r in rows:
        metric = r.metric + (f"@{r.x_value}" if r.x_name == "step" else "")
        cells.setdefault(r.name.split("/")[0], {}).setdefault(r.provider, {})[metric] = r
    steps = sorted({int(r.x_value) for r in rows if r.metric == "val_loss"})
    text = []
    for model, configs in cells.items():
        best = best_runs(configs, f"val_loss@{steps[-1]}")
        params = configs[next(iter(configs))]["failed_runs"].config.split("; ")[1]
        text += [f"## {model} ({params})", "",
                 "| optimizer | " + " | ".join(f"val loss @{s} (median; min-max)" for s in steps)
                 + " | ms/step | failed runs | seeds | best of its grid |",
                 "|---|" + "---|" * (len(steps) + 4)]
        for label, m in configs.items():
            losses = [f"{m[f'val_loss@{s}'].p50:.3f} ({m[f'val_loss@{s}'].p20:.3f}-"
                      f"{m[f'val_loss@{s}'].p80:.3f})" if m[f"val_loss@{s}"].n else "—"
                      for s in steps]
            failed, ms = m["failed_runs"], m["step_time"].p50
            seeds = failed.config.split("; ")[2].removeprefix("seeds ")
            text.append(f"| {label} | " + " | ".join(losses) + f" | "
                        f"{'—' if ms is None else f'{ms:.1f}'} | {failed.p50:.0f}/{failed.n} | "
                        f"{seeds} | {'yes' if best[failed.name.split('/')[1]] == label else ''} |")
        text.append("")
    loads = [d["load_end"] for d in records if d["load_end"] is not None]
    stamps = sorted(d["timestamp"] for d in records if d["timestamp"])
    unknown = len(records) - len(stamps)
    (out / f"{name}.md").write_text("\n".join(
        ["# Small Hugging Face GPT-2 and Llama on the standard library's characters "
         "(`python bench/hf_lm.py`)", "",
         f"- machine: {platform.machine()}, {os.cpu_count()} logical cores, one torch thread "
         f"per run; {rows[0].device}, torch {rows[0].torch}, grng {rows[0].grng}",
         f"- {len(records)} runs" + (f", {len(stamps)} finished {stamps[0]} to {stamps[-1]} "
                                    f"with load average (1 min) {min(loads):.1f} to "
                                    f"{max(loads):.1f} at their ends" if stamps else "")
         + (f"; {unknown} recorded from the progress lines of an earlier version of this "
            "script (same runs; losses to 3 decimals, no load or time)" if unknown else "")
         + " (machine shared: ms/step is noisy)",
         "", "\n\n".join(__doc__.split("\n\n")[2:5]), "",
         f"Validation loss in nats per character (bits per character = nats / ln 2). 'best of "
         f"its grid': the optimizer's configuration with the lowest median loss at step "
         f"{steps[-1]} among those with every run finished on the most seeds.", "",
         *text]) + "\n")


if __name__ == "__main__":
    sys.exit(main())
