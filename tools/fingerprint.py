"""Behaviour fingerprint of the curvature optimizers: train a grid of configurations and save
every parameter and state dict, so that two trees (before and after a refactor) can be shown to
train bit for bit the same.

    python tools/fingerprint.py save OUT.pt        # in the old tree, then in the new one
    python tools/fingerprint.py compare OLD.pt NEW.pt

The grid: every curvature case of :mod:`grng.optim.cases` (K-FAC eigen/newton/cholesky, RING,
RENG forward/exact, R-Kalman, F-GR around K-FAC) x {host path, sync-free path} x {MLP with a
LayerNorm (float64), CNN (float64), embedding model (float64)}, plus ``precision="bf16"`` on a
float32 MLP, 7 steps each with a non-finite batch at step 3 (the skip path) and refreshes every
2 steps. Only public API is used, so the script runs on any tree since 0.3.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grng.optim.cases import CASES

F64 = torch.float64
CURVATURE_CASES = [name for name, case in CASES.items() if case.curvature]
STEPS = 7
NAN_STEP = 3


def _mlp(dtype: torch.dtype) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.LayerNorm(7), nn.Linear(7, 3)).to(dtype)


def _cnn(dtype: torch.dtype) -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 5 * 5, 3)).to(dtype)


class _Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.emb(x).mean(1)))


MODELS: dict[str, tuple[Callable[[torch.dtype], nn.Module], Callable[[torch.Generator, torch.dtype], Tensor]]] = {
    "mlp": (_mlp, lambda g, dt: torch.randn(9, 5, generator=g, dtype=F64).to(dt)),
    "cnn": (_cnn, lambda g, dt: torch.randn(9, 2, 5, 5, generator=g, dtype=F64).to(dt)),
    "embed": (lambda dt: _Embed().to(dt), lambda g, dt: torch.randint(0, 11, (9, 4), generator=g)),
}

HP: dict[str, Any] = dict(lr=0.1, damping=0.05, momentum=0.9, inverse_every=2, factor_every=1)
HP_CASE: dict[str, dict[str, Any]] = {
    "ring": {"rho": 0.1}, "reng-forward": {"rho": 0.1}, "reng-exact": {"rho": 0.1},
    "rkalman": dict(lr=0.1, rho=0.1, momentum=0.9, kalman_rank=5, prior_precision=1.0,
                    kl_clip=None, factor_every=1),
    "ekfac": dict(lr=0.01, weight_decay=0.01, inverse_every=2, factor_every=1),
}
#: cases whose keywords are their own (not K-FAC's HP plus extras)
OWN_HP = ("rkalman", "ekfac")


def _hp(case: str) -> dict[str, Any]:
    return dict(HP_CASE[case]) if case in OWN_HP else {**HP, **HP_CASE.get(case, {})}


def _curv(opt: Any) -> Any:
    return getattr(opt, "base_optimizer", opt)


def run(case: str, model_name: str, sync_free: bool, dtype: torch.dtype = F64,
        precision: str | None = None) -> dict[str, Any]:
    """Train one configuration; its final parameters and state dict (tensors cloned)."""
    build, inputs = MODELS[model_name]
    torch.manual_seed(0)
    model = build(dtype)
    hp = _hp(case)
    hp["sync_free"] = sync_free
    if precision is not None:
        hp["precision"] = precision
    opt = CASES[case].make(model, **hp)
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        x, y = inputs(g, dtype), torch.randint(0, 3, (9,), generator=g)
        if step == NAN_STEP and x.is_floating_point():
            x = x.clone()
            x[0, 0] = float("nan")

        def closure() -> Tensor:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step(closure)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = _curv(opt).state_dict()
    return {"params": [p.detach().clone() for p in model.parameters()],
            "state": _clone(state), "skipped": int(_curv(opt).skipped_steps)}


def _clone(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def grid() -> dict[str, dict[str, Any]]:
    out = {}
    for case in CURVATURE_CASES:
        for model_name in MODELS:
            for sync_free in (False, True):
                out[f"{case}/{model_name}/sync_free={sync_free}"] = run(case, model_name, sync_free)
    for sync_free in (False, True):
        for case in ("kfac-eigen", "kfac-newton", "ring"):
            out[f"{case}/mlp-f32/bf16/sync_free={sync_free}"] = run(
                case, "mlp", sync_free, torch.float32, "bf16")
    return out


def _diff(a: Any, b: Any, path: str, out: list[str]) -> None:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            out.append(f"{path}: tensor vs {type(b).__name__ if isinstance(a, Tensor) else type(a).__name__}")
        elif a.shape != b.shape or a.dtype != b.dtype:
            out.append(f"{path}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
        elif not torch.equal(a, b) and not (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                            and torch.equal(a.nan_to_num(), b.nan_to_num())):
            d = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else "int"
            out.append(f"{path}: differs (max abs {d})")
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(f"{path}/{k}: only in {'new' if k not in a else 'old'}")
            else:
                _diff(a[k], b[k], f"{path}/{k}", out)
        return
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            out.append(f"{path}: length {len(a)} vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{path}[{i}]", out)
        return
    if a != b:
        out.append(f"{path}: {a!r} vs {b!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    save = sub.add_parser("save")
    save.add_argument("out")
    save.add_argument("--without-auto", default="", help="comma-separated ops taken out of the "
                      "CPU auto order first (to tell a refactor from a new backend choice)")
    cmp = sub.add_parser("compare")
    cmp.add_argument("old")
    cmp.add_argument("new")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.cmd == "save":
        from grng.ops import dispatch

        for op in filter(None, args.without_auto.split(",")):
            dispatch.AUTO_ORDER["cpu"].pop(op, None)
        torch.save(grid(), args.out)
        return 0
    old, new = torch.load(args.old, weights_only=False), torch.load(args.new, weights_only=False)
    problems: list[str] = []
    _diff(old, new, "", problems)
    for line in problems:
        print(line)
    print(f"{len(old)} configurations, {len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
