"""EKFAC's refresh: Householder QR against CholeskyQR3 in the warm-started subspace step.

    python bench/ekfac_qr.py [--steps 150] [--sizes 768 1536]

CholeskyQR3 is :func:`grng.precondition.eigenbasis.cholesky_qr3` (shifted first pass, float64);
its float32 rows below are float32 inputs (M, Q_prev and the product M Q_prev in float32).

1. Real factor sequences: the demo transformer trains with EKFAC at its CPU defaults (T = 10)
   and every subspace step of its refreshes is recorded (the factor M and the previous basis
   Q_prev of each dense side); each is then redone from the same (M, Q_prev) by both QRs, in
   float32 and float64: the orthogonality error max|Q^T Q - I|, how far Q^T M Q is from
   diagonal (||offdiag||_F / ||M||_F) and how many CholeskyQR3 steps fail (a non-finite result,
   which the refresh replaces by eigh on the host or by the previous basis on the device).
2. GPT-2-sized factors (d = 768 and up: X^T X / n with a spectrum decaying over four decades,
   warm start from the basis before a 5% EMA drift, as ``bench/ekfac.py refresh``): the time of
   the whole step and its errors, float32, one torch thread.
Writes ``bench/results/ekfac_qr.md``. The machine is shared (its load is recorded).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from grng.benchmark.schema import load_text, run_header  # noqa: E402
from grng.demo.tasks import TASKS, load_data  # noqa: E402
from grng.demo.train import train_run  # noqa: E402
from grng.precondition import eigenbasis  # noqa: E402
from grng.precondition.eigenbasis import subspace_step  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def record_refreshes(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(M, Q_prev) of every dense side at every subspace step of a demo transformer run."""
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = eigenbasis.subspace_step

    def recording(M: torch.Tensor, Q: torch.Tensor, qr: str = "householder") -> torch.Tensor:
        pairs.extend(zip(M.detach().double().clone().unbind(0),
                         Q.detach().double().clone().unbind(0)))
        return original(M, Q, qr)

    eigenbasis.subspace_step = recording
    try:
        task = TASKS["transformer"]
        data = load_data(task.dataset)
        train_run("transformer", "ekfac", {"lr": 1e-2}, data.train, data.val, seed=100,
                  epochs=task.epochs, batch_size=task.batch_size, eval_every=10_000,
                  max_steps=steps, progress=False)
    finally:
        eigenbasis.subspace_step = original
    return pairs


def errors(M: torch.Tensor, Q: torch.Tensor) -> tuple[float, float]:
    """(max|Q^T Q - I|, ||offdiag(Q^T M Q)||_F / ||M||_F)."""
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype)
    D = Q.T @ M @ Q
    return (float((Q.T @ Q - eye).abs().max()),
            float((D - torch.diag(D.diagonal())).norm() / M.norm()))


def factor(d: int, seed: int) -> torch.Tensor:
    """X^T X / n, n = 2d rows whose scales decay over four decades (float64)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2 * d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d,
                                                                                dtype=torch.float64)
    return X.T @ X / (2 * d)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--sizes", type=int, nargs="+", default=[768, 1536])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    lines = ["# EKFAC's refresh: Householder QR vs CholeskyQR3 (`python bench/ekfac_qr.py`)", "",
             *(f"- {k}: {v}" for k, v in run_header(1).items()), ""]
    pairs = record_refreshes(args.steps)
    dims = sorted({int(M.shape[-1]) for M, _ in pairs})
    lines += [f"## 1. Real factor sequences: the demo transformer, {args.steps} EKFAC steps "
              f"(T = 10): {len(pairs)} subspace steps of dense sides d in {dims}", "",
              "| dtype | QR | max orthogonality error (median, worst) | off-diagonal "
              "(median, worst) | failed |", "|---|---|---|---|---|"]
    for dtype in (torch.float32, torch.float64):
        for qr in ("householder", "cholesky"):
            orth, off, failed = [], [], 0
            for M, Q in pairs:
                Mc, Qc = M.to(dtype), Q.to(dtype)
                new = subspace_step(Mc, Qc, qr)
                if not bool(torch.isfinite(new).all()):
                    failed += 1
                    continue
                o, f = errors(Mc.double(), new.double())
                orth.append(o)
                off.append(f)
            lines.append(f"| {str(dtype)[6:]} | {qr} | {statistics.median(orth):.1e}, "
                         f"{max(orth):.1e} | {statistics.median(off):.1e}, {max(off):.1e} | "
                         f"{failed} / {len(pairs)} |")
            print(lines[-1], flush=True)
    lines += ["", "## 2. GPT-2-sized factors, float32, one thread (median ms of 3)", "",
              "| d | Householder ms | CholeskyQR3 ms | ratio | orthogonality H / C | "
              "off-diagonal start / H / C |", "|---|---|---|---|---|---|"]
    for d in args.sizes:
        prev = factor(d, 0)
        M = (0.95 * prev + 0.05 * factor(d, 1)).float()
        Q = torch.linalg.eigh(prev).eigenvectors.flip(-1).float()
        times = {}
        out = {}
        for qr in ("householder", "cholesky", "householder", "cholesky", "householder",
                   "cholesky"):  # interleaved
            t = time.perf_counter()
            out[qr] = subspace_step(M, Q, qr)
            times.setdefault(qr, []).append(1000.0 * (time.perf_counter() - t))
        h, c = (statistics.median(times[k]) for k in ("householder", "cholesky"))
        (oh, fh), (oc, fc) = (errors(M.double(), out[k].double()) for k in ("householder",
                                                                           "cholesky"))
        lines.append(f"| {d} | {h:.0f} | {c:.0f} | {h / c:.2f}x | {oh:.1e} / {oc:.1e} | "
                     f"{errors(M.double(), Q.double())[1]:.1e} / {fh:.1e} / {fc:.1e} |")
        print(lines[-1], flush=True)
    lines += ["", f"- {load_text(load_start, os.getloadavg())} (machine shared: times noisy)"]
    (RESULTS / "ekfac_qr.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
