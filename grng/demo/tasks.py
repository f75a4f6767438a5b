"""The demo's tasks: a model, its data, its metric, its budget and its targets.

``cnn`` and ``mlp`` train on scikit-learn's digits and are scored by accuracy (higher is
better); ``transformer`` trains on the standard library's source characters
(:mod:`grng.demo.text`) and is scored by bits per character (cross-entropy / ln 2, lower is
better). Every task's loss is the mean cross-entropy over its targets (images, or characters).
``target`` is the level the defaults benchmark and the demo time: steps and seconds until the
evaluation split first reaches it. The final gradient norm is taken over the whole train split,
or its first ``grad_rows`` rows (the transformer: 256 windows, 8,192 characters).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

from grng.demo.data import load_digits_splits


@dataclass(frozen=True)
class Task:
    """What one demo task is (module docstring). ``epochs`` of ``batch_size`` minibatches
    (``drop_last``) make the budget; the evaluation split is read every ``eval_every`` steps."""

    key: str
    dataset: str
    metric: str  # "acc" or "bpc"
    thresholds: tuple[float, ...]
    target: float
    epochs: int
    batch_size: int
    eval_every: int
    grad_rows: int | None = None  # rows of the train split for the final gradient norm (None: all)

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "acc"

    def value(self, acc: float, loss: float) -> float:
        """The task's metric from an evaluation's (accuracy, mean cross-entropy)."""
        return acc if self.metric == "acc" else loss / math.log(2.0)

    def reached(self, value: float, level: float) -> bool:
        """Whether ``value`` of the metric is at ``level`` or better (NaN never is)."""
        if not math.isfinite(value):
            return False
        return value >= level if self.higher_is_better else value <= level

    def better(self, a: float, b: float) -> bool:
        """Whether metric value ``a`` is strictly better than ``b`` (NaN is worst)."""
        if not math.isfinite(a):
            return False
        if not math.isfinite(b):
            return True
        return a > b if self.higher_is_better else a < b

    def format(self, value: float) -> str:
        """``97.2 %`` for accuracy, ``2.41`` bits per character."""
        if not math.isfinite(value):
            return "—"
        return f"{100 * value:.1f} %" if self.metric == "acc" else f"{value:.3f}"

    def level_name(self, level: float) -> str:
        return f"{100 * level:.0f}%" if self.metric == "acc" else f"{level:g} bpc"

    @property
    def metric_name(self) -> str:
        return "accuracy" if self.metric == "acc" else "bits per character"


TASKS: dict[str, Task] = {t.key: t for t in (
    Task("cnn", "digits", "acc", (0.95, 0.97), 0.95, epochs=6, batch_size=64, eval_every=4),
    Task("mlp", "digits", "acc", (0.95, 0.97), 0.95, epochs=6, batch_size=64, eval_every=4),
    Task("transformer", "text", "bpc", (3.7, 3.6), 3.7, epochs=1, batch_size=16, eval_every=25,
         grad_rows=256),
)}


@cache
def load_data(dataset: str):
    """The splits of ``dataset`` ("digits" or "text"), loaded once per process."""
    if dataset == "digits":
        return load_digits_splits()
    if dataset == "text":
        from grng.demo.text import load_text_splits

        return load_text_splits()
    raise ValueError(f"unknown dataset {dataset!r}")
