"""bench/results/issue25_targets.md is what bench/issue25_targets.py makes of the committed results,
and the script's grid verdict counts and tests what its docstring says."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import issue25_targets as it  # noqa: E402  (bench/issue25_targets.py)


def test_targets_file_matches_the_results() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "issue25_targets.py"), "--check"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize(("fewer", "more", "p"), [(0, 0, 1.0), (3, 3, 1.0), (5, 0, 0.0625),
                                                   (0, 5, 0.0625), (10, 0, 2 / 1024),
                                                   (9, 1, 22 / 1024)])
def test_sign_test_is_the_two_sided_binomial_tail(fewer: int, more: int, p: float) -> None:
    assert it.sign_test(fewer, more) == pytest.approx(p)


def test_count_leaves_out_pairs_where_neither_reached() -> None:
    u = it.UNREACHED
    assert it._count([(30, 35), (40, 40), (45, 40), (u, 50), (50, u), (u, u)]) == (2, 2, 1)


def _grid(path: Path, blocks: list[int | None], fallback: list[int | None],
          settings: dict[str, dict] = it.DEFAULTS) -> None:
    """A grid CSV of one K-FAC and one EKFAC setting (``settings``) over seeds 0..n-1."""
    fields = ["stage", "task", "seed", "optimizer", "variant", "settings", "target", "steps",
              "eval_at_50", "curve", "error"]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        for optimizer in ("K-FAC", "EKFAC"):
            for seed, (b, d) in enumerate(zip(blocks, fallback)):
                for variant, steps in (("blocks", b), ("diagonal", d)):
                    w.writerow(dict(stage="grid", task="digits CNN", seed=seed,
                                    optimizer=optimizer, variant=variant,
                                    settings=repr(settings[optimizer]), target="0.5",
                                    steps=steps or "", eval_at_50="0.4", curve="", error=""))


@pytest.mark.parametrize(("blocks", "fallback", "met"), [
    ([30] * 6, [35] * 6, True),  # fewer on 6 of 6: p = 1/32
    ([30] * 5, [35] * 5, False),  # fewer on 5 of 5: p = 1/16, not below 0.05
    ([30] * 6, [30] * 6, False),  # all tied
    ([35] * 6, [30] * 6, False),  # more on every seed
    ([30] * 6, [None] * 6, True),  # the fallback never reaches the target
    ([None] * 6, [None] * 6, False),  # neither does: every pair left out
])
def test_grid_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, blocks: list[int | None],
                      fallback: list[int | None], met: bool) -> None:
    monkeypatch.setattr(it, "RESULTS", tmp_path)
    for tail in ("", "_eval1"):
        _grid(tmp_path / f"issue25_grid_CNN{tail}.csv", blocks, fallback)
    _grid(tmp_path / f"{it.LIBRARY_DEFAULTS}.csv", blocks, fallback,
          dict(it.DEFAULTS, **{"K-FAC": it.LIBRARY_KFAC}))
    verdicts = [r for r in it.steps_rows("digits CNN") if r[3] is not None]
    assert [r[0].split(":")[0] for r in verdicts] == ["digits CNN, K-FAC", "digits CNN, EKFAC"]
    assert all(r[3] is met for r in verdicts)
