"""Memory of the curvature capture (issue 23): peak and final resident memory of a process
against the same process with AdamW.

    python bench/capture_memory.py [--label capture] [--scenarios conv,del,second,eval]

Every (scenario, optimizer) runs in its own fresh subprocess with one torch thread (the numbers
are that process's ``ru_maxrss`` and its resident set at the end, from ``/proc/self/statm``), so
nothing one run allocated is seen by another. Scenarios:

- ``conv``: one training step of Conv2d 64->64 3x3 (padding 1) at 56x56, batch 32, global average
  pool and a Linear head; the capture holds the conv's patch matrix, 100352 x 577 in float32
  (221 MiB), which the row count and width give exactly;
- ``del``: a 1024-1024-1024-10 MLP takes one curvature step, the optimizer is deleted
  (``del opt``) and 40 AdamW steps of 256 x 1024 batches follow (the fine-tuning phase);
- ``train``: the same MLP trained 40 steps (the control of ``second``: what the optimizer's
  own steps add);
- ``second``: the same MLP trained 40 steps by one curvature optimizer while a second one,
  built on the same model, is kept and never stepped;
- ``eval``: the MLP trained 3 steps, then 40 evaluation batches with gradients enabled whose
  losses are read and dropped, never backpropagated.

For the MLP scenarios ``growth`` is the resident memory added from the 5th to the 40th iteration
of the phase (what a leak adds per batch, times 35; the optimizer's own state and the
allocator's pools are in place by then); peak and final RSS include the curvature optimizer's
own state (factors, inverses), which AdamW does not have.

``--label`` names the tree measured (``provider`` in the CSV), so that the same script run from
another checkout (``PYTHONPATH=/path/to/other``) gives a comparison. Rows of the one benchmark
schema (suite ``capture_memory``) append to ``bench/results/capture_memory.csv``;
``bench/results/capture_memory.md`` gets this run's table appended.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SUITE = "capture_memory"
RESULTS = Path(__file__).resolve().parent / "results"
SCENARIOS = ("conv", "del", "train", "second", "eval")
OPTIMIZERS = {s: ("adamw", "kfac", "rkalman") for s in SCENARIOS}
PATCH_ROWS, PATCH_COLS = 32 * 56 * 56, 64 * 9 + 1
WARM = 5  # growth of a 40-iteration phase is measured from this iteration on


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _child(scenario: str, optimizer: str) -> dict[str, float]:
    """One measurement, in this (fresh) process."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from grng.optim.cases import make_optimizer

    torch.set_num_threads(1)
    torch.manual_seed(0)

    def build(model: nn.Module, name: str) -> torch.optim.Optimizer:
        if name == "adamw":
            return make_optimizer("adamw", model, lr=1e-3)
        return make_optimizer({"kfac": "kfac-eigen"}.get(name, name), model, lr=1e-3,
                              factor_every=1)

    def train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
              y: torch.Tensor) -> None:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    base = _rss_mib()
    if scenario == "conv":
        model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
        x, y = torch.randn(32, 64, 56, 56), torch.randint(0, 10, (32,))
        base = _rss_mib()
        train(model, build(model, optimizer), x, y)
    else:
        model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024),
                              nn.ReLU(), nn.Linear(1024, 10))
        g = torch.Generator().manual_seed(1)

        def batch() -> tuple[torch.Tensor, torch.Tensor]:
            return torch.randn(256, 1024, generator=g), torch.randint(0, 10, (256,), generator=g)

        opt = build(model, optimizer)
        mid = 0.0
        if scenario == "del":
            train(model, opt, *batch())
            del opt
            adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
            for i in range(40):
                train(model, adamw, *batch())
                mid = _rss_mib() if i == WARM - 1 else mid
        elif scenario in ("train", "second"):
            second = build(model, optimizer) if scenario == "second" else None  # never stepped
            for i in range(40):
                train(model, opt, *batch())
                mid = _rss_mib() if i == WARM - 1 else mid
            final = _rss_mib()
            del second
        else:
            for _ in range(3):
                train(model, opt, *batch())
            for i in range(40):
                x, y = batch()
                float(F.cross_entropy(model(x), y).detach())
                mid = _rss_mib() if i == WARM - 1 else mid
        final = final if scenario in ("train", "second") else _rss_mib()
        return {"peak_mib": _peak_mib(), "final_mib": final, "growth_mib": final - mid,
                "base_mib": base}
    return {"peak_mib": _peak_mib(), "final_mib": _rss_mib(), "base_mib": base}


def _measure(scenario: str, optimizer: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", scenario, optimizer],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--label", default="capture")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(*args.child)))
        return

    import grng
    from grng.benchmark.schema import Row, append_rows, environment, load_text, run_header

    env = environment("cpu")
    load0, t0 = os.getloadavg(), time.time()
    results = []
    for scenario in args.scenarios.split(","):
        for optimizer in OPTIMIZERS[scenario]:
            results.append((scenario, optimizer, _measure(scenario, optimizer)))
            print(scenario, optimizer, results[-1][2], flush=True)
    load1 = os.getloadavg()
    adamw = {s: r for s, o, r in results if o == "adamw"}
    rows = []
    patch_mib = PATCH_ROWS * PATCH_COLS * 4 / 2**20
    lines = [f"## `{args.label}` ({grng.__file__.rsplit('/grng/', 1)[0]})", "",
             *(f"- {k}: {v}" for k, v in {**run_header(1), "grng": grng.__version__}.items()),
             f"- {load_text(load0, load1)} (a shared machine); wall {time.time() - t0:.0f} s",
             f"- conv patch matrix: {PATCH_ROWS} x {PATCH_COLS} float32 = {patch_mib:.0f} MiB", "",
             "| scenario | optimizer | peak RSS MiB | - AdamW's | final RSS MiB | - AdamW's |"
             " growth over iterations 5-40, MiB | peak over AdamW / patch matrix |",
             "|---|---|---|---|---|---|---|---|"]
    for scenario, optimizer, r in results:
        extra_peak = r["peak_mib"] - adamw[scenario]["peak_mib"]
        extra_final = r["final_mib"] - adamw[scenario]["final_mib"]
        ratio = f"{extra_peak / patch_mib:.2f}" if scenario == "conv" else ""
        growth = f"{r['growth_mib']:+.0f}" if "growth_mib" in r else ""
        lines.append(f"| {scenario} | {optimizer} | {r['peak_mib']:.0f} | {extra_peak:+.0f} | "
                     f"{r['final_mib']:.0f} | {extra_final:+.0f} | {growth} | {ratio} |")
        measured = [("peak_rss", r["peak_mib"]), ("final_rss", r["final_mib"]),
                    ("peak_rss_over_adamw", extra_peak), ("final_rss_over_adamw", extra_final)]
        if "growth_mib" in r:
            measured.append(("rss_growth_iterations_5_40", r["growth_mib"]))
        for metric, value in measured:
            rows.append(Row(suite=SUITE, name=optimizer, provider=args.label, metric=metric,
                            unit="MiB", p50=value, x_name="scenario", x_value=scenario,
                            dtype="float32", n=1, config="1 torch thread, fresh process",
                            **env))
    args.out.mkdir(parents=True, exist_ok=True)
    append_rows(args.out / f"{SUITE}.csv", rows)
    md = args.out / f"{SUITE}.md"
    head = ("# Capture memory (`python bench/capture_memory.py`)\n\nPeak and final resident "
            "memory per (scenario, optimizer), each in a fresh one-thread process (module "
            "docstring); appended by the script.\n\n")
    with open(md, "a") as f:
        if md.stat().st_size == 0:
            f.write(head)
        f.write("\n".join(lines) + "\n\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
