"""Steps to target of EKFAC at longer fold / refresh intervals and with the CholeskyQR3 refresh
(on the CPU): the evidence behind EKFAC's CUDA defaults.

    python bench/ekfac_cuda_intervals.py [--tasks transformer,cnn,mlp] [--seeds 3]

The cost model (docs/performance.md) prices EKFAC's fold every F steps, its basis refresh every
T steps and the refresh's orthonormalization (Householder QR, or CholeskyQR3: GEMMs, the tensor
cores' work); this script measures what each costs in steps against EKFAC's CPU defaults
(F = 3, T = 10, Householder), as ``bench/cuda_intervals.py`` did for K-FAC: every setting of
:data:`SETTINGS` trains the demo tasks' budgets (``bench/amortization.py``'s phase 1: the demo's
learning rates, validation split, seeds from its first) and is judged against the first by
amortization's rule (:func:`amortization.keeps_accuracy`). Steps are deterministic, independent
of the machine's load. Writes ``bench/results/ekfac_cuda_intervals.md``.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import amortization as am  # noqa: E402
from cuda_intervals import report  # noqa: E402

#: (F, T, qr); the first is the reference (EKFAC's CPU defaults)
SETTINGS: tuple[tuple[int, int, str], ...] = (
    (3, 10, "householder"), (2, 20, "cholesky"), (4, 20, "cholesky"), (4, 50, "cholesky"),
    (4, 100, "cholesky"))


def _results(task: str, table: dict) -> list[am.Result]:
    """One run per setting, the demo's hyperparameters plus the setting's ``qr``."""
    configs = [(am.Config("ekfac", f, t), qr) for f, t, qr in SETTINGS]
    return [am.Result(task, c, {**am.demo_hparams(task, c, table), "qr": qr}) for c, qr in configs]


def main(argv: list[str] | None = None) -> int:
    return report(
        argv, "ekfac_cuda_intervals.py",
        "EKFAC's intervals and refresh QR against its CPU defaults: steps to target",
        "ekfac_cuda_intervals.md", _results,
        lambda res: f"F{res.config.factor_every} T{res.config.inverse_every} {res.hp['qr']}",
        "reference (CPU defaults)")


if __name__ == "__main__":
    raise SystemExit(main())
