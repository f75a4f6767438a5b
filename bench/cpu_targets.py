"""The CPU step-time targets of issue "A fast step": a full training step (forward, backward,
optimizer) of K-FAC, RING and R-Kalman at the library defaults against AdamW's, interleaved.

    python bench/cpu_targets.py [--rounds 7] [--steps 40] [--models small,mlp,transformer]

Models: ``small`` = 64-128-10 MLP at batch 64; ``mlp`` = 256-512-512-10 MLP at batch 2048;
``transformer`` = bench/models.GPT with 2 layers of width 256 (4 heads, vocabulary 256, context
64, tied head) at batch 16 x 64. Per model every optimizer steps round-robin in one process
(one torch thread, random inputs, never zeros): each round times ``steps`` consecutive steps of
each optimizer (a multiple of the refresh period, so folds and refreshes are in the mean), and
the ratio to AdamW is taken per round, under the same load; reported: the median over rounds of
the mean step time and of the ratio. A FLOP floor per model says what the ratio cannot go
below with exact float32 arithmetic at this efficiency: (forward + backward + fold / F + apply)
over forward + backward (docs/performance.md).

Rows of the one benchmark schema (suite ``cpu_targets``) append to
``bench/results/cpu_targets.csv``; ``bench/results/cpu_targets.md`` is rewritten.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402

import grng  # noqa: E402
from grng.benchmark.schema import (Row, append_rows, environment, load_text,  # noqa: E402
                                   run_header)
from grng.optim.cases import make_optimizer  # noqa: E402

SUITE = "cpu_targets"
RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 1.5


def make_model(name: str) -> tuple[nn.Module, Callable[[torch.Generator], tuple[Tensor, Tensor]]]:
    """A model and a batch sampler."""
    if name in ("small", "mlp"):
        sizes, batch = ((64, 128, 10), 64) if name == "small" else ((256, 512, 512, 10), 2048)
        layers: list[nn.Module] = []
        for i, o in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(i, o), nn.Tanh()]
        return nn.Sequential(*layers[:-1]), lambda g: (
            torch.randn(batch, sizes[0], generator=g), torch.randint(0, sizes[-1], (batch,), generator=g))
    cfg = models.GPTConfig(vocab=256, context=64, width=256, heads=4, layers=2)

    def tokens(g: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, cfg.vocab, (16, cfg.context + 1), generator=g)
        return idx[:, :-1], idx[:, 1:]
    return models.GPT(cfg), tokens


# benchmark name -> its case of grng.optim.cases, at the case's (the library's) defaults
OPTIMIZERS: dict[str, str] = {"adamw": "adamw", "kfac": "kfac-eigen", "ring": "ring",
                              "rkalman": "rkalman"}


def loss_of(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    out = model(x)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def flop_floor(model: nn.Module, x: Tensor, factor_every: int) -> float:
    """(fwd+bwd + fold / F + eigen apply) / (fwd+bwd) FLOPs of K-FAC on ``model``'s blocks."""
    opt = make_optimizer("kfac-eigen", model)
    try:
        fb = fold = apply = 0.0
        rows = x.shape[0] * (x.shape[1] if x.dim() == 2 and not x.is_floating_point() else 1)
        for layer in opt.layers:
            d_g, d_a = layer.dims()
            m = rows
            fb += 6.0 * m * d_a * d_g
            fold += m * (d_a * d_a * (0 if layer.a_factor.diagonal else 1) + d_g * d_g)
            apply += 4.0 * d_g * d_a * (d_g + d_a)
        return (fb + fold / factor_every + apply) / fb
    finally:
        opt.capture.remove()


def measure(model_name: str, rounds: int, steps: int) -> list[dict]:
    """Per optimizer: median over rounds of the mean step time and of the ratio to AdamW."""
    torch.manual_seed(0)
    base, sample = make_model(model_name)
    g = torch.Generator().manual_seed(1)
    batches = [sample(g) for _ in range(4)]
    runs = {}
    for name, case in OPTIMIZERS.items():
        model, _ = make_model(model_name)
        model.load_state_dict(base.state_dict())
        runs[name] = (model, make_optimizer(case, model))
    per_round: dict[str, list[float]] = {name: [] for name in runs}

    def step(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
        x, y = batches[i % len(batches)]
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()

    for model, opt in runs.values():  # warm-up: factors, first inverses, allocator
        for i in range(10):
            step(model, opt, i)
    for _ in range(rounds):
        for name, (model, opt) in runs.items():
            t = time.perf_counter()
            for i in range(steps):
                step(model, opt, i)
            per_round[name].append((time.perf_counter() - t) / steps)
    out = []
    for name, times in per_round.items():
        ratios = [t / a for t, a in zip(times, per_round["adamw"])]
        opt = runs[name][1]
        out.append({"model": model_name, "optimizer": name, "ms": statistics.median(times) * 1e3,
                    "ratio": statistics.median(ratios), "skipped": getattr(opt, "skipped_steps", 0),
                    "factor_every": getattr(opt, "factor_every", None)})
    floor_model, _ = make_model(model_name)
    out.append({"model": model_name, "optimizer": "floor", "ratio": flop_floor(
        floor_model, batches[0][0], make_optimizer("kfac-eigen", floor_model).factor_every)})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="small,mlp,transformer")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    env = environment()
    load0 = os.getloadavg()
    t0 = time.time()
    results = []
    for name in args.models.split(","):
        results += measure(name, args.rounds, args.steps)
        print(f"{name} done", flush=True)
    load1 = os.getloadavg()
    rows = []
    for r in results:
        if r["optimizer"] == "floor":
            rows.append(Row(suite=SUITE, name="kfac", provider="flop-floor", x_name="model",
                            x_value=r["model"], metric="ratio_vs_adamw_floor", unit="x",
                            p50=r["ratio"], **env))
            continue
        rows.append(Row(suite=SUITE, name=r["optimizer"], provider="defaults", x_name="model",
                        x_value=r["model"], metric="full_step", unit="ms", p50=r["ms"],
                        n=args.rounds, **env))
        rows.append(Row(suite=SUITE, name=r["optimizer"], provider="defaults", x_name="model",
                        x_value=r["model"], metric="full_step_vs_adamw", unit="x",
                        p50=r["ratio"], n=args.rounds, **env))
    args.out.mkdir(parents=True, exist_ok=True)
    append_rows(args.out / f"{SUITE}.csv", rows)
    lines = ["# CPU step-time targets (`python bench/cpu_targets.py`)", "",
             "A full training step at the library defaults, interleaved with AdamW's (module "
             "docstring). Written by the script.", "",
             *(f"- {k}: {v}" for k, v in {**run_header(1), "grng": grng.__version__}.items()),
             f"- {load_text(load0, load1)}; {args.rounds} rounds of {args.steps} steps; "
             f"wall {time.time() - t0:.0f} s", "",
             "| model | optimizer | factor_every | ms/step (median of rounds) | x AdamW | "
             f"<= {TARGET}x | K-FAC FLOP floor |", "|---|---|---|---|---|---|---|"]
    floors = {r["model"]: r["ratio"] for r in results if r["optimizer"] == "floor"}
    for r in results:
        if r["optimizer"] in ("floor",):
            continue
        ok = "-" if r["optimizer"] == "adamw" else ("yes" if r["ratio"] <= TARGET else "no")
        fe = "-" if r["factor_every"] is None else r["factor_every"]
        lines.append(f"| {r['model']} | {r['optimizer']} | {fe} | {r['ms']:.3g} | {r['ratio']:.2f} | "
                     f"{ok} | {floors[r['model']]:.2f} |")
    (args.out / f"{SUITE}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
