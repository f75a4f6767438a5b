"""The cost model (grng/benchmark/costmodel.py) against this machine, and its GPU predictions.

    python bench/costmodel.py [--rounds 3] [--steps 10] [--models small,mlp,transformer]

1. Calibration: this CPU as a device (``measure_cpu``: GEMM rates, copy bandwidth, eigh latency +
   throughput; the cost of one dispatched op fitted to AdamW's step on the first model, the only
   fitted constant), with the ops of each step counted on a real step (``count_ops``), then per
   model of bench/cpu_targets.py the predicted
   K-FAC (library defaults) and AdamW step times beside the measured ones (interleaved rounds, one
   thread; the rates are measured in the same run, so a loaded machine loads both). The issue's
   bar: within 30 %.
2. Predictions: GPT-2 small (bench/models.py, batch 8 x 1024, bf16 autocast forward/backward) on
   H100, H200 and A100 for the 0.3 defaults and the configurations the CUDA defaults are chosen
   among, each with its component table.

Rows of the one benchmark schema (suite ``costmodel``) append to ``bench/results/costmodel.csv``;
``bench/results/costmodel.md`` is rewritten.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_targets  # noqa: E402
import models  # noqa: E402

import grng  # noqa: E402
from grng.benchmark import costmodel as cm  # noqa: E402
from grng.benchmark.schema import Row, append_rows, environment, load_text, run_header  # noqa: E402
from grng.optim import device_defaults  # noqa: E402
from grng.optim.cases import make_optimizer  # noqa: E402

SUITE = "costmodel"
RESULTS = Path(__file__).resolve().parent / "results"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
BAR = 0.30

#: the CUDA defaults (grng.optim.device_defaults.CUDA) as the model sees them: sync-free, and
#: either as CUDA's auto dispatch runs them (cm.dispatched: the kernel flags read off
#: grng.ops.dispatch.AUTO_ORDER["cuda"]), with the reference ops (backend="reference"), or with
#: grng's kernels for the fold (Triton / extension one-triangle fold, masked under the device
#: gate), the update and EKFAC's moment step
_CUDA = dict(inverse=device_defaults.CUDA.inverse, inverse_every=device_defaults.CUDA.inverse_every,
             precision=device_defaults.CUDA.precision,
             factor_every=device_defaults.CUDA.factor_every, sync_free=True)
_KERNELS = dict(fold_kernel=True, fused_update=True, moments_kernel=True)
#: EKFAC's CUDA defaults (grng.optim.device_defaults.EKFAC_CUDA), sync-free
_EKFAC = dict(family="ekfac", iterations=1, qr=device_defaults.EKFAC_CUDA.qr,
              inverse_every=device_defaults.EKFAC_CUDA.inverse_every,
              precision=device_defaults.EKFAC_CUDA.precision,
              factor_every=device_defaults.EKFAC_CUDA.factor_every, sync_free=True)
_E, _C = device_defaults.EKFAC_CUDA, device_defaults.EKFAC_CPU
_EKFAC_NAME = (f"EKFAC CUDA defaults (CholeskyQR3 refresh, {_E.precision}, T={_E.inverse_every}, "
               f"F={_E.factor_every}, sync-free)")


def _as_dispatched(config: cm.StepConfig) -> tuple[str, cm.StepConfig]:
    """A row label's tail and the configuration as CUDA's auto dispatch runs ``config``."""
    cfg = cm.dispatched(config, "cuda")
    on = [flag for flag in cm.KERNEL_OPS if getattr(cfg, flag)]
    what = ("grng's kernels" if len(on) == len(cm.KERNEL_OPS)
            else "reference ops" if not on else f"kernels: {', '.join(on)}")
    return f"as dispatched (AUTO_ORDER['cuda']: {what})", cfg


_CUDA_AUTO = _as_dispatched(cm.StepConfig(**_CUDA))
_EKFAC_AUTO = _as_dispatched(cm.StepConfig(**_EKFAC))

#: the configurations compared on the GPU (name -> StepConfig)
GPU_CONFIGS: dict[str, cm.StepConfig] = {
    "0.3 defaults (eigen, fp32, T=10, F=2), reference ops": cm.StepConfig(),
    f"CUDA defaults (cholesky, tf32, T=20, F=4, sync-free), {_CUDA_AUTO[0]}": _CUDA_AUTO[1],
    "CUDA defaults, reference ops (backend='reference'; the dispatch before)":
        cm.StepConfig(**_CUDA),
    "CUDA defaults, grng's kernels (masked one-triangle fold, fused update)":
        cm.StepConfig(**_CUDA, **_KERNELS),
    "CUDA defaults at F=2 (before), grng's kernels": cm.StepConfig(
        **{**_CUDA, "factor_every": 2}, **_KERNELS),
    "CUDA defaults, grng's kernels, T=40": cm.StepConfig(**{**_CUDA, "inverse_every": 40},
                                                         **_KERNELS),
    "newton 20 its, fp32 (0.3 sync-free newton), reference ops": cm.StepConfig(
        inverse="newton", iterations=20, sync_free=True),
    "newton 3 its warm, tf32, T=20, kernels (does not converge: newton_warmstart.md)":
        cm.StepConfig(inverse="newton", iterations=3, inverse_every=20, precision="tf32",
                      sync_free=True, **_KERNELS),
    "eigen, tf32, T=100, kernels": cm.StepConfig(inverse_every=100, precision="tf32",
                                                 **_KERNELS),
    f"EKFAC at its CPU defaults (Householder QR refresh, fp32, T={_C.inverse_every}, "
    f"F={_C.factor_every}, sync-free), reference ops": cm.StepConfig(
        family="ekfac", iterations=1, inverse_every=_C.inverse_every,
        factor_every=_C.factor_every, sync_free=True),
    "EKFAC before (Householder QR refresh, tf32, T=20, F=2, sync-free), kernels": cm.StepConfig(
        family="ekfac", iterations=1, inverse_every=20, precision="tf32", sync_free=True,
        **_KERNELS),
    f"{_EKFAC_NAME}, {_EKFAC_AUTO[0]}": _EKFAC_AUTO[1],
    "EKFAC CUDA defaults, reference ops (backend='reference'; the dispatch before)":
        cm.StepConfig(**_EKFAC),
    f"{_EKFAC_NAME}, grng's kernels (masked fold and moment step, fused update)":
        cm.StepConfig(**_EKFAC, **_KERNELS),
    "EKFAC CUDA defaults with the Householder QR refresh, kernels": cm.StepConfig(
        **{**_EKFAC, "qr": "householder"}, **_KERNELS),
    "EKFAC CUDA defaults at T=50, kernels": cm.StepConfig(
        **{**_EKFAC, "inverse_every": 50}, **_KERNELS),
}


def shape_of(name: str) -> cm.StepShape:
    """The step shape of a bench/cpu_targets.py model (read on the meta device)."""
    model, sample = cpu_targets.make_model(name)
    x, y = sample(torch.Generator().manual_seed(0))
    return cm.step_shape(lambda: cpu_targets.make_model(name)[0],
                         lambda d: (x.to(d), y.to(d)),
                         lambda m, b: cpu_targets.loss_of(m, *b))


#: one EKFAC basis refresh of one dense d x d factor (the model's refresh term at T = 1): eigh
#: (the first refresh, and the host path's fallback) against one warm-started subspace step
_REFRESH = dict(family="ekfac", inverse_every=1)
REFRESHES: dict[str, cm.StepConfig] = {
    "eigh (the first refresh; the fallback)": cm.StepConfig(**_REFRESH, iterations=0),
    "subspace step, Householder QR, fp32 (the CPU default)": cm.StepConfig(**_REFRESH,
                                                                           iterations=1),
    "subspace step, Householder QR, tf32": cm.StepConfig(**_REFRESH, iterations=1,
                                                         precision="tf32"),
    f"subspace step, CholeskyQR3, {_E.precision} (the CUDA default)": cm.StepConfig(
        **_REFRESH, iterations=1, precision=_E.precision, qr="cholesky"),
}
REFRESH_SIZES = (768, 3072)


def refresh_predictions(device_key: str = "h100") -> dict[str, list[float]]:
    """The predicted ms of one refresh of one dense d x d factor on a device, per way of
    :data:`REFRESHES` (label -> ms per d of :data:`REFRESH_SIZES`)."""
    device = cm.DEVICES[device_key]
    return {label: [1e3 * cm._refresh([(cm.BlockShape("factor", d, d, True, False, 0), d)], cfg,
                                      device).seconds for d in REFRESH_SIZES]
            for label, cfg in REFRESHES.items()}


def refresh_section(device_key: str = "h100") -> list[str]:
    """Markdown lines: :func:`refresh_predictions` as a table (measured on the CPU by
    ``python bench/ekfac.py refresh``)."""
    device = cm.DEVICES[device_key]
    ms = refresh_predictions(device_key)
    eigh = next(iter(ms.values()))
    lines = [f"EKFAC's basis refresh, one dense d x d factor on the {device.name} (the model's "
             "refresh term at T = 1; measured on the CPU in bench/results/ekfac_refresh.md):", "",
             "| refresh | " + " | ".join(f"d = {d} ms | eigh / it" for d in REFRESH_SIZES) + " |",
             "|---|" + "---|---|" * len(REFRESH_SIZES)]
    for label, row in ms.items():
        lines.append(f"| {label} | " + " | ".join(f"{t:.3g} | {e / t:.1f}x"
                                                  for t, e in zip(row, eigh)) + " |")
    return lines + [""]


def gpu_section() -> str:
    """The GPU predictions as markdown (deterministic: no measurement): GPT-2 small on every
    device of the model for every configuration of :data:`GPU_CONFIGS`, and the H100 component
    tables."""
    shape = cm.gpt_shape(*cm.PRESETS["gpt2-small"])
    lines = ["GPT-2 small (bench/models.GPT sizes, tied head), batch 8 x 1024, forward and backward "
             "under bf16 autocast; device rates from data sheets (`grng.benchmark.costmodel.DEVICES`; "
             "eigh assumed until `bench/gpu_check.py` measures it):", "",
             "| device | configuration | ms/step | AdamW ms | x AdamW |", "|---|---|---|---|---|"]
    tables = []
    for key, device in cm.DEVICES.items():
        for label, cfg in GPU_CONFIGS.items():
            pred = cm.predict(shape, cfg, device)
            lines.append(f"| {device.name} | {label} | {pred.seconds * 1e3:.3g} | "
                         f"{pred.adamw_seconds * 1e3:.3g} | {pred.ratio:.2f} |")
            if key == "h100":
                tables.append(f"#### {label}\n\n{cm.table(pred)}\n")
    return "\n".join(lines + ["", *refresh_section(), "Component tables on the H100:", "",
                              *tables]).rstrip() + "\n"


BEGIN, END = "<!-- costmodel:begin (bench/costmodel.py) -->", "<!-- costmodel:end -->"
PREDICTIONS = "## Predictions (also in docs/performance.md)"


def write_docs(path: Path, section: str) -> None:
    """Replace the marked block of docs/performance.md with ``section``."""
    text = path.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    path.write_text(f"{head}{BEGIN}\n{section}{END}{tail}")


def counted_ops(name: str, steps: int = 20) -> dict[str, float]:
    """Aten ops of one optimizer step (K-FAC defaults, AdamW) on the model, over ``steps``."""
    out = {}
    for opt_name, case in (("kfac", "kfac-eigen"), ("adamw", "adamw")):
        torch.manual_seed(0)
        model, sample = cpu_targets.make_model(name)
        g = torch.Generator().manual_seed(1)
        batches = [sample(g) for _ in range(4)]
        opt = make_optimizer(case, model)
        out[opt_name] = cm.count_ops(model, opt, lambda i: cpu_targets.loss_of(
            model, *batches[i % len(batches)]), steps)[1]
        getattr(opt, "capture", None) and opt.capture.remove()
    return out


def measure_steps(name: str, rounds: int, steps: int) -> dict[str, float]:
    """Median over rounds of the mean step time (s) of K-FAC (defaults) and AdamW, interleaved."""
    torch.manual_seed(0)
    base, sample = cpu_targets.make_model(name)
    g = torch.Generator().manual_seed(1)
    batches = [sample(g) for _ in range(4)]
    runs = {}
    for opt_name, case in (("kfac", "kfac-eigen"), ("adamw", "adamw")):
        model, _ = cpu_targets.make_model(name)
        model.load_state_dict(base.state_dict())
        runs[opt_name] = (model, make_optimizer(case, model))
    times: dict[str, list[float]] = {k: [] for k in runs}

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
        x, y = batches[i % len(batches)]
        opt.zero_grad()
        cpu_targets.loss_of(model, x, y).backward()
        opt.step()

    for model, opt in runs.values():
        for i in range(10):
            step(model, opt, i)
    for _ in range(rounds):
        for k, (model, opt) in runs.items():
            t = time.perf_counter()
            for i in range(steps):
                step(model, opt, i)
            times[k].append((time.perf_counter() - t) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def cpu_config() -> cm.StepConfig:
    """K-FAC's library defaults as the model sees them on the CPU (the ext fused update takes a
    param group's tensors in one call; the ext fold updates block rows of the upper triangle)."""
    opt = make_optimizer("kfac-eigen", torch.nn.Linear(2, 2))
    try:
        return cm.StepConfig(factor_every=opt.factor_every, inverse_every=opt.inverse_every,
                             fused_update=True, fold_kernel=True)
    finally:
        opt.capture.remove()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="small,mlp,transformer")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--predictions-only", action="store_true",
                    help="regenerate the GPU predictions (docs/performance.md and the "
                         "predictions section of costmodel.md) and keep the recorded CPU "
                         "calibration (for a machine too loaded to calibrate on)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.predictions_only:
        section = gpu_section()
        write_docs(DOCS, section)
        md = args.out / f"{SUITE}.md"
        head, sep, _ = md.read_text().partition(PREDICTIONS)
        if not sep:
            raise SystemExit(f"{md} has no {PREDICTIONS!r} section: run without --predictions-only")
        md.write_text(f"{head}{PREDICTIONS}\n\n{section}")
        print(section)
        return 0
    env = environment()
    load0, t0 = os.getloadavg(), time.time()
    cpu = cm.measure_cpu()
    config = cpu_config()
    names = args.models.split(",")
    measured = {name: (shape_of(name), counted_ops(name), measure_steps(name, args.rounds, args.steps))
                for name in names}
    # the one fitted constant: the cost of a dispatched op in a real step (Python, dispatch,
    # allocation; more than the bare op measure_cpu times), from AdamW's step on the first
    # model, where that overhead dominates; every K-FAC row and the other AdamW rows are checks
    shape, ops, got = measured[names[0]]
    bare = cm.predict(shape, config, replace(cpu, launch_us=0.0), optimizer_ops=ops["kfac"],
                      adamw_ops=ops["adamw"])
    launches = shape.fwd_bwd_ops + ops["adamw"]
    cpu = replace(cpu, launch_us=max(cpu.launch_us, (got["adamw"] - bare.adamw_seconds)
                                     / launches * 1e6))
    rows: list[Row] = []
    cal = ["| model | K-FAC predicted ms | measured ms | error | AdamW predicted ms | measured ms | "
           "error | x AdamW predicted | measured |", "|---|---|---|---|---|---|---|---|---|"]
    worst = 0.0
    for name in names:
        shape, ops, got = measured[name]
        pred = cm.predict(shape, config, cpu, optimizer_ops=ops["kfac"], adamw_ops=ops["adamw"])
        err_k = pred.seconds / got["kfac"] - 1.0
        err_a = pred.adamw_seconds / got["adamw"] - 1.0
        worst = max(worst, abs(err_k), abs(err_a))
        cal.append(f"| {name} | {pred.seconds * 1e3:.3g} | {got['kfac'] * 1e3:.3g} | {err_k:+.0%} | "
                   f"{pred.adamw_seconds * 1e3:.3g} | {got['adamw'] * 1e3:.3g} | {err_a:+.0%} | "
                   f"{pred.ratio:.2f} | {got['kfac'] / got['adamw']:.2f} |")
        for opt_name, p, m in (("kfac", pred.seconds, got["kfac"]),
                               ("adamw", pred.adamw_seconds, got["adamw"])):
            for provider, value in (("predicted", p), ("measured", m)):
                rows.append(Row(suite=SUITE, name=opt_name, provider=provider, metric="full_step",
                                unit="ms", x_name="model", x_value=name, p50=value * 1e3,
                                n=args.rounds, config="cpu calibration", **env))
    load1 = os.getloadavg()
    section = gpu_section()
    shape = cm.gpt_shape(*cm.PRESETS["gpt2-small"])
    for dev_key, device in cm.DEVICES.items():
        for label, cfg in GPU_CONFIGS.items():
            rows.append(Row(suite=SUITE, name=cfg.family, provider="predicted",
                            metric="step_vs_adamw", unit="x", x_name="device", x_value=dev_key,
                            p50=cm.predict(shape, cfg, device).ratio,
                            config=f"gpt2-small {label}", **env))
    write_docs(DOCS, section)
    args.out.mkdir(parents=True, exist_ok=True)
    append_rows(args.out / f"{SUITE}.csv", rows)
    c = cpu
    lines = ["# The cost model against this machine, and its GPU predictions "
             "(`python bench/costmodel.py`)", "",
             "Written by the script (module docstring).", "",
             *(f"- {k}: {v}" for k, v in {**run_header(1), "grng": grng.__version__}.items()),
             f"- {load_text(load0, load1)}; {args.rounds} rounds of {args.steps} steps; "
             f"wall {time.time() - t0:.0f} s",
             f"- this CPU as measured: fp32 {c.tflops['fp32'] * 1e3:.3g} GFLOP/s, fp64 "
             f"{c.tflops['fp64'] * 1e3:.3g}, bf16 {c.tflops['bf16'] * 1e3:.3g}; copy "
             f"{c.bandwidth_gbs:.3g} GB/s; {c.launch_us:.3g} us per dispatched op (fitted to "
             f"AdamW's step on {names[0]}: the one fitted constant); eigh "
             f"{c.eigh_latency_ms:.3g} ms + 9 n^3 at {c.eigh_tflops * 1e3:.3g} GFLOP/s", "",
             f"## CPU calibration (K-FAC at the library defaults; bar: within {BAR:.0%})", "",
             *cal, "", f"Largest error: {worst:.0%} ({'within' if worst <= BAR else 'OUTSIDE'} "
             f"the bar).", "",
             PREDICTIONS, "", section]
    (args.out / f"{SUITE}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
