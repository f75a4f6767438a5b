"""Issue 25: why K-FAC's depthwise Kronecker blocks reach AdamW's 50-step eval loss later than
the diagonal fallback on the digits CNN of ``bench/time_to_target.py`` under its eval (BatchNorm
on its running statistics), and what the blocks' steps look like
(bench/results/depthwise_diagnosis.md).

Stages (K-FAC at its library defaults lr 0.01, damping 1e-3, kl_clip 1e-3 with the bench's
eigen inverse every 5 steps; EKFAC at its defaults; "blocks": the depthwise convs dw1 = module
3 and dw2 = module 9 in block-diagonal blocks, "diagonal": their helper switched off):

- ``eval``: steps to AdamW's 50-step loss under the bench's eval and under the same
  ``model.eval()`` after the running statistics are recalibrated at the current weights (reset,
  then one train-mode pass over the training set with a cumulative average; no parameter
  changes; AdamW's target recomputed the same way); per run the depthwise convs' share of the
  KL-clip quantity lr^2 <d, g> (<dW, g> summed per layer, over all; steps 1-10 / 11-50), dw1's
  weight norm and bn4's input variance over its running variance.
- ``steps``: per step, for each conv (dw1, pw1 = 6, dw2, pw2 = 12), the update norm |dW|, its
  radial part (per output channel along w_c: the direction the following BatchNorm makes the
  loss invariant to) and tangential part, and the bias update |db| (also loss-invariant), means
  over steps 1-30; with ``+proj``: after every step the depthwise convs' radial part and bias
  update are undone (an intervention on the loss-invariant directions, not a library change).
- ``fisher``: for each channel c of dw1 / dw2, the KFC factorization A_c G_c of one batch against
  the exact second moment F_c of the per-example contributions sum_t abar_nt e_nt (the same rows,
  without the spatial-independence assumption), and the damped steps (F_c + d)^-1 g_c vs
  (A_c G_c + d)^-1 g_c, along a blocks run (seed 0).
- ``perturb``: the steps under the bench's eval after a rounding-sized relative change
  (1e-6) of every initial parameter, 4 draws: the count's sensitivity to the start.

    python bench/depthwise_diagnosis.py eval --seeds 0 1 2 3 4
    python bench/depthwise_diagnosis.py steps --seeds 0 1 2 [--optimizers K-FAC EKFAC]
    python bench/depthwise_diagnosis.py fisher --seeds 0
    python bench/depthwise_diagnosis.py perturb --seeds 0 1 2 [--optimizers K-FAC EKFAC]

One thread; steps and losses do not depend on the machine's load.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import recurrent_tuning as rt  # noqa: E402
import time_to_target as ttt  # noqa: E402

KFAC_DEFAULTS = dict(lr=0.01, damping=1e-3, kl_clip=1e-3)
SETTINGS = {"K-FAC": KFAC_DEFAULTS, "EKFAC": {}}
DW, CONVS = (3, 9), {"dw1": 3, "pw1": 6, "dw2": 9, "pw2": 12}


def _images(x: Tensor) -> Tensor:
    return x.reshape(-1, 1, 8, 8)


def recalibrated_eval(model: nn.Module) -> float:
    """Validation loss in eval mode after BatchNorm's running statistics are recomputed at the
    current weights (a copy: reset, one train-mode pass over the training set, cumulative)."""
    m = copy.deepcopy(model)
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.reset_running_stats()
            bn.momentum = None
    m.train()
    with torch.no_grad():
        for xb in ttt._DIGITS.train.x.split(64):
            m(_images(xb))
        return float(F.cross_entropy(m.eval()(_images(ttt._DIGITS.val.x)), ttt._DIGITS.val.y))


def _train(seed: int, optimizer: str, off: bool, steps: int, each_step=None) -> dict[int, tuple]:
    """Train the digits CNN; ``each_step(step, model, before)`` after every step, with the
    parameters and gradients before it; the eval pair (bench's, recalibrated) every 5 steps."""
    model, batch_loss, evaluate, lrs = ttt._task("digits CNN", seed)
    opt = ttt.make(model, optimizer, lrs, off, SETTINGS.get(optimizer))
    curve = {}
    for step in range(1, steps + 1):
        opt.zero_grad()
        batch_loss(model).backward()
        before = {n: (p.detach().clone(), p.grad.detach().clone())
                  for n, p in model.named_parameters()}
        opt.step()
        if each_step is not None:
            each_step(step, model, before)
        if step % ttt.EVAL_EVERY == 0:
            curve[step] = (evaluate(model), recalibrated_eval(model))
    return curve


def _hit(curve: dict[int, tuple], target: float, k: int) -> int | str:
    return next((s for s, v in sorted(curve.items()) if v[k] <= target), "> 60")


def eval_stage(seeds: list[int]) -> None:
    for seed in seeds:
        target = _train(seed, "AdamW", False, 50)[50]
        for optimizer in ("K-FAC", "EKFAC"):
            for off in (False, True):
                share, norms, ratio = [], {}, {}

                def record(step, model, before, share=share, norms=norms, ratio=ratio):
                    kl = {n: float(((w - p.detach()) * g).sum())
                          for (n, p), (w, g) in zip(model.named_parameters(), before.values())}
                    total = sum(kl.values())
                    share.append([sum(kl[f"{i}.{k}"] for k in ("weight", "bias")) / total
                                  for i in DW] + [total])
                    if step in (10, 20, 30, 50):
                        norms[step] = float(model[3].weight.detach().norm())
                        bn, seen = model[4], {}
                        hook = bn.register_forward_hook(
                            lambda mod, inp, out: seen.__setitem__("x", inp[0]))
                        with torch.no_grad():
                            model.eval()(_images(ttt._DIGITS.val.x))
                        model.train()
                        hook.remove()
                        ratio[step] = float(seen["x"].var((0, 2, 3)).mean() / bn.running_var.mean())
                curve = _train(seed, optimizer, off, 60, record)

                def mean(k, a, b):
                    return sum(s[k] for s in share[a:b]) / (b - a)
                print(f"seed {seed} {optimizer:5s} {'diagonal' if off else 'blocks':8s} | steps: "
                      f"bench's eval {_hit(curve, target[0], 0)}, recalibrated "
                      f"{_hit(curve, target[1], 1)} (targets {target[0]:.3f} / {target[1]:.3f}; "
                      f"at 50: {curve[50][0]:.3f} / {curve[50][1]:.3f}) | KL share dw1 "
                      f"{mean(0, 0, 10):.2f} / {mean(0, 10, 50):.2f}, dw2 {mean(1, 0, 10):.2f} / "
                      f"{mean(1, 10, 50):.2f} | |W_dw1| "
                      + " ".join(f"{k}:{v:.2f}" for k, v in norms.items())
                      + " | bn4 input var / running var "
                      + " ".join(f"{k}:{v:.2f}" for k, v in ratio.items()), flush=True)


def steps_stage(seeds: list[int], optimizers: list[str]) -> None:
    for seed in seeds:
        target = _train(seed, "AdamW", False, 50)[50][0]
        for optimizer in optimizers:
            for off in (False, True):
                for project in (False, True):
                    stats: list[dict[str, tuple]] = []

                    def record(step, model, before, stats=stats, project=project):
                        row = {}
                        for name, i in CONVS.items():
                            conv = model[i]
                            W0, b0 = before[f"{i}.weight"][0], before[f"{i}.bias"][0]
                            D = (conv.weight.detach() - W0).flatten(1)
                            unit = W0.flatten(1) / W0.flatten(1).norm(dim=1, keepdim=True)
                            radial = (D * unit).sum(1, keepdim=True) * unit
                            row[name] = (float(D.norm()), float(radial.norm()),
                                         float((D - radial).norm()),
                                         float((conv.bias.detach() - b0).norm()))
                            if project and i in DW:
                                with torch.no_grad():
                                    conv.weight.copy_((W0.flatten(1) + D - radial).view_as(W0))
                                    conv.bias.copy_(b0)
                        stats.append(row)
                    curve = _train(seed, optimizer, off, 60, record)

                    def mean(name, k):
                        return sum(r[name][k] for r in stats[:30]) / 30
                    variant = ("diagonal" if off else "blocks") + (" +proj" if project else "")
                    label = f"{optimizer} {variant}"
                    print(f"seed {seed} {label:22s} steps {_hit(curve, target, 0)} (at 50: "
                          f"{curve[50][0]:.3f}, target {target:.3f}) | " + "; ".join(
                              f"{n} |dW| {mean(n, 0):.3f} radial {mean(n, 1):.3f} tangential "
                              f"{mean(n, 2):.3f} |db| {mean(n, 3):.3f}" for n in CONVS), flush=True)


def fisher_stage(seed: int, damping: float = 1e-3) -> None:
    model, batch_loss, _, lrs = ttt._task("digits CNN", seed)
    opt = ttt.make(model, "K-FAC", lrs, False, KFAC_DEFAULTS)
    seen: dict[tuple[str, int], Tensor] = {}
    for i in DW:
        model[i].register_forward_hook(
            lambda mod, inp, out, i=i: seen.__setitem__(("x", i), inp[0].detach()))
        model[i].register_full_backward_hook(
            lambda mod, gin, gout, i=i: seen.__setitem__(("e", i), gout[0].detach()))
    for step in range(1, 41):
        opt.zero_grad()
        batch_loss(model).backward()
        for i in DW if step in (1, 5, 10, 20, 30, 40) else ():
            x, e = seen[("x", i)].double(), seen[("e", i)].double()
            N, C, H, W = x.shape
            T = H * W
            P = F.unfold(x, 3, padding=1).view(N, C, 9, T)
            P = torch.cat([P, torch.ones(N, C, 1, T, dtype=P.dtype)], 2)     # (N, C, 10, T)
            E = (e * N).reshape(N, C, T)       # the per-example losses' rows (the loss is a mean)
            per = torch.einsum("nckt,nct->nck", P, E)                          # (N, C, 10)
            exact = torch.einsum("nck,ncl->ckl", per, per) / N
            kfc = torch.einsum("nckt,nclt->ckl", P, P) / (N * T) * ((E * E).sum((0, 2)) / N
                                                                    )[:, None, None]
            g = per.mean(0).unsqueeze(-1)
            eye = torch.eye(10, dtype=torch.float64)
            s_exact = torch.linalg.solve(exact + damping * eye, g).squeeze(-1)
            s_kfc = torch.linalg.solve(kfc + damping * eye, g).squeeze(-1)
            ratio = exact.diagonal(dim1=1, dim2=2).sum(1) / kfc.diagonal(dim1=1, dim2=2).sum(1)
            cos = float((s_exact * s_kfc).sum() / (s_exact.norm() * s_kfc.norm()))
            print(f"step {step:2d} {'dw1' if i == 3 else 'dw2'}: tr F_c / tr(A_c G_c) median "
                  f"{float(ratio.median()):.2f} "
                  f"[{float(ratio.min()):.2f}, {float(ratio.max()):.2f}]"
                  f"; mean eigenvalue F_c {float(exact.diagonal(dim1=1, dim2=2).mean()):.2e}, "
                  f"A_c G_c {float(kfc.diagonal(dim1=1, dim2=2).mean()):.2e}, g^2 "
                  f"{float((g * g).mean()):.2e}; |step exact| / |step KFC| "
                  f"{float(s_exact.norm() / s_kfc.norm()):.2f} (cos {cos:.2f}); |g / d| / |step "
                  f"KFC| {float(g.norm() / damping / s_kfc.norm()):.1f}", flush=True)
        opt.step()


def perturb_stage(seeds: list[int], optimizers: list[str], copies: int = 4, size: float = 1e-6
                  ) -> None:
    """Steps under the bench's eval after multiplying every initial parameter by
    (1 + size N(0, 1)) (generator seed k = 1..copies; k = 0 unperturbed): how far the count
    moves on a rounding-sized change of the start."""
    for seed in seeds:
        target = _train(seed, "AdamW", False, 50)[50][0]
        for optimizer in optimizers:
            for off in (False, True):
                counts = []
                for k in range(copies + 1):
                    model, batch_loss, evaluate, lrs = ttt._task("digits CNN", seed)
                    if k:
                        g = torch.Generator().manual_seed(k)
                        with torch.no_grad():
                            for p in model.parameters():
                                p.mul_(1 + size * torch.randn(p.shape, generator=g))
                    opt = ttt.make(model, optimizer, lrs, off, SETTINGS.get(optimizer))
                    hit = None
                    for step in range(1, 61):
                        opt.zero_grad()
                        batch_loss(model).backward()
                        opt.step()
                        if step % ttt.EVAL_EVERY == 0 and evaluate(model) <= target:
                            hit = step
                            break
                    counts.append(hit or "> 60")
                print(f"seed {seed} {optimizer} {'diagonal' if off else 'blocks':8s} steps "
                      f"(unperturbed, then {copies} perturbations of {size:g}): "
                      + " / ".join(map(str, counts)), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("eval", "steps", "fisher", "perturb"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--optimizers", nargs="+", default=["K-FAC"], choices=list(SETTINGS))
    args = parser.parse_args(argv)
    rt._load()
    if args.stage == "eval":
        eval_stage(args.seeds)
    elif args.stage == "steps":
        steps_stage(args.seeds, args.optimizers)
    elif args.stage == "perturb":
        perturb_stage(args.seeds, args.optimizers)
    else:
        fisher_stage(args.seeds[0])


if __name__ == "__main__":
    main()
