"""The recurrent EKFAC results file's table is the script's output over the committed CSVs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def test_recurrent_ekfac_defaults_table_is_the_scripts_output() -> None:
    """bench/results/recurrent_ekfac_defaults.md holds, verbatim, what ``recurrent_tuning.py
    resolutions`` prints for its two CSVs (table and counted reading): no number typed."""
    csvs = [RESULTS / f"recurrent_ekfac_defaults{tail}.csv" for tail in ("", "_eval1")]
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "recurrent_tuning.py"),
                          "resolutions", "--csv", *map(str, csvs)],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.count("\n") > 10 and "| LSTM | 0 |" in out and "median" in out
    assert out in (RESULTS / "recurrent_ekfac_defaults.md").read_text()
