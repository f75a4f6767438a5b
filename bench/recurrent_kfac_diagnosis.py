"""Issue 25: why K-FAC with the recurrent Kronecker blocks diverges (LSTM) or is slow (GRU) on
the byte-level language models of ``bench/time_to_target.py``, and why the depthwise CNN's
blocks reach the target later at K-FAC's defaults (bench/results/recurrent_kfac_diagnosis.md).

``trace``: one K-FAC run (eigen, inverse_every 5, the bench's settings), per step the loss, the
KL-clip quantity lr^2 <d, g> in total and for the parameters that contribute most (with the
norm of their update), the eval loss every 5 steps, and at a few steps the eigenvalue range of
every block's A and G (``--off``: the diagonal fallback, with its D of the grouped convs'
weights). ``roles``: steps to AdamW's 50-step eval loss with the blocks of only
some weights of the LSTM / GRU (``ih``, ``hh``; the others on the diagonal fallback). ``bn``
(digits CNN): AdamW, K-FAC and EKFAC (blocks, diagonal) with the validation loss under
BatchNorm's running statistics (the bench's eval) and the validation batch's own, the steps to
AdamW's 50-step value under each, the conv biases' drift and the BatchNorm input variance
against the running variance. One thread.

    python bench/recurrent_kfac_diagnosis.py trace LSTM 2 --lr 0.01 --damping 1e-3 [--kl-clip C]
    python bench/recurrent_kfac_diagnosis.py roles LSTM 2 --lr 0.01 --damping 1e-3
    python bench/recurrent_kfac_diagnosis.py trace "digits CNN" 0 --lr 0.01 --damping 1e-3 \
        --kl-clip 1e-3 --steps 50 [--off]
    python bench/recurrent_kfac_diagnosis.py bn "digits CNN" 0 --lr 0.01 --damping 1e-3 \
        --kl-clip 1e-3 [--no-conv-bias] [--bn-momentum M]
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import recurrent_tuning as rt  # noqa: E402
import time_to_target as ttt  # noqa: E402
from grng import register_layer  # noqa: E402
from grng.curvature.recurrent import RecurrentProjection  # noqa: E402

SPECTRA_AT = (1, 5, 10, 20, 30)


def _spectrum(M: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a dense factor, of every group of a block-diagonal (groups, b, b) one, or
    a diagonal factor's entries."""
    M = M.double()
    return torch.linalg.eigvalsh(M) if M.dim() >= 2 else M


def trace(task: str, seed: int, settings: dict, steps: int, off: bool = False) -> None:
    model, batch_loss, evaluate, lrs = ttt._task(task, seed)
    names = {m: n for n, m in model.named_modules()}
    opt = ttt.make(model, "K-FAC", lrs, off, settings)
    lr = settings["lr"]
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = batch_loss(model)
        loss.backward()
        before = {n: (p.detach().clone(), p.grad.detach().clone())
                  for n, p in model.named_parameters()}
        opt.step()
        kl = {n: (lr * float(((w - p.detach()) * g).sum()), float((w - p.detach()).norm()))
              for (n, p), (w, g) in zip(model.named_parameters(), before.values())}
        ev = f"{evaluate(model):.3f}" if step % ttt.EVAL_EVERY == 0 else "-"
        top = sorted(kl.items(), key=lambda kv: -kv[1][0])[:4]
        print(f"{step:3d} loss {float(loss.detach()):7.3f} eval {ev:>7s} KL {sum(v[0] for v in kl.values()):.2e} | "
              + " ".join(f"{n}:{v[0]:.1e}/{v[1]:.2f}" for n, v in top), flush=True)
        if step in SPECTRA_AT:
            for unit in opt._blocks:
                if unit.state.A is None:
                    continue
                la, lg = _spectrum(unit.state.A), _spectrum(unit.state.G)
                name = getattr(unit.layer, "role", names.get(unit.layer.module, "?"))
                print(f"      {name:10s} A [max {float(la.max()):.2e} mean {float(la.mean()):.2e}]"
                      f"  G [max {float(lg.max()):.2e} mean {float(lg.mean()):.2e}]")
            for unit in (opt._diagonal_units.values() if off else ()):
                module = next((m for m in model.modules() if getattr(m, "weight", None) is unit.like
                               and getattr(m, "groups", 1) > 1), None)
                if module is not None and unit.state.value is not None:
                    D = unit.state.value.double()
                    print(f"      {names[module]:10s} diagonal D of the weight [max {float(D.max()):.2e} "
                          f"mean {float(D.mean()):.2e} median {float(D.median()):.2e}]")
        if not math.isfinite(float(loss)):
            break


def _bn_eval(model: nn.Module, batch_stats: bool) -> float:
    """Validation loss of the digits CNN on a copy of ``model``: BatchNorm with its running
    statistics (the bench's eval) or with the validation set's own (one batch)."""
    m = copy.deepcopy(model).train(batch_stats)
    with torch.no_grad():
        return float(nn.functional.cross_entropy(m(ttt._DIGITS.val.x.reshape(-1, 1, 8, 8)),
                                                 ttt._DIGITS.val.y))


def _bn_variances(model: nn.Module) -> str:
    """Per BatchNorm: the channel-mean variance of its input on the validation set / the mean
    of its running variance (which starts at 1 and moves 10% per step)."""
    net, seen = copy.deepcopy(model).eval(), {}
    bns = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    for n, m in bns:
        m.register_forward_hook(lambda mod, inp, out, n=n: seen.__setitem__(n, inp[0]))
    with torch.no_grad():
        net(ttt._DIGITS.val.x.reshape(-1, 1, 8, 8))
    return " ".join(f"bn{n} {float(seen[n].var((0, 2, 3)).mean()):.3g}/{float(m.running_var.mean()):.3g}"
                    for n, m in bns)


def batchnorm(seed: int, settings: dict, optimizers: list[str], conv_bias: bool = True,
              momentum: float | None = None) -> None:
    """Digits CNN: steps to AdamW's 50-step validation loss under both BatchNorm evals (running
    statistics, the bench's; the validation batch's own), and the drift of the conv biases
    that feed a BatchNorm (their gradient is 0: the BatchNorm removes the channel mean);
    ``conv_bias=False``: those biases removed; ``momentum``: the BatchNorms' running-statistics
    momentum (PyTorch's default 0.1); both for every optimizer, AdamW's target included."""
    runs = [("AdamW", False)] + [(o, off) for o in optimizers for off in (False, True)]
    targets: tuple[float, float] | None = None
    for optimizer, off in runs:
        model, batch_loss, _, lrs = ttt._task("digits CNN", seed)
        convs = [m for m, nxt in zip(model, list(model)[1:]) if isinstance(nxt, nn.BatchNorm2d)]
        if not conv_bias:
            for c in convs:
                c.register_parameter("bias", None)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and momentum is not None:
                m.momentum = momentum
        opt = ttt.make(model, optimizer, lrs, off, None if optimizer == "AdamW"
                       else settings if optimizer == "K-FAC" else {})
        b0 = [c.bias.detach().clone() if conv_bias else None for c in convs]
        curve: dict[int, tuple[float, float]] = {}
        variances: list[str] = []
        for step in range(1, (ttt.TARGET_STEP if optimizer == "AdamW" else ttt.MAX_STEPS) + 1):
            opt.zero_grad()
            batch_loss(model).backward()
            opt.step()
            if step % ttt.EVAL_EVERY == 0:
                curve[step] = (_bn_eval(model, False), _bn_eval(model, True))
            if step in (10, 20, 30):
                variances.append(f"step {step}: {_bn_variances(model)}")
        if targets is None:
            targets = curve[ttt.TARGET_STEP]
        hit = [next((s for s, v in sorted(curve.items()) if v[k] <= targets[k]), None)
               for k in (0, 1)]
        drift = " ".join(f"{float((c.bias.detach() - b).norm()):.3f}" if conv_bias else "-"
                         for c, b in zip(convs, b0))
        name = optimizer if optimizer == "AdamW" else f"{optimizer} {'diagonal' if off else 'blocks'}"
        print(f"digits CNN seed {seed} {name:15s} steps (running BN / batch BN) "
              f"{hit[0] or '> 100'} / {hit[1] or '> 100'}; eval@50 {curve[50][0]:.4f} / "
              f"{curve[50][1]:.4f}; targets {targets[0]:.4f} / {targets[1]:.4f}; conv-bias "
              f"drift at the end (stem, dw1, pw1, dw2, pw2) {drift}; curve "
              + " ".join(f"{s}:{a:.3f}/{b:.3f}" for s, (a, b) in sorted(curve.items())), flush=True)
        print("    BatchNorm input variance / running variance, " + "; ".join(variances), flush=True)


def roles(task: str, seed: int, settings: dict) -> None:
    target = ttt.run(task, seed, "AdamW")[ttt.TARGET_STEP]
    for kept in (("ih",), ("hh",), ("ih", "hh")):
        class Only(RecurrentProjection):
            @classmethod
            def blocks(cls, module: nn.Module, max_factor_dim: int | None):
                return [b for b in super().blocks(module, max_factor_dim)
                        if b.role.split("_")[0] in kept]
        register_layer(nn.LSTM, Only)
        register_layer(nn.GRU, Only)
        try:
            curve = ttt.run(task, seed, "K-FAC", settings=settings, until=target)
        finally:
            register_layer(nn.LSTM, RecurrentProjection)
            register_layer(nn.GRU, RecurrentProjection)
        print(task, seed, settings, "blocks", "+".join(kept), "steps",
              ttt.steps_to(curve, target) or f"> {ttt.MAX_STEPS}",
              "eval@50", f"{curve.get(ttt.TARGET_STEP, float('nan')):.4f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("trace", "roles", "bn"))
    parser.add_argument("task", choices=("LSTM", "GRU", "digits CNN"))
    parser.add_argument("seed", type=int)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--damping", type=float, required=True)
    parser.add_argument("--kl-clip", type=float)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--off", action="store_true",
                        help="trace: the diagonal fallback for the recurrent / grouped layers")
    parser.add_argument("--bn-momentum", type=float,
                        help="bn: the BatchNorms' running-statistics momentum (default 0.1)")
    parser.add_argument("--no-conv-bias", action="store_true",
                        help="bn: remove the biases of the convolutions that feed a BatchNorm")
    args = parser.parse_args(argv)
    rt._load()
    settings = dict(lr=args.lr, damping=args.damping, kl_clip=args.kl_clip)
    if args.stage == "trace":
        trace(args.task, args.seed, settings, args.steps, args.off)
    elif args.stage == "bn":
        batchnorm(args.seed, settings, ["K-FAC", "EKFAC"], not args.no_conv_bias, args.bn_momentum)
    else:
        roles(args.task, args.seed, settings)


if __name__ == "__main__":
    main()
