"""Plot benchmark rows: median time against size, one panel per (suite, name).

Rows whose unit is ms and whose ``x_value`` is a number are drawn: one line per
(provider, dtype, device) with the p20-p80 band as error bars, log-log axes. Only the newest
row of each (suite, name, provider, metric, x, dtype, device) is drawn.
"""
from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable

from grng.benchmark.schema import Row


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def newest(rows: Iterable[Row]) -> list[Row]:
    """The newest row (by timestamp) per (suite, name, provider, metric, x, dtype, device)."""
    best: dict[tuple, Row] = {}
    for r in rows:
        key = (r.suite, r.name, r.provider, r.metric, r.x_name, r.x_value, r.dtype, r.device)
        if key not in best or r.timestamp >= best[key].timestamp:
            best[key] = r
    return list(best.values())


def plot(rows: Iterable[Row], out: str | os.PathLike, title: str | None = None) -> int:
    """Draw the timed rows to the PNG ``out``; returns the number of panels (0: nothing to draw)."""
    timed = [r for r in newest(rows) if r.unit == "ms" and r.p50 is not None
             and _number(r.x_value) is not None]
    panels = sorted({(r.suite, r.name, r.metric) for r in timed})
    if not panels:
        raise ValueError("no rows with unit ms and a numeric x_value to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    cols = min(4, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.8 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (suite, name, metric) in zip(axes.flat, panels):
        lines: dict[str, list[Row]] = defaultdict(list)
        for r in timed:
            if (r.suite, r.name, r.metric) == (suite, name, metric):
                lines[f"{r.provider} {r.dtype} ({r.device.split(' (')[0][:20]})"].append(r)
        for label, rs in sorted(lines.items()):
            rs.sort(key=lambda r: _number(r.x_value))
            xs = [_number(r.x_value) for r in rs]
            ys = [r.p50 for r in rs]
            lo = [r.p50 - (r.p20 if r.p20 is not None else r.p50) for r in rs]
            hi = [(r.p80 if r.p80 is not None else r.p50) - r.p50 for r in rs]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=2, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        xs = sorted({_number(r.x_value) for rs in lines.values() for r in rs})
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(" / ".join(sorted({r.x_name for rs in lines.values() for r in rs})))
        ax.set_ylabel(f"{metric} (ms, median, p20-p80)")
        ax.set_title(name if suite == "kernels" else f"{suite}: {name}")
        ax.legend(fontsize=6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return len(panels)


__all__ = ["newest", "plot"]
