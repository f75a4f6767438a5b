"""The cost of capturing an LSTM / GRU (issue 25 target: the written-out forward of a capturing
step at most 2x the fused one).

For the byte-level language models of ``bench/coverage.py`` (embedding 64, 2 layers, hidden
128) on a batch of B x L bytes: the median time of forward + backward with the module's fused
forward (K-FAC's capture disarmed, as on a step that folds no factors) and with the capture
armed (the written-out recurrence reporting every block, plus the capture's hooks), the two
interleaved repetition by repetition, and of a whole K-FAC step (``factor_every=1``). One
thread, timed in CPU time of that thread (``time.thread_time``), which other processes on a
shared machine inflate far less than wall-clock time; the ratio (median of the
per-repetition ratios) is the number to read.

    python bench/recurrent_capture.py [--batch 16 --length 64 --repeats 5] [--out FILE.md]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from coverage import _next_byte_loss, recurrent_lm  # noqa: E402
from grng.optim.cases import CASES  # noqa: E402


def _interleaved(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """CPU seconds (this thread) of each function per repetition, the functions run in turn (one warm-up each)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.thread_time()
            fn()
            times[name].append(time.thread_time() - start)
    return times


def measure(kind: str, batch: int, length: int, repeats: int) -> dict[str, float]:
    """Median seconds of fused forward+backward, captured forward+backward and a whole K-FAC
    step, and the median per-repetition ratio captured / fused."""
    tokens = torch.randint(0, 256, (batch, length + 1), generator=torch.Generator().manual_seed(0))
    model = recurrent_lm(kind, 0)
    opt = CASES["kfac-eigen"].make(model, lr=0.0, factor_every=1)

    def fwd_bwd(armed: bool) -> None:
        opt.capture.armed = armed
        model.zero_grad()
        _next_byte_loss(model, tokens).backward()
        opt.capture.clear()
        opt.capture.armed = True

    def step() -> None:
        opt.zero_grad()
        _next_byte_loss(model, tokens).backward()
        opt.step()

    times = _interleaved({"fused": lambda: fwd_bwd(False), "captured": lambda: fwd_bwd(True),
                          "step": step}, repeats)
    opt.capture.remove()
    out = {name: statistics.median(t) for name, t in times.items()}
    out["ratio"] = statistics.median(c / f for c, f in zip(times["captured"], times["fused"]))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lines = [f"# Capture cost of recurrent layers ({args.batch} x {args.length} bytes, 1 thread, "
             f"CPU time, torch {torch.__version__})", "",
             "| model | fused fwd+bwd (ms) | captured fwd+bwd (ms) | ratio | K-FAC step (ms) |",
             "|---|---|---|---|---|"]
    for kind in ("LSTM", "GRU"):
        r = measure(kind, args.batch, args.length, args.repeats)
        lines.append(f"| {kind} LM | {1e3 * r['fused']:.1f} | {1e3 * r['captured']:.1f} | "
                     f"{r['ratio']:.2f}x | {1e3 * r['step']:.1f} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
