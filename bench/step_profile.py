"""Where a curvature optimizer's step spends its time on this machine (CPU): the cost model of
docs/performance.md, measured by component.

    python bench/step_profile.py [--optimizer kfac|ring|rkalman] [--model mlp|small] [--steps N]

``mlp`` is the 256-512-512-10 MLP at batch 2048, ``small`` the 64-128-10 MLP at batch 64.
Each component's time is cProfile's cumulative time of the function that does it, divided by
the number of steps (cProfile's own overhead inflates Python-heavy parts; the ratios between
components are what the model is checked against). One thread, random inputs (never zeros).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
import torch.nn.functional as F
from torch import nn

from grng.optim.cases import make_optimizer

# --optimizer -> its case of grng.optim.cases (profiled at lr=0.01, the library's other defaults)
OPTIMIZERS = {"kfac": "kfac-eigen", "ring": "ring", "rkalman": "rkalman"}
COMPONENTS = {  # label -> (file suffix, function name) in cProfile's table
    "forward + backward": ("torch/_tensor.py", "backward"),
    "non-finite checks": ("grng/finite.py", "all_finite"),
    "factor fold (A, G EMA)": ("grng/precondition/kronecker.py", "fold"),
    "Kalman fold": ("grng/precondition/kalman.py", "fold"),
    "inverse refresh (amortized)": ("grng/optim/base.py", "_refresh"),
    "preconditioning (directions)": ("grng/optim/base.py", "_directions"),
    "fused update": ("grng/ops/__init__.py", "fused_update"),
    "whole opt.step": ("grng/optim/base.py", "step"),
}


def model_and_batch(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if name == "mlp":
        sizes, batch = (256, 512, 512, 10), 2048
    else:
        sizes, batch = (64, 128, 10), 64
    layers: list[nn.Module] = []
    for i, o in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(i, o), nn.Tanh()]
    model = nn.Sequential(*layers[:-1])
    return model, torch.randn(batch, sizes[0]), torch.randint(0, sizes[-1], (batch,))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--optimizer", default="kfac", choices=list(OPTIMIZERS))
    ap.add_argument("--model", default="mlp", choices=["mlp", "small"])
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, x, y = model_and_batch(args.model)
    opt = make_optimizer(OPTIMIZERS[args.optimizer], model, lr=0.01)
    adam_model = model_and_batch(args.model)[0]
    adam = make_optimizer("adamw", adam_model)

    def train(m: nn.Module, o: torch.optim.Optimizer, n: int) -> None:
        for _ in range(n):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()

    train(model, opt, 10)  # warm-up, past the first inverse refresh
    train(adam_model, adam, 10)
    t0 = time.perf_counter()
    train(adam_model, adam, args.steps)
    adam_ms = (time.perf_counter() - t0) / args.steps * 1e3
    t0 = time.perf_counter()
    train(model, opt, args.steps)
    plain_ms = (time.perf_counter() - t0) / args.steps * 1e3
    prof = cProfile.Profile()
    prof.runcall(train, model, opt, args.steps)
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    print(f"{args.optimizer} on {args.model}: full step {plain_ms:.3f} ms, AdamW {adam_ms:.3f} ms "
          f"(x{plain_ms / adam_ms:.2f}); components (cProfile, ms per step):")
    for label, (suffix, fn) in COMPONENTS.items():
        cum = sum(v[3] for (file, _, name), v in stats.items()
                  if file.endswith(suffix) and name == fn)
        if cum:
            print(f"  {label:32s} {cum / args.steps * 1e3:8.3f}")


if __name__ == "__main__":
    main()
