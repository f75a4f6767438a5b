"""bench/results/ekfac_targets.md is what bench/ekfac_targets.py makes of the committed results
(rerun the script after a result file it reads changes)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_targets_file_matches_the_results() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "ekfac_targets.py"), "--check"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
