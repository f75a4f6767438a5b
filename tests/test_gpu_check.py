"""bench/gpu_check.py end to end on the CPU (``--cpu``: tiny sizes, Triton interpreted), so the
prepared GPU run cannot rot: every stage runs or says why not, its rows parse in the benchmark
schema, the op checks pass, and a run out of budget says which stages it cut and still prints
its summary last.
"""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grng.benchmark.schema import read_rows
from grng.ops import dispatch, registry

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
STAGES = ("env", "build", "ceilings", "correct", "kernels", "step")


def run_check(out: Path, *flags: str) -> subprocess.CompletedProcess:
    """``python bench/gpu_check.py --cpu --out OUT FLAGS`` from the repository root."""
    return subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--out", str(out), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def stage_table(stdout: str) -> dict[str, tuple[str, str]]:
    """{stage: (status, notes)} from the summary table, which must be the last thing printed."""
    lines = stdout.rstrip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("| stage | status |"))
    body = lines[start + 2:]
    assert body and all(line.startswith("| ") for line in body), "the table is not printed last"
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in body]
    return {c[0]: (c[1], c[3]) for c in cells}


def test_cpu_mode_runs_every_stage(tmp_path: Path) -> None:
    """Exit status 0; every stage ok (build skipped with its reason); the CSV holds passing op
    checks of both fast backends, kernel timings, ceilings and whole steps of every optimizer."""
    proc = run_check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    table = stage_table(proc.stdout)
    assert list(table) == list(STAGES)
    for stage in STAGES:
        status, notes = table[stage]
        assert status == ("skipped" if stage == "build" else "ok"), (stage, status, notes)
    assert "--cpu" in table["build"][1]
    assert (tmp_path / "summary.md").read_text().rstrip().endswith(proc.stdout.rstrip()
                                                                   .splitlines()[-1])

    rows = read_rows(tmp_path / "gpu_check.csv")
    passed = [r for r in rows if r.suite == "gpu_check.correct" and r.metric == "passed"]
    assert {r.provider for r in passed} == {"triton", "ext"}
    dispatch.backends()  # registers the Triton ops
    assert {r.name for r in passed if r.provider == "triton"} == {
        op for op in registry.SPECS if dispatch.implementation(op, "triton") is not None}
    assert all(r.p50 == 1.0 for r in passed), [(r.name, r.provider, r.config) for r in passed
                                               if r.p50 != 1.0]
    assert any(r.suite == "ceilings" and r.name == "gemm" and r.p50 > 0 for r in rows)
    times = [r for r in rows if r.suite == "kernels" and r.metric == "time"]
    assert {r.provider for r in times} >= {"reference", "ext"} and all(r.p50 > 0 for r in times)
    inverses = {(r.name, r.provider, int(r.x_value)) for r in rows
                if r.suite == "gpu_check.kernels" and r.metric == "time" and r.p50 > 0}
    for n in (32, 64):  # CPU_PLAN.inverse_sizes
        assert {(c, "reference", n) for c in ("eigh", "cholesky_inverse",
                                              "newton_schulz_inverse_warm",
                                              "newton_schulz_masked_warm")} <= inverses, inverses
    measured = [(r.name, r.provider) for r in rows
                if r.suite == "gpu_check.step" and r.metric == "full_step_time" and r.p50 > 0]
    assert set(measured) == {("adamw", "-"), ("kfac-newton-host", "reference")} | {
        (o, b) for o in ("kfac-default", "ekfac", "kfac", "ring", "rkalman", "kfac-newton")
        for b in ("reference", "triton", "ext")}
    # what a short window must not lose runs first: AdamW, the sync-free step against the host
    # path, then the device's defaults
    assert measured[:3] == [("adamw", "-"), ("kfac-newton", "reference"),
                            ("kfac-newton-host", "reference")]
    assert {o for o, _ in measured[3:9]} == {"kfac-default", "ekfac"}
    # the cost model's prediction beside every measured step row
    for metric in ("predicted_step_time", "predicted_ratio_vs_adamw", "measured_over_predicted"):
        predicted = [(r.name, r.provider) for r in rows
                     if r.suite == "gpu_check.step" and r.metric == metric and r.p50 > 0]
        assert predicted == measured, metric
    summary = (tmp_path / "summary.md").read_text()
    assert "| predicted ms | predicted x AdamW | measured / predicted |" in summary
    assert {r.name for r in rows if r.suite == "gpu_check" and r.metric == "wall_time"} == {
        "env", "ceilings", "correct", "kernels", "step"}


def test_budget_cuts_stages_and_still_summarizes(tmp_path: Path) -> None:
    """With a 12 s budget (8 s after the summary's reserve) the correct stage stops at its share
    and runs no pytest, the step stage is never started; exit status 1, table printed last."""
    proc = run_check(tmp_path, "--stages", "correct,step", "--budget", "12")
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-2000:]
    table = stage_table(proc.stdout)
    assert table["correct"][0] == "cut short by the budget", table["correct"]
    assert table["step"] == ("cut short by the budget", "not started: budget spent")
    assert all(table[s][0] == "skipped" for s in ("env", "build", "ceilings", "kernels"))


def test_warmup_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The build stage's Triton warm-up: jobs (an op check, a micro-GPT step through the triton
    backend) run in parallel processes, log to build.log and are counted in the stage's notes
    (here in the interpreter, where nothing is compiled)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # dataclasses look their module up
    spec.loader.exec_module(gpu_check)
    monkeypatch.setattr(gpu_check, "warm_jobs", lambda: ["eigen_apply:bfloat16:7", "step:rkalman"])
    report = gpu_check.Report(tmp_path / "report.json")
    now = time.time()
    ctx = gpu_check.Ctx(tmp_path, True, "cpu", now + 300, now + 300, gpu_check.CPU_PLAN, report)
    pool, jobs = gpu_check.start_warmup(ctx, gpu_check.LockedLog(tmp_path / "build.log"))
    gpu_check.finish_warmup(ctx, pool, jobs)
    assert report.notes[-1].startswith("Triton warm-up: 2/2 jobs done"), report.notes
    log = (tmp_path / "build.log").read_text()
    match = re.search(r"\[warm eigen_apply:bfloat16:7\] warm eigen_apply:bfloat16:7: (\d+)/(\d+) "
                      r"checks passed", log)
    assert match and match.group(1) == match.group(2) != "0", log
    assert "[warm step:rkalman] warm step:rkalman: 2 steps" in log, log


def test_auto_order_rule_is_decided_per_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend that wins every bf16 point but loses at fp32 is listed for bf16 alone (pooling
    the dtypes would hide the win); one losing a single size of a dtype is not listed for it."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setattr(gpu_check, "fast_backends", lambda: ("triton", "ext"))
    speed = {("eigen_apply", "triton", 769, "bfloat16"): 1.8,
             ("eigen_apply", "triton", 3072, "bfloat16"): 2.5,
             ("eigen_apply", "triton", 769, "float32"): 0.6,
             ("eigen_apply", "triton", 3072, "float32"): 0.7,
             ("eigen_apply", "ext", 769, "float32"): 1.2,
             ("eigen_apply", "ext", 3072, "float32"): 0.9}
    assert gpu_check.auto_order_wins(speed) == ["eigen_apply/bfloat16: triton (x1.80-2.50)"]


def test_auto_order_verdicts_confirm_or_remove_the_predicted_entries(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each AUTO_ORDER['cuda'] entry (predicted by the cost model) is confirmed per dtype where
    it wins every measured size, marked REMOVE where it loses one, and "not timed" without points."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)
    spec.loader.exec_module(gpu_check)
    speed = {("factor_update_masked", "triton", 769, "float32"): 1.5,
             ("factor_update_masked", "triton", 3073, "float32"): 1.9,
             ("factor_update_masked", "triton", 769, "bfloat16"): 2.0,
             ("factor_update_masked", "triton", 3073, "bfloat16"): 0.8,
             ("factor_update_masked", "ext", 769, "float32"): 1.1}
    order = {"factor_update_masked": ("triton", "ext"), "adam_moments_masked": ("ext",)}
    assert gpu_check.auto_order_verdicts(speed, order) == [
        "factor_update_masked/triton/bfloat16: REMOVE (x0.80-2.00)",
        "factor_update_masked/triton/float32: confirmed (x1.50-1.90)",
        "factor_update_masked/ext/float32: confirmed (x1.10-1.10)",
        "adam_moments_masked/ext: not timed"]
