"""Why EKFAC's recurrent Kronecker blocks need MORE steps than the diagonal fallback at lr 3e-3
on the byte-level GRU / LSTM language models (and fewer at 1e-2, 3e-2): a diagnosis
(bench/results/ekfac_smalllr_diagnosis.md; issue 25's grid, issue25_grid_GRU_eval1.csv).

Models, data, AdamW target (AdamW's eval loss at step 50) and eval are those of
``bench/time_to_target.py``; the eval loss is read every step. Variants of the recurrent
layers' helper (bench-local subclasses of ``RecurrentProjection``; the library is unchanged):

- ``blocks``: the library's helper (ih / hh blocks with their biases);
- ``diagonal``: switched off (``time_to_target._RecurrentOff``): AdamW on every recurrent
  parameter;
- ``nobias``: the blocks without their biases (the biases take the diagonal fallback's Adam);
- ``ih`` / ``hh``: only the ih_* / only the hh_* blocks (the others' parameters: fallback);
- ``identity``: the blocks with both sides diagonal (every basis the identity: coordinate Adam
  on [W b], the GR term's norms per block instead of per parameter);
- ``rotA`` / ``rotG``: only the A side / only the G side dense (the other the identity).

``--no-bias``: the LM built with ``bias=False`` in the GRU / LSTM (its own AdamW target).

Subcommands (one thread; steps and losses do not depend on the machine's load):

    python bench/ekfac_smalllr_diagnosis.py steps --variants blocks diagonal nobias ih hh \
        --carry keep reproject --seeds 0 1 2 3 4 --csv OUT.csv
    python bench/ekfac_smalllr_diagnosis.py steps --variants blocks diagonal --no-bias ...
    python bench/ekfac_smalllr_diagnosis.py steps --variants blocks diagonal \
        --settings '{"refresh_warmup": 0}' ...       # any EKFAC keyword, on top of lr / carry
    python bench/ekfac_smalllr_diagnosis.py steps --variants blocks \
        --settings '{"delay_bases": 10}' ...  # recurrent blocks' first basis at step 10
    python bench/ekfac_smalllr_diagnosis.py trace --variants blocks diagonal --seeds 0 1 2 \
        --steps 40 --csv TRACE.csv                     # per-step update norms and directions
    python bench/ekfac_smalllr_diagnosis.py rotated --seeds 0 1 2 --carry keep --double \
        --csv ROT.csv                                  # the blocks' update vs rotated Adam
    python bench/ekfac_smalllr_diagnosis.py spectra --seeds 0 1 2 --csv SPECTRA.md  # (markdown)
    python bench/ekfac_smalllr_diagnosis.py table --csv OUT.csv ...   # markdown of steps CSVs
    python bench/ekfac_smalllr_diagnosis.py summary --csv TRACE.csv   # markdown of a trace
    python bench/ekfac_smalllr_diagnosis.py regime --csv TRACE.csv    # first-order regime

``trace`` records per step, for the recurrent weights and biases (ih / hh, both layers) of
the variant's own trajectory: the update's norm over lr (sign-like Adam: about sqrt(n)), its
cosine with -g, the first-order decrease -g.dtheta / lr, the cosine with the step that
coordinate Adam (a shadow AdamW with EKFAC's betas, eps and rho_rel per parameter, fed the same
gradients) would take at the same point, and for the blocks the ratio ||Q_G^T V Q_A||_1 /
||V||_1 of the gradient in the block's eigenbasis; for the whole model the train loss before
and after the step on the step's own batch, its first-order prediction -g.dtheta (dtheta the
step's parameter change) and the eval loss.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import warnings
from functools import cached_property
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import recurrent_tuning as rt  # noqa: E402
import time_to_target as ttt  # noqa: E402
from coverage import RecurrentLM, _next_byte_loss  # noqa: E402
from grng import register_layer  # noqa: E402
from grng.curvature.factors import DiagonalFactor, FactorStructure  # noqa: E402
from grng.curvature.layers import KroneckerLayer  # noqa: E402
from grng.curvature.options import BlockOptions  # noqa: E402
from grng.curvature.recurrent import RecurrentProjection  # noqa: E402
from grng.optim.cases import CASES  # noqa: E402

MAX_STEPS = 100


class _NoBias(RecurrentProjection):
    """The blocks on W alone; b_ih / b_hh take the diagonal fallback."""

    def __init__(self, module: nn.Module, role: str, weight: Tensor, bias: Tensor | None,
                 options: BlockOptions = BlockOptions()) -> None:
        super().__init__(module, role, weight, None, options)


def _only(kind: str) -> type[RecurrentProjection]:
    """A helper whose blocks are only the ``kind`` ("ih" / "hh") ones."""

    class Only(RecurrentProjection):
        @classmethod
        def blocks(cls, module: nn.Module, options: BlockOptions) -> list[KroneckerLayer]:
            return [b for b in super().blocks(module, options) if b.role.startswith(kind)]
    return Only


def _sides(a_dense: bool, g_dense: bool) -> type[RecurrentProjection]:
    """A helper whose A (G) side is kept diagonal (identity basis) unless ``a_dense``
    (``g_dense``)."""

    class Sides(RecurrentProjection):
        @cached_property
        def a_factor(self) -> FactorStructure:
            return super().a_factor if a_dense else DiagonalFactor(self.dims()[1])

        @cached_property
        def g_factor(self) -> FactorStructure:
            return super().g_factor if g_dense else DiagonalFactor(self.dims()[0])
    return Sides


VARIANTS: dict[str, type[RecurrentProjection]] = {
    "blocks": RecurrentProjection, "diagonal": ttt._RecurrentOff, "nobias": _NoBias,
    "ih": _only("ih"), "hh": _only("hh"), "identity": _sides(False, False),
    "rotA": _sides(True, False), "rotG": _sides(False, True)}
FIELDS = ["task", "bias", "seed", "variant", "settings", "target", "steps", "eval_at_50",
          "curve"]


def model_of(task: str, seed: int, bias: bool) -> nn.Module:
    """``coverage.recurrent_lm(task, seed)``, with ``bias`` in the recurrent layer."""
    torch.manual_seed(seed)
    return RecurrentLM(task, bias)


def make(model: nn.Module, variant: str, settings: dict) -> torch.optim.Optimizer:
    """EKFAC (``settings`` its keywords) with the recurrent layers' helper of ``variant``; or
    AdamW at time_to_target's lr for ``variant == "AdamW"``."""
    if variant == "AdamW":
        return CASES["adamw"].make(model, lr=2e-3)
    helper = VARIANTS[variant]
    register_layer(nn.LSTM, helper)
    register_layer(nn.GRU, helper)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return CASES["ekfac"].make(model, **settings)
    finally:
        register_layer(nn.LSTM, RecurrentProjection)
        register_layer(nn.GRU, RecurrentProjection)


def delay_bases(opt: torch.optim.Optimizer, k: int) -> None:
    """The recurrent blocks get no basis before optimizer step ``k`` (0-based; plain Adam on
    [W b] there, the identity being their basis), their first at step k (the moments carried
    into it as at any basis change); the other blocks refresh as usual. Bench-local: wraps
    this optimizer's preconditioner's ``refresh``."""
    block = opt.block
    refresh = block.refresh

    def delayed(units, comm, due, dampings):
        keep = [i for i, u in enumerate(units)
                if opt._steps >= k or not isinstance(u.layer, RecurrentProjection)]
        refresh([units[i] for i in keep], comm, [due[i] for i in keep],
                [dampings[i] for i in keep])
    block.refresh = delayed


_TARGETS: dict[tuple[str, int, bool], float] = {}


def target(task: str, seed: int, bias: bool) -> float:
    """AdamW's eval loss at step 50 (lr 2e-3) of this model and seed."""
    key = (task, seed, bias)
    if key not in _TARGETS:
        model = model_of(task, seed, bias)
        opt = make(model, "AdamW", {})
        for _, batch in zip(range(ttt.TARGET_STEP), ttt.lm_batches(seed)):
            opt.zero_grad()
            _next_byte_loss(model, batch).backward()
            opt.step()
        _TARGETS[key] = ttt.lm_eval(model)
    return _TARGETS[key]


def steps_run(task: str, seed: int, bias: bool, variant: str, settings: dict) -> dict:
    """Eval loss after every step until the target is reached (at step 50 at the earliest)
    or MAX_STEPS."""
    goal = target(task, seed, bias)
    model = model_of(task, seed, bias)
    settings = dict(settings)
    delay = settings.pop("delay_bases", 0)
    opt = make(model, variant, settings)
    if delay:
        delay_bases(opt, delay)
    curve: dict[int, float] = {}
    for step, batch in zip(range(1, MAX_STEPS + 1), ttt.lm_batches(seed)):
        opt.zero_grad()
        loss = _next_byte_loss(model, batch)
        loss.backward()
        opt.step()
        if not torch.isfinite(loss):
            break
        curve[step] = ttt.lm_eval(model)
        if step >= ttt.TARGET_STEP and min(curve.values()) <= goal:
            break
    steps = next((s for s, v in sorted(curve.items()) if v <= goal), None)
    if delay:
        settings["delay_bases"] = delay
    return dict(task=task, bias=bias, seed=seed, variant=variant, settings=json.dumps(settings),
                target=f"{goal:.4f}", steps=steps or "",
                eval_at_50=f"{curve.get(ttt.TARGET_STEP, math.nan):.4f}",
                curve=" ".join(f"{s}:{v:.4f}" for s, v in sorted(curve.items())))


def steps(path: Path, task: str, bias: bool, variants: list[str], seeds: list[int],
          settings_list: list[dict]) -> None:
    """Steps to the target of every (settings, seed, variant); rows already in ``path`` kept."""
    rows = rt._read(path)
    done = {(r["task"], r["bias"], r["seed"], r["variant"], r["settings"]) for r in rows}
    for settings, seed, variant in itertools.product(settings_list, seeds, variants):
        key = (task, str(bias), str(seed), variant, json.dumps(settings))
        if key in done:
            continue
        rows.append(steps_run(task, seed, bias, variant, settings))
        print(task, "bias" if bias else "no-bias", seed, variant, settings, rows[-1]["steps"],
              rows[-1]["eval_at_50"], flush=True)
        rt._write(path, rows, FIELDS)


# ------------------------------------------------------------------------------ trace
TRACE_FIELDS = ["task", "seed", "variant", "settings", "step", "loss_before", "loss_after",
                "eval", "decrease_all", "first_order_all", "group", "n", "step_norm",
                "sqrt_n", "cos_neg_grad", "first_order", "cos_shadow", "shadow_norm",
                "l1_ratio"]


def _groups(model: nn.Module) -> dict[str, list[tuple[str, Tensor]]]:
    """The recurrent parameters by kind: weight_ih, weight_hh, bias_ih, bias_hh (both
    layers)."""
    out: dict[str, list[tuple[str, Tensor]]] = {}
    for name, p in model.rnn.named_parameters():
        out.setdefault(name.rsplit("_", 1)[0], []).append((name, p))
    return out


class _ShadowAdam:
    """Coordinate Adam fed the trajectory's gradients: EKFAC's DiagonalAdam (betas, eps, bias
    correction, the relative GR term per parameter) without applying anything."""

    def __init__(self, params: dict[str, Tensor], betas: tuple[float, float], eps: float,
                 rho_rel: float) -> None:
        self.m = {k: torch.zeros_like(p) for k, p in params.items()}
        self.v = {k: torch.zeros_like(p) for k, p in params.items()}
        self.betas, self.eps, self.rho_rel, self.t = betas, eps, rho_rel, 0

    def direction(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        b1, b2 = self.betas
        self.t += 1
        out = {}
        for k, g in grads.items():
            self.m[k].mul_(b1).add_(g, alpha=1 - b1)
            self.v[k].mul_(b2).addcmul_(g, g, value=1 - b2)
            d = (self.m[k] / (1 - b1 ** self.t)) / (
                self.v[k].sqrt() / math.sqrt(1 - b2 ** self.t) + self.eps)
            out[k] = d + self.rho_rel * d.norm() / g.norm().clamp_min(1e-38) * g
        return out


def _l1_ratios(opt: torch.optim.Optimizer, grads: dict[int, Tensor]) -> dict[str, float]:
    """||Q_G^T V Q_A||_1 / ||V||_1 per recurrent block (by role) in its current bases."""
    out = {}
    for unit in opt._blocks:
        if not isinstance(unit.layer, RecurrentProjection):
            continue
        V = unit.layer.to_matrix([grads[id(p)] for p in unit.layer.params])
        QG, QA = unit.state.QG, unit.state.QA  # None before a delayed first basis
        P = V if QG is None else QG.T.to(V.dtype) @ V
        P = P if QA is None else P @ QA.to(V.dtype)
        out[unit.layer.role] = float(P.abs().sum() / V.abs().sum())
    return out


def _cos(x: Tensor, y: Tensor) -> float:
    return float((x * y).sum() / (x.norm() * y.norm()).clamp_min(1e-38))


def trace_run(task: str, seed: int, variant: str, settings: dict, n_steps: int) -> list[dict]:
    """Per-step rows (one per recurrent parameter group) of ``n_steps`` steps."""
    model = model_of(task, seed, True)
    delay = settings.get("delay_bases", 0)
    opt = make(model, variant, {k: v for k, v in settings.items() if k != "delay_bases"})
    if delay:
        delay_bases(opt, delay)
    groups = _groups(model)
    flat = {name: p for ps in groups.values() for name, p in ps}
    lr = opt.param_groups[0]["lr"]
    shadow = _ShadowAdam(flat, (opt.adam.beta1, opt.adam.beta2),
                         opt.adam.eps, opt.param_groups[0]["rho_rel"])
    rows = []
    for step, batch in zip(range(1, n_steps + 1), ttt.lm_batches(seed)):
        opt.zero_grad()
        loss = _next_byte_loss(model, batch)
        loss.backward()
        grads = {name: p.grad.detach().clone() for name, p in flat.items()}
        all_grads = [(p, p.grad.detach().clone()) for p in model.parameters()]
        before = [p.detach().clone() for p in model.parameters()]
        sd = shadow.direction(grads)
        opt.step()
        delta = {name: p.detach() - b for (name, p), b in zip(model.named_parameters(), before)}
        with torch.no_grad():
            after = float(_next_byte_loss(model, batch))
        first_all = -sum(float((g * (p.detach() - b)).sum())
                         for (p, g), b in zip(all_grads, before))  # -g.dtheta
        ratios = _l1_ratios(opt, {id(p): grads[n] for n, p in flat.items()})
        common = dict(task=task, seed=seed, variant=variant, settings=json.dumps(settings),
                      step=step, loss_before=f"{float(loss.detach()):.5f}",
                      loss_after=f"{after:.5f}", eval=f"{ttt.lm_eval(model):.5f}",
                      decrease_all=f"{float(loss.detach()) - after:.6f}",
                      first_order_all=f"{first_all:.6f}")
        for kind, params in groups.items():
            names = [n for n, _ in params]
            d = torch.cat([delta["rnn." + n].flatten() for n in names]) / lr
            g = torch.cat([grads[n].flatten() for n in names])
            s = torch.cat([sd[n].flatten() for n in names])
            roles = [n.split("_", 1)[1] for n in names]  # ih_l0, ...
            l1 = [ratios[r] for r in roles if r in ratios]
            rows.append(dict(common, group=kind, n=g.numel(), step_norm=f"{float(d.norm()):.4f}",
                             sqrt_n=f"{math.sqrt(g.numel()):.4f}",
                             cos_neg_grad=f"{_cos(-d, g):.4f}",
                             first_order=f"{-float((g * d).sum()):.6f}",
                             cos_shadow=f"{_cos(d, -s):.4f}",
                             shadow_norm=f"{float(s.norm()):.4f}",
                             l1_ratio=f"{statistics.fmean(l1):.4f}" if l1 else ""))
    return rows


def trace(path: Path, task: str, variants: list[str], seeds: list[int],
          settings_list: list[dict], n_steps: int) -> None:
    rows = rt._read(path)
    done = {(r["task"], r["seed"], r["variant"], r["settings"]) for r in rows}
    for settings, seed, variant in itertools.product(settings_list, seeds, variants):
        if (task, str(seed), variant, json.dumps(settings)) in done:
            continue
        rows += trace_run(task, seed, variant, settings, n_steps)
        print("traced", task, seed, variant, settings, flush=True)
        rt._write(path, rows, TRACE_FIELDS)


# ------------------------------------------------------------------------------ reports
def table(paths: list[Path]) -> str:
    """Steps per seed (and their sum) per (model bias, settings, variant)."""
    rows = [r for p in paths for r in rt._read(p)]
    out: dict[tuple, dict[str, str]] = {}
    for r in rows:
        out.setdefault((r["task"], r["bias"], r["settings"], r["variant"]), {})[r["seed"]] = \
            r["steps"] or ">100"
    lines = ["| task | recurrent bias | settings | variant | steps per seed | sum |",
             "|---|---|---|---|---|---|"]
    for (task, bias, settings, variant), by in out.items():
        seeds = sorted(by, key=int)
        total = sum(int(by[s]) if by[s].isdigit() else 101 for s in seeds)
        lines.append(f"| {task} | {bias} | `{settings}` | {variant} | "
                     f"{'/'.join(by[s] for s in seeds)} (seeds {','.join(seeds)}) | {total} |")
    return "\n".join(lines)


def summary(paths: list[Path], steps_shown: tuple[int, ...]) -> str:
    """Means over seeds of the trace's columns at chosen steps, per variant and group."""
    rows = [r for p in paths for r in rt._read(p)]
    cols = ["step_norm", "sqrt_n", "cos_neg_grad", "first_order", "cos_shadow", "shadow_norm",
            "l1_ratio"]
    lines = ["| settings | variant | group | step | " + " | ".join(cols)
             + " | train loss | same-batch decrease | first-order (all params) | eval |",
             "|" + "---|" * (len(cols) + 8)]
    keyed: dict[tuple, list[dict]] = {}
    for r in rows:
        if int(r["step"]) in steps_shown:
            keyed.setdefault((r["settings"], r["variant"], r["group"], int(r["step"])),
                             []).append(r)

    def mean(rs: list[dict], col: str) -> str:
        vals = [float(r[col]) for r in rs if r[col] != ""]
        return f"{statistics.fmean(vals):.4g}" if vals else ""
    for (settings, variant, group, step), rs in sorted(keyed.items()):
        lines.append(f"| `{settings}` | {variant} | {group} | {step} | "
                     + " | ".join(mean(rs, c) for c in cols)
                     + f" | {mean(rs, 'loss_before')} | {mean(rs, 'decrease_all')} | "
                     f"{mean(rs, 'first_order_all')} | {mean(rs, 'eval')} |")
    return "\n".join(lines)


def rotated_check(task: str, seed: int, settings: dict, n_steps: int,
                  double: bool = False) -> list[dict]:
    """The blocks' recurrent updates against a shadow written from the docstring's formulas:
    coordinate Adam on P = Q_G^T V Q_A in the optimizer's own bases (m rotated by
    R = Q_new^T Q_old at a basis change, v kept index for index: ``carry="keep"``), bias
    corrections, eps, then Q_G N Q_A^T + rho_rel (||d|| / ||V||) V per block. Per step and
    block: ||dtheta / lr + d_shadow|| / ||d_shadow|| (0 up to rounding: nothing but the rotation
    distinguishes the blocks' Adam from coordinate Adam). ``double``: the model in float64."""
    if settings.get("carry") != "keep":
        raise ValueError("rotated_check's shadow carries v as carry='keep' does")
    model = model_of(task, seed, True).to(torch.float64 if double else torch.float32)
    opt = make(model, "blocks", settings)
    b1, b2, eps = opt.adam.beta1, opt.adam.beta2, opt.adam.eps
    lr, rho = opt.param_groups[0]["lr"], opt.param_groups[0]["rho_rel"]
    units = [u for u in opt._blocks if isinstance(u.layer, RecurrentProjection)]
    shadow: dict[str, list] = {}  # role -> [m, v, QG, QA]
    rows = []
    for step, batch in zip(range(1, n_steps + 1), ttt.lm_batches(seed)):
        opt.zero_grad()
        _next_byte_loss(model, batch).backward()
        grads = {u.layer.role: u.layer.grad_matrix().detach().double() for u in units}
        before = {u.layer.role: u.layer.to_matrix([p.detach() for p in u.layer.params]).double()
                  for u in units}
        opt.step()
        for u in units:
            role, V = u.layer.role, grads[u.layer.role]
            # copies: a batched block's bases are views of a stack that the next step overwrites
            QG, QA = u.state.QG.double().clone(), u.state.QA.double().clone()
            if role not in shadow:
                shadow[role] = [torch.zeros_like(V), torch.zeros_like(V), QG, QA]
            m, v, QG0, QA0 = shadow[role]
            m = (QG.T @ QG0) @ m @ (QA.T @ QA0).T  # the first moment into the new bases
            P = QG.T @ V @ QA
            m = b1 * m + (1 - b1) * P
            v = b2 * v + (1 - b2) * P * P
            shadow[role] = [m, v, QG, QA]
            N = (m / (1 - b1 ** step)) / (v.sqrt() / math.sqrt(1 - b2 ** step) + eps)
            d = QG @ N @ QA.T
            d = d + rho * d.norm() / V.norm() * V
            after = u.layer.to_matrix([p.detach() for p in u.layer.params]).double()
            err = float(((after - before[role]) / lr + d).norm() / d.norm())
            rows.append(dict(task=task, seed=seed, settings=json.dumps(settings), double=double,
                             step=step,
                             block=role, rel_diff=f"{err:.3e}"))
    return rows


def _effective_rank(M: Tensor) -> float:
    """exp(entropy) of the normalized eigenvalues of the PSD ``M`` (1: rank one; d: flat)."""
    lam = torch.linalg.eigvalsh(M.double()).clamp_min(0.0)
    p = lam / lam.sum()
    return float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))


def spectra(task: str, seeds: list[int], settings: dict, at: tuple[int, ...]) -> str:
    """Per recurrent block after the steps ``at`` of the blocks' run: the factors' effective
    ranks (of d_G, d_A), the top eigenvalue's share of A's trace, the median |entry| of V and
    of P = Q_G^T V Q_A (against Adam's eps), and the gradient's L1 ratio ||P||_1 / ||V||_1
    (sign-like Adam's first-order decrease in the eigenbasis over that in coordinates;
    |P_ij| <= sqrt(l_G,i l_A,j) by Cauchy-Schwarz over the rows, so steep factor spectra
    concentrate P); means over seeds."""
    acc: dict[tuple[int, str], list[tuple[float, ...]]] = {}
    for seed in seeds:
        model = model_of(task, seed, True)
        opt = make(model, "blocks", settings)
        for step, batch in zip(range(1, max(at) + 1), ttt.lm_batches(seed)):
            opt.zero_grad()
            _next_byte_loss(model, batch).backward()
            opt.step()
            if step not in at:
                continue
            for unit in opt._blocks:
                if not isinstance(unit.layer, RecurrentProjection):
                    continue
                V = unit.layer.grad_matrix().double()
                QG, QA = unit.state.QG.double(), unit.state.QA.double()
                A = unit.state.A.double()
                lam = torch.linalg.eigvalsh(A)
                P = QG.T @ V @ QA
                acc.setdefault((step, unit.layer.role), []).append((
                    _effective_rank(unit.state.G), unit.state.G.shape[0],
                    _effective_rank(A), A.shape[0], float(lam[-1] / lam.sum()),
                    float(V.abs().median()), float(P.abs().median()),
                    float(P.abs().sum() / V.abs().sum())))
    lines = ["| step | block | eff. rank G (of d_G) | eff. rank A (of d_A) | A's top share | "
             "median abs V | median abs P | L1 ratio |", "|---|---|---|---|---|---|---|---|"]
    for (step, role), vals in sorted(acc.items()):
        mean = [statistics.fmean(v[k] for v in vals) for k in range(8)]
        lines.append(f"| {step} | {role} | {mean[0]:.1f} ({mean[1]:.0f}) | {mean[2]:.1f} "
                     f"({mean[3]:.0f}) | {mean[4]:.2f} | {mean[5]:.2e} | {mean[6]:.2e} | "
                     f"{mean[7]:.3f} |")
    return "\n".join(lines)


WINDOWS = ((1, 5), (6, 15), (16, 40))


def regime(paths: list[Path]) -> str:
    """Per (settings, variant), means over seeds: the whole model's same-batch loss decrease
    and its first-order prediction -g.dtheta summed over step windows (their ratio: 1 in
    the first-order regime, below 1 where curvature eats the step), the eval loss at some
    steps; and per seed the first step from which the blocks' eval loss stays at or below the
    diagonal fallback's."""
    rows = [r for p in paths for r in rt._read(p) if r["group"] == "weight_ih"]  # one per step
    by: dict[tuple, dict[str, dict[int, dict]]] = {}
    for r in rows:
        by.setdefault((r["settings"], r["variant"]), {}).setdefault(r["seed"], {})[
            int(r["step"])] = r
    lines = ["| settings | variant | " + " | ".join(
        f"steps {a}-{b}: decrease / first-order" for a, b in WINDOWS)
        + " | eval @ 1 / 5 / 10 / 20 / 30 / 40 |", "|---|---|" + "---|" * (len(WINDOWS) + 1)]
    for (settings, variant), seeds in sorted(by.items()):
        cells = []
        for a, b in WINDOWS:
            dec = statistics.fmean(sum(float(s[t]["decrease_all"]) for t in range(a, b + 1)
                                       if t in s) for s in seeds.values())
            fo = statistics.fmean(sum(float(s[t]["first_order_all"]) for t in range(a, b + 1)
                                      if t in s) for s in seeds.values())
            cells.append(f"{dec:.3f} / {fo:.3f} ({dec / fo:.2f})")
        evals = " / ".join(f"{statistics.fmean(float(s[t]['eval']) for s in seeds.values()):.3f}"
                           for t in (1, 5, 10, 20, 30, 40))
        lines.append(f"| `{settings}` | {variant} | " + " | ".join(cells) + f" | {evals} |")
    lines += ["", "| settings | seed | first step from which blocks' eval <= diagonal's |",
              "|---|---|---|"]
    for (settings, variant), seeds in sorted(by.items()):
        if variant != "blocks" or (settings, "diagonal") not in by:
            continue
        for seed, curve in sorted(seeds.items()):
            other = by[(settings, "diagonal")].get(seed, {})
            steps_ = sorted(set(curve) & set(other))
            behind = [t for t in steps_ if float(curve[t]["eval"]) > float(other[t]["eval"])]
            cross = (behind[-1] + 1 if behind else 1) if steps_ else None
            lines.append(f"| `{settings}` | {seed} | "
                         f"{cross if cross is not None and cross <= steps_[-1] else 'never'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("steps", "trace", "rotated", "spectra"):
        p = sub.add_parser(name)
        p.add_argument("--task", default="GRU", choices=["GRU", "LSTM"])
        p.add_argument("--variants", nargs="+", default=["blocks", "diagonal"],
                       choices=sorted(VARIANTS))
        p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        p.add_argument("--lr", type=float, nargs="+", default=[0.003])
        p.add_argument("--carry", nargs="+", default=["keep"], choices=["keep", "reproject"])
        p.add_argument("--settings", default="{}", help="more EKFAC keywords (JSON)")
        p.add_argument("--csv", type=Path, required=True)
    sub.choices["steps"].add_argument("--no-bias", action="store_true")
    sub.choices["trace"].add_argument("--steps", type=int, default=40)
    sub.choices["rotated"].add_argument("--steps", type=int, default=40)
    sub.choices["rotated"].add_argument("--double", action="store_true")
    sub.choices["spectra"].add_argument("--at", type=int, nargs="+", default=[1, 5, 10, 30])
    for name in ("table", "summary", "regime"):
        p = sub.add_parser(name)
        p.add_argument("--csv", type=Path, nargs="+", required=True)
    sub.choices["summary"].add_argument("--at", type=int, nargs="+", default=[1, 2, 3, 5, 10,
                                                                              20, 40])
    args = parser.parse_args(argv)
    if args.command == "table":
        print(table(args.csv))
        return
    if args.command == "summary":
        print(summary(args.csv, tuple(args.at)))
        return
    if args.command == "regime":
        print(regime(args.csv))
        return
    rt._load()
    extra = json.loads(args.settings)
    settings_list = [dict(lr=lr, carry=carry, **extra)
                     for lr, carry in itertools.product(args.lr, args.carry)]
    if args.command == "spectra":
        text = "\n\n".join(f"`{json.dumps(s)}`\n\n" + spectra(args.task, args.seeds, s,
                                                                 tuple(args.at))
                            for s in settings_list)
        args.csv.write_text(text + "\n")
        print(text)
    elif args.command == "rotated":
        rows = [r for s, seed in itertools.product(settings_list, args.seeds)
                for r in rotated_check(args.task, seed, s, args.steps, args.double)]
        rt._write(args.csv, rows, list(rows[0]))
        worst: dict[tuple, float] = {}
        for r in rows:
            key = (r["settings"], r["block"])
            worst[key] = max(worst.get(key, 0.0), float(r["rel_diff"]))
        for (s, block), err in sorted(worst.items()):
            print(f"{s} {block}: max relative difference over steps and seeds {err:.2e}")
    elif args.command == "steps":
        steps(args.csv, args.task, not args.no_bias, args.variants, args.seeds, settings_list)
    else:
        trace(args.csv, args.task, args.variants, args.seeds, settings_list, args.steps)


if __name__ == "__main__":
    main()
