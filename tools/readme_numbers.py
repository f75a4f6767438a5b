"""Regenerate every number the README shows from committed results, and check that they agree.

Each such number sits in a block of README.md between ``<!-- readme_numbers: NAME -->`` and
``<!-- /readme_numbers: NAME -->``; :data:`BLOCKS` says where each block comes from:

* ``dropin``: ``examples/dropin.py`` and what running it prints (it runs here, a second);
* ``verify`` / ``bench``: excerpts of ``bench/results/verify_quick.txt`` and
  ``bench/results/bench_quick.txt``, the committed outputs of ``grng verify --quick`` and
  ``grng bench --quick --threads 1`` (``--run verify,bench`` reruns them on this machine);
* ``demo``: the tables and measured claims of a committed ``make demo`` run,
  ``bench/results/demo.json`` (``--demo results/demo-<stamp>`` adopts a run's results.json
  and curves.png);
* ``defaults``: the targets of ``bench/results/defaults.md`` (``python bench/defaults.py``);
* ``step_time``: ratios computed from ``bench/results/step_time.md`` (``bench/step_time.py``);
* ``ext``: speed-ups computed from ``bench/results/ext.csv`` (``bench/ext_update.py``);
* ``ekfac``: the demo's tasks against peers, from ``bench/results/ekfac_tasks.csv``
  (``python bench/ekfac.py tasks``);
* ``ekfac_scaling``: EKFAC's two scalings, betas and GR term against AdamW and SOAP, from
  ``bench/results/ekfac_scaling.csv`` (``python bench/ekfac.py tasks --set scaling``);
* ``hf_lm``: small Hugging Face GPT-2 and Llama, from ``bench/results/hf_lm.csv``
  (``python bench/hf_lm.py``);
* ``which``: which optimizer for which model, each optimizer's best configuration from both.

``python tools/readme_numbers.py`` rewrites the blocks; ``--check`` rewrites nothing, prints the
blocks that disagree and exits 1 (tests/test_readme_numbers.py runs it).
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import difflib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "bench" / "results"
DROPIN = ROOT / "examples" / "dropin.py"
VERIFY_OUT = RESULTS / "verify_quick.txt"
BENCH_OUT = RESULTS / "bench_quick.txt"
DEMO_JSON = RESULTS / "demo.json"
DEMO_PNG = ROOT / "docs" / "demo_curves.png"
BLOCK = re.compile(r"(<!-- readme_numbers: (?P<name>[a-z_]+) -->\n)(?P<body>.*?)"
                   r"(<!-- /readme_numbers: (?P=name) -->)", re.S)


def _python_env() -> dict[str, str]:
    """This tree's grng first on the path, whatever the caller's PYTHONPATH."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


# ----------------------------------------------------------------------------- blocks

def dropin_block() -> str:
    """The example's code and its printed losses (run now, in a fresh process)."""
    out = subprocess.run([sys.executable, str(DROPIN)], capture_output=True, text=True, check=True,
                         env=_python_env(), cwd=ROOT, timeout=300).stdout
    code = DROPIN.read_text().split('"""', 2)[2].strip()
    return (f"```python\n{code}\n```\n\nprints (`python examples/dropin.py`):\n\n```\n{out.strip()}\n```\n")


def _header(path: Path) -> tuple[str, list[str]]:
    """(the ``# ...`` first line without its mark, the other lines) of a committed output."""
    lines = path.read_text().splitlines()
    return lines[0].lstrip("# ").strip(), lines[1:]


def verify_block() -> str:
    """Header, per (op, fast backend) the row with the largest ratio, skips, the summary."""
    about, lines = _header(VERIFY_OUT)
    head = next(i for i, line in enumerate(lines) if line.startswith("op "))
    worst: dict[tuple[str, str], tuple[float, str]] = {}
    for line in lines[head + 1:]:
        cells = line.split()
        if len(cells) < 8 or cells[-1] not in ("pass", "FAIL") or cells[1] == "reference":
            continue
        ratio = {"-": -1.0, "inf": math.inf}.get(cells[-2]) or float(cells[-2])
        key = (cells[0], cells[1])
        if key not in worst or ratio > worst[key][0]:
            worst[key] = (ratio, line)
    rest = [line for line in lines[head + 1:] if line.startswith(("skipped", "FAIL", "NOTHING"))
            or " checks on " in line]
    notes = [line for line in lines[:head] if "not checked" in line]
    body = "\n".join(notes + [lines[head]] + [w[1] for w in worst.values()] + rest[:3] + rest[-1:])
    return (f"Excerpt of `python -m grng verify --quick` ({about}): for each op and fast backend "
            f"the row with the largest ratio, then the skips and the summary (the whole output: "
            f"[bench/results/verify_quick.txt](bench/results/verify_quick.txt)):\n\n```\n{body}\n```\n")


def bench_block() -> str:
    """The ceilings, the rows of the largest size, the flags and the closing line."""
    about, lines = _header(BENCH_OUT)
    sizes = [int(m.group(1)) for line in lines for m in [re.search(r" n=(\d+) ", line)] if m]
    big = f"n={max(sizes)}" if sizes else None
    keep = [line for line in lines
            if not line.startswith(("  skip", "torch.matmul", "  ")) or (big and f" {big} " in line)]
    keep = [line for line in keep if not line.startswith("  skip")]
    return (f"Excerpt of `python -m grng bench --quick --threads 1` ({about}; the rows of the "
            f"largest size; the whole output: [bench/results/bench_quick.txt]"
            f"(bench/results/bench_quick.txt)):\n\n```\n" + "\n".join(keep) + "\n```\n")


def _denull(summary: dict) -> dict:
    """results.json writes NaN as null; the report's (mean, std) pairs want NaN back."""
    out = dict(summary)
    for key, value in summary.items():
        if isinstance(value, list) and len(value) == 2 and all(v is None or isinstance(v, (int, float))
                                                               for v in value):
            out[key] = tuple(math.nan if v is None else v for v in value)
    return out


def demo_block(path: Path = DEMO_JSON) -> str:
    """The demo's tables per task and its measured claims, from a run's results.json."""
    if not path.exists():
        return ("No `make demo` run is committed for this version, so no demo numbers are shown "
                "here (the tables of earlier versions came from older defaults). `make demo` "
                "prints them; `python tools/readme_numbers.py --demo results/demo-<stamp>` "
                "commits a run's numbers and plot to this section.\n")
    sys.path.insert(0, str(ROOT))
    from grng.demo import report
    from grng.demo.tasks import TASKS

    raw = json.loads(path.read_text())
    summaries = [_denull(s) for s in raw["summaries"]]
    models = list(raw["settings"]["tasks"])
    machine = raw["machine"]
    seeds = ", ".join(f"{m} {len(raw['settings']['tasks'][m]['seeds'])}" for m in models)
    text = [f"`{raw['settings']['command']}` on {machine.get('date', '?')}: {machine.get('cpu', '?')}, "
            f"torch {machine.get('torch', '?')}, grng {machine.get('grng', '?')}, load average "
            f"{machine.get('load average at start (1/5/15 min)', '?')} at the start; seeds: {seeds} "
            f"([bench/results/demo.json](bench/results/demo.json)).", ""]
    for model in models:
        task = TASKS[model]
        text += [f"*{model}* ({task.dataset}, test {task.metric_name}):", "",
                 report.markdown_table([s for s in summaries if s["model"] == model]), ""]
    text += ["![demo curves](docs/demo_curves.png)", ""] + report.claims(summaries, models)
    return "\n".join(text) + "\n"


def defaults_block() -> str:
    """The defaults benchmark's date, load and its targets section."""
    lines = (RESULTS / "defaults.md").read_text().splitlines()
    meta = {m.group(1): m.group(2) for line in lines for m in [re.match(r"- (\w[\w ]*): (.*)", line)] if m}
    targets = lines[lines.index("## Targets") + 1:]
    body = [re.sub(r"^### (.*)", r"*\1*", line) for line in targets]
    return (f"From [bench/results/defaults.md](bench/results/defaults.md) ({meta.get('date', '?')}, "
            f"{meta.get('machine', '?')}, grng {meta.get('grng', '?')}, {meta.get('load', '?')}; "
            f"validation split):\n" + "\n".join(body).rstrip() + "\n")


def _range(values: list[float], fmt: str = ".1f") -> str:
    lo, hi = min(values), max(values)
    return f"{lo:{fmt}}x" if format(lo, fmt) == format(hi, fmt) else f"{lo:{fmt}}-{hi:{fmt}}x"


def step_time_block() -> str:
    """Full-step cost ratios per model: curvature methods against AdamW, GR against SGD."""
    lines = (RESULTS / "step_time.md").read_text().splitlines()
    title = lines[0].lstrip("# ").strip()
    ms: dict[tuple[str, str, str], float] = {}
    ratio: dict[tuple[str, str, str], float] = {}
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and re.match(r"[\d.]+ \(", cells[3]):
            ms[tuple(cells[:3])] = float(cells[3].split()[0])
            ratio[tuple(cells[:3])] = float(cells[4])
    models = list(dict.fromkeys(k[0] for k in ms))
    curv = ", ".join(f"{_range([ratio[(m, o, 'auto')] for o in ('kfac', 'ring', 'rkalman')])} on the {m}"
                     for m in models)
    gr = ", ".join(f"{_range([ms[(m, o, '-')] / ms[(m, 'sgd', '-')] for o in ('fgr-sgd', 'bgr-sgd')])} "
                   f"on the {m}" for m in models)
    db = ", ".join(f"{ms[(m, 'db-sgd', '-')] / ms[(m, 'sgd', '-')]:.1f}x on the {m}"
                   for m in models if (m, "db-sgd", "-") in ms)
    return (f"From [bench/results/step_time.md](bench/results/step_time.md) ({title}): a full "
            f"K-FAC/RING/R-Kalman step (backend `auto`) as a multiple of AdamW's: {curv}. Gradient "
            f"regularization as a multiple of SGD's step: F-GR and B-GR {gr}; double backprop "
            f"{db}.\n")


def ext_block() -> str:
    """The compiled ops' speed-ups, per measurement in ext.csv."""
    groups: list[tuple[str, dict[str, float]]] = []  # (op, {provider: ms}) per measurement
    open_group: dict[tuple[str, str, str], dict[str, float]] = {}
    device = ""
    with (RESULTS / "ext.csv").open() as fh:
        for row in csv.DictReader(fh):
            if row["metric"] != "time":
                continue
            key = (row["name"], row["x_value"], row["dtype"])
            group = open_group.get(key)
            if group is None or row["provider"] in group:  # the providers repeat: a new measurement
                group = open_group[key] = {}
                groups.append((row["name"], group))
            group[row["provider"]] = float(row["p50"])
            device = row["device"]

    def speedups(op: str, base: str) -> list[float]:
        return [g[base] / g["ext"] for name, g in groups if name == op and base in g and "ext" in g]

    return (f"From [bench/results/ext.csv](bench/results/ext.csv) ({device}): the compiled fused "
            f"update is {_range(speedups('fused_update', 'foreach'))} as fast as a foreach-op loop "
            f"over the same 120 tensors and {_range(speedups('fused_update', 'reference'))} the "
            f"reference; the ext factor update {_range(speedups('factor_update', 'reference'))} and "
            f"Kalman update {_range(speedups('kalman_update', 'reference'))} the reference.\n")


Cells = dict[str, dict[str, dict[str, dict]]]  # group -> configuration label -> metric -> row


def _cells(path: Path) -> tuple[Cells, dict[str, str], str]:
    """A long-format result file as (cells, {configuration label: optimizer key}, "device,
    torch, date"): a row's group is its ``name`` before the "/", the optimizer key after it;
    a metric taken at a step (``x_name`` "step") is keyed "metric@step"."""
    cells: Cells = {}
    keys: dict[str, str] = {}
    meta = stamp = ""
    with path.open() as fh:
        for row in csv.DictReader(fh):
            group, _, key = row["name"].partition("/")
            metric = row["metric"] + (f"@{row['x_value']}" if row["x_name"] == "step" else "")
            cells.setdefault(group, {}).setdefault(row["provider"], {})[metric] = row
            keys[row["provider"]] = key
            stamp = max(stamp, row["timestamp"][:10])
            meta = f"{row['device']}, torch {row['torch']}, {stamp}"
    return cells, keys, meta


def _complete(m: dict[str, dict], metric: str) -> bool:
    """Every run of the configuration has ``metric`` and none failed."""
    return bool(m[metric]["p50"]) and m[metric]["n"] == m["failed_runs"]["n"] \
        and float(m["failed_runs"]["p50"]) == 0.0


def _final_key(m: dict[str, dict]) -> str:
    return next(k for k in m if k.startswith("final_val_"))


def _task_rank(m: dict[str, dict]) -> tuple[float, float]:
    """(median steps to the target, the final metric signed so that lower is better)."""
    final = _final_key(m)
    sign = -1.0 if "acc" in final else 1.0
    return float(m["steps_to_target"]["p50"]), sign * float(m[final]["p50"] or "nan")


def _fewest_steps(configs: dict[str, dict]) -> str | None:
    """The configuration that reached the target in the fewest median steps with every seed
    (ties: the better final metric); None when none did."""
    full = [(label, m) for label, m in configs.items() if _complete(m, "steps_to_target")]
    return min(full, key=lambda item: _task_rank(item[1]))[0] if full else None


def _lowest(configs: dict[str, dict], metric: str) -> str | None:
    """The configuration with the lowest median ``metric`` with every run finished."""
    full = [(label, m) for label, m in configs.items() if _complete(m, metric)]
    return min(full, key=lambda item: float(item[1][metric]["p50"]))[0] if full else None


def ekfac_block(name: str = "ekfac_tasks") -> str:
    """Per task of ``bench/results/<name>.csv`` (``python bench/ekfac.py tasks``;
    ``ekfac_scaling``: ``--set scaling``) every
    configuration's median steps to the target, final validation metric and ms per step, and
    the configuration that reached the target in the fewest median steps with every seed
    (ties: the better final metric)."""
    cells, _, meta = _cells(RESULTS / f"{name}.csv")
    text = [f"From [bench/results/{name}.md](bench/results/{name}.md) ({meta}; "
            "validation split, medians over the seeds; ms/step on a shared machine):", "",
            "| model | optimizer | steps to target (reached) | final val | ms/step | fewest steps |",
            "|---|---|---|---|---|---|"]
    for task, configs in cells.items():
        best = _fewest_steps(configs)
        for label, m in configs.items():
            steps = m["steps_to_target"]
            final = m[_final_key(m)]
            unit = "%" if final["unit"] == "%" else " bpc"
            reached = f"{steps['n']}/{m['failed_runs']['n']}"
            text.append(f"| {task} | {label} | "
                        f"{float(steps['p50']):.0f} ({reached}) | " if steps["p50"] else
                        f"| {task} | {label} | never (0/{m['failed_runs']['n']}) | ")
            text[-1] += (f"{float(final['p50']):.3g}{unit} | {float(m['step_time']['p50']):.0f} | "
                         f"{'**yes**' if label == best else ''} |")
    return "\n".join(text) + "\n"


HF_STEPS = ("100", "300")  # the steps of bench/results/hf_lm.csv the README shows
#: the models' names in the "which" table (others as their group name)
MODEL_NAMES = {"mlp": "digits MLP (demo)", "cnn": "digits CNN (demo)",
               "transformer": "character transformer (demo)", "gpt2": "GPT-2 (Hugging Face)",
               "llama": "Llama (Hugging Face)"}
#: the optimizers' order in the README's tables, by key of grng.demo.optimizers
FAMILIES = {"ekfac": "EKFAC", "kfac": "K-FAC", "adamw": "AdamW", "muon": "Muon", "soap": "SOAP",
            "psgd": "PSGD-Kron", "sophia": "Sophia"}


def _most_runs(configs: dict[str, dict]) -> dict[str, dict]:
    """The configurations run as many times as the most-run one (a grid point tried on fewer
    seeds does not compete with the configurations run on all of them)."""
    most = max(int(m["failed_runs"]["n"]) for m in configs.values())
    return {label: m for label, m in configs.items() if int(m["failed_runs"]["n"]) == most}


def _best_per_family(configs: dict[str, dict], keys: dict[str, str],
                     pick: Callable[[dict[str, dict]], str | None]) -> dict[str, str]:
    """{optimizer key: ``pick`` among that optimizer's configurations (its best lr)}."""
    out = {}
    for key in FAMILIES:
        mine = {label: m for label, m in configs.items() if keys[label] == key}
        chosen = pick(mine) if mine else None
        if chosen is not None:
            out[key] = chosen
    return out


def hf_lm_block() -> str:
    """Per model of ``bench/results/hf_lm.csv`` (``python bench/hf_lm.py``) each optimizer at
    the lr of its grid with the lowest median validation loss at the last step shown (among
    its configurations run on the most seeds): its losses at :data:`HF_STEPS` and runs; the
    lowest loss at each step in bold. No ms/step: the rows ran at different loads (the grids
    many processes at once), so their times do not compare."""
    cells, keys, meta = _cells(RESULTS / "hf_lm.csv")
    last = f"val_loss@{HF_STEPS[-1]}"
    text = [f"From [bench/results/hf_lm.md](bench/results/hf_lm.md) ({meta}; validation loss in "
            "nats per character, medians over the seeds; each optimizer at the best lr of its "
            "grid, the whole grid in the file; no times: its rows ran at different loads):", "",
            "| model | optimizer | " + " | ".join(f"val loss @{s}" for s in HF_STEPS)
            + " | runs finished |", "|---|---|" + "---|" * (len(HF_STEPS) + 1)]
    for model, configs in cells.items():
        best = _best_per_family(configs, keys, lambda c: _lowest(_most_runs(c), last))
        lowest = {s: _lowest({best[k]: configs[best[k]] for k in best}, f"val_loss@{s}")
                  for s in HF_STEPS}
        for key, label in best.items():
            m = configs[label]
            losses = [f"**{float(m[f'val_loss@{s}']['p50']):.3f}**" if lowest[s] == label
                      else f"{float(m[f'val_loss@{s}']['p50']):.3f}" for s in HF_STEPS]
            done = int(m["failed_runs"]["n"]) - int(float(m["failed_runs"]["p50"]))
            text.append(f"| {model} | {label} | " + " | ".join(losses)
                        + f" | {done}/{m['failed_runs']['n']} |")
    return "\n".join(text) + "\n"


#: the demo tasks' result files of the "which" table, oldest first: per task, an optimizer's
#: configurations come from the last of them that ran it (bench/ekfac.py's sets "peers",
#: "grid", and "fisher": EKFAC's Fisher scaling on the digits models)
WHICH_DEMO_FILES = ("ekfac_tasks.csv", "ekfac_grid.csv", "ekfac_fisher.csv")


def _newest_per_family(files: tuple[str, ...]) -> tuple[Cells, dict[str, str]]:
    """The cells of several result files, each task's configurations of one optimizer taken
    from the last file that ran that optimizer on that task."""
    cells: Cells = {}
    keys: dict[str, str] = {}
    for name in files:
        found, found_keys, _ = _cells(RESULTS / name)
        keys.update(found_keys)
        for task, configs in found.items():
            mine = cells.setdefault(task, {})
            for key in {found_keys[label] for label in configs}:
                for label in [lab for lab in mine if keys[lab] == key]:
                    del mine[label]
            mine.update(configs)
    return cells, keys


def which_block() -> str:
    """Which optimizer for which model: per model of the demo's result files
    (:data:`WHICH_DEMO_FILES`) and ``hf_lm.csv`` each optimizer's best configuration (fewest
    median steps to the target; lowest median validation loss at the last step of
    :data:`HF_STEPS`) and the best of them."""
    tasks, task_keys = _newest_per_family(WHICH_DEMO_FILES)
    lms, lm_keys, _ = _cells(RESULTS / "hf_lm.csv")
    last = f"val_loss@{HF_STEPS[-1]}"
    rows = []
    seeds: set[str] = set()  # run counts of the configurations shown
    for task, configs in tasks.items():
        best = _best_per_family(configs, task_keys, lambda c: _fewest_steps(c) or next(iter(c)))
        reached = {k: lab for k, lab in best.items() if _complete(configs[lab], "steps_to_target")}
        winner = _fewest_steps({lab: configs[lab] for lab in reached.values()})
        cell = {k: f"{float(configs[lab]['steps_to_target']['p50']):.0f} ({lab})"
                if k in reached else f"{configs[lab]['steps_to_target']['n']}/"
                f"{configs[lab]['failed_runs']['n']} seeds reached ({lab})"
                for k, lab in best.items()}
        what = "steps to " + ("95%" if "acc" in _final_key(next(iter(configs.values())))
                              else "3.7 bpc")
        rows.append((MODEL_NAMES.get(task, task), what, winner, cell))
        seeds |= {configs[lab]["failed_runs"]["n"] for lab in best.values()}
    for model, configs in lms.items():
        best = _best_per_family(configs, lm_keys, lambda c: _lowest(_most_runs(c), last))
        winner = _lowest({lab: configs[lab] for lab in best.values()}, last)
        cell = {k: f"{float(configs[lab][last]['p50']):.3f} ({lab})" for k, lab in best.items()}
        rows.append((MODEL_NAMES.get(model, model), f"val loss @{HF_STEPS[-1]}", winner, cell))
        seeds |= {configs[lab]["failed_runs"]["n"] for lab in best.values()}
    shown = [k for k in FAMILIES if any(k in r[3] for r in rows)]
    text = ["| model | measure | best | " + " | ".join(FAMILIES[k] for k in shown) + " |",
            "|---|---|---|" + "---|" * len(shown)]
    for model, what, winner, cell in rows:
        text.append(f"| {model} | {what} | **{winner or 'none'}** | "
                    + " | ".join(cell.get(k, "—") for k in shown) + " |")
    return ("Each optimizer at its best measured configuration (in brackets; lower is better), "
            f"medians over {'/'.join(sorted(seeds, key=int))} seeds, from "
            + ", ".join(f"[bench/results/{f}](bench/results/{f})" for f in WHICH_DEMO_FILES)
            + " (each optimizer's newest runs on a task) and [bench/results/hf_lm.csv]"
            "(bench/results/hf_lm.csv):\n\n" + "\n".join(text) + "\n")


BLOCKS: dict[str, Callable[[], str]] = {
    "dropin": dropin_block, "verify": verify_block, "bench": bench_block, "demo": demo_block,
    "defaults": defaults_block, "step_time": step_time_block, "ext": ext_block,
    "ekfac": ekfac_block, "ekfac_scaling": lambda: ekfac_block("ekfac_scaling"),
    "hf_lm": hf_lm_block, "which": which_block,
}


# ----------------------------------------------------------------------------- README

def render(text: str, blocks: dict[str, Callable[[], str]] = BLOCKS) -> str:
    """``text`` with every marked block regenerated; an unknown or missing block is an error."""
    found = [m.group("name") for m in BLOCK.finditer(text)]
    unknown = sorted(set(found) - set(blocks))
    missing = sorted(set(blocks) - set(found))
    if unknown or missing:
        raise ValueError(f"README blocks: unknown {unknown}, missing {missing}")
    made = {name: blocks[name]() for name in found}
    return BLOCK.sub(lambda m: m.group(1) + made[m.group("name")] + m.group(4), text)


def disagreements(text: str, blocks: dict[str, Callable[[], str]] = BLOCKS) -> list[str]:
    """A unified diff per block whose README text differs from what its results give."""
    new = render(text, blocks)
    old_blocks = {m.group("name"): m.group("body") for m in BLOCK.finditer(text)}
    new_blocks = {m.group("name"): m.group("body") for m in BLOCK.finditer(new)}
    return ["".join(difflib.unified_diff(old_blocks[n].splitlines(True), new_blocks[n].splitlines(True),
                                         f"README.md: {n}", f"{n} from the results"))
            for n in old_blocks if old_blocks[n] != new_blocks[n]]


# ----------------------------------------------------------------------------- reruns

def _about() -> str:
    sys.path.insert(0, str(ROOT))
    import torch

    from grng.benchmark.schema import environment

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {environment('cpu')['device']}, "
            f"torch {torch.__version__}, load average {load:.1f}")


def rerun(what: str) -> None:
    """Run ``grng verify --quick`` or ``grng bench --quick --threads 1`` and commit its output."""
    if what == "verify":
        cmd, out = ["verify", "--quick", "--no-progress"], VERIFY_OUT
    elif what == "bench":
        cmd, out = ["bench", "--quick", "--threads", "1", "--csv", "rows.csv"], BENCH_OUT
    else:
        raise SystemExit(f"--run: unknown {what!r}; choose verify, bench")
    about = _about()
    start = dt.datetime.now()
    with tempfile.TemporaryDirectory() as work:  # the CSV the bench appends to is thrown away
        proc = subprocess.run([sys.executable, "-m", "grng", *cmd], capture_output=True, text=True,
                              env=_python_env(), cwd=work)
    seconds = (dt.datetime.now() - start).total_seconds()
    if proc.returncode != 0:
        raise SystemExit(f"grng {' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    out.write_text(f"# {about}, the whole run {seconds:.1f} s\n{proc.stdout}")
    print(f"wrote {out.relative_to(ROOT)}")


def adopt_demo(folder: Path) -> None:
    """Commit a demo run: its results.json as bench/results/demo.json, its plot as the README's."""
    shutil.copyfile(folder / "results.json", DEMO_JSON)
    shutil.copyfile(folder / "curves.png", DEMO_PNG)
    print(f"adopted {folder}: {DEMO_JSON.relative_to(ROOT)}, {DEMO_PNG.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true",
                   help="rewrite nothing; exit 1 when README and results disagree")
    p.add_argument("--run", help="comma-separated: rerun verify and/or bench first, write their output")
    p.add_argument("--demo", type=Path, help="a demo results folder to adopt first")
    ns = p.parse_args(argv)
    for what in (ns.run or "").split(","):
        if what:
            rerun(what)
    if ns.demo:
        adopt_demo(ns.demo)
    text = README.read_text()
    if ns.check:
        diffs = disagreements(text)
        for d in diffs:
            print(d)
        print("README and results agree" if not diffs else f"{len(diffs)} README block(s) disagree "
              "with the results: run python tools/readme_numbers.py")
        return 1 if diffs else 0
    new = render(text)
    README.write_text(new)
    print("README.md " + ("unchanged" if new == text else "updated"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
