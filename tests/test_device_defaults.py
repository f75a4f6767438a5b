"""The K-FAC family's defaults follow the model's device (grng.optim.device_defaults): measured
CPU defaults, cost-model CUDA defaults; explicit arguments always win."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from grng.optim import device_defaults
from grng.optim.cases import make_optimizer


def _model(device: str = "cpu") -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(device)


@pytest.mark.parametrize("case", ["kfac-eigen", "ring", "reng-exact"])
def test_cpu_model_gets_the_measured_cpu_defaults(case: str) -> None:
    opt = make_optimizer(case, _model())
    assert (opt.inverse.name, opt.inverse_every, opt.precision, opt.factor_every) == (
        "eigen", 10, "fp32", 2)
    assert device_defaults.for_model(_model()) is device_defaults.CPU


def test_cuda_defaults_are_wired_into_the_constructor(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model the defaults see as on CUDA gets cholesky, T = 20, TF32 and F = 4 (simulated: no
    GPU)."""
    monkeypatch.setattr(device_defaults, "for_model", lambda model: device_defaults.CUDA)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf32 on CPU parameters is inert (warned)
        opt = make_optimizer("ring", _model())
    assert (opt.inverse.name, opt.inverse_every, opt.precision, opt.factor_every) == (
        "cholesky", 20, "tf32", 4)


def test_explicit_arguments_win_over_device_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_defaults, "for_model", lambda model: device_defaults.CUDA)
    opt = make_optimizer("kfac-newton", _model(), inverse_every=3, precision="fp32",
                         factor_every=1)
    assert (opt.inverse.name, opt.inverse_every, opt.precision, opt.factor_every) == (
        "newton", 3, "fp32", 1)


def test_the_cuda_defaults_are_exact_per_refresh_and_never_eigh() -> None:
    """The CUDA inverse refreshes without eigh and without an iteration that may not converge
    (bench/results/newton_warmstart.md: a few warm Newton-Schulz steps do not track factors)."""
    assert device_defaults.CUDA.inverse == "cholesky"


@pytest.mark.gpu
def test_a_cuda_model_gets_the_cuda_defaults() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    opt = make_optimizer("ring", _model("cuda"))
    assert (opt.inverse.name, opt.inverse_every, opt.precision, opt.factor_every) == (
        "cholesky", 20, "tf32", 4)
    assert opt.sync_free


def _ekfac_defaults(opt) -> tuple:
    return (opt.block.qr, opt.inverse_every, opt.precision, opt.factor_every)


def test_ekfac_defaults_follow_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """EKFAC: the CPU defaults as measured (Householder, T = 10, fp32, F = 3); a model seen as
    on CUDA (simulated) gets EKFAC_CUDA (CholeskyQR3, TF32, its intervals); explicit arguments
    win; the fisher scaling, which reads the rows every step, folds every step."""
    assert _ekfac_defaults(make_optimizer("ekfac", _model())) == ("householder", 10, "fp32", 3)
    cuda = device_defaults.EKFAC_CUDA
    monkeypatch.setattr(device_defaults, "ekfac_for_model", lambda model: cuda)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf32 on CPU parameters is inert (warned)
        assert _ekfac_defaults(make_optimizer("ekfac", _model())) == (
            "cholesky", cuda.inverse_every, "tf32", cuda.factor_every)
        assert _ekfac_defaults(make_optimizer("ekfac", _model(), qr="householder",
                                              inverse_every=7, precision="fp32",
                                              factor_every=2)) == ("householder", 7, "fp32", 2)
        assert make_optimizer("ekfac", _model(), scaling="fisher").factor_every == 1
