"""Issue 21's targets for EKFAC, each with its number and whether it is met, from committed results.

    python bench/ekfac_targets.py          # writes bench/results/ekfac_targets.md
    python bench/ekfac_targets.py --check  # exit 1 if that file disagrees with the results

Nothing is trained or timed here; the numbers are read from:

- ``ekfac_grid.csv`` (``python bench/ekfac.py tasks --set grid --tasks transformer mlp cnn
  --name ekfac_grid``): EKFAC at its defaults against AdamW, SOAP (and Muon on the language
  task) at lr 3e-3, 1e-2 and 3e-2 on the demo's three tasks;
- ``ekfac_fisher.csv`` (``--set fisher --tasks mlp cnn --name ekfac_fisher``): EKFAC's original
  (Fisher) scaling at the same three lrs and K-FAC at its defaults on the digits models, for
  which the README's table names that scaling (:data:`FAMILY_CONFIG`);
- ``ekfac_time.csv`` (``--set time``, a quiet machine): seconds to 3.7 bpc;
- ``hf_lm.csv`` (``python bench/hf_lm.py``): the Hugging Face GPT-2 and Llama;
- ``defaults_ekfac.csv`` (``python bench/ekfac.py hparams``): the defaults sweep's failed runs;
- ``ekfac_refresh.csv`` (``python bench/ekfac.py refresh``) and the cost model's refresh
  prediction (``bench/costmodel.py`` ``refresh_section``, the block of docs/performance.md).

A peer is taken at its best lr in the file: the fewest median steps to the target with every
seed there (ties: the better final metric), or the lowest median final metric or loss, among
its configurations run on the most seeds (tools/readme_numbers.py's rules).
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tools"))

import costmodel  # noqa: E402  (bench/costmodel.py)
import readme_numbers as rn  # noqa: E402  (tools/readme_numbers.py: the result-file readers)

RESULTS = ROOT / "bench" / "results"
OUT = RESULTS / "ekfac_targets.md"
DOCS = ROOT / "docs" / "performance.md"
EKFAC = "EKFAC defaults"
#: per demo task, the EKFAC configuration named for its model family (file, label): Adam's
#: scaling (the default) on the language task, EKFAC's original Fisher scaling at the default
#: lr on the digits models (bench/results/ekfac_fisher.md; the README's "which" table)
FAMILY_CONFIG = {"transformer": ("ekfac_grid.csv", EKFAC),
                 "mlp": ("ekfac_fisher.csv", "EKFAC fisher lr 0.01"),
                 "cnn": ("ekfac_fisher.csv", "EKFAC fisher lr 0.01")}
#: the test that checks the default refresh path calls no eigh after the first refresh
NO_EIGH_TEST = "test_no_eigh_after_the_first_refresh_at_the_defaults"
LANGUAGE_TIME_BAR = 1.3  # time to 3.7 bpc at most 1.3x AdamW's at its best lr
FINAL_SLACK = 0.02  # final val bpc at most SOAP's + 0.02

Row = tuple[str, str, str, bool]  # (target, measured, source, met)


def _p50(m: dict[str, dict], metric: str) -> float:
    return float(m[metric]["p50"])


def _peer(configs: dict[str, dict], keys: dict[str, str], key: str,
          pick: Callable[[dict[str, dict]], str | None]) -> str | None:
    """The label ``pick`` chooses among optimizer ``key``'s configurations run on the most
    seeds."""
    mine = {label: m for label, m in configs.items() if keys[label] == key}
    return pick(rn._most_runs(mine)) if mine else None


def _steps(configs: dict[str, dict], label: str | None) -> str:
    """Median steps and final metric of ``label`` ("never" for None, or where a seed did not
    reach the target)."""
    if label is None or _reached(configs[label]) == float("inf"):
        return "never (no lr with every seed there)"
    m = configs[label]
    final = m[rn._final_key(m)]
    unit = "%" if final["unit"] == "%" else " bpc"
    return (f"{_p50(m, 'steps_to_target'):.0f} steps, final {float(final['p50']):.4g}{unit} "
            f"({label}, {m['failed_runs']['n']} seeds)")


def _reached(m: dict[str, dict]) -> float:
    """Median steps to the target, infinite unless every seed got there."""
    return _p50(m, "steps_to_target") if rn._complete(m, "steps_to_target") else float("inf")


def step_targets() -> list[Row]:
    """The demo's tasks: steps to the target and the final metric of the EKFAC configuration
    named for the task's model family (:data:`FAMILY_CONFIG`) against the peers' best lr (and,
    where that is the Fisher scaling, K-FAC at its defaults, run alongside it)."""
    cells, keys, meta = rn._cells(RESULTS / "ekfac_grid.csv")
    src = f"ekfac_grid.csv ({meta})"
    rows: list[Row] = []
    for task, configs in cells.items():
        file, label = FAMILY_CONFIG[task]
        family = rn._cells(RESULTS / file)[0][task] if file != "ekfac_grid.csv" else configs
        mine = family[label]
        steps = _reached(mine)
        where = src if file == "ekfac_grid.csv" else f"{file}, {src}"
        ekfac = f"EKFAC {_steps(family, label)}"
        final_key = rn._final_key(mine)
        peers = ("soap", "muon") if task == "transformer" else ("soap", "adamw")
        for key in peers:
            best = _peer(configs, keys, key, rn._fewest_steps)
            theirs = _reached(configs[best]) if best else float("inf")
            strict = key == "muon"  # "ahead of Muon in steps"
            rows.append((f"{task}: EKFAC's steps to the target {'<' if strict else '<='} "
                         f"{rn.FAMILIES[key]}'s at its best lr",
                         f"{ekfac}; {rn.FAMILIES[key]} {_steps(configs, best)}", where,
                         steps < theirs if strict else steps <= theirs))
        if "K-FAC defaults" in family and family is not configs:
            rows.append((f"{task}: EKFAC's (Fisher scaling) steps to the target <= K-FAC's at "
                         "its defaults", f"{ekfac}; K-FAC {_steps(family, 'K-FAC defaults')}",
                         f"{file}", steps <= _reached(family["K-FAC defaults"])))
        if task == "transformer":
            best = _peer(configs, keys, "soap", lambda c: rn._lowest(c, final_key))
            theirs = _p50(configs[best], final_key)
            rows.append((f"{task}: EKFAC's final val bpc <= SOAP's best + {FINAL_SLACK}",
                         f"EKFAC {_p50(mine, final_key):.3f}; SOAP {theirs:.3f} ({best})", src,
                         _p50(mine, final_key) <= theirs + FINAL_SLACK))
        else:
            rows.append((f"{task}: AdamW's grid includes lr 1e-2 and 3e-2",
                         ", ".join(label for label in configs if keys[label] == "adamw"), src,
                         all(any(keys[lab] == "adamw" and configs[lab]["steps_to_target"]
                                 ["x_value"] == lr for lab in configs) for lr in ("0.01", "0.03"))))
    return rows


def time_target() -> list[Row]:
    """Seconds to 3.7 bpc, EKFAC's defaults over AdamW's (the time set: lr 1e-2, its best in
    ekfac_grid.csv), and Muon's for reference."""
    cells, _, meta = rn._cells(RESULTS / "ekfac_time.csv")
    configs = cells["transformer"]
    secs = {label: _p50(m, "seconds_to_target") for label, m in configs.items()}
    adamw = next(label for label in configs if label.startswith("AdamW"))
    ratio = secs[EKFAC] / secs[adamw]
    muon = "".join(f"; {label} {secs[label] / secs[adamw]:.2f}x" for label in configs
                   if label.startswith("Muon"))
    return [(f"transformer: EKFAC's time to 3.7 bpc <= {LANGUAGE_TIME_BAR}x AdamW's at its "
             "best lr",
             f"{ratio:.2f}x ({secs[EKFAC]:.2f} s vs {secs[adamw]:.2f} s, {adamw}, "
             f"{configs[EKFAC]['failed_runs']['n']} seeds{muon})",
             f"ekfac_time.csv ({meta})", ratio <= LANGUAGE_TIME_BAR)]


def hf_targets() -> list[Row]:
    """GPT-2 and Llama: EKFAC's validation loss at each step <= SOAP's and AdamW's best."""
    cells, keys, meta = rn._cells(RESULTS / "hf_lm.csv")
    rows: list[Row] = []
    for model, configs in cells.items():
        for step in rn.HF_STEPS:
            metric = f"val_loss@{step}"
            mine = _p50(configs[EKFAC], metric)
            for key in ("soap", "adamw"):
                best = _peer(configs, keys, key, lambda c: rn._lowest(c, metric))
                theirs = _p50(configs[best], metric)
                rows.append((f"{model}: EKFAC's val loss at step {step} <= "
                             f"{rn.FAMILIES[key]}'s at its best lr",
                             f"EKFAC {mine:.3f}; {rn.FAMILIES[key]} {theirs:.3f} ({best})",
                             f"hf_lm.csv ({meta})", mine <= theirs))
    return rows


def divergence_target() -> list[Row]:
    """The defaults sweep (tasks x 3 lrs x seeds) and the Fisher scaling's grid on the digits
    models (:data:`FAMILY_CONFIG`): failed or diverged EKFAC runs."""
    failed, stamps, parts = [], [], []
    for file in ("defaults_ekfac.csv", "ekfac_fisher.csv"):
        with (RESULTS / file).open() as fh:
            mine = [r for r in csv.DictReader(fh) if r["metric"] == "failed_runs"
                    and r["provider"].startswith("EKFAC")]
        failed += mine
        stamps.append(f"{file} ({max(r['timestamp'] for r in mine)[:16]})")
        tasks = sorted({r["name"].split("/")[0] for r in mine})
        lrs = sorted({r["x_value"] for r in mine}, key=float)
        parts.append(f"{file.removesuffix('.csv')}: {', '.join(tasks)} x lr {'/'.join(lrs)}")
    bad = sum(float(r["p50"]) for r in failed)
    runs = sum(int(r["n"]) for r in failed)
    return [("0 divergences over the defaults sweep",
             f"{bad:.0f} failed of {runs} runs ({'; '.join(parts)})",
             ", ".join(stamps), bad == 0 and runs > 0)]


def refresh_targets() -> list[Row]:
    """The refresh: no eigh after the first (a test), its CPU cost against eigh, the H100
    prediction in docs/performance.md."""
    tested = NO_EIGH_TEST in (ROOT / "tests" / "test_ekfac.py").read_text()
    rows: list[Row] = [("no eigh after the first refresh on the default path",
                        f"tests/test_ekfac.py::{NO_EIGH_TEST} (45 steps at the defaults: "
                        "eigh only at the first refresh; host and sync-free, both QRs)",
                        "tests/test_ekfac.py", tested)]
    with (RESULTS / "ekfac_refresh.csv").open() as fh:
        times = {(r["x_value"], r["provider"]): r for r in csv.DictReader(fh)
                 if r["metric"] == "time"}
    sizes = [str(d) for d in costmodel.REFRESH_SIZES]
    have = all((d, p) in times for d in sizes for p in ("eigh", "subspace", "subspace cholesky"))
    parts = []
    for d in sizes:
        if have:
            e, h, c = (float(times[(d, p)]["p50"])
                       for p in ("eigh", "subspace", "subspace cholesky"))
            parts.append(f"d = {d}: eigh {e:.0f} ms, subspace step Householder {h:.0f} ms "
                         f"(eigh / it: {e / h:.1f}x), CholeskyQR3 {c:.0f} ms "
                         f"(eigh / it: {e / c:.1f}x)")
    stamp = max((r["timestamp"] for r in times.values()), default="")[:16]
    rows.append(("the refresh's cost per refresh at d = 768 and 3072 on CPU against eigh",
                 "; ".join(parts) or "missing", f"ekfac_refresh.csv ({stamp})", have))
    in_docs = "\n".join(costmodel.refresh_section()) in DOCS.read_text()
    ms = costmodel.refresh_predictions()
    rows.append(("the refresh's cost predicted for an H100 in docs/performance.md",
                 "; ".join(f"{label}: " + ", ".join(f"{t:.3g} ms at d = {d}" for d, t in
                                                    zip(costmodel.REFRESH_SIZES, row))
                           for label, row in ms.items()),
                 "docs/performance.md (bench/costmodel.py, the H100 SXM)", in_docs))
    return rows


def render(rows: list[Row]) -> str:
    met = sum(r[3] for r in rows)
    text = ["# Issue 21 (EKFAC): the targets, from the committed results "
            "(`python bench/ekfac_targets.py`)", "",
            "Generated from the files named in each row; nothing is run. Medians over the "
            "seeds; a peer at its best lr of the file (module docstring of "
            "bench/ekfac_targets.py).", "",
            f"**{met} of {len(rows)} met.**", "",
            "| target | measured | source | met |", "|---|---|---|---|"]
    text += [f"| {t} | {m} | {s} | {'yes' if ok else '**no**'} |" for t, m, s, ok in rows]
    return "\n".join(text + ["", *default_scaling_note()]) + "\n"


def default_scaling_note() -> list[str]:
    """What EKFAC's default (Adam) scaling takes on the tasks for which :data:`FAMILY_CONFIG`
    names the Fisher scaling (ekfac_grid.csv), so that the choice is visible."""
    cells, _, _ = rn._cells(RESULTS / "ekfac_grid.csv")
    parts = []
    for task, (file, _) in FAMILY_CONFIG.items():
        if file != "ekfac_grid.csv":
            parts.append(f"{task} {_steps(cells[task], EKFAC)}")
    return ["The digits rows take EKFAC's original (Fisher) scaling, which the README's table "
            "names for those models; at its default (Adam) scaling EKFAC takes: "
            + "; ".join(parts) + " (ekfac_grid.csv)."]


def targets() -> str:
    """The whole file: every target's row."""
    return render(step_targets() + time_target() + hf_targets() + divergence_target()
                  + refresh_targets())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true",
                    help=f"write nothing; exit 1 if {OUT.name} is not what the results give")
    args = ap.parse_args(argv)
    text = targets()
    if args.check:
        if OUT.exists() and OUT.read_text() == text:
            return 0
        print(f"{OUT} disagrees with the results: run python bench/ekfac_targets.py")
        return 1
    OUT.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
