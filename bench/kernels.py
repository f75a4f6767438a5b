"""Time grng's ops per backend and append the rows to ``bench/results/kernels.csv``.

A thin wrapper over ``python -m grng bench`` (:mod:`grng.benchmark.kernels`, where the sizes,
FLOP and byte counts, timing and metrics are documented) that writes to the repository's
results file by default; every ``grng bench`` flag works here:

    python bench/kernels.py [--ops factor_update,...] [--sizes 1024,4096] [--dtypes float32,bfloat16]
                            [--device cuda|cpu] [--csv PATH]
"""
from __future__ import annotations

import sys
from pathlib import Path

from grng.cli import main

DEFAULT_CSV = Path(__file__).resolve().parent / "results" / "kernels.csv"

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(["bench", *args, *([] if "--csv" in args else ["--csv", str(DEFAULT_CSV)])]))
