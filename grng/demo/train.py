"""One training run: a model, an optimizer with fixed hyperparameters, one seed.

The run trains on ``train`` with shuffled minibatches (``drop_last``, so every step sees a full
batch) and evaluates on ``eval_split`` every ``eval_every`` steps. In the demo ``eval_split`` is
the test set and those evaluations only draw the curves and the time-to-target columns; in
the defaults benchmark (``bench/defaults.py``) it is the validation set. The task
(:mod:`grng.demo.tasks`) says which metric the evaluations report (accuracy or bits per
character) and which levels are timed.

``wall_s`` and the seconds-to-accuracy count training time only: the periodic evaluations are
excluded (on CUDA the clock is read after a synchronize). A run whose minibatch loss or
parameters become non-finite stops there with status ``diverged``; an exception inside the
optimizer gives status ``error`` with the message; neither stops the other runs.
"""
from __future__ import annotations

import math
import re
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from grng.demo.data import Split
from grng.demo.models import make_model
from grng.demo.optimizers import SPECS, cross_entropy, make_stepper, unavailable_reason
from grng.demo.tasks import TASKS, Task


@dataclass
class RunResult:
    model: str
    optimizer: str
    seed: int
    hparams: dict[str, Any]
    status: str = "ok"  # ok | diverged | error | unavailable
    message: str = ""
    steps: int = 0
    planned_steps: int = 0
    wall_s: float = 0.0
    curve_step: list[int] = field(default_factory=list)
    curve_time: list[float] = field(default_factory=list)
    curve_acc: list[float] = field(default_factory=list)
    curve_loss: list[float] = field(default_factory=list)
    curve_metric: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    final_acc: float = float("nan")
    final_metric: float = float("nan")
    final_loss: float = float("nan")
    train_loss_full: float = float("nan")
    grad_norm: float = float("nan")
    reached: dict[str, list[float] | None] = field(default_factory=dict)  # "0.95": [step, s]
    skipped_steps: int = 0
    warnings: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def level_key(level: float) -> str:
    """The key of a timed level in :attr:`RunResult.reached` ("0.95", "3.00")."""
    return f"{level:.2f}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on the whole split (per character for text)."""
    was_training = model.training
    model.eval()
    logits = model(split.x)
    model.train(was_training)
    loss = cross_entropy(logits, split.y).item()
    acc = (logits.argmax(-1) == split.y).float().mean().item()
    return acc, loss


def full_batch_gradient(model: nn.Module, split: Split) -> tuple[float, float]:
    """(loss, ||grad||_2) of the mean loss over the whole split (no parameter is changed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        loss = cross_entropy(model(split.x), split.y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    norm = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(g) for g in grads if g is not None]))
    return loss.item(), norm.item()


def _finite_params(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _warning_key(message: str) -> str:
    """Group warnings that differ only in counts ("(3 skipped so far)")."""
    return re.sub(r"\d+", "N", message)[:200]


def train_run(
    model_name: str,
    optimizer: str,
    hparams: dict[str, Any],
    train: Split,
    eval_split: Split,
    *,
    seed: int = 0,
    epochs: int = 5,
    batch_size: int = 64,
    eval_every: int = 4,
    max_steps: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str | None = None,
    task: Task | None = None,
    build: Callable[[], nn.Module] | None = None,
) -> RunResult:
    """Train ``model_name`` with ``optimizer`` (a key of :data:`SPECS`) and return the record;
    ``task`` (default ``TASKS[model_name]``) gives the metric and the timed levels; ``build``
    (default ``make_model(model_name)``) makes the model, after the seed is set."""
    device = torch.device(device)
    task = task or TASKS[model_name]
    result = RunResult(model_name, optimizer, seed, dict(hparams))
    result.reached = {level_key(t): None for t in task.thresholds}
    reason = unavailable_reason(optimizer)
    if reason is not None:
        result.status, result.message = "unavailable", reason
        return result
    n = len(train)
    per_epoch = n // batch_size if n >= batch_size else 1
    bs = min(batch_size, n)
    total = per_epoch * epochs if max_steps is None else min(max_steps, per_epoch * epochs)
    result.planned_steps = total

    torch.manual_seed(seed)
    model = (make_model(model_name) if build is None else build()).to(device)
    order = torch.Generator().manual_seed(10_000 + seed)
    bar = None
    train_time = 0.0

    def record_eval(step: int) -> None:
        acc, loss = evaluate(model, eval_split)
        value = task.value(acc, loss)
        result.curve_step.append(step)
        result.curve_time.append(train_time)
        result.curve_acc.append(acc)
        result.curve_loss.append(loss)
        result.curve_metric.append(value)
        for t in task.thresholds:
            key = level_key(t)
            if result.reached[key] is None and task.reached(value, t):
                result.reached[key] = [step, train_time]
        if bar is not None:
            bar.set_postfix({task.metric: f"{value:.3f}", "loss": f"{loss:.3f}"}, refresh=False)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            stepper = make_stepper(optimizer, model, hparams, seed=seed,
                                   batch_size=bs * train.y[0].numel())
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=total, desc=desc or f"{model_name}/{SPECS[optimizer].label} s{seed}",
                           leave=False, dynamic_ncols=True, mininterval=0.25)
            record_eval(0)
            step = 0
            while step < total and result.status == "ok":
                perm = torch.randperm(n, generator=order)
                for b in range(per_epoch):
                    if step >= total:
                        break
                    idx = perm[b * bs:(b + 1) * bs].to(device)
                    xb, yb = train.x[idx], train.y[idx]
                    _sync(device)
                    t0 = time.perf_counter()
                    loss = stepper.step(xb, yb)
                    loss_value = float(loss)  # synchronizes on CUDA
                    train_time += time.perf_counter() - t0
                    step += 1
                    result.steps = step
                    result.train_loss.append(loss_value)
                    if bar is not None:
                        bar.update(1)
                    if not math.isfinite(loss_value) or not _finite_params(model):
                        result.status = "diverged"
                        result.message = (f"non-finite {'loss' if not math.isfinite(loss_value) else 'parameters'}"
                                          f" at step {step}")
                        break
                    if step % eval_every == 0 or step == total:
                        record_eval(step)
            result.wall_s = train_time
            result.skipped_steps = stepper.skipped_steps
            if result.status == "ok" or _finite_params(model):
                result.final_acc, result.final_loss = evaluate(model, eval_split)
                result.final_metric = task.value(result.final_acc, result.final_loss)
                with stepper.paused():
                    rows = train if task.grad_rows is None else train.head(task.grad_rows)
                    result.train_loss_full, result.grad_norm = full_batch_gradient(model, rows)
        except Exception as err:  # noqa: BLE001 - one failing optimizer must not end the demo
            result.status = "error"
            result.message = f"{type(err).__name__}: {err}"
            result.wall_s = train_time
            result.message += "\n" + traceback.format_exc(limit=6)
        finally:
            if bar is not None:
                bar.close()
    for w in caught:
        key = _warning_key(f"{w.category.__name__}: {w.message}")
        result.warnings[key] = result.warnings.get(key, 0) + 1
    return result


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of the finite values."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    t = torch.tensor(vals, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(vals) > 1 else 0.0)


def summarize(runs: list[RunResult]) -> dict[str, Any]:
    """Aggregate the seeds of one (model, optimizer) pair."""
    first = runs[0]
    acc = mean_std([r.final_acc for r in runs])
    out: dict[str, Any] = {
        "model": first.model, "optimizer": first.optimizer, "label": SPECS[first.optimizer].label,
        "seeds": len(runs), "lr": float(first.hparams.get("lr", float("nan"))), "acc": acc, "metric": mean_std([r.final_metric for r in runs]),
        "test_loss": mean_std([r.final_loss for r in runs]),
        "train_loss": mean_std([r.train_loss_full for r in runs]),
        "grad_norm": mean_std([r.grad_norm for r in runs]),
        "wall_s": mean_std([r.wall_s for r in runs]),
        "steps": mean_std([float(r.steps) for r in runs]),
        "statuses": [r.status for r in runs],
        "messages": sorted({r.message.splitlines()[0] for r in runs if r.message}),
        "skipped": sum(r.skipped_steps for r in runs),
        "reached": {},
    }
    for key in first.reached:
        hits = [r.reached.get(key) for r in runs if r.reached.get(key) is not None]
        out["reached"][key] = {
            "count": len(hits),
            "steps": mean_std([h[0] for h in hits])[0] if hits else None,
            "seconds": mean_std([h[1] for h in hits])[0] if hits else None,
        }
    return out
