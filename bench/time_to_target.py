"""Steps to AdamW's 50-step eval loss with the new Kronecker blocks vs the diagonal fallback
(issue 25 target).

Tasks: the byte-level LSTM and GRU language models of ``bench/coverage.py`` (16 x 64 bytes of
the standard library per step, eval on 64 validation windows) and a depthwise-separable CNN on
sklearn's 8x8 digits (batch 64, eval on the validation split). Per seed: AdamW runs 50 steps
and its eval loss there is the target; K-FAC (eigen, ``KFAC`` settings below) runs up to
``MAX_STEPS`` steps twice, with the recurrent / depthwise layers in Kronecker blocks ("blocks")
and with their helper switched off so that they get the diagonal fallback ("diagonal", as before
issue 25); the eval loss is read every ``EVAL_EVERY`` steps and the first step at or below the
target is recorded (None: not reached). Fixed learning rates (no grid): AdamW 2e-3 (LMs) /
1e-2 (digits), K-FAC 0.02 / 0.05 (``--kfac-lr`` sets another), the same for both K-FAC runs.
One thread.

    python bench/time_to_target.py [--seeds 0 1 2] [--out FILE.md]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from coverage import _next_byte_loss, recurrent_lm, stdlib_text, windows  # noqa: E402
from grng import register_layer  # noqa: E402
from grng.curvature.layers import Conv2dLayer  # noqa: E402
from grng.curvature.recurrent import RecurrentProjection  # noqa: E402
from grng.demo.data import load_digits_splits  # noqa: E402
from grng.optim.cases import CASES  # noqa: E402

TARGET_STEP, MAX_STEPS, EVAL_EVERY = 50, 100, 5
KFAC = dict(damping=0.1, inverse_every=5, kl_clip=None)


class _RecurrentOff(RecurrentProjection):
    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        return "switched off for the comparison"


class _GroupedConvOff(Conv2dLayer):
    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        return "switched off for the comparison" if module.groups > 1 else super().unsupported(module)


def digits_cnn(seed: int) -> nn.Module:
    """Depthwise-separable CNN on 1 x 8 x 8 digits: 3x3 stem to 16 channels, two blocks
    (depthwise 3x3, pointwise 1x1 to 32, 64), BatchNorm + ReLU, a linear head."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()]
    c = 16
    for out in (32, 64):
        layers += [nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), nn.ReLU(),
                   nn.Conv2d(c, out, 1), nn.BatchNorm2d(out), nn.ReLU()]
        c = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)]
    return nn.Sequential(*layers)


def lm_batches(seed: int) -> Iterator[Tensor]:
    """The language models' training batches of ``seed``: 16 windows of 64 bytes per step."""
    g = torch.Generator().manual_seed(1000 + seed)
    while True:
        yield windows(_TEXT["train"], 16, g)


def lm_eval(m: nn.Module) -> float:
    """The language models' eval loss: mean next-byte loss over the fixed eval windows."""
    with torch.no_grad():
        return statistics.fmean(float(_next_byte_loss(m, b)) for b in _EVAL.split(16))


def _task(name: str, seed: int) -> tuple[nn.Module, Callable[[], Tensor], Callable[[nn.Module],
                                                                              float], dict]:
    """(model, batch loss closure factory, eval, learning rates) of a task."""
    if name in ("LSTM", "GRU"):
        batches = lm_batches(seed)
        model = recurrent_lm(name, seed)

        def batch_loss(m: nn.Module) -> Tensor:
            return _next_byte_loss(m, next(batches))
        return model, batch_loss, lm_eval, {"AdamW": 2e-3, "K-FAC": _KFAC_LR[0] or 0.02}
    digits = _DIGITS
    g = torch.Generator().manual_seed(1000 + seed)
    model = digits_cnn(seed)

    def image(x: Tensor) -> Tensor:
        return x.reshape(-1, 1, 8, 8)

    def batch_loss(m: nn.Module) -> Tensor:
        idx = torch.randint(0, digits.train.x.shape[0], (64,), generator=g)
        return nn.functional.cross_entropy(m(image(digits.train.x[idx])), digits.train.y[idx])

    def evaluate(m: nn.Module) -> float:
        """Validation loss, BatchNorm on its running statistics (``BN_EVAL`` "running") or on
        the validation set's own ("batch": a copy in train mode, the model's statistics kept)."""
        net = copy.deepcopy(m).train() if BN_EVAL[0] == "batch" else m.eval()
        with torch.no_grad():
            out = float(nn.functional.cross_entropy(net(image(digits.val.x)), digits.val.y))
        m.train()
        return out
    return model, batch_loss, evaluate, {"AdamW": 1e-2, "K-FAC": _KFAC_LR[0] or 0.05}


def make(model: nn.Module, optimizer: str, lrs: dict, off: bool = False,
         settings: dict | None = None) -> torch.optim.Optimizer:
    """``optimizer`` ("AdamW", "K-FAC": eigen at ``KFAC``, "EKFAC") for ``model``, ``settings``
    overriding its keyword arguments; ``off``: the recurrent and grouped layers' helpers
    switched off (the diagonal fallback)."""
    if off:
        register_layer(nn.LSTM, _RecurrentOff)
        register_layer(nn.GRU, _RecurrentOff)
        register_layer(nn.Conv2d, _GroupedConvOff)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if optimizer == "AdamW":
                return CASES["adamw"].make(model, lr=lrs["AdamW"])
            if optimizer == "EKFAC":
                return CASES["ekfac"].make(model, **(settings or {}))
            kwargs = dict(KFAC, lr=lrs["K-FAC"])
            kwargs.update(settings or {})
            return CASES["kfac-eigen"].make(model, **kwargs)
    finally:
        register_layer(nn.LSTM, RecurrentProjection)
        register_layer(nn.GRU, RecurrentProjection)
        register_layer(nn.Conv2d, Conv2dLayer)


def run(task: str, seed: int, optimizer: str, off: bool = False, settings: dict | None = None,
        until: float | None = None) -> dict[int, float]:
    """Eval loss every EVAL_EVERY steps (AdamW: up to TARGET_STEP). ``optimizer``: "AdamW",
    "K-FAC" (eigen, ``KFAC`` settings) or "EKFAC"; ``settings`` override its keyword arguments
    (``lr`` included); ``until``: stop once the eval loss is at or below it (at TARGET_STEP at
    the earliest)."""
    model, batch_loss, evaluate, lrs = _task(task, seed)
    opt = make(model, optimizer, lrs, off, settings)
    out = {}
    for step in range(1, (TARGET_STEP if optimizer == "AdamW" else MAX_STEPS) + 1):
        opt.zero_grad()
        loss = batch_loss(model)
        loss.backward()
        opt.step()
        if not torch.isfinite(loss):
            break
        if step % EVAL_EVERY == 0:
            out[step] = evaluate(model)
            if until is not None and step >= TARGET_STEP and min(out.values()) <= until:
                break
    return out


def steps_to(curve: dict[int, float], target: float) -> int | None:
    return next((s for s, v in sorted(curve.items()) if v <= target), None)


_KFAC_LR: list[float | None] = [None]  # --kfac-lr
# the digits CNN's eval: BatchNorm on its running statistics ("running", the default) or on the
# validation batch's own ("batch"; bench/results/recurrent_kfac_diagnosis.md, depthwise CNN)
BN_EVAL: list[str] = ["running"]
_TEXT: dict[str, Tensor] = {}
_EVAL = torch.empty(0)
_DIGITS = None


def main(argv: list[str] | None = None) -> None:
    global _TEXT, _EVAL, _DIGITS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=["LSTM", "GRU", "digits CNN"])
    parser.add_argument("--kfac-lr", type=float, help="K-FAC's learning rate on every task")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.kfac_lr is not None:
        _KFAC_LR[0] = args.kfac_lr
    torch.set_num_threads(1)
    _TEXT = stdlib_text()
    _EVAL = windows(_TEXT["valid"], 64, torch.Generator().manual_seed(1234))
    _DIGITS = load_digits_splits()
    lines = [f"# Steps to AdamW's {TARGET_STEP}-step eval loss (issue 25; seeds {args.seeds}, "
             f"eval every {EVAL_EVERY} steps, at most {MAX_STEPS}; K-FAC lr "
             f"{args.kfac_lr or 'per task'})", "",
             "| task | seed | AdamW eval @ 50 | K-FAC blocks: steps | K-FAC diagonal fallback: steps "
             "| K-FAC blocks eval @ 50 | diagonal eval @ 50 |", "|---|---|---|---|---|---|---|"]
    for task in args.tasks:
        for seed in args.seeds:
            target = run(task, seed, "AdamW")[TARGET_STEP]
            blocks = run(task, seed, "K-FAC")
            diagonal = run(task, seed, "K-FAC", off=True)
            cell = lambda c: str(steps_to(c, target) or f"> {MAX_STEPS}")  # noqa: E731
            lines.append(f"| {task} | {seed} | {target:.3f} | {cell(blocks)} | {cell(diagonal)} | "
                         f"{blocks.get(TARGET_STEP, float('nan')):.3f} | "
                         f"{diagonal.get(TARGET_STEP, float('nan')):.3f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
