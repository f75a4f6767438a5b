"""bench/hf_lm.py: its two Hugging Face models are what its docstring says, grng covers them,
and a one-step run of every configuration writes schema rows and a table."""
from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grng.benchmark.schema import read_rows

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("hf_lm", ROOT / "bench" / "hf_lm.py")
hf_lm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hf_lm)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_the_models_are_small_causal_and_covered(name: str) -> None:
    import grng
    from grng.demo.text import VOCAB_SIZE

    model = hf_lm.build(name)
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 120_000
    x = torch.randint(0, VOCAB_SIZE, (3, hf_lm.SEQ_LEN))
    logits = model(x)
    assert logits.shape == (3, hf_lm.SEQ_LEN, VOCAB_SIZE)
    changed = x.clone()
    changed[:, -1] = (x[:, -1] + 1) % VOCAB_SIZE
    torch.testing.assert_close(model(changed)[:, :-1], logits[:, :-1])  # causal
    from grng.curvature.coverage import KRONECKER

    coverage = grng.EKFAC(model).coverage()
    assert coverage.fraction(KRONECKER) > 0.95, coverage.summary()


def test_a_one_step_run_writes_rows_and_table_and_resumes(tmp_path: Path) -> None:
    """Two configurations (a torch peer, EKFAC at its defaults) one step each: rows and a
    table; run again, nothing is run and the files are the same."""
    cmd = [sys.executable, str(ROOT / "bench" / "hf_lm.py"), "--models", "llama", "--seeds", "1",
           "--steps", "1", "--configs", "AdamW lr 3e-3", "EKFAC defaults", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_rows(tmp_path / "hf_lm.csv")
    losses = {r.provider: r.p50 for r in rows if r.metric == "val_loss" and r.x_value == "1"}
    assert set(losses) == {"AdamW lr 3e-3", "EKFAC defaults"}
    assert all(math.isfinite(v) and 0 < v < 6 for v in losses.values())
    assert all(r.p50 == 0.0 for r in rows if r.metric == "failed_runs")
    table = (tmp_path / "hf_lm.md").read_text()
    assert "## llama (" in table and "| EKFAC defaults |" in table
    runs = (tmp_path / "hf_lm_runs.jsonl").read_text()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0 and "0 runs to do (2 in" in again.stdout, again.stdout
    assert (tmp_path / "hf_lm_runs.jsonl").read_text() == runs
