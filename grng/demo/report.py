"""The printed tables, the Markdown report (with the paper's claims as measured) and the PNG."""
from __future__ import annotations

import datetime as _dt
import math
import os
import platform
from pathlib import Path
from typing import Any

import torch

from grng.demo.optimizers import OPTIMIZERS, SPECS
from grng.demo.tasks import TASKS, Task
from grng.demo.train import RunResult, level_key

BASELINES = tuple(k for k, spec in SPECS.items() if spec.family != "grng")  # dashed in the plot
#: the paper's comparison: GRNG (RING, RENG, R-Kalman) against these
CLAIM_BASELINES = ("sgd", "adamw", "kfac", "sophia")
#: strong peers outside the paper's comparison, judged on a line of their own
PEER_BASELINES = ("soap", "psgd")
GRNG_METHODS = ("ring", "reng", "rkalman")


def _mean(ms: tuple[float, float]) -> float:
    return ms[0]


def _seconds(x: float) -> str:
    return "—" if not math.isfinite(x) else f"{x:.2f}" if x < 10 else f"{x:.1f}"


def _reach(summary: dict[str, Any], level: float, which: str) -> str:
    hit = summary["reached"].get(level_key(level))
    if not hit or not hit["count"]:
        return "—"
    value = hit[which]
    text = _seconds(value) if which == "seconds" else f"{value:.0f}"
    if hit["count"] < summary["seeds"]:
        text += f" ({hit['count']}/{summary['seeds']})"
    return text


def status_text(summary: dict[str, Any]) -> str:
    statuses = summary["statuses"]
    if all(s == "ok" for s in statuses):
        text = "ok"
    elif all(s == "unavailable" for s in statuses):
        return summary["messages"][0] if summary["messages"] else "unavailable"
    else:
        counts = {s: statuses.count(s) for s in dict.fromkeys(statuses)}
        text = ", ".join(f"{s} {c}/{len(statuses)}" for s, c in counts.items())
    if summary["skipped"]:
        text += f"; {summary['skipped']} skipped steps"
    return text


def columns(task: Task) -> list[str]:
    lv = [task.level_name(t) for t in task.thresholds]
    return (["Optimizer", "lr", f"Test {task.metric}", "Test loss", "Train loss", "Grad norm",
             "Wall s", "ms/step"] + [f"Steps→{lv[0]}", f"s→{lv[0]}", f"Steps→{lv[1]}",
                                     f"s→{lv[1]}"] + ["Status"])


def _metric_pm(task: Task, ms: tuple[float, float]) -> str:
    m, s = ms
    if not math.isfinite(m):
        return "—"
    if task.metric == "acc":
        return f"{100 * m:.1f} ± {100 * s:.1f} %"
    return f"{m:.3f} ± {s:.3f}"


def table_rows(summaries: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for s in summaries:
        task = TASKS[s["model"]]
        if all(st == "unavailable" for st in s["statuses"]):
            rows.append([s["label"]] + ["—"] * (len(columns(task)) - 2) + [status_text(s)])
            continue
        steps = _mean(s["steps"])
        ms = 1000 * _mean(s["wall_s"]) / steps if steps and math.isfinite(steps) else float("nan")
        lo, hi = task.thresholds
        rows.append([
            s["label"], f"{s['lr']:g}", _metric_pm(task, s["metric"]),
            _fmt(_mean(s["test_loss"]), ".3f"), _fmt(_mean(s["train_loss"]), ".3f"),
            _fmt(_mean(s["grad_norm"]), ".3g"), _seconds(_mean(s["wall_s"])), _fmt(ms, ".1f"),
            _reach(s, lo, "steps"), _reach(s, lo, "seconds"),
            _reach(s, hi, "steps"), _reach(s, hi, "seconds"), status_text(s)])
    return rows


def _fmt(x: float, fmt: str) -> str:
    return "—" if not math.isfinite(x) else format(x, fmt)


def markdown_table(summaries: list[dict[str, Any]]) -> str:
    """The table of one task's summaries (all of the same task)."""
    if not summaries:
        return ""
    head = columns(TASKS[summaries[0]["model"]])
    rows = [head] + table_rows(summaries)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _target(summary: dict[str, Any]) -> tuple[float, float] | None:
    """(steps, seconds) to the task's target when every seed got there, else None."""
    task = TASKS[summary["model"]]
    hit = summary["reached"].get(level_key(task.target))
    if not hit or hit["count"] < summary["seeds"] or summary["statuses"].count("ok") < summary["seeds"]:
        return None
    return hit["steps"], hit["seconds"]


def _verdict(holds: list[str], fails: list[str]) -> str:
    """"holds against A, B; does not hold against C": every baseline named on one side."""
    if not fails:
        return "holds against " + ", ".join(holds) if holds else "no baseline to compare with"
    if not holds:
        return "does not hold against " + ", ".join(fails)
    return f"holds against {', '.join(holds)}; does not hold against {', '.join(fails)}"


def _claim_line(mine: dict[str, Any], bases: list[dict[str, Any]]) -> str:
    """One GRNG method against ``bases``: faster in steps (and seconds), better final metric."""
    task = TASKS[mine["model"]]
    t_mine = _target(mine)
    faster, not_faster, slower_secs, better, not_better = [], [], [], [], []
    for b in bases:
        t_b, label = _target(b), b["label"]
        if t_mine is not None and (t_b is None or t_mine[0] < t_b[0]):
            faster.append(label)
            if t_b is not None and t_mine[1] > t_b[1]:
                slower_secs.append(label)
        else:
            not_faster.append(label)
        (better if task.better(_mean(mine["metric"]), _mean(b["metric"])) else not_better).append(label)
    secs = (f" (in seconds slower than {', '.join(slower_secs)})" if slower_secs else
            " (also in seconds)" if faster else "")
    return (f"faster optimization in steps: {_verdict(faster, not_faster)}{secs}; "
            f"better generalization: {_verdict(better, not_better)}")


def claims(summaries: list[dict[str, Any]], models: list[str]) -> list[str]:
    """The paper's two claims, per task and GRNG method, as measured in this run: (1) faster
    optimization: reaches the task's target (every seed) in fewer steps (seconds said
    separately); (2) better generalization: a better final test metric (mean over seeds). Each
    is judged against the paper's baselines (:data:`CLAIM_BASELINES`, K-FAC included) and,
    on a line of its own, against the peers outside the paper's comparison
    (:data:`PEER_BASELINES`: SOAP, PSGD-Kron); every baseline is named on the side it falls
    on, so "holds against SGD, AdamW" never hides "not against K-FAC". Lines of Markdown."""
    out = ["Claims of the GRNG paper, as measured in this run (target = first level of each "
           "table; 'faster' needs every seed at the target in fewer steps; seconds are said "
           "separately; 'better generalization' compares the final test metric's mean). The "
           "paper compares with " + ", ".join(SPECS[b].label for b in CLAIM_BASELINES)
           + "; the peers " + ", ".join(SPECS[b].label for b in PEER_BASELINES)
           + " are outside its comparison and judged separately:", ""]
    by = {(s["model"], s["optimizer"]): s for s in summaries}

    def present(model: str, keys: tuple[str, ...]) -> list[dict[str, Any]]:
        return [by[(model, b)] for b in keys if (model, b) in by
                and not all(st == "unavailable" for st in by[(model, b)]["statuses"])]

    for model in models:
        task = TASKS[model]
        bases, peers = present(model, CLAIM_BASELINES), present(model, PEER_BASELINES)
        for key in GRNG_METHODS:
            mine = by.get((model, key))
            if mine is None:
                continue
            t_mine = _target(mine)
            where = "never reached the target" if t_mine is None else \
                f"target in {t_mine[0]:.0f} steps / {_seconds(t_mine[1])} s"
            line = (f"- **{model} / {mine['label']}** ({where}; test {task.metric} "
                    f"{task.format(_mean(mine['metric']))}): {_claim_line(mine, bases)}.")
            if peers:
                line += f" Against the peers outside the paper: {_claim_line(mine, peers)}."
            out.append(line)
    return out


def machine_info(device: str, load_start: tuple[float, ...] | None = None) -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpu": f"{cpu} ({os.cpu_count()} logical cores visible, torch threads "
               f"{torch.get_num_threads()})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": device,
    }
    try:
        import grng

        info["grng"] = grng.__version__
        info["grng backends"] = str(grng.backends())
    except Exception:  # noqa: BLE001
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    if hasattr(os, "getloadavg"):
        if load_start is not None:
            info["load average at start (1/5/15 min)"] = " / ".join(f"{v:.1f}" for v in load_start)
        info["load average at end (1/5/15 min)"] = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    return info


def hparam_lines(used: dict[tuple[str, str], tuple[dict, str]]) -> str:
    lines = ["| Task | Optimizer | Hyperparameters set | Source |", "|---|---|---|---|"]
    for (model, key), (hp, source) in used.items():
        hp_text = ", ".join(f"{k}={v}" for k, v in hp.items())
        lines.append(f"| {model} | {SPECS[key].label} | {hp_text} | {source} |")
    return "\n".join(lines)


def spec_lines() -> str:
    lines = ["| Optimizer | What runs | lr sweep |", "|---|---|---|"]
    for spec in SPECS.values():
        note = f" ({spec.note})" if spec.note else ""
        lines.append(f"| {spec.label} | {spec.description}{note} | "
                     f"{', '.join(f'{lr:g}' for lr in spec.lrs)} |")
    return "\n".join(lines)


def write_markdown(path: Path, *, tables: dict[str, str], summaries: list[dict[str, Any]],
                   runs: list[RunResult], hp_table: dict[str, Any] | None,
                   used: dict[tuple[str, str], tuple[dict, str]], settings: dict[str, Any],
                   machine: dict[str, str], total_s: float, png_name: str) -> None:
    problems = [r for r in runs if r.status not in ("ok", "unavailable")]
    notes = [f"- {r.model} / {SPECS[r.optimizer].label} seed {r.seed}: **{r.status}** after "
             f"{r.steps} of {r.planned_steps} steps — {r.message.splitlines()[0] if r.message else ''}"
             for r in problems]
    warn_lines = [f"- {r.model} / {SPECS[r.optimizer].label} seed {r.seed}: {count}× `{msg}`"
                  for r in runs for msg, count in r.warnings.items()]
    text = ["# grng demo: every optimizer at its defaults, on digits and on text", "",
            f"Command: `{settings['command']}`  ", f"Total wall time: {total_s:.1f} s", "",
            "Every optimizer runs at its defaults; its learning rate is the best of a 3-value "
            "sweep on the validation split (`bench/defaults.py`). Metrics are on the **test** "
            "split, mean ± std over seeds. Wall s, ms/step and s→X are training time only "
            "(the periodic test evaluations are not counted); steps/s→X are averaged over the "
            "seeds that reached X (k/n when only k did; — when none did). Grad norm and train "
            "loss are full-batch over the train split at the end (the transformer: its first "
            "8,192 characters). Timings share a 2-core CPU with other jobs: see the load below.",
            ""]
    for model, table in tables.items():
        task, st = TASKS[model], settings["tasks"][model]
        text += [f"## {model} ({task.dataset}; test {task.metric_name})", "",
                 f"{len(st['seeds'])} seed(s) ({', '.join(map(str, st['seeds']))}), "
                 f"{st['epochs']} epoch(s) of batch {st['batch_size']} ({st['steps_per_epoch']} "
                 f"steps per epoch), test evaluated every {st['eval_every']} steps; "
                 f"train/val/test sizes {st['sizes'][0]}/{st['sizes'][1]}/{st['sizes'][2]} "
                 f"{'images' if task.dataset == 'digits' else 'windows of 32 characters'}.", "",
                 table, ""]
    text += ["## The paper's claims, measured", ""] + claims(summaries, list(tables)) + [""]
    text += [f"![curves]({png_name})", ""]
    if notes:
        text += ["### Problems", ""] + notes + [""]
    if warn_lines:
        text += ["### Warnings raised during the runs", ""] + warn_lines[:60] + [""]
    meta = (hp_table or {}).get("meta", {})
    text += ["## Optimizers and hyperparameters", "", spec_lines(), "",
             f"Learning rates chosen by `bench/defaults.py` on {meta.get('date_utc', '—')} "
             f"({meta.get('criterion', 'no table: default learning rates')}).", "",
             hparam_lines(used), "",
             "## Data", "",
             "- digits: scikit-learn's 1,797 8x8 images (shipped inside scikit-learn), a fixed "
             "seeded 60/20/20 split, standardized with the train split's statistics.",
             "- text: the running Python's standard library sources (top-level `*.py`, assigned "
             "to splits by a hash of the file name), 98 character ids, windows of 32 characters.",
             "", "## Machine", ""]
    text += [f"- {k}: {v}" for k, v in machine.items()]
    path.write_text("\n".join(text) + "\n")


#: one colour per optimizer of the demo, all distinct (tab10, then black, ochre and magenta): K-FAC/RING
#: and RENG/R-Kalman, whose curves lie close together, must not share a hue
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf", "#000000", "#a6761d", "#e7298a")


def optimizer_colors() -> dict[str, str]:
    """Optimizer key -> its plot colour, fixed by the table order (the same in every subset)."""
    if len(OPTIMIZERS) > len(PALETTE):
        raise ValueError(f"{len(OPTIMIZERS)} optimizers but {len(PALETTE)} colours: extend PALETTE")
    return dict(zip(OPTIMIZERS, PALETTE))


def plot_curves(path: Path, runs: list[RunResult], models: list[str], optimizers: list[str]) -> None:
    """Per task: minibatch train loss, test loss and the test metric against steps (mean over
    seeds); the baselines dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(models), 3, figsize=(17, 4.3 * len(models)), squeeze=False)
    colors = optimizer_colors()
    for row, model in enumerate(models):
        task = TASKS[model]
        ax_train, ax_loss, ax_metric = axes[row]
        for key in optimizers:
            mine = [r for r in runs if r.model == model and r.optimizer == key and r.curve_step]
            if not mine:
                continue
            color, label = colors[key], SPECS[key].label
            style = "--" if key in BASELINES else "-"
            if any(r.status != "ok" for r in mine):
                label += " (" + ", ".join(sorted({r.status for r in mine if r.status != "ok"})) + ")"
            n = min(len(r.curve_step) for r in mine)
            steps = np.array(mine[0].curve_step[:n])
            metric = np.mean([r.curve_metric[:n] for r in mine], axis=0)
            loss = np.mean([r.curve_loss[:n] for r in mine], axis=0)
            ax_loss.plot(steps, loss, color=color, ls=style, label=label)
            ax_metric.plot(steps, 100 * metric if task.metric == "acc" else metric,
                           color=color, ls=style, label=label)
            m = min(len(r.train_loss) for r in mine)
            if m:
                tl = np.mean([r.train_loss[:m] for r in mine], axis=0)
                k = max(1, min(8, m // 10))
                smooth = np.convolve(tl, np.ones(k) / k, mode="valid")
                ax_train.plot(np.arange(k, m + 1), smooth, color=color, ls=style, label=label)
        ax_train.set(title=f"{model}: minibatch train loss (moving avg)", xlabel="step",
                     ylabel="loss", yscale="log")
        ax_loss.set(title=f"{model}: test loss", xlabel="step", ylabel="cross-entropy",
                    yscale="log")
        if task.metric == "acc":
            ax_metric.set(title=f"{model}: test accuracy", xlabel="step", ylabel="%",
                          ylim=(60, 100))
            levels = [100 * t for t in task.thresholds]
        else:
            ax_metric.set(title=f"{model}: test bits per character", xlabel="step",
                          ylabel="bits / char", ylim=(3.0, 5.0))
            levels = list(task.thresholds)
        for thr in levels:
            ax_metric.axhline(thr, color="grey", lw=0.6, ls="--")
        for ax in (ax_train, ax_loss, ax_metric):
            ax.grid(alpha=0.3)
        ax_metric.legend(fontsize=7, loc="lower right" if task.metric == "acc" else "upper right",
                         ncol=2)
    fig.suptitle("grng demo, every optimizer at its defaults (mean over seeds; dashed: "
                 "torch and peer baselines)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
