"""The printed table, the Markdown report and the PNG of the curves."""
from __future__ import annotations

import datetime as _dt
import math
import os
import platform
from pathlib import Path
from typing import Any

import torch

from grng.demo.optimizers import SPECS
from grng.demo.train import RunResult

BASELINES = ("sgd", "adamw", "sophia")  # dashed in the plot; grng's optimizers are solid
COLUMNS = ("Model", "Optimizer", "Test acc", "Test loss", "Train loss", "Grad norm", "Wall s",
           "Steps→95%", "s→95%", "Steps→97%", "s→97%", "Status")


def _pm(ms: tuple[float, float], digits: int, scale: float = 1.0) -> str:
    m, s = ms
    if not math.isfinite(m):
        return "—"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def _num(ms: tuple[float, float], fmt: str) -> str:
    return "—" if not math.isfinite(ms[0]) else format(ms[0], fmt)


def _seconds(ms: tuple[float, float]) -> str:
    return "—" if not math.isfinite(ms[0]) else f"{ms[0]:.2f}" if ms[0] < 10 else f"{ms[0]:.1f}"


def _reach(summary: dict[str, Any], key: str, which: str, fmt: str) -> str:
    hit = summary["reached"].get(key)
    if not hit or not hit["count"]:
        return "—"
    value = hit[which]
    text = f"{value:.2f}" if which == "seconds" and value < 10 else format(value, fmt)
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


def table_rows(summaries: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for s in summaries:
        unavailable = all(st == "unavailable" for st in s["statuses"])
        if unavailable:
            rows.append([s["model"], s["label"]] + ["—"] * (len(COLUMNS) - 3) + [status_text(s)])
            continue
        rows.append([
            s["model"], s["label"], _pm(s["acc"], 1, 100.0) + " %", _num(s["test_loss"], ".3f"),
            _num(s["train_loss"], ".3f"), _num(s["grad_norm"], ".3g"), _seconds(s["wall_s"]),
            _reach(s, "0.95", "steps", ".0f"), _reach(s, "0.95", "seconds", ".1f"),
            _reach(s, "0.97", "steps", ".0f"), _reach(s, "0.97", "seconds", ".1f"),
            status_text(s),
        ])
    return rows


def markdown_table(summaries: list[dict[str, Any]]) -> str:
    rows = [list(COLUMNS)] + table_rows(summaries)
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def machine_info(device: str) -> dict[str, str]:
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
    except Exception:  # noqa: BLE001
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    if hasattr(os, "getloadavg"):
        info["load average (1/5/15 min)"] = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    return info


def hparam_lines(table: dict[str, Any] | None, used: dict[tuple[str, str], tuple[dict, str]]) -> str:
    lines = ["| Model | Optimizer | Hyperparameters | Source | Val acc (search) |",
             "|---|---|---|---|---|"]
    for (model, key), (hp, source) in used.items():
        entry = (table or {}).get("models", {}).get(model, {}).get(key) or {}
        val = entry.get("val_acc")
        val_text = f"{100 * val:.1f} %" if isinstance(val, (int, float)) else "—"
        hp_text = ", ".join(f"{k}={v}" for k, v in hp.items())
        rows = f"| {model} | {SPECS[key].label} | {hp_text} | {source} | {val_text} |"
        lines.append(rows)
    return "\n".join(lines)


def search_space_text(table: dict[str, Any] | None) -> str:
    meta = (table or {}).get("meta")
    lines = []
    if meta:
        lines.append(
            f"Chosen by `python -m grng.demo --search` on {meta.get('date_utc')}: a grid search "
            f"on the **validation split** ({meta.get('val_size')} images; trained on the "
            f"{meta.get('train_size')} train images), {meta.get('epochs')} epochs of batch "
            f"{meta.get('batch_size')}, one seed ({meta.get('seed')}, not one of the demo's "
            f"seeds), scored by {meta.get('criterion')}. Diverged or failed candidates are never "
            "chosen. The test split is not passed to the search; it is only used for the "
            "curves and the table below.")
    else:
        lines.append("No `hparams.json` was found: every optimizer used the midpoint of its grid.")
    lines.append("")
    lines.append("| Optimizer | Searched | Fixed |")
    lines.append("|---|---|---|")
    for spec in SPECS.values():
        grid = "; ".join(f"{k} ∈ {{{', '.join(str(v) for v in vals)}}}" for k, vals in spec.grid.items())
        fixed = ", ".join(f"{k}={v}" for k, v in spec.fixed.items())
        if spec.inherit:
            fixed += f"; {', '.join(spec.inherit[1])} from {SPECS[spec.inherit[0]].label}"
        lines.append(f"| {spec.label} | {grid} | {fixed or '—'} |")
    return "\n".join(lines)


def write_markdown(path: Path, *, table_md: str, summaries: list[dict[str, Any]],
                   runs: list[RunResult], hp_table: dict[str, Any] | None,
                   used: dict[tuple[str, str], tuple[dict, str]], settings: dict[str, Any],
                   machine: dict[str, str], total_s: float, png_name: str) -> None:
    problems = [r for r in runs if r.status not in ("ok", "unavailable")]
    notes = []
    for r in problems:
        first = r.message.splitlines()[0] if r.message else ""
        notes.append(f"- {r.model} / {SPECS[r.optimizer].label} seed {r.seed}: **{r.status}** "
                     f"after {r.steps} of {r.planned_steps} steps — {first}")
    warn_lines = []
    for r in runs:
        for msg, count in r.warnings.items():
            warn_lines.append(f"- {r.model} / {SPECS[r.optimizer].label} seed {r.seed}: "
                              f"{count}× `{msg}`")
    text = [
        "# grng demo: digits, CNN and MLP, every optimizer", "",
        f"Command: `{settings['command']}`  ",
        f"Total wall time: {total_s:.1f} s", "",
        "## Results", "",
        f"Test accuracy is mean ± std over {settings['seeds']} seed(s) "
        f"({', '.join(map(str, settings['seed_list']))}) after {settings['epochs']} epoch(s) of "
        f"batch {settings['batch_size']} ({settings['steps_per_epoch']} steps per epoch). "
        "Wall s and s→X% are training time only (the periodic test evaluations, every "
        f"{settings['eval_every']} steps, are not counted); steps/s→X% are averaged over the "
        "seeds that reached X% on the test set (k/n when only k did; — when none did). "
        "Grad norm and train loss are full-batch over the train split at the end.", "",
        table_md, "",
        f"![curves]({png_name})", "",
    ]
    if notes:
        text += ["### Problems", ""] + notes + [""]
    if warn_lines:
        text += ["### Warnings raised during the runs", ""] + warn_lines[:60] + [""]
    text += [
        "## Hyperparameters", "", search_space_text(hp_table), "",
        "Values used in this run:", "", hparam_lines(hp_table, used), "",
        "## Data", "",
        f"scikit-learn digits: train {settings['sizes'][0]}, validation {settings['sizes'][1]}, "
        f"test {settings['sizes'][2]} images (fixed seeded 60/20/20 split), standardized with "
        "the train split's statistics.", "",
        "## Machine", "",
    ]
    text += [f"- {k}: {v}" for k, v in machine.items()]
    path.write_text("\n".join(text) + "\n")


def plot_curves(path: Path, runs: list[RunResult], models: list[str], optimizers: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(models), 3, figsize=(16, 4.2 * len(models)), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for row, model in enumerate(models):
        ax_train, ax_loss, ax_acc = axes[row]
        for j, key in enumerate(optimizers):
            mine = [r for r in runs if r.model == model and r.optimizer == key and r.curve_step]
            if not mine:
                continue
            color, label = cmap(j % 10), SPECS[key].label
            style = "--" if key in BASELINES else "-"
            if any(r.status != "ok" for r in mine):
                label += " (" + ", ".join(sorted({r.status for r in mine if r.status != "ok"})) + ")"
            n = min(len(r.curve_step) for r in mine)
            steps = np.array(mine[0].curve_step[:n])
            acc = np.mean([r.curve_acc[:n] for r in mine], axis=0)
            loss = np.mean([r.curve_loss[:n] for r in mine], axis=0)
            ax_loss.plot(steps, loss, color=color, ls=style, label=label)
            ax_acc.plot(steps, 100 * acc, color=color, ls=style, label=label)
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
        ax_acc.set(title=f"{model}: test accuracy", xlabel="step", ylabel="%", ylim=(60, 100))
        for thr in (95, 97):
            ax_acc.axhline(thr, color="grey", lw=0.6, ls="--")
        for ax in (ax_train, ax_loss, ax_acc):
            ax.grid(alpha=0.3)
        ax_acc.legend(fontsize=8, loc="lower right")
    fig.suptitle("grng demo on digits (mean over seeds; dashed: torch / Sophia baselines)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
