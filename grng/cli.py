"""The ``grng`` command (also ``python -m grng``): ``grng verify`` and ``grng bench``.

``grng verify`` checks every registered op on every live backend of this machine against the
float64 reference (the rule is in :mod:`grng.verify.checks`) and one K-FAC, RING and R-Kalman
step per backend; it prints a table (or ``--json``) and exits 1 on any failure, and 2 when
nothing was verified (no backend but the reference was checked: the reference against itself).
``grng bench`` times the ops (:mod:`grng.benchmark.kernels`) and appends the rows to a CSV of
the one benchmark schema (:mod:`grng.benchmark.schema`); ``--plot`` draws a CSV's rows and
``--compare`` prints new / old per matching row of two CSVs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from grng.verify import Check

# verify --quick: sizes, and the largest size the Triton CPU interpreter gets
QUICK_SIZES = (1, 33, 123)
QUICK_INTERPRETER_MAX_N = 40
QUICK_VARIANTS = ("contiguous", "strided")
BENCH_SIZES = {"cpu": (128, 256, 512), "cuda": (1024, 2048, 4096, 8192)}
BENCH_QUICK_SIZES = {"cpu": (64, 123), "cuda": (1024, 4096)}
# exit status of `grng verify` when no fast backend was checked (1 is "a check failed")
NOTHING_VERIFIED = 2


def _csv_list(text: str | None) -> list[str] | None:
    return None if text is None else [t for t in text.split(",") if t]


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_device(parser: argparse.ArgumentParser, device: str) -> None:
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: no CUDA device here")


def _interpret_triton_on_cpu(device: str) -> None:
    """On a machine without CUDA, let Triton's interpreter run the kernels on CPU tensors.

    Must happen before ``grng.kernels`` (and triton.jit) is first imported; a user's explicit
    TRITON_INTERPRET setting wins.
    """
    if (torch.device(device).type == "cpu" and not torch.cuda.is_available()
            and "TRITON_INTERPRET" not in os.environ and "grng.kernels" not in sys.modules):
        os.environ["TRITON_INTERPRET"] = "1"


class _Progress:
    """A progress bar on stderr: tqdm when installed, else a plain counter."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.bar = total, 0, None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, file=sys.stderr, unit="check", leave=False)

    def __call__(self, row: Check) -> None:
        self.done += 1
        if not self.enabled:
            return
        label = f"{row.op} {row.backend} {row.dtype} {row.shape}"
        if self.bar is not None:
            self.bar.set_description_str(label[:40])
            self.bar.update(1)
        else:
            sys.stderr.write(f"\r[{self.done}/{self.total}] {label[:60]:60s}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\r" + " " * 80 + "\r")
            sys.stderr.flush()


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else f"{x:.2e}"


def format_checks(rows: Sequence[Check]) -> str:
    """The table of run checks, then the skipped ones grouped by reason."""
    run = [r for r in rows if r.passed is not None]
    header = ("op", "backend", "dtype", "shape", "error", "ref error", "ratio", "verdict")
    body = [(r.op, r.backend, r.dtype, r.shape, _fmt(r.error), _fmt(r.ref_error),
             "-" if r.ratio is None else ("inf" if math.isinf(r.ratio) else f"{r.ratio:.2f}"),
             r.verdict) for r in run]
    widths = [max(len(c) for c in col) for col in zip(header, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in (header, *body)]
    for r in run:
        if r.passed is False:
            lines.append(f"FAIL {r.op} {r.backend} {r.dtype} {r.shape}: {r.note}")
    skipped = Counter((r.backend, r.op, r.dtype, r.note.split(" (")[0]) for r in rows if r.passed is None)
    for (backend, op, dtype, note), count in sorted(skipped.items()):
        lines.append(f"skipped {count} {backend} {op} {dtype}: {note}")
    return "\n".join(lines)


def cmd_verify(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run the checks; print the table or JSON; 1 if any check failed, else 0."""
    _check_device(parser, ns.device)
    _interpret_triton_on_cpu(ns.device)
    if torch.device(ns.device).type == "cpu":
        # the problems are small: one intra-op thread is fastest and keeps a busy machine from
        # slowing the checks down tenfold (they are checks, not timings)
        torch.set_num_threads(1)
    import grng
    from grng import verify
    from grng.ops import dispatch, registry

    live, not_live = verify.live_backends(ns.device)
    backends = _csv_list(ns.backend)
    if backends is not None:
        for b in backends:
            try:
                dispatch.validate_backend(b)
            except ValueError as err:
                parser.error(f"--backend: {err}")
        missing = [b for b in backends if b not in live]
        for b in missing:
            print(f"{b}: not live: {not_live.get(b, 'not a checkable backend')}", file=sys.stderr)
        if missing:
            return 1
    names = _csv_list(ns.ops)
    if names is not None:
        unknown = sorted(set(names) - set(registry.SPECS) - set(verify.STEP_CHECKS))
        if unknown:
            parser.error(f"--ops: unknown {unknown}; choose from {sorted(registry.SPECS)} "
                         f"and {list(verify.STEP_CHECKS)}")
    ops = None if names is None else [n for n in names if n in registry.SPECS]
    steps = verify.STEP_CHECKS if names is None else tuple(n for n in names if n in verify.STEP_CHECKS)
    sizes = [int(s) for s in ns.sizes.split(",")] if ns.sizes else (QUICK_SIZES if ns.quick else verify.SIZES)
    dtypes = _csv_list(ns.dtypes) or (("float32", "bfloat16") if ns.quick else verify.DTYPES)
    variants = QUICK_VARIANTS if ns.quick else None
    chosen = backends or live
    cases = verify.plan(ns.device, chosen, dtypes, sizes, ops, variants)
    progress = _Progress(len(cases) + len(steps) * len(chosen), enabled=not ns.no_progress)
    start = time.monotonic()
    deadline = None if ns.time_budget is None else start + ns.time_budget
    try:
        rows = verify.check_ops(ns.device, chosen, dtypes, sizes, ops, ns.seed, deadline,
                                variants=variants, progress=progress,
                                interpreter_max_n=QUICK_INTERPRETER_MAX_N if ns.quick else None)
        rows += verify.check_steps(ns.device, chosen, ns.seed, deadline, steps=steps,
                                   progress=progress)
    finally:
        progress.close()
    elapsed = time.monotonic() - start
    counts = Counter(r.verdict for r in rows)
    summary = (f"{len(rows)} checks on {ns.device} in {elapsed:.1f} s: {counts['pass']} pass, "
               f"{counts['FAIL']} FAIL, {counts['skip']} skipped")
    verified = sorted({r.backend for r in rows if r.passed is not None} - {"reference"})
    nothing = None if verified else nothing_verified(ns.device, not_live)
    if ns.json:
        json.dump({"device": ns.device, "seed": ns.seed, "backends": grng.backends(),
                   "not_live": {b: why for b, why in not_live.items() if backends is None},
                   "checks": [r.as_dict() for r in rows], "summary": dict(counts),
                   "verified_backends": verified, "nothing_verified": nothing,
                   "seconds": round(elapsed, 2)}, sys.stdout, indent=1)
        print()
    else:
        if backends is None:
            for b, why in not_live.items():
                print(f"{b}: not checked: {why}")
        print(format_checks(rows))
        print(summary)
        if nothing:
            print(nothing)
    return 1 if counts["FAIL"] else NOTHING_VERIFIED if nothing else 0


def nothing_verified(device: str, not_live: dict[str, str]) -> str:
    """The line `grng verify` ends with when no backend but the reference ran a check."""
    why = "; ".join(f"{b}: {reason}" for b, reason in not_live.items())
    return (f"NOTHING VERIFIED on {device}: no backend other than the reference ran a check (the "
            f"reference was compared with its own float64 run, which tests no fast kernel)"
            + (f"; {why}" if why else "") + f". Exit status {NOTHING_VERIFIED}.")


def cmd_bench(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Time the ops, append the rows to ``--csv``; or ``--plot`` / ``--compare`` CSVs."""
    from grng.benchmark import schema

    if ns.plot:
        from grng.benchmark.plot import plot

        rows = [r for path in ns.plot for r in schema.read_rows(path)]
        out = ns.out or os.path.splitext(ns.plot[0])[0] + ".png"
        panels = plot(rows, out)
        print(f"wrote {out} ({panels} panels from {len(rows)} rows)")
        return 0
    if ns.predict:
        return _predict(ns, parser)
    if ns.compare:
        from grng.benchmark.compare import compare, format_pairs

        pairs = compare(schema.read_rows(ns.compare[0]), schema.read_rows(ns.compare[1]))
        if not pairs:
            print("no matching rows")
            return 1
        print(format_pairs(pairs))
        return 0
    _check_device(parser, ns.device)
    from grng.benchmark import contention, kernels
    from grng.ops import dispatch, registry

    if torch.device(ns.device).type == "cuda" and dispatch.interpreter_enabled():
        parser.error("TRITON_INTERPRET=1 on a CUDA run: unset it to time the real kernels")
    ops = _csv_list(ns.ops)
    for op in ops or []:
        if op not in registry.SPECS:
            parser.error(f"--ops: unknown {op!r}; choose from {sorted(registry.SPECS)}")
    if ns.threads is not None:
        if ns.threads < 1:
            parser.error(f"--threads must be >= 1, got {ns.threads}")
        torch.set_num_threads(ns.threads)
    kind = torch.device(ns.device).type
    sizes = ([int(s) for s in ns.sizes.split(",")] if ns.sizes
             else (BENCH_QUICK_SIZES if ns.quick else BENCH_SIZES).get(kind, BENCH_SIZES["cpu"]))
    dtypes = _csv_list(ns.dtypes) or (["float32"] if ns.quick else ["float32", "bfloat16"])
    status = dispatch.backends()  # imports the backends, so their implementations are registered
    providers = _csv_list(ns.providers) or [b for b, s in status.items() if s.startswith("live")]
    if ops is None:  # the ops some chosen backend besides the reference implements itself
        ops = [op for op in registry.SPECS
               if any(dispatch.implementation(op, p) is not None for p in providers if p != "reference")]
        ops = ops or None
    reps = ns.reps or (10 if ns.quick else 25)
    deadline = None if ns.time_budget is None else time.monotonic() + ns.time_budget
    print(f"backends: {status}")
    flags = [] if kind != "cpu" else contention.check(torch.get_num_threads())
    for line in flags:
        print(line)
    rows = kernels.run(ns.device, providers, sizes, dtypes, ops, deadline, warmup=3, reps=reps,
                       seed=ns.seed, log=print)
    n = schema.append_rows(ns.csv, rows)
    for line in flags:  # again at the end, next to the numbers it concerns
        print(line)
    print(f"appended {n} rows to {ns.csv}")
    return 0


def _predict(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Print the cost model's component table of one step (and AdamW's) for a preset model."""
    from grng.benchmark import costmodel

    device = costmodel.DEVICES.get(ns.predict)
    if device is None:
        parser.error(f"--predict: unknown device {ns.predict!r}; choose from {sorted(costmodel.DEVICES)}")
    if ns.model not in costmodel.PRESETS:
        parser.error(f"--model: unknown {ns.model!r}; choose from {sorted(costmodel.PRESETS)}")
    try:
        config = costmodel.parse_config(ns.config)
    except (ValueError, TypeError) as err:
        parser.error(f"--config: {err}")
    shape = costmodel.gpt_shape(*costmodel.PRESETS[ns.model])
    print(f"{ns.model}, bf16 autocast forward/backward; device rates: {device.source}")
    print(costmodel.table(costmodel.predict(shape, config, device)))
    return 0



def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``grng`` (subcommands verify and bench)."""
    parser = argparse.ArgumentParser(prog="grng", description="grng's kernels on this machine: "
                                     "verify them against the float64 reference, or time them.")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check every op on every live backend against the reference",
                       description="Exit status: 0 all checks passed, 1 a check failed, "
                                   f"{NOTHING_VERIFIED} nothing verified (only the reference ran).")
    v.add_argument("--device", default=_default_device(), help="cpu or cuda (default: cuda if present)")
    v.add_argument("--backend", help="comma-separated backends (default: every live one)")
    v.add_argument("--ops", help="comma-separated ops and step checks (default: all)")
    v.add_argument("--quick", action="store_true",
                   help="sizes 1, 33, 123; fp32 and bf16; two layouts; Triton's CPU interpreter <= 40")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--sizes", help="comma-separated sizes n (default 1,123,769)")
    v.add_argument("--dtypes", help="comma-separated dtypes (default float32,bfloat16,float64)")
    v.add_argument("--time-budget", type=float, help="seconds; checks after that are skipped")
    v.add_argument("--json", action="store_true", help="print JSON instead of the table")
    v.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    b = sub.add_parser("bench", help="time the ops; append the rows to a CSV; plot or compare CSVs")
    b.add_argument("--device", default=_default_device())
    b.add_argument("--providers", help="comma-separated backends (default: every live one)")
    b.add_argument("--ops", help="comma-separated ops (default: those a chosen provider other than "
                   "the reference implements; all with --providers reference)")
    b.add_argument("--sizes", help="comma-separated sizes n (default by device)")
    b.add_argument("--dtypes", help="comma-separated dtypes (default float32,bfloat16)")
    b.add_argument("--quick", action="store_true", help="two small sizes, float32, 10 repetitions")
    b.add_argument("--reps", type=int, help="timed calls per measurement (default 25)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--time-budget", type=float, help="seconds; measurements after that are skipped")
    b.add_argument("--threads", type=int, help="CPU intra-op threads (default: torch's; recorded in "
                   "the rows' device cell)")
    b.add_argument("--csv", default="grng-bench.csv", help="CSV the rows are appended to")
    b.add_argument("--plot", nargs="+", metavar="CSV", help="draw these CSVs' rows to a PNG")
    b.add_argument("--out", help="PNG path for --plot (default: the first CSV's name .png)")
    b.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="new / old per matching row")
    b.add_argument("--predict", metavar="DEVICE", help="print the cost model's prediction of one "
                   "step on DEVICE (h100, h200, a100) instead of timing (docs/performance.md)")
    b.add_argument("--model", default="gpt2-small", help="--predict's model preset (gpt2-small, "
                   "gpt2-medium)")
    b.add_argument("--config", help="--predict's optimizer configuration, key=value,... (family, "
                   "inverse, factor_every, inverse_every, iterations, precision, fused_update)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``grng`` and ``python -m grng``; returns the exit status."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command == "verify":
        return cmd_verify(ns, parser)
    return cmd_bench(ns, parser)
