"""How much of real architectures grng's Kronecker blocks cover, and what that does to training
(issue 13; docs/algorithms.md "Layer helpers" and "Coverage").

1. **Coverage** of a small Hugging Face GPT-2 (``GPT2Config(n_layer=2, n_embd=64, n_head=4)``,
   a 256-byte vocabulary, no download) and of an ``nn.TransformerEncoder``: the share of the
   trainable parameters in Kronecker blocks that receive factors ("live"), in blocks that never
   do ("dead": a block whose module's forward is never called, as ``nn.MultiheadAttention``'s
   ``out_proj``, which then steps along the raw gradient), and on the diagonal fallback. It is
   computed from ``opt.layers`` and the factor state after two steps, so it runs on any grng.
2. **Training**: eval loss of that GPT-2 after 20, 50 and 100 steps (``loss.backward(); opt.step()``)
   on bytes of the Python standard library's top-level modules (read at run time; files split
   into train / validation / test), AdamW vs K-FAC, 3 seeds (the seed fixes the initialization
   and the batches, shared by both optimizers). Each optimizer's learning rate is the best of a
   small grid on the validation loss at the last step, averaged over the seeds; the test loss is
   reported.

Coverage also of the models of issue 25: byte-level LSTM and GRU language models (embedding,
2-layer recurrence, head) and a depthwise-separable CNN (MobileNet-style: depthwise 3x3 then
pointwise 1x1 convolutions with BatchNorm). ``--coverage-only`` skips the training part; a model
that an earlier commit cannot build is reported with its construction error.

Before / after: run this script in a worktree of the earlier commit, then merge:

    git worktree add --detach /tmp/before <commit>; cp bench/coverage.py /tmp/before/bench/
    (cd /tmp/before && python bench/coverage.py --json /tmp/before.json)
    python bench/coverage.py --before /tmp/before.json --out bench/results/coverage.md

The script imports the grng of the repository it sits in.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import grng  # noqa: E402
from grng.optim.cases import CASES  # noqa: E402

SEEDS = (0, 1, 2)
STEPS = (20, 50, 100)
BATCH, LENGTH = 16, 64
GRIDS = {"AdamW": (1e-3, 2e-3, 4e-3, 8e-3), "K-FAC": (0.01, 0.02, 0.04, 0.08)}
KFAC_SETTINGS = dict(damping=0.1, inverse_every=5, kl_clip=None)  # the default at both commits measured


def gpt2(seed: int) -> nn.Module:
    """The small GPT-2 of this benchmark (byte vocabulary), initialized from ``seed``."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256,
                                     n_positions=LENGTH, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


class RecurrentLM(nn.Module):
    """Byte-level language model: embedding 256 x 64, a 2-layer ``kind`` (LSTM or GRU) of
    hidden size 128 (``bias``: its biases), a linear head to 256 bytes."""

    def __init__(self, kind: str, bias: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(256, 64)
        self.rnn = getattr(nn, kind)(64, 128, num_layers=2, batch_first=True, bias=bias)
        self.head = nn.Linear(128, 256)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.rnn(self.emb(tokens))[0])


def recurrent_lm(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return RecurrentLM(kind)


def separable_cnn(seed: int) -> nn.Module:
    """MobileNet-style CNN on 3 x 16 x 16 images: a 3x3 stem, three depthwise-separable blocks
    (depthwise 3x3, groups = channels; pointwise 1x1), BatchNorm + ReLU, a linear head."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()]
    c = 32
    for out in (64, 128, 256):
        layers += [nn.Conv2d(c, c, 3, padding=1, stride=2, groups=c), nn.BatchNorm2d(c),
                   nn.ReLU(), nn.Conv2d(c, out, 1), nn.BatchNorm2d(out), nn.ReLU()]
        c = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)]
    return nn.Sequential(*layers)


def _next_byte_loss(model: nn.Module, batch: Tensor) -> Tensor:
    logits = model(batch[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       batch[:, 1:].reshape(-1))


def encoder(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


# ------------------------------------------------------------------------------ data


def stdlib_text() -> dict[str, Tensor]:
    """Bytes of the standard library's top-level modules: every 10th file (offset 1) is the
    validation split, (offset 2) the test split, the rest train."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    parts: dict[str, list[bytes]] = {"train": [], "valid": [], "test": []}
    for i, path in enumerate(files):
        parts["valid" if i % 10 == 1 else "test" if i % 10 == 2 else "train"].append(path.read_bytes())
    return {k: torch.frombuffer(bytearray(b"\n".join(v)), dtype=torch.uint8).long()
            for k, v in parts.items()}


def windows(data: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``n`` random windows of LENGTH tokens."""
    starts = torch.randint(0, data.numel() - LENGTH, (n,), generator=generator)
    return torch.stack([data[s:s + LENGTH] for s in starts.tolist()])


def eval_loss(model: nn.Module, batches: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        loss = statistics.fmean(float(model(b, labels=b).loss) for b in batches.split(BATCH))
    model.train()
    return loss


# -------------------------------------------------------------------------- coverage


def coverage(model: nn.Module, batch: Callable[[], Tensor], loss: Callable[[nn.Module, Tensor], Tensor]
             ) -> dict:
    """Shares of the trainable parameters in live blocks, dead blocks and on the diagonal,
    after two K-FAC steps (the matrices on the diagonal named); {"error": ...} when the
    optimizer cannot be built for the model."""
    try:
        opt = CASES["kfac-eigen"].make(model, lr=0.0)
    except (ValueError, TypeError) as err:
        return {"error": f"{type(err).__name__}: {err}"}
    for _ in range(2):
        opt.zero_grad()
        loss(model, batch()).backward()
        opt.step()
    trainable = {id(p): (n, p) for n, p in model.named_parameters() if p.requires_grad}
    live = dead = 0
    blocks = {"live": 0, "dead": 0}
    covered = set()
    for layer in opt.layers:
        numel = sum(p.numel() for p in layer.params)
        state = opt.layer_state(layer)
        kind = "live" if "A" in dict(state) else "dead"
        blocks[kind] += 1
        live, dead = (live + numel, dead) if kind == "live" else (live, dead + numel)
        covered.update(id(p) for p in layer.params)
    diagonal = [(n, p) for i, (n, p) in trainable.items() if i not in covered]
    total = sum(p.numel() for _, p in trainable.values())
    return {"total": total, "live": live / total, "dead": dead / total,
            "diagonal": sum(p.numel() for _, p in diagonal) / total, "blocks": blocks,
            "matrices_on_diagonal": [f"{n} {tuple(p.shape)}" for n, p in diagonal if p.dim() >= 2]}


def coverages() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "GPT-2 (2 layers, d=64, 256 bytes)": coverage(
            gpt2(0), lambda: torch.randint(0, 256, (4, LENGTH), generator=g),
            lambda m, b: m(b, labels=b).loss),
        "nn.TransformerEncoder (2 layers, d=64)": coverage(
            encoder(0), lambda: torch.randn(4, 16, 64, generator=g),
            lambda m, x: m(x).square().mean()),
        **{f"{kind} byte LM (2 layers, hidden 128)": coverage(
            recurrent_lm(kind, 0), lambda: torch.randint(0, 256, (4, LENGTH), generator=g),
            _next_byte_loss) for kind in ("LSTM", "GRU")},
        "depthwise-separable CNN (3 blocks, 16x16)": coverage(
            separable_cnn(0), lambda: torch.randn(8, 3, 16, 16, generator=g),
            lambda m, x: nn.functional.cross_entropy(m(x), torch.arange(8) % 10)),
    }


# -------------------------------------------------------------------------- training


def make_optimizer(name: str, model: nn.Module, lr: float):
    """AdamW, or K-FAC (eigen) with KFAC_SETTINGS, at ``lr`` (cases of grng.optim.cases)."""
    if name == "AdamW":
        return CASES["adamw"].make(model, lr=lr)
    return CASES["kfac-eigen"].make(model, lr=lr, **KFAC_SETTINGS)


def train(name: str, lr: float, seed: int, data: dict[str, Tensor], evals: dict[str, Tensor]
          ) -> dict:
    """Validation and test losses after each of STEPS."""
    model = gpt2(seed)
    opt = make_optimizer(name, model, lr)
    g = torch.Generator().manual_seed(1000 + seed)
    out: dict = {"valid": {}, "test": {}}
    for step in range(1, max(STEPS) + 1):
        batch = windows(data["train"], BATCH, g)
        opt.zero_grad()
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        if not torch.isfinite(loss):
            break
        if step in STEPS:
            for split in ("valid", "test"):
                out[split][step] = eval_loss(model, evals[split])
    return out


def training() -> dict:
    data = stdlib_text()
    g = torch.Generator().manual_seed(1234)
    evals = {split: windows(data[split], 4 * BATCH, g) for split in ("valid", "test")}
    results = {}
    for name, grid in GRIDS.items():
        runs = {lr: [train(name, lr, s, data, evals) for s in SEEDS] for lr in grid}
        scores = {lr: _validation_score(seeds) for lr, seeds in runs.items()}
        best = min(grid, key=scores.__getitem__)
        results[name] = {"lr": best, "grid": {str(lr): scores[lr] for lr in grid},
                         "test": {str(k): [r["test"].get(k, float("nan")) for r in runs[best]]
                                  for k in STEPS}}
    results["tokens"] = {k: int(v.numel()) for k, v in data.items()}
    return results


def _validation_score(seeds: list[dict]) -> float:
    """The mean validation loss at the last step over the seeds (inf if a run diverged)."""
    values = [r["valid"].get(max(STEPS), math.inf) for r in seeds]
    return statistics.fmean(values) if all(map(math.isfinite, values)) else math.inf


# -------------------------------------------------------------------------- report


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def measure(with_training: bool = True) -> dict:
    torch.set_num_threads(2)
    return {"commit": _commit(), "grng": grng.__version__, "coverage": coverages(),
            "training": training() if with_training else None,
            "environment": f"Python {platform.python_version()}, torch {torch.__version__}, "
                           f"{platform.processor() or platform.machine()}, "
                           f"{torch.get_num_threads()} threads"}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _mean_sd(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return f"diverged ({len(values) - len(finite)}/{len(values)})"
    return f"{statistics.fmean(finite):.3f} ± {statistics.stdev(finite):.3f}"


def markdown(runs: list[tuple[str, dict]]) -> str:
    lines = ["# Coverage of real architectures (issue 13)", "",
             ("Produced by `bench/coverage.py` (see its docstring for the protocol and how the "
              "\"before\" column was measured)."), ""]
    for label, r in runs:
        lines.append(f"- **{label}**: commit `{r['commit']}` (grng {r['grng']}); {r['environment']}")
    lines += ["", "## Coverage (share of trainable parameters)", "",
              ("| model | run | parameters | Kronecker, live | Kronecker, dead | diagonal | "
               "blocks live / dead | matrices on the diagonal |"),
              "|---|---|---|---|---|---|---|---|"]
    for model in runs[-1][1]["coverage"]:
        for label, r in runs:
            c = r["coverage"].get(model)
            if c is None or "error" in c:
                why = "not measured" if c is None else c["error"].replace("|", "/")
                lines.append(f"| {model} | {label} | | | | | | {why} |")
                continue
            mats = ", ".join(c["matrices_on_diagonal"]) or "none"
            lines.append(f"| {model} | {label} | {c['total']:,} | {_pct(c['live'])} | "
                         f"{_pct(c['dead'])} | {_pct(c['diagonal'])} | {c['blocks']['live']} / "
                         f"{c['blocks']['dead']} | {mats} |")
    if any(r["training"] is None for _, r in runs):
        return "\n".join(lines) + "\n"
    tokens = runs[0][1]["training"]["tokens"]
    lines += ["", (f"## Small GPT-2 on Python standard-library bytes ({BATCH} x {LENGTH} tokens "
                   f"per step; train {tokens['train']:,}, validation {tokens['valid']:,}, test "
                   f"{tokens['test']:,} bytes)"), "",
              (f"Test loss (nats per byte; mean ± sd over seeds {list(SEEDS)}) at each "
               f"optimizer's best learning rate (validation loss at step {max(STEPS)}, grids "
               f"{ {k: list(v) for k, v in GRIDS.items()} }; K-FAC also {KFAC_SETTINGS})."), "",
              "| run | optimizer | lr | " + " | ".join(f"test loss @ {s}" for s in STEPS) + " |",
              "|---|---|---|" + "---|" * len(STEPS)]
    for label, r in runs:
        for name in GRIDS:
            t = r["training"][name]
            losses = " | ".join(_mean_sd(t["test"][str(s)]) for s in STEPS)
            lines.append(f"| {label} | {name} | {t['lr']:g} | {losses} |")
    lines += ["", (f"Validation loss at step {max(STEPS)} (mean over the seeds) for each "
                   "learning rate of the grids:"), "", "| run | optimizer | lr: validation loss |",
              "|---|---|---|"]
    for label, r in runs:
        for name in GRIDS:
            grid = r["training"][name]["grid"]
            cells = ", ".join(f"{lr}: {v:.3f}" if math.isfinite(v) else f"{lr}: diverged"
                              for lr, v in grid.items())
            lines.append(f"| {label} | {name} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write this run's measurements as JSON")
    parser.add_argument("--before", type=Path, help="JSON of a run of an earlier commit")
    parser.add_argument("--out", type=Path, help="write the Markdown report here")
    parser.add_argument("--coverage-only", action="store_true",
                        help="measure the coverage only (no training runs)")
    args = parser.parse_args(argv)
    result = measure(with_training=not args.coverage_only)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    runs = ([("before", json.loads(args.before.read_text()))] if args.before else []) + [
        ("after" if args.before else "this commit", result)]
    text = markdown(runs)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
