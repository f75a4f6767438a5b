"""The cost of capturing an LSTM / GRU (issue 25 target: the written-out forward of a capturing
step at most 2x the fused one).

For the byte-level language models of ``bench/coverage.py`` (embedding 64, 2 layers, hidden
128) on a batch of B x L bytes: the median time of forward + backward with the module's fused
forward (AdamW, no capture) and with K-FAC's capture armed (the written-out recurrence reporting
every block, plus the capture's hooks), and of a whole K-FAC step (``factor_every=1``). One
thread; the machine may be shared, so the ratio is the number to read.

    python bench/recurrent_capture.py [--batch 16 --length 64 --repeats 5] [--out FILE.md]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from coverage import _next_byte_loss, recurrent_lm  # noqa: E402
from grng.optim.cases import CASES  # noqa: E402


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(kind: str, batch: int, length: int, repeats: int) -> dict[str, float]:
    """Seconds: fused forward+backward, captured forward+backward, whole K-FAC step."""
    tokens = torch.randint(0, 256, (batch, length + 1), generator=torch.Generator().manual_seed(0))
    model = recurrent_lm(kind, 0)

    def fwd_bwd() -> None:
        model.zero_grad()
        _next_byte_loss(model, tokens).backward()

    fused = _median_time(fwd_bwd, repeats)
    opt = CASES["kfac-eigen"].make(model, lr=0.0, factor_every=1)
    captured = _median_time(lambda: (fwd_bwd(), opt.capture.clear()), repeats)

    def step() -> None:
        opt.zero_grad()
        _next_byte_loss(model, tokens).backward()
        opt.step()

    whole = _median_time(step, repeats)
    opt.capture.remove()
    return {"fused": fused, "captured": captured, "step": whole}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lines = [f"# Capture cost of recurrent layers ({args.batch} x {args.length} bytes, 1 thread, "
             f"torch {torch.__version__})", "",
             "| model | fused fwd+bwd (ms) | captured fwd+bwd (ms) | ratio | K-FAC step (ms) |",
             "|---|---|---|---|---|"]
    for kind in ("LSTM", "GRU"):
        r = measure(kind, args.batch, args.length, args.repeats)
        lines.append(f"| {kind} LM | {1e3 * r['fused']:.1f} | {1e3 * r['captured']:.1f} | "
                     f"{r['captured'] / r['fused']:.2f}x | {1e3 * r['step']:.1f} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
