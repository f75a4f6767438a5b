"""Plot the op benchmarks of ``bench/results/kernels.csv`` and ``ext.csv`` (median time against
size, one line per provider, dtype and device) to ``bench/results/kernels.png``.

A thin wrapper over ``python -m grng bench --plot`` (:mod:`grng.benchmark.plot`):

    python bench/plot_kernels.py [--out bench/results/kernels.png]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grng.cli import main

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "kernels.png")
    ns = parser.parse_args()
    sys.exit(main(["bench", "--plot", str(RESULTS / "kernels.csv"), str(RESULTS / "ext.csv"),
                   "--out", str(ns.out)]))
