"""bench/amortization.py --quick: it runs, and the rows it writes are sane."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

from grng.benchmark.schema import read_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_writes_sane_rows(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "amortization.py"), "--quick",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_rows(tmp_path / "amortization.csv")
    assert rows and all(r.suite == "amortization" for r in rows)
    by = {(r.name, r.x_value, r.metric): r for r in rows}
    configs = {(r.name, r.x_value) for r in rows}
    # AdamW; K-FAC, RING and R-Kalman at their library default and at least one other setting
    assert {n for n, _ in configs} == {"mlp/adamw", "mlp/kfac", "mlp/ring", "mlp/rkalman"}
    for name in ("mlp/kfac", "mlp/ring", "mlp/rkalman"):
        assert sum(n == name for n, _ in configs) >= 2
    for name, setting in configs:
        get = {metric: row for (n, s, metric), row in by.items() if (n, s) == (name, setting)}.get
        ms = get("step_time")
        assert ms.p50 is not None and math.isfinite(ms.p50) and ms.p50 > 0 and ms.n == 2
        ratio = get("step_time_ratio_adamw").p50
        assert ratio is not None and math.isfinite(ratio) and ratio > 0
        if name == "mlp/adamw":
            assert ratio == pytest.approx(1.0)
        steps, secs = get("steps_to_target"), get("seconds_to_target")
        if steps.p50 is None:  # explicitly missing: no seed reached the target
            assert steps.n == 0 and secs.p50 is None and "reached 0/1" in steps.config
        else:
            assert steps.n == 1 and steps.p50 > 0 and steps.p50 == int(steps.p50)
            assert secs.p50 == pytest.approx(steps.p50 * ms.p50 / 1000.0, rel=1e-4)
        final = get("final_val_acc")
        assert final.p50 is not None and 0.0 <= final.p50 <= 100.0
        assert get("failed_runs").p50 == 0.0
    md = (tmp_path / "amortization.md").read_text()
    assert "## mlp" in md and "## Reading" in md and "load average" in md
