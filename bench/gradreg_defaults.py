"""GradReg's default gamma and epsilon, chosen by measurement (issue 24 item 7).

    python bench/gradreg_defaults.py --steps 240,180 --gammas 0.001,0.003,0.01,0.03 --epsilons 0.05
    python bench/gradreg_defaults.py --steps 60 --tag 60steps       # the short-horizon run
    python bench/gradreg_defaults.py --seeds 1 --steps 10 --out /tmp/g   # a smoke run

GradReg(AdamW, gamma, epsilon, mode="forward", model=model) against plain AdamW (the same
learning rate, batches and initialization per seed) on two tasks:

- ``bn-cnn``: Conv(1->16)-BatchNorm-ReLU-Conv(16->32)-BatchNorm-ReLU-MaxPool-Linear on
  scikit-learn's digits (grng.demo.data: the demo's fixed split), batch 64, AdamW lr 3e-3;
- ``gpt2``: a tiny Hugging Face GPT-2 from ``GPT2Config`` (2 layers, width 32, 2 heads, the
  default dropout 0.1, no download) on the bytes of the standard library's ``textwrap.py``
  (blocks of 32, first 90 % train, the rest validation), batch 8, AdamW lr 3e-3.

Each (gamma, epsilon) of the grid (``--gammas`` x ``--epsilons``) trains every task for its
``--steps`` (one number, or one per task) with every seed;
the score is the validation loss at the end (median over seeds; digits also report accuracy).
A cell's relative score on a task is its median validation loss divided by AdamW's; the default
is the cell with the smallest mean relative score over the tasks (reported with its per-task
ratios, so "no better than AdamW" shows when it is the case). Writes ``gradreg_defaults.csv``
(grng's benchmark schema) and ``gradreg_defaults.md`` under ``--out`` (default bench/results;
``--tag T`` appends ``_T`` to both names).
One torch thread; the load average is recorded, since other jobs share the CPU.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grng  # noqa: E402
from grng.benchmark.schema import (Row, environment, load_text, replace_rows,  # noqa: E402
                                   run_header)
from grng.demo.data import load_digits_splits  # noqa: E402
from grng.optim.cases import make_optimizer  # noqa: E402

SUITE = "gradreg_defaults"
GAMMAS = (0.001, 0.003, 0.01, 0.03, 0.1)
EPSILONS = (0.01, 0.05)
LR = 3e-3


def bn_cnn() -> nn.Module:
    """The demo's digits CNN with BatchNorm after each convolution."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


class Task:
    """A model factory, training batches per seed and a validation score."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "bn-cnn":
            digits = load_digits_splits()
            self.train, self.val = digits.train, digits.val
        else:
            data = torch.tensor(list(Path(textwrap.__file__).read_bytes())) % 128
            blocks = data[: len(data) // 32 * 32].view(-1, 32)
            cut = int(0.9 * len(blocks))
            self.train_blocks, self.val_blocks = blocks[:cut], blocks[cut:]

    def model(self) -> nn.Module:
        return bn_cnn() if self.name == "bn-cnn" else tiny_gpt2()

    def batch(self, gen: torch.Generator) -> tuple[Tensor, ...]:
        if self.name == "bn-cnn":
            idx = torch.randint(0, len(self.train), (64,), generator=gen)
            return self.train.x[idx], self.train.y[idx]
        idx = torch.randint(0, len(self.train_blocks), (8,), generator=gen)
        return (self.train_blocks[idx],)

    def loss(self, model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        if self.name == "bn-cnn":
            return F.cross_entropy(model(batch[0]), batch[1])
        return model(input_ids=batch[0], labels=batch[0]).loss

    def score(self, model: nn.Module) -> tuple[float, float | None]:
        """(validation loss, validation accuracy or None)."""
        model.eval()
        with torch.no_grad():
            if self.name == "bn-cnn":
                logits = model(self.val.x)
                loss = float(F.cross_entropy(logits, self.val.y))
                acc = float((logits.argmax(1) == self.val.y).float().mean())
            else:
                loss, acc = float(model(input_ids=self.val_blocks,
                                        labels=self.val_blocks).loss), None
        model.train()
        return loss, acc


def train(task: Task, seed: int, steps: int, cell: tuple[float, float] | None
          ) -> tuple[float, float | None, float]:
    """(validation loss, accuracy, seconds) after ``steps`` steps of AdamW (``cell`` None) or
    GradReg(AdamW, gamma, epsilon) (forward finite difference)."""
    torch.manual_seed(seed)
    model = task.model()
    opt = (make_optimizer("adamw", model, lr=LR) if cell is None else
           make_optimizer("fgr-adamw", model, lr=LR, gamma=cell[0], epsilon=cell[1]))
    gen = torch.Generator().manual_seed(1000 + seed)
    start = time.perf_counter()
    for _ in range(steps):
        batch = task.batch(gen)
        forward: Callable[[], Tensor] = lambda b=batch: task.loss(model, b)  # noqa: E731
        if cell is None:
            opt.zero_grad()
            forward().backward()
            opt.step()
        else:
            opt.step(grng.make_closure(opt, forward))
    seconds = time.perf_counter() - start
    loss, acc = task.score(model)
    return loss, acc, seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="bn-cnn,gpt2")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", default="60", help="steps, one number or one per task")
    parser.add_argument("--gammas", default=",".join(map(str, GAMMAS)))
    parser.add_argument("--epsilons", default=",".join(map(str, EPSILONS)))
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    env = environment("cpu")
    tasks = args.tasks.split(",")
    steps = [int(s) for s in args.steps.split(",")]
    args.steps_of = dict(zip(tasks, steps * len(tasks) if len(steps) == 1 else steps))
    grid = itertools.product(map(float, args.gammas.split(",")),
                             map(float, args.epsilons.split(",")))
    cells: list[tuple[float, float] | None] = [None, *grid]
    results: dict[tuple[str, tuple[float, float] | None], list[tuple]] = {}
    rows = []
    for name in tasks:
        task = Task(name)
        for cell in cells:
            runs = [train(task, seed, args.steps_of[name], cell) for seed in range(args.seeds)]
            results[(name, cell)] = runs
            label = "adamw" if cell is None else f"gradreg-g{cell[0]}-e{cell[1]}"
            losses = [r[0] for r in runs]
            config = (f"steps={args.steps_of[name]} seeds={args.seeds} lr={LR}"
                      + ("" if cell is None else f" gamma={cell[0]} epsilon={cell[1]} forward"))
            rows.append(Row(SUITE, name, label, "val_loss", "nats", statistics.median(losses),
                            p20=min(losses), p80=max(losses), n=len(runs), config=config, **env))
            if runs[0][1] is not None:
                accs = [r[1] for r in runs]
                rows.append(Row(SUITE, name, label, "val_acc", "fraction",
                                statistics.median(accs), p20=min(accs), p80=max(accs),
                                n=len(runs), config=config, **env))
            secs = [r[2] for r in runs]
            rows.append(Row(SUITE, name, label, "train_seconds", "s", statistics.median(secs),
                            n=len(runs), config=config, **env))
            print(name, label, [round(v, 4) for v in losses], flush=True)
    load_end = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gradreg_defaults" + (f"_{args.tag}" if args.tag else "")
    replace_rows(args.out / f"{stem}.csv", rows)
    (args.out / f"{stem}.md").write_text(
        summary(results, args, load_text(load_start, load_end)))


def summary(results: dict, args: argparse.Namespace, load: str) -> str:
    """The Markdown table (median validation loss per task and cell, ratio to AdamW) and the
    choice."""
    tasks = list(dict.fromkeys(name for name, _ in results))
    median = {k: statistics.median(r[0] for r in v) for k, v in results.items()}
    ratios = {cell: [median[(t, cell)] / median[(t, None)] for t in tasks]
              for (_, cell) in results if cell is not None}
    best = min(ratios, key=lambda c: statistics.mean(ratios[c]))
    header = run_header(1)
    lines = [f"# GradReg defaults (`bench/gradreg_defaults.py`)", "",
             f"{header['date']}; {header['machine']}; torch {header['torch']}; {load} "
             "(a shared 2-core machine: timings are indicative only).", "",
             f"Steps {', '.join(f'{t} {n}' for t, n in args.steps_of.items())}; {args.seeds} "
             "seeds (seed fixes the initialization and the batches, shared by every cell), "
             f"AdamW lr {LR}; GradReg = GradReg(AdamW, gamma, "
             "epsilon, mode='forward', model=model). Median validation loss at the end "
             "(min-max over seeds); ratio = median / AdamW's median.", "",
             "| cell | " + " | ".join(f"{t} val loss | {t} ratio" for t in tasks)
             + " | mean ratio |",
             "|---|" + "---|---|" * len(tasks) + "---|"]
    for (_, cell) in [(None, None), *[(None, c) for c in ratios]]:
        parts = []
        for t in tasks:
            runs = results[(t, cell)]
            lo, hi = min(r[0] for r in runs), max(r[0] for r in runs)
            ratio = median[(t, cell)] / median[(t, None)]
            acc = [r[1] for r in runs if r[1] is not None]
            extra = f", acc {statistics.median(acc):.3f}" if acc else ""
            parts.append(f"{median[(t, cell)]:.4f} ({lo:.4f}-{hi:.4f}{extra}) | {ratio:.3f}")
        label = "AdamW" if cell is None else f"gamma={cell[0]}, epsilon={cell[1]}"
        mean = 1.0 if cell is None else statistics.mean(ratios[cell])
        lines.append(f"| {label} | " + " | ".join(parts) + f" | {mean:.3f} |")
    verdict = ("better than AdamW on every task" if all(r < 1 for r in ratios[best])
               else "not better than AdamW on every task: " + ", ".join(
                   f"{t} ratio {r:.3f}" for t, r in zip(tasks, ratios[best])))
    lines += ["", f"Chosen default: **gamma={best[0]}, epsilon={best[1]}** (smallest mean ratio, "
              f"{statistics.mean(ratios[best]):.3f}); {verdict}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
