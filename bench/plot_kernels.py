"""Plot the op benchmarks from their CSV rows: median time per op against matrix size, one line
per (provider, dtype, device), from ``bench/results/kernels.csv`` and ``bench/results/ext.csv``.

    python bench/plot_kernels.py [--out bench/results/kernels.png]

Only the newest date of each (op, provider, size, dtype, device) is drawn.
"""
from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(paths: list[Path]) -> list[dict]:
    """Rows of the CSVs (common columns: op, provider, size, dtype, median_ms, device, date)."""
    rows = []
    for path in paths:
        if path.exists():
            with open(path, newline="") as f:
                rows += list(csv.DictReader(f))
    newest: dict[tuple, dict] = {}
    for r in rows:
        key = (r["op"], r["provider"], r["size"], r["dtype"], r["device"])
        if key not in newest or r["date"] >= newest[key]["date"]:
            newest[key] = r
    return list(newest.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "kernels.png")
    args = parser.parse_args()
    rows = [r for r in load([RESULTS / "kernels.csv", RESULTS / "ext.csv"])
            if r["size"].isdigit()]  # the fused update's "size" is a model description
    ops = sorted({r["op"] for r in rows})
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ops), figsize=(4.5 * len(ops), 3.8), squeeze=False)
    for ax, op in zip(axes[0], ops):
        lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in rows:
            if r["op"] == op:
                label = f"{r['provider']} {r['dtype']} ({r['device'].split(' (')[0][:18]})"
                lines[label].append((float(r["size"]), float(r["median_ms"])))
        for label, pts in sorted(lines.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("size")
        ax.set_ylabel("median ms")
        ax.set_title(op)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
