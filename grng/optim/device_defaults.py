"""Defaults that depend on where the model lives (docs/defaults.md "Defaults per device").

On the CPU the K-FAC family's defaults are measured: time to accuracy on the demo's tasks
(``bench/defaults.py``, docs/defaults.md). No GPU has been measured yet, so the CUDA defaults are
chosen from the cost model (``grng.benchmark.costmodel``; its predictions are generated into
docs/performance.md) among the configurations that stay exact per refresh, because the one that
was cheapest on paper (a warm-started Newton-Schulz inverse with 1-3 fixed steps) does not track
real factor sequences (``bench/newton_warmstart.py``, ``bench/results/newton_warmstart.md``):
Cholesky refreshes (cuSOLVER, no eigh, sync-free through ``cholesky_inverse_masked``) every 20
steps with TF32 factor and apply GEMMs, and folds every 4 steps: the fold is the model's largest
curvature term at F = 2, and F = 4 kept the steps to target of F = 2 on the demo's three tasks
(``bench/cuda_intervals.py``, ``bench/results/cuda_intervals.md``: 3 seeds each).
EKFAC has its own (:data:`EKFAC_CPU`, :data:`EKFAC_CUDA`), chosen the same way
(``bench/ekfac_cuda_intervals.py``, ``bench/ekfac_qr.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class DeviceDefaults:
    """The inverse strategy, its refresh period T, the optimizer's matmul precision and the
    fold period F."""

    inverse: str
    inverse_every: int
    precision: str
    factor_every: int


#: measured on the CPU (docs/defaults.md)
CPU = DeviceDefaults(inverse="eigen", inverse_every=10, precision="fp32", factor_every=2)
#: chosen from the cost model for CUDA (module docstring; docs/defaults.md)
CUDA = DeviceDefaults(inverse="cholesky", inverse_every=20, precision="tf32", factor_every=4)


@dataclass(frozen=True)
class EigenbasisDefaults:
    """EKFAC's: how its subspace refresh orthonormalizes (``qr``), the refresh period T, the
    optimizer's matmul precision and the fold period F."""

    qr: str
    inverse_every: int
    precision: str
    factor_every: int


#: measured on the CPU (bench/results/defaults_ekfac.csv; F = 3, folding every step of the
#: refresh warmup and at decay factor_decay ** 3 after it: the steps to target and the losses
#: of F = 1 on the demo's tasks and the Hugging Face models, bench/results/ekfac_factor_every.md)
EKFAC_CPU = EigenbasisDefaults(qr="householder", inverse_every=10, precision="fp32",
                               factor_every=3)
#: chosen from the cost model for CUDA (docs/performance.md "EKFAC's CUDA defaults"): TF32
#: GEMMs, the refresh's orthonormalization by CholeskyQR3 (GEMMs, no per-matrix Householder
#: latency), F = 4 and T = 100: 1.58x AdamW on GPT-2 small (T = 50: 1.69x). At the per-step fold
#: decay these intervals keep the CPU defaults' 120 steps to 3.7 bpc on the demo transformer but
#: end higher (bench/results/ekfac_cuda_intervals.md: 3.328 bpc at F = 4, T = 100 against 3.243;
#: the digits tasks take 2-4 steps more); steps x the model's step time, the predicted time to
#: target, is lowest at T = 100
EKFAC_CUDA = EigenbasisDefaults(qr="cholesky", inverse_every=100, precision="tf32",
                                factor_every=4)


def on_cuda(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is on a CUDA device."""
    return any(p.is_cuda for p in model.parameters())


def for_model(model: nn.Module) -> DeviceDefaults:
    """:data:`CUDA` when any parameter of ``model`` is on a CUDA device, else :data:`CPU`."""
    return CUDA if on_cuda(model) else CPU


def ekfac_for_model(model: nn.Module) -> EigenbasisDefaults:
    """:data:`EKFAC_CUDA` when any parameter of ``model`` is on a CUDA device, else
    :data:`EKFAC_CPU`."""
    return EKFAC_CUDA if on_cuda(model) else EKFAC_CPU
