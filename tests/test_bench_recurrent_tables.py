"""Issue 25's side-by-side results files (recurrent LMs, depthwise CNN): their tables are the
script's output over the committed CSVs."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


@pytest.mark.parametrize("name", ["recurrent_ekfac_defaults", "recurrent_ekfac_keep",
                                  "depthwise_ekfac_defaults", "depthwise_kfac_tuned"])
def test_resolutions_table_is_the_scripts_output(name: str) -> None:
    """bench/results/<name>.md holds, verbatim, what ``recurrent_tuning.py resolutions`` prints
    for its two CSVs (the bench's eval and every step: table and counted reading)."""
    csvs = [RESULTS / f"{name}{tail}.csv" for tail in ("", "_eval1")]
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "recurrent_tuning.py"),
                          "resolutions", "--csv", *map(str, csvs)],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.count("\n") > 8 and re.search(r"^\| [^|]+ \| 0 \| \d+ \|", out, re.M)
    assert "median" in out
    assert out in (RESULTS / f"{name}.md").read_text()
