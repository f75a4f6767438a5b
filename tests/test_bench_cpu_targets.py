"""bench/cpu_targets.py on the small model: it runs, and its rows and table are sane."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

from grng.benchmark.schema import read_rows

ROOT = Path(__file__).resolve().parents[1]


def test_small_run_writes_rows_and_table(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "cpu_targets.py"), "--models",
                           "small", "--rounds", "2", "--steps", "2", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_rows(tmp_path / "cpu_targets.csv")
    ratios = {r.name: r.p50 for r in rows if r.metric == "full_step_vs_adamw"}
    assert set(ratios) == {"adamw", "kfac", "ring", "rkalman"}
    assert ratios["adamw"] == 1.0
    assert all(math.isfinite(v) and v > 0 for v in ratios.values())
    ms = [r.p50 for r in rows if r.metric == "full_step"]
    assert len(ms) == 4 and all(v > 0 for v in ms)
    floor = [r.p50 for r in rows if r.metric == "ratio_vs_adamw_floor"]
    assert len(floor) == 1 and floor[0] > 1.0  # curvature adds FLOPs to forward + backward
    table = (tmp_path / "cpu_targets.md").read_text()
    assert "| small | kfac |" in table and "| small | rkalman |" in table
