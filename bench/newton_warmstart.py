"""How many warm-started Newton-Schulz steps a refresh needs along real factor sequences.

    python bench/newton_warmstart.py [--steps 60] [--every 10] [--iterations 1,2,3,4]

A one-block GPT at GPT-2 small's width (768; tracked: qkv's A and G, 769 and 2304, and the
MLP output's A, 3073) trains with
K-FAC (cholesky inverses, F = 2, the library's damping) on the standard library's characters
(grng.demo.text, 8 x 128 per batch). At every ``every``-th step each tracked dense factor M
(Tikhonov-damped as the newton inverse damps it) starts one chain per iteration count i: the
first refresh is exact (Cholesky, as the warm-started path's first refresh), every later one
runs i steps X <- X (2I - M X) from the chain's previous X, in float32 and float32 with
TF32-rounded GEMM operands (10-bit mantissas, emulated; float64 on request). Recorded per refresh: the RMS residual
||I - M X||_F / sqrt(d) of each chain; the verdict per (precision, i): the largest residual over
the run against the newton tolerance (1e-3 in float32, what the sync-free refresh accepts).

Rows of the one benchmark schema (suite ``newton_warmstart``) append to
``bench/results/newton_warmstart.csv``; ``bench/results/newton_warmstart.md`` is rewritten.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402

import grng  # noqa: E402
from grng.benchmark.schema import Row, append_rows, environment, load_text, run_header  # noqa: E402
from grng.curvature.inverse import tikhonov_split  # noqa: E402
from grng.demo.text import VOCAB_SIZE, load_text_splits  # noqa: E402
from grng.optim.cases import make_optimizer  # noqa: E402

SUITE = "newton_warmstart"
RESULTS = Path(__file__).resolve().parent / "results"
TOL = 1e-3
#: the tracked factors: (layer name, side)
TRACKED = (("blocks.0.attn.qkv", "A"), ("blocks.0.attn.qkv", "G"), ("blocks.0.out", "A"))


def tf32(x: Tensor) -> Tensor:
    """x with its float32 mantissa rounded to TF32's 10 bits (round to nearest even)."""
    bits = x.contiguous().view(torch.int32)
    rounded = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return rounded.view(torch.float32)


def matmul(a: Tensor, b: Tensor, mode: str) -> Tensor:
    return tf32(a) @ tf32(b) if mode == "tf32" else a @ b


def residual(M: Tensor, X: Tensor) -> float:
    """||I - M X||_F / sqrt(d), in float64."""
    M64, X64 = M.double(), X.double()
    return float(torch.linalg.matrix_norm(torch.eye(M.shape[0], dtype=torch.float64) - M64 @ X64)
                 / math.sqrt(M.shape[0]))


def newton(M: Tensor, X: Tensor, steps: int, mode: str) -> Tensor:
    eye = torch.eye(M.shape[0], dtype=M.dtype)
    for _ in range(steps):
        X = X + matmul(X, eye - matmul(M, X, mode), mode)
        X = 0.5 * (X + X.T)
    return X


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--iterations", default="1,2,3")
    ap.add_argument("--modes", default="float32,tf32", help="float64, float32, tf32 (emulated)")
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    its = [int(i) for i in args.iterations.split(",")]
    modes = tuple(args.modes.split(","))
    env, load0, t0 = environment(), os.getloadavg(), time.time()
    torch.manual_seed(0)
    cfg = models.GPTConfig(vocab=VOCAB_SIZE, context=128, width=args.width, heads=12, layers=1)
    model = models.GPT(cfg)
    opt = make_optimizer("kfac-cholesky", model, lr=0.05)
    damping = opt.param_groups[0]["damping"]
    data = load_text_splits(seq_len=cfg.context).train
    g = torch.Generator().manual_seed(1)
    names = dict(zip(opt.capture.names, opt.capture.layers))
    chains: dict[tuple[str, str, str, int], Tensor] = {}
    worst: dict[tuple[str, int], float] = {}
    rows: list[Row] = []
    table = ["| refresh step | factor | d | " + " | ".join(f"{m} i={i}" for m in modes for i in its)
             + " |", "|---|---|---|" + "---|" * (len(modes) * len(its))]
    for step in range(args.steps):
        idx = torch.randint(0, data.x.shape[0], (8,), generator=g)
        x, y = data.x[idx], data.y[idx]
        opt.zero_grad()
        out = model(x)
        F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
        opt.step()
        if (step + 1) % args.every:
            continue
        for name, side in TRACKED:
            state = opt.layer_state(names[name])
            A, G = state["A"], state["G"]
            da, dg = tikhonov_split(A, G, damping)
            M64 = (A if side == "A" else G).double() + (da if side == "A" else dg) * torch.eye(
                (A if side == "A" else G).shape[0], dtype=torch.float64)
            cells = []
            for mode in modes:
                M = M64 if mode == "float64" else M64.float()
                for i in its:
                    key = (name, side, mode, i)
                    if key not in chains:  # the first refresh: exact
                        chains[key] = torch.cholesky_inverse(torch.linalg.cholesky(M))
                        cells.append("exact")
                        continue
                    chains[key] = newton(M, chains[key], i, mode)
                    r = residual(M64, chains[key])
                    worst[(mode, i)] = max(worst.get((mode, i), 0.0), r)
                    cells.append(f"{r:.1e}")
                    rows.append(Row(suite=SUITE, name=f"{name}.{side}", provider=mode,
                                    metric="rms_residual", unit="", x_name="iterations",
                                    x_value=str(i), p50=r, config=f"step {step + 1}", **env))
            table.append(f"| {step + 1} | {name} {side} | {M64.shape[0]} | " + " | ".join(cells) + " |")
        print(table[-1], flush=True)
    load1 = os.getloadavg()
    verdict = ["| precision | " + " | ".join(f"i={i}" for i in its) + " |",
               "|---|" + "---|" * len(its)]
    for mode in modes:
        verdict.append(f"| {mode} | " + " | ".join(
            f"{worst.get((mode, i), math.nan):.1e} {'ok' if worst.get((mode, i), math.inf) <= TOL else 'no'}"
            for i in its) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    append_rows(args.out / f"{SUITE}.csv", rows)
    lines = ["# Warm-started Newton-Schulz along real factor sequences "
             "(`python bench/newton_warmstart.py`)", "", "Written by the script (module docstring).",
             "", *(f"- {k}: {v}" for k, v in {**run_header(1), "grng": grng.__version__}.items()),
             f"- {load_text(load0, load1)}; {args.steps} steps, a refresh every {args.every}; "
             f"width {args.width}; wall {time.time() - t0:.0f} s", "",
             f"## Largest RMS residual over the run (ok: <= {TOL:g})", "", *verdict, "",
             "## Per refresh", "", *table]
    (args.out / f"{SUITE}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-len(table) - len(verdict) - 4:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
