"""A cost model of one optimizer step (docs/performance.md, "The cost model as code").

Every component of a step is counted as (FLOPs, bytes moved, kernel launches) from the model's
Kronecker blocks and the optimizer's configuration, and turned into time on a device by

    t = launches * overhead + max(FLOPs / rate(precision), bytes / bandwidth),

one roofline per component (eigh: a calibrated latency + throughput per call, since it runs at a
few percent of peak and is not batched on CUDA above n = 32). AdamW's step is modelled the same
way, so a prediction is always a ratio against AdamW on the same forward and backward.

- :class:`Device`: rates as data (:data:`DEVICES`: H100 SXM, H200, A100 SXM from their data
  sheets, with the achieved fraction of peak an assumption until ``bench/gpu_check.py`` measures
  it), or measured on this machine (:func:`measure_cpu`).
- :class:`StepShape`: what a step touches, read off a model by running one forward and backward
  on the ``meta`` device (no memory, no arithmetic): blocks (d_A, d_G, dense sides, rows m),
  parameter counts, forward + backward FLOPs (torch's FlopCounterMode) and aten op count.
- :class:`StepConfig`: the optimizer's configuration (family, inverse, F, T, precision, ...).
- :func:`predict`: component -> :class:`Cost`; :func:`table` prints it beside AdamW's.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from grng.ops.dispatch import AUTO_ORDER

#: bytes per element of a precision's operands
ELEMENT_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp64": 8}


@dataclass(frozen=True)
class Device:
    """Achieved rates of one device: TFLOP/s per precision (GEMM-class work), GB/s of memory,
    microseconds of fixed cost per launched op, and eigh as latency + 9 n^3 / eigh_rate."""

    name: str
    tflops: dict[str, float]
    bandwidth_gbs: float
    launch_us: float
    eigh_latency_ms: float
    eigh_tflops: float
    source: str = ""
    #: AdamW's step as torch runs it here: multi-tensor (foreach, CUDA's default) or a loop of
    #: about 12 ops per parameter tensor (the CPU's default)
    adamw_foreach: bool = True
    #: the local fold batches equal-shape factors whose rows have at most this many elements
    #: (None: grng.distributed.plan.FOLD_BATCH_MAX_ELEMENTS; a CPU: FOLD_BATCH_MAX_ELEMENTS_CPU)
    fold_batch_max_elements: int | None = None

    def rate(self, precision: str) -> float:
        """FLOP/s at ``precision`` (fp32, tf32, bf16, fp64)."""
        return self.tflops[precision] * 1e12

    def eigh_seconds(self, n: int) -> float:
        """One symmetric eigendecomposition of an n x n matrix (latency + throughput)."""
        return self.eigh_latency_ms * 1e-3 + 9.0 * float(n) ** 3 / (self.eigh_tflops * 1e12)


def _gpu(name: str, fp32: float, tf32: float, bf16: float, fp64: float, hbm: float,
         eigh_tflops: float, source: str) -> Device:
    """A GPU from its data-sheet peaks: GEMMs at 70 % of peak (SIMT fp32/fp64) and 60 % (tensor
    cores), memory at 85 % of peak, 6 us per eager launch, eigh 3 ms + 9 n^3 at a few % of peak."""
    return Device(name, {"fp32": 0.7 * fp32, "tf32": 0.6 * tf32, "bf16": 0.6 * bf16,
                         "fp64": 0.7 * fp64}, 0.85 * hbm, 6.0, 3.0, eigh_tflops, source)


#: data-sheet peaks (dense, TFLOP/s; GB/s): fp32 SIMT, tf32 / bf16 tensor cores, fp64 tensor.
#: eigh_tflops: 9 n^3 per second of cuSOLVER syevd at n = 768-3072 (about 3 % of fp32 peak:
#: the figure behind the 0.3 roofline of issue 22), an assumption until gpu_check measures it.
DEVICES: dict[str, Device] = {
    "h100": _gpu("H100 SXM", 67.0, 495.0, 989.0, 67.0, 3350.0, 2.0,
                 "NVIDIA H100 SXM data sheet; eigh assumed"),
    "h200": _gpu("H200", 67.0, 495.0, 989.0, 67.0, 4800.0, 2.0,
                 "NVIDIA H200 data sheet; eigh assumed"),
    "a100": _gpu("A100 SXM", 19.5, 156.0, 312.0, 19.5, 2039.0, 0.8,
                 "NVIDIA A100 SXM data sheet; eigh assumed"),
}


@dataclass(frozen=True)
class BlockShape:
    """One Kronecker block: side sizes, which sides are dense, rows m folded per capture."""

    name: str
    d_a: int
    d_g: int
    a_dense: bool
    g_dense: bool
    rows: int

    def dense_sides(self) -> list[int]:
        """Sizes of the dense (d x d) factors of the block."""
        return [d for d, dense in ((self.d_a, self.a_dense), (self.d_g, self.g_dense)) if dense]


@dataclass(frozen=True)
class StepShape:
    """What one training step touches: blocks, parameters (P in all, those on the diagonal
    fallback), forward + backward FLOPs and aten ops, and the element size of the model."""

    blocks: tuple[BlockShape, ...]
    params: int
    diagonal_params: int
    tensors: int
    fwd_bwd_flops: float
    fwd_bwd_ops: int
    model_precision: str = "fp32"
    #: parameter tensors on the diagonal fallback (each a unit of its own); 0: unknown, taken as
    #: every tensor outside the blocks' weights
    diagonal_tensors: int = 0


@dataclass(frozen=True)
class StepConfig:
    """An optimizer configuration as the model sees it. ``family``: adamw, kfac, ring, reng,
    rkalman, ekfac; ``inverse``: eigen, newton, cholesky; ``iterations``: Newton-Schulz steps per
    refresh; ``precision``: of the optimizer's GEMMs (fp32, tf32, bf16); ``fused_update``: one
    multi-tensor launch for the update (else the reference's ops per parameter);
    ``fold_kernel``: the fold through grng's one-triangle kernel (Triton ``sym_update`` or the
    extension; under the device gate its masked form, written only where ok) instead of the
    reference (a full X^T X GEMM, then passes that mirror, blend and, under the device gate,
    copy and select); :func:`dispatched` sets these kernel flags from what a device type's auto
    dispatch runs (``grng.ops.dispatch.AUTO_ORDER``);
    ``batched``: equal-shape blocks share one launch (the fold: where the rows are small,
    ``grng.distributed.plan.FOLD_BATCH_MAX_ELEMENTS``); ``kalman_rank``: R-Kalman's k;
    ``sync_free``: the device gate (the CUDA default): the copies it keeps and selects back
    (statistics the communicator does not fold in place where ok, the state of the blocks due,
    per-step fields); ``qr``: EKFAC's orthonormalization in its subspace refresh (householder:
    geqrf + orgqr; cholesky: shifted CholeskyQR3 in float64, GEMMs); ``moments_kernel``:
    EKFAC's masked moment step through grng's kernel (``adam_moments_masked``, Triton or the
    extension: one launch) instead of the reference's elementwise ops."""

    family: str = "kfac"
    inverse: str = "eigen"
    factor_every: int = 2
    inverse_every: int = 10
    iterations: int = 20
    precision: str = "fp32"
    fused_update: bool = False
    fold_kernel: bool = False
    batched: bool = True
    kalman_rank: int = 64
    sync_free: bool = False
    qr: str = "householder"
    moments_kernel: bool = False


#: the kernel flags of :class:`StepConfig` -> the op each charges as grng's kernel (the host
#: gate's, the device gate's): a flag is on where ``backend="auto"`` lists a backend for it
KERNEL_OPS: dict[str, tuple[str, str]] = {
    "fold_kernel": ("factor_update", "factor_update_masked"),
    "fused_update": ("fused_update", "fused_update_masked"),
    "moments_kernel": ("adam_moments_masked", "adam_moments_masked"),
}


def dispatched(config: StepConfig, device_type: str = "cuda") -> StepConfig:
    """``config`` with its kernel flags as ``backend="auto"`` runs it on ``device_type``: a flag
    is on where ``grng.ops.dispatch.AUTO_ORDER[device_type]`` lists a backend for its op (the
    masked one under the device gate), so an "as dispatched" prediction follows that table."""
    order = AUTO_ORDER.get(device_type, {})
    flags = {flag: bool(order.get(ops[1] if config.sync_free else ops[0]))
             for flag, ops in KERNEL_OPS.items()}
    return replace(config, **flags)


@dataclass
class Cost:
    """Work of one component per step (amortized over F and T) and its predicted time."""

    flops: float = 0.0
    bytes: float = 0.0
    launches: float = 0.0
    seconds: float = 0.0
    note: str = ""


@dataclass
class Prediction:
    """Component -> cost of one step, the total, and AdamW's total on the same model."""

    device: str
    config: StepConfig
    components: dict[str, Cost] = field(default_factory=dict)
    adamw: dict[str, Cost] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.components.values())

    @property
    def adamw_seconds(self) -> float:
        return sum(c.seconds for c in self.adamw.values())

    @property
    def ratio(self) -> float:
        """Predicted step time over AdamW's."""
        return self.seconds / self.adamw_seconds


def _time(device: Device, cost: Cost, precision: str) -> Cost:
    """Fill ``cost.seconds``: launches * overhead + max(FLOPs / rate, bytes / bandwidth)."""
    compute = cost.flops / device.rate(precision) if cost.flops else 0.0
    memory = cost.bytes / (device.bandwidth_gbs * 1e9) if cost.bytes else 0.0
    cost.seconds = cost.launches * device.launch_us * 1e-6 + max(compute, memory)
    return cost


def _groups(sizes: Sequence[int], batched: bool) -> int:
    """Launches for ops over ``sizes``: one per distinct size when batched, else one each."""
    return len(set(sizes)) if batched else len(sizes)


def _common(shape: StepShape, device: Device) -> Cost:
    """Forward + backward: FLOPs at the model's precision, one launch per aten op."""
    cost = Cost(shape.fwd_bwd_flops, 0.0, shape.fwd_bwd_ops)
    return _time(device, cost, shape.model_precision)


def predict(shape: StepShape, config: StepConfig, device: Device,
            optimizer_ops: float | None = None, adamw_ops: float | None = None) -> Prediction:
    """Per component of ``config``'s step on ``shape``: FLOPs, bytes, launches and seconds,
    every term amortized per step (folds over F, refreshes over T); AdamW's beside it.
    ``optimizer_ops`` (ops of one optimizer step as counted by :func:`count_ops`) replaces the
    modelled launches of the optimizer's components by one "dispatch" component; ``adamw_ops``
    likewise AdamW's step's."""
    out = Prediction(device.name, config)
    P = shape.params
    out.adamw["forward+backward"] = _common(shape, device)
    # AdamW (foreach): ~15 FLOPs / element; reads p, g, m, v and writes p, m, v (fp32 state)
    adamw_launches = 5.0 * math.ceil(shape.tensors / 64) if device.adamw_foreach else 12.0 * shape.tensors
    out.adamw["update"] = _time(device, Cost(15.0 * P, 28.0 * P, adamw_launches if adamw_ops is None
                                             else adamw_ops), "fp32")
    c = out.components
    c["forward+backward"] = _common(shape, device)
    if config.family == "adamw":
        c["update"] = out.adamw["update"]
        return out
    F, T, p = config.factor_every, config.inverse_every, config.precision
    eb = ELEMENT_BYTES[p]
    blocks = shape.blocks
    rows_elems = sum(b.rows * (b.d_a + b.d_g) for b in blocks)
    # captured rows: the bias column appended to A (a copy of the A rows), on capturing steps
    c["capture"] = _time(device, Cost(0.0, 2.0 * 4 * sum(b.rows * b.d_a for b in blocks) / F,
                                      2.0 * len(blocks) / F), "fp32")
    # one finite check over gradients, loss and the captured rows
    c["checks"] = _time(device, Cost(P + rows_elems / F, 4.0 * (P + rows_elems / F),
                                     3.0 + 2.0 * len(blocks) / F), "fp32")
    dense = [(b, d) for b in blocks for d in b.dense_sides()]
    if config.family == "rkalman":
        k = config.kalman_rank
        fl = sum(2.0 * k * b.rows * d + 3.0 * d * d * k + 2.0 * k * k * d + k ** 3 / 3.0
                 for b, d in dense)
        by = sum(4.0 * (b.rows * d + 3 * d * d + k * d) for b, d in dense)
        c["fold"] = _time(device, Cost(fl / F, by / F, 8.0 * len(dense) / F), p)
    else:
        c["fold"], passes = _fold(dense, config, device)
        if passes is not None:
            c["fold passes"] = passes
    c["refresh"] = _refresh(dense, config, device)
    if config.family == "ekfac":
        c["reproject"] = _reproject(blocks, config, device)
    c["apply"] = _apply(blocks, config, device)
    if config.family == "ekfac":
        c["moments"] = _moments(blocks, config, device)
    Pd = shape.diagonal_params
    # multi-tensor fold (3 ops) and apply (2 ops) per (device, dtype): grng.precondition.diagonal
    c["diagonal"] = _time(device, Cost(6.0 * Pd, 4.0 * 4 * Pd, 5.0), "fp32")
    if config.sync_free:
        c["gate"] = _gate(shape, dense, config, device)
    # the reference's masked update: 20 ops plus 15 per parameter (momentum and weight decay),
    # counted by grng.benchmark.costmodel.count_ops-style dispatch counting
    launches = 2.0 if config.fused_update else UPDATE_OPS[0] + UPDATE_OPS[1] * shape.tensors
    c["update"] = _time(device, Cost(10.0 * P, 4.0 * 6 * P, launches), "fp32")
    if config.family == "reng":  # a second forward and backward (finite differences)
        c["probe pass"] = _common(shape, device)
    if optimizer_ops is not None:
        for name, cost in c.items():
            if name not in ("forward+backward", "probe pass") and cost.launches:
                cost.seconds -= cost.launches * device.launch_us * 1e-6
                cost.launches = 0.0
        c["dispatch (counted ops)"] = Cost(0.0, 0.0, optimizer_ops,
                                           optimizer_ops * device.launch_us * 1e-6)
    return out


#: ops of the reference fused_update_masked: (fixed, per parameter tensor) with momentum and
#: weight decay (counted with :class:`_OpCounter` on grng.ops.masked.fused_update_masked)
UPDATE_OPS = (20.0, 15.0)
#: bytes per factor element of the reference fold's passes after its GEMM (4-byte elements):
#: mirror (two triu reads + writes, one add: 28), blend (mul_ 8, add_ 12); under the device
#: gate the masked reference adds a clone (8), a where (12) and the copy back (8)
REFERENCE_FOLD_BYTES, MASKED_REFERENCE_BYTES = 48.0, 28.0
#: launches per factor of those passes: triu, triu, add, mul_, add_ (+ clone, where, copy_)
REFERENCE_FOLD_PASSES, MASKED_REFERENCE_PASSES = 5.0, 3.0
#: a device-gate copy of a tensor and its select back: clone (8 B / element), where (12) and
#: copy_ (8); three launches
COPY_BYTES, COPY_LAUNCHES = 28.0, 3.0


def _fold_calls(dense: list[tuple[BlockShape, int]], config: StepConfig, device: Device
                ) -> float:
    """Launches of one fold: the local fold batches equal-shape factors only where the rows are
    small (m d <= the device's ``fold_batch_max_elements``), else one call per factor."""
    from grng.distributed.plan import FOLD_BATCH_MAX_ELEMENTS

    limit = device.fold_batch_max_elements
    limit = FOLD_BATCH_MAX_ELEMENTS if limit is None else limit
    small = [d for b, d in dense if b.rows * d <= limit]
    return float(_groups(small, config.batched) + len(dense) - len(small))


def _fold(dense: list[tuple[BlockShape, int]], config: StepConfig, device: Device
          ) -> tuple[Cost, Cost | None]:
    """The Gram fold of every dense factor, per step (over F): grng's one-triangle kernel (m d^2
    FLOPs, M read and written in its epilogue, masked there under the device gate), or the
    reference: a full GEMM (2 m d^2) and then its elementwise passes (a second component)."""
    F, p = config.factor_every, config.precision
    eb = ELEMENT_BYTES[p]
    calls = _fold_calls(dense, config, device)
    rows = sum(eb * b.rows * d for b, d in dense)
    sq = sum(float(d) * d for _, d in dense)
    if config.fold_kernel:
        fl = sum(b.rows * d * (d + 1.0) for b, d in dense)  # one triangle of X^T X
        return _time(device, Cost(fl / F, (rows + 8.0 * sq) / F, calls / F,
                                  note="one-triangle kernel"), p), None
    fl = sum(2.0 * b.rows * d * d for b, d in dense)
    gemm = _time(device, Cost(fl / F, (rows + 4.0 * sq) / F, calls / F, note="reference GEMM"), p)
    masked = config.sync_free
    per = REFERENCE_FOLD_BYTES + (MASKED_REFERENCE_BYTES if masked else 0.0)
    ops = REFERENCE_FOLD_PASSES + (MASKED_REFERENCE_PASSES if masked else 0.0)
    passes = _time(device, Cost(2.0 * sq / F, per * sq / F, ops * len(dense) / F,
                                note="mirror, blend" + (", masked select" if masked else "")),
                   "fp32")
    return gemm, passes


def _gate(shape: StepShape, dense: list[tuple[BlockShape, int]], config: StepConfig,
          device: Device) -> Cost:
    """The device gate's copies and selects (grng.optim.gate.DeviceGate): the diagonal units'
    statistics on fold steps (the Kronecker factors are folded where ok by the communicator,
    no copy) and the refreshed state of the blocks due (over T); EKFAC's per-step moments are
    written where ok by ``adam_moments_masked`` and need no copy."""
    F, T = config.factor_every, config.inverse_every
    blocks = shape.blocks
    Pd = shape.diagonal_params
    diag_units = shape.diagonal_tensors or max(1, shape.tensors - len(blocks))
    elems = Pd / F
    launches = diag_units / F
    if config.family == "ekfac":
        # Q_A, Q_G and the moments a refresh carries, over T; no per-step copies (the moments
        # are written where ok by adam_moments_masked) and no folded diagonal statistics
        refreshed = sum(float(d) * d for _, d in dense) + 2.0 * sum(b.d_a * b.d_g for b in blocks)
        elems = refreshed / T
        launches = (len(dense) + 3.0 * len(blocks)) / T
    elif config.family != "rkalman":  # the inverse of each dense factor (a vector if diagonal)
        eigen = config.inverse == "eigen"
        elems += sum(float(d) * d + (d if eigen else 0) for _, d in dense) / T
        launches += (2.0 if eigen else 1.0) * len(dense) / T
    return _time(device, Cost(elems, COPY_BYTES * elems, COPY_LAUNCHES * launches), "fp32")


#: EKFAC's masked moment step: (launches, bytes per element) of grng's kernel (reads Vb, m,
#: v; writes m, v, N) and of the reference's elementwise ops (counted on
#: grng.ops.masked.adam_moments_masked: two mul/add/where/copy chains and the ratio's five ops)
MOMENT_KERNEL, MOMENT_REFERENCE = (1.0, 24.0), (16.0, 136.0)
#: per batch of equal-layout blocks: the gradient stack, the bias corrections (count, two pows,
#: two subtractions, a square root, the flag's cast) and the two projection GEMMs
MOMENT_BATCH_OPS = 10.0


def _layouts(blocks: Sequence[BlockShape], config: StepConfig) -> int:
    """Batches of EKFAC's per-step phases: one per block layout (equal shapes and dense sides;
    grng.precondition.adam.batches), or one per block unbatched."""
    return _groups([(b.d_a, b.d_g, b.a_dense, b.g_dense) for b in blocks], config.batched)


def _moments(blocks: Sequence[BlockShape], config: StepConfig, device: Device) -> Cost:
    """EKFAC's update phase per step (grng.precondition.eigenbasis.update): each block's
    gradient matrix (its bias column appended: a copy) stacked per layout, P = Q_G^T V Q_A (two
    GEMMs per batch where the sides are dense), then Adam's masked moment step on P
    (``adam_moments_masked``: :data:`MOMENT_KERNEL` or :data:`MOMENT_REFERENCE`)."""
    launches_op, bytes_op = MOMENT_KERNEL if config.moments_kernel else MOMENT_REFERENCE
    fl = by = 0.0
    for b in blocks:
        a = b.d_a if b.a_dense else 0
        g = b.d_g if b.g_dense else 0
        fl += 2.0 * b.d_g * b.d_a * (a + g) + 12.0 * b.d_g * b.d_a
        # copies 16 B, the GEMMs' operands and results 16 B, the bases; the moment step
        by += (32.0 + bytes_op) * b.d_g * b.d_a + 4.0 * (a * a + g * g)
    layouts = _layouts(blocks, config)
    launches = len(blocks) + layouts * (MOMENT_BATCH_OPS + launches_op)
    return _time(device, Cost(fl, by, launches, note="projection + masked Adam step"),
                 config.precision)


def _reproject(blocks: Sequence[BlockShape], config: StepConfig, device: Device) -> Cost:
    """EKFAC's moments carried into a new basis, per refresh (over T): R = Q_new^T Q_old per
    dense side (2 d^3), then R_G m R_A^T and W_G v W_A^T, W = R * R (2 d_G d_A (d_G + d_A)
    each)."""
    T = config.inverse_every
    fl = by = launches = 0.0
    for b in blocks:
        sides = [d for d, dense in ((b.d_a, b.a_dense), (b.d_g, b.g_dense)) if dense]
        fl += sum(2.0 * d ** 3 for d in sides) + 4.0 * b.d_g * b.d_a * sum(sides)
        by += 4.0 * (sum(3.0 * d * d for d in sides) + 6.0 * b.d_g * b.d_a)
        launches += 5.0 * len(sides)
    return _time(device, Cost(fl / T, by / T, launches / T, note="carry m, v"),
                 config.precision)


def _refresh(dense: list[tuple[BlockShape, int]], config: StepConfig, device: Device) -> Cost:
    """The inverse (or basis) refresh of every dense factor, amortized over T."""
    T, p = config.inverse_every, config.precision
    sizes = [d for _, d in dense]
    if config.family == "rkalman":
        return Cost(note="none (Kalman)")
    if config.family == "ekfac" or config.inverse == "eigen":
        if config.family == "ekfac" and config.iterations > 0:
            # warm-started subspace iteration (grng.precondition.eigenbasis.subspace_step): M Q
            # (2 d^3, batched per size) and the Rayleigh order (gather), then a Householder QR
            # with Q formed (geqrf + orgqr, 8/3 d^3, at a quarter of the SIMT rate, one call
            # per matrix)
            gemm = Cost(sum(2.0 * d ** 3 for d in sizes) / T,
                        sum(4.0 * 5 * d * d for d in sizes) / T, 5.0 * _groups(sizes, True) / T)
            _time(device, gemm, p)
            if config.qr == "cholesky":
                # shifted CholeskyQR3 in float64 (eigenbasis.cholesky_qr3), batched per size:
                # per pass a Gram GEMM (2 d^3) and a triangular solve (d^3) at the fp64 GEMM
                # rate, a potrf (d^3 / 3) per matrix at a quarter of it; ~17 launches per size
                fp64 = device.rate("fp64")
                qr = sum(3.0 * (3.0 * d ** 3 / fp64 + d ** 3 / 3.0 / (0.25 * fp64)
                                + device.launch_us * 1e-6) for d in sizes) / T
                launches = 17.0 * _groups(sizes, True) / T
                return Cost(gemm.flops + sum(10.0 * d ** 3 for d in sizes) / T,
                            gemm.bytes + sum(168.0 * d * d for d in sizes) / T,
                            gemm.launches + launches,
                            gemm.seconds + qr + launches * device.launch_us * 1e-6,
                            "GEMM + CholeskyQR3")
            qr = sum(device.eigh_latency_ms * 1e-3 / 3 + (8.0 / 3.0) * d ** 3 / device.rate("fp32")
                     / 0.25 for d in sizes) / T
            return Cost(gemm.flops + sum(8.0 / 3.0 * d ** 3 for d in sizes) / T, gemm.bytes,
                        gemm.launches + len(sizes) / T, gemm.seconds + qr, "GEMM + QR")
        seconds = sum(device.eigh_seconds(d) for d in sizes) / T
        return Cost(sum(9.0 * d ** 3 for d in sizes) / T, sum(4.0 * 3 * d * d for d in sizes) / T,
                    len(sizes) / T, seconds, "eigh")
    if config.inverse == "newton":
        i = config.iterations
        cost = Cost(sum(4.0 * i * d ** 3 for d in sizes) / T,
                    sum(4.0 * 4 * i * d * d for d in sizes) / T,
                    6.0 * i * _groups(sizes, config.batched) / T, note=f"{i} Newton-Schulz steps")
        return _time(device, cost, p)
    # cholesky: potrf + potri, d^3 FLOPs at a quarter of the SIMT rate (factorization kernels)
    cost = Cost(sum(float(d) ** 3 for d in sizes) / T, sum(4.0 * 3 * d * d for d in sizes) / T,
                3.0 * len(sizes) / T, note="Cholesky")
    cost.seconds = cost.launches * device.launch_us * 1e-6 + cost.flops / (0.25 * device.rate("fp32"))
    return cost


def _apply(blocks: Sequence[BlockShape], config: StepConfig, device: Device) -> Cost:
    """P(V) per block: the eigenbasis sandwich (4 GEMMs), X_G V X_A (2 GEMMs), or EKFAC's
    ratio of its eigenbasis moments taken back to parameter space (2 GEMMs; the projection
    of V is in :func:`_moments`)."""
    eigen = config.family == "ekfac" or (config.inverse == "eigen" and config.family != "rkalman")
    gemms = 4.0 if eigen and config.family != "ekfac" else 2.0
    fl = by = 0.0
    for b in blocks:
        # a diagonal side is a scaling: its GEMM pair costs d_G d_A instead of 2 d d_G d_A
        a = b.d_a if b.a_dense else 0
        g = b.d_g if b.g_dense else 0
        fl += gemms * b.d_g * b.d_a * (a + g) + 2.0 * b.d_g * b.d_a
        by += 4.0 * (3 * b.d_g * b.d_a + a * a + g * g) * (2 if eigen else 1)
    shapes = [(b.d_a, b.d_g) for b in blocks]
    if config.family == "ekfac":
        # per layout batch (apply_many): N and the stack of V from the update phase, N back by
        # 2 GEMMs (16 B per element), the relative GR term (two norms, the scale, d + c g: 8
        # ops, 28 B per element); each block's V formed for the pipeline (its bias column
        # appended: a copy, 8 B)
        by = sum(52.0 * b.d_g * b.d_a + 8.0 * ((b.d_a if b.a_dense else 0) ** 2
                                               + (b.d_g if b.g_dense else 0) ** 2)
                 for b in blocks)
        launches = len(blocks) + _layouts(blocks, config) * (gemms + 8.0)
    else:
        launches = (gemms + 1) * (len(set(shapes)) if config.batched else len(blocks))
    return _time(device, Cost(fl, by, launches), config.precision)


# ------------------------------------------------------------------------------- shapes

class _OpCounter(TorchDispatchMode):
    """Counts aten ops dispatched (a launch each on a GPU, a fixed overhead each on the CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.count += 1
        return func(*args, **(kwargs or {}))


def step_shape(build: Callable[[], nn.Module], batch: Callable[[torch.device], tuple[Tensor, ...]],
               loss: Callable[[nn.Module, tuple[Tensor, ...]], Tensor],
               model_precision: str = "fp32", max_factor_dim: int | None = None) -> StepShape:
    """Read a step's shape off a model on the ``meta`` device: ``build()`` makes the model (it
    is built under ``torch.device("meta")``), ``batch(device)`` the inputs, ``loss`` the loss.
    A K-FAC optimizer's capture lists the blocks and the rows each folds; FlopCounterMode counts
    forward + backward FLOPs and the dispatch counter its aten ops."""
    from grng.optim.cases import make_optimizer  # the optimizer package sits above grng.benchmark

    meta = torch.device("meta")
    with meta:
        model = build()
    kwargs = {} if max_factor_dim is None else {"max_factor_dim": max_factor_dim}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make_optimizer("kfac-eigen", model, **kwargs)
    try:
        counter = _OpCounter()
        with FlopCounterMode(display=False) as flops, counter:
            loss(model, batch(meta)).backward()
        blocks = []
        for layer, name in zip(opt.block_set.layers, opt.block_set.names):
            rows = opt.capture.rows(layer)
            m = 0 if rows is None or rows[1] is None else int(rows[1].X.shape[0])
            d_g, d_a = layer.dims()
            blocks.append(BlockShape(name, d_a, d_g, not layer.a_factor.diagonal,
                                     not layer.g_factor.diagonal, m))
        covered = {id(p) for layer in opt.block_set.layers for p in layer.params}
        params = [p for p in model.parameters() if p.requires_grad]
        return StepShape(tuple(blocks), sum(p.numel() for p in params),
                         sum(p.numel() for p in params if id(p) not in covered), len(params),
                         float(flops.get_total_flops()), counter.count, model_precision,
                         sum(1 for p in params if id(p) not in covered))
    finally:
        opt.capture.remove()


def gpt_shape(layers: int, width: int, vocab: int, context: int, batch: int,
              model_precision: str = "bf16") -> StepShape:
    """A GPT-2-style causal transformer (bench/models.GPT: tied head, learned positions,
    pre-norm blocks of qkv, proj, fc 4x, out) at ``batch`` x ``context`` tokens, counted
    analytically: forward = 2 (12 L d^2 + d V) + 4 T d L FLOPs per token, backward twice that;
    about 150 aten ops per layer (what the meta-device run of bench/models.GPT counts)."""
    d, m = width, batch * context
    blocks = [BlockShape("tok", vocab, d, False, True, m),  # an embedding's A is diagonal
              BlockShape("pos", context, d, False, True, context)]  # one row per position
    for i in range(layers):
        for name, d_a, d_g in (("qkv", d + 1, 3 * d), ("proj", d + 1, d), ("fc", d + 1, 4 * d),
                               ("out", 4 * d + 1, d)):
            blocks.append(BlockShape(f"blocks.{i}.{name}", d_a, d_g, True, True, m))
    norms = (2 * layers + 1) * 2 * d
    params = layers * (12 * d * d + 9 * d) + (vocab + context) * d + norms
    per_token = 2.0 * (12 * layers * d * d + d * vocab) + 4.0 * context * d * layers
    return StepShape(tuple(blocks), params, norms, 4 * layers * 2 + 2 + 2 * (2 * layers + 1),
                     3.0 * per_token * m, 150 * layers + 80, model_precision,
                     2 * (2 * layers + 1))


#: transformer presets for ``grng bench --predict``: (layers, width, vocab, context, batch)
PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "gpt2-small": (12, 768, 50257, 1024, 8),
    "gpt2-medium": (24, 1024, 50257, 1024, 8),
}


def parse_config(text: str | None) -> StepConfig:
    """A StepConfig from "key=value,..." (keys: the dataclass's fields); ValueError naming a bad
    key or value."""
    kwargs: dict[str, object] = {}
    names = {f.name: f for f in fields(StepConfig)}
    for part in filter(None, (text or "").split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in names:
            raise ValueError(f"config entry {part!r}: expected key=value with key one of {sorted(names)}")
        default = getattr(StepConfig(), key)
        if isinstance(default, bool):
            kwargs[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            kwargs[key] = int(value)
        else:
            kwargs[key] = value
    config = StepConfig(**kwargs)  # type: ignore[arg-type]
    if config.precision not in ELEMENT_BYTES:
        raise ValueError(f"precision must be one of {sorted(ELEMENT_BYTES)}, got {config.precision!r}")
    return config


def count_ops(model: nn.Module, optimizer: torch.optim.Optimizer,
              step_loss: Callable[[int], Tensor], steps: int) -> tuple[float, float]:
    """(aten ops of one forward + backward, aten ops of one ``optimizer.step()``), averaged over
    ``steps`` real steps (a multiple of F x T puts folds and refreshes in the mean);
    ``step_loss(i)`` runs the forward of step i and returns its loss."""
    fb = opt_ops = 0
    for i in range(steps):
        optimizer.zero_grad()
        counter = _OpCounter()
        with counter:
            step_loss(i).backward()
        fb += counter.count
        counter = _OpCounter()
        with counter:
            optimizer.step()
        opt_ops += counter.count
    return fb / steps, opt_ops / steps


# ------------------------------------------------------------------------------ the CPU

def measure_cpu(threads: int = 1, sizes: Sequence[int] = (256, 512), gemm_size: int = 1024
                ) -> Device:
    """This machine as a :class:`Device`: float32/float64 GEMM rates at ``gemm_size``, copy
    bandwidth, the fixed cost of one small op, and eigh's latency + throughput fitted to the
    two sizes (medians of a few calls; one torch thread unless ``threads`` says otherwise)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        def best(fn: Callable[[], object], reps: int = 5) -> float:
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return sorted(times)[len(times) // 2]

        n = gemm_size  # the GEMM rate of the training step's sizes, not of a small square
        rates = {}
        for name, dt in (("fp32", torch.float32), ("fp64", torch.float64), ("bf16", torch.bfloat16)):
            a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
            a @ b
            rates[name] = 2.0 * n ** 3 / best(lambda: a @ b) / 1e12
        rates["tf32"] = rates["fp32"]
        src, dst = torch.randn(1 << 24), torch.empty(1 << 24)
        bandwidth = 2.0 * 4 * (1 << 24) / best(lambda: dst.copy_(src)) / 1e9
        x = torch.randn(8)
        launch = best(lambda: [x.add(1.0) for _ in range(1000)]) / 1000 * 1e6
        t = []
        for d in sizes:
            m = torch.randn(d, d, dtype=torch.float32)
            m = m @ m.T + d * torch.eye(d)
            t.append(best(lambda: torch.linalg.eigh(m), reps=3))
        (d0, d1), (t0, t1) = sizes, t
        per = max((t1 - t0) / (9.0 * (d1 ** 3 - d0 ** 3)), 1e-15)
        latency = max(t0 - 9.0 * d0 ** 3 * per, 0.0)
        from grng.distributed.plan import FOLD_BATCH_MAX_ELEMENTS_CPU

        return Device(f"cpu ({threads} thread{'s' if threads > 1 else ''})", rates, bandwidth,
                      launch, latency * 1e3, 1.0 / per / 1e12, "measured by measure_cpu",
                      adamw_foreach=False, fold_batch_max_elements=FOLD_BATCH_MAX_ELEMENTS_CPU)
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------- report

def table(pred: Prediction) -> str:
    """A markdown table: component, GFLOP, MB, launches, ms, share, per step; AdamW below."""
    lines = [f"{pred.device}: {pred.config.family} ({_describe(pred.config)})", "",
             "| component | GFLOP | MB | launches | ms | share |", "|---|---|---|---|---|---|"]
    total = pred.seconds
    for name, c in pred.components.items():
        note = f" ({c.note})" if c.note else ""
        lines.append(f"| {name}{note} | {c.flops / 1e9:.3g} | {c.bytes / 1e6:.3g} | "
                     f"{c.launches:.3g} | {c.seconds * 1e3:.3g} | {c.seconds / total:.0%} |")
    lines.append(f"| **step** | | | | **{total * 1e3:.3g}** | |")
    lines.append(f"| AdamW step | | | | {pred.adamw_seconds * 1e3:.3g} | |")
    lines.append(f"| **x AdamW** | | | | **{pred.ratio:.2f}** | |")
    return "\n".join(lines)


def _describe(config: StepConfig) -> str:
    if config.family == "adamw":
        return "torch defaults"
    ekfac = config.family == "ekfac"
    inverse = ({"cholesky": "CholeskyQR3 refresh"}.get(config.qr, "QR refresh") if ekfac
               else config.inverse)
    iters = f", {config.iterations} its" if config.inverse == "newton" and not ekfac else ""
    moments = (f", {'kernel' if config.moments_kernel else 'reference'} moment step"
               if ekfac else "")
    return (f"{inverse}{iters}, F={config.factor_every}, T={config.inverse_every}, "
            f"{config.precision}, {'kernel' if config.fold_kernel else 'reference'} fold"
            f"{moments}, {'fused' if config.fused_update else 'per-tensor'} update"
            f"{', sync-free' if config.sync_free else ''}")


__all__ = ["BlockShape", "Cost", "DEVICES", "Device", "Prediction", "StepConfig", "StepShape",
           "PRESETS", "count_ops", "gpt_shape", "measure_cpu", "parse_config", "predict",
           "step_shape", "table"]
