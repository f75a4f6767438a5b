"""The one benchmark CSV schema: long format, one measured quantity per row.

Every benchmark in the project (``bench/*.py``, ``python -m grng bench``,
``bench/gpu_check.py``) appends :class:`Row` records with :func:`append_rows`; plots and
comparisons read them back with :func:`read_rows`. A row says what was measured (``suite``,
``name``, ``provider``, ``metric``, ``unit``), at which point of a sweep (``x_name`` =
``x_value``, ``dtype``), the statistic (``p50`` with ``p20``/``p80`` where repeated samples
exist, ``n`` samples), and where (``device``, versions, ``timestamp``); ``config`` is a short
free-text description of the remaining settings.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass, field

COLUMNS: tuple[str, ...] = (
    "suite", "name", "provider", "metric", "unit", "x_name", "x_value", "dtype",
    "p50", "p20", "p80", "n", "device", "torch", "triton", "grng", "config", "timestamp",
)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Row:
    """One measured quantity (see the module docstring); ``p50`` is the value itself when the
    quantity is not a distribution (``p20``/``p80`` then empty)."""

    suite: str
    name: str
    provider: str
    metric: str
    unit: str
    p50: float | None
    x_name: str = ""
    x_value: str = ""
    dtype: str = ""
    p20: float | None = None
    p80: float | None = None
    n: int | None = None
    device: str = ""
    torch: str = ""
    triton: str = ""
    grng: str = ""
    config: str = ""
    timestamp: str = field(default_factory=_now)

    def as_dict(self) -> dict[str, str]:
        out = {}
        for k in COLUMNS:
            v = getattr(self, k)
            out[k] = "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))
        return out


def environment(device: str | None = None) -> dict[str, str]:
    """device / torch / triton / grng strings for rows measured in this process.

    ``device`` ("cpu", "cuda", "cuda:1", ...) names the device the rows were measured on;
    by default the CUDA device when there is one, else the CPU.
    """
    import torch

    import grng

    try:
        import triton  # noqa: F401

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - triton absent or broken: recorded as empty
        triton_version = ""
    where = torch.device(device if device is not None
                         else ("cuda" if torch.cuda.is_available() else "cpu"))
    if where.type == "cuda":
        name = torch.cuda.get_device_name(where)
    else:
        name = f"{where.type} {platform.machine()} ({torch.get_num_threads()} threads)"
    return {"device": name, "torch": torch.__version__, "triton": triton_version,
            "grng": grng.__version__}


def append_rows(path: str | os.PathLike, rows: Iterable[Row]) -> int:
    """Append rows to a CSV at ``path`` (header written when the file is new); returns the
    number of rows written. Raises ValueError if an existing file has another header."""
    rows = list(rows)
    exists = os.path.exists(path) and os.path.getsize(path) > 0
    if exists:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != COLUMNS:
            raise ValueError(f"{path}: header {header} is not grng's benchmark schema {COLUMNS}")
    else:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if not exists:
            writer.writeheader()
        for row in rows:
            writer.writerow(row.as_dict())
    return len(rows)


def read_rows(path: str | os.PathLike) -> list[Row]:
    """Rows of a schema CSV (numbers parsed; empty cells as None / "")."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path}: header {reader.fieldnames} is not grng's benchmark schema")
        out = []
        for rec in reader:
            kw: dict[str, object] = dict(rec)
            for k in ("p50", "p20", "p80"):
                kw[k] = float(rec[k]) if rec[k] else None
            kw["n"] = int(rec["n"]) if rec["n"] else None
            out.append(Row(**kw))  # type: ignore[arg-type]
    return out


__all__ = ["COLUMNS", "Row", "append_rows", "environment", "read_rows"]


def replace_rows(path: str | os.PathLike, rows: Iterable[Row]) -> int:
    """Write ``rows`` as the whole file (one file per benchmark run), header included."""
    if os.path.exists(path):
        os.unlink(path)
    return append_rows(path, rows)


def load_text(start: tuple[float, float, float], end: tuple[float, float, float]) -> str:
    """The machine's load averages (1/5/15 min) at a run's start and end, as one phrase."""
    return (f"load average (1/5/15 min) at start {'/'.join(f'{v:.1f}' for v in start)}, "
            f"at end {'/'.join(f'{v:.1f}' for v in end)}")


def run_header(threads: int) -> dict[str, str]:
    """date, machine (processor, logical cores, torch threads), python and torch of a run, for
    the Markdown summaries next to the CSV files."""
    import time

    import torch
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} "
                       f"logical cores, torch threads {threads}",
            "python": platform.python_version(), "torch": torch.__version__}

