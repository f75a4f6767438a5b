"""Compare two benchmark CSVs row by row: new / old of each measured quantity present in both.

Rows match on (suite, name, provider, metric, unit, x_name, x_value, dtype); the device,
versions and timestamp may differ (that is usually the point). Where a file holds several
rows of one key (appended runs), the newest counts.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from grng.benchmark.schema import Row

KEY_FIELDS: tuple[str, ...] = ("suite", "name", "provider", "metric", "unit", "x_name", "x_value",
                               "dtype")
# units where a smaller value is better (times, memory, bytes); for the others higher is better
LOWER_IS_BETTER = {"ms", "s", "MB", "B"}


@dataclass(frozen=True)
class Pair:
    """One matching quantity: its key, the old and new medians and new / old."""

    key: tuple[str, ...]
    unit: str
    old: float
    new: float

    @property
    def ratio(self) -> float:
        """new / old (inf when old is 0 and new is not)."""
        if self.old == 0.0:
            return 1.0 if self.new == 0.0 else float("inf")
        return self.new / self.old

    @property
    def better(self) -> bool:
        """True when new is an improvement (lower for times and sizes, higher otherwise)."""
        return self.new < self.old if self.unit in LOWER_IS_BETTER else self.new > self.old


def _latest(rows: Iterable[Row]) -> dict[tuple[str, ...], Row]:
    out: dict[tuple[str, ...], Row] = {}
    for r in rows:
        if r.p50 is None:
            continue
        key = tuple(str(getattr(r, f)) for f in KEY_FIELDS)
        if key not in out or r.timestamp >= out[key].timestamp:
            out[key] = r
    return out


def compare(old: Iterable[Row], new: Iterable[Row]) -> list[Pair]:
    """The quantities present in both, in the new file's order."""
    before, after = _latest(old), _latest(new)
    return [Pair(k, r.unit, float(before[k].p50), float(r.p50)) for k, r in after.items() if k in before]


def format_pairs(pairs: list[Pair]) -> str:
    """A fixed-width table: name provider metric x dtype old new new/old."""
    header = ("suite", "name", "provider", "metric", "x", "dtype", "old", "new", "new/old")
    body = [(k[0], k[1], k[2], f"{k[3]} ({p.unit})", f"{k[5]}={k[6]}" if k[5] else k[6], k[7],
             f"{p.old:.4g}", f"{p.new:.4g}", f"{p.ratio:.3f}" + (" +" if p.better else ""))
            for p in pairs for k in [p.key]]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in (header, *body)]
    return "\n".join(lines + ["(+ marks an improvement: lower ms/s/MB/B, higher otherwise)"])


__all__ = ["KEY_FIELDS", "Pair", "compare", "format_pairs"]
