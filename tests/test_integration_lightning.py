"""grng in PyTorch Lightning (real ``lightning.Trainer`` on CPU): automatic optimization with
K-FAC, RING, R-Kalman, RENG, GradReg and EKFAC (plain, ``gradient_clip_val``, ``bf16-mixed``, a
scheduler) and manual optimization. Each run is checked against a plain PyTorch loop over the
same batches where the semantics are exact (fp32), and for a falling loss and finite
parameters everywhere."""
from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import grng
from grng.optim.cases import optimizer_factory

L = pytest.importorskip("lightning")

from grng.integrations import needs_closure
from grng.integrations.lightning import GRNGModule

pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
              # lightning 2.6's pytree helper on torch 2.13
              pytest.mark.filterwarnings("ignore:.*LeafSpec.* is deprecated:FutureWarning")]

STEPS = 16
BATCH = 32
CLIP = 0.5


def _data() -> TensorDataset:
    """256 Gaussian inputs labelled by a fixed random linear teacher (learnable)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(STEPS * BATCH, 8, generator=g)
    return TensorDataset(x, (x @ torch.randn(8, 4, generator=g)).argmax(1))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


_KFAC = dict(lr=0.1, damping=0.05, momentum=0.5, inverse_every=2)
OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {  # grng.optim.cases
    "kfac": optimizer_factory("kfac-eigen", **_KFAC),
    "ring": optimizer_factory("ring", **_KFAC, rho=0.1),
    "rkalman": optimizer_factory("rkalman", lr=0.2, rho=0.1, momentum=0.5, kalman_rank=4),
    "reng": optimizer_factory("reng-forward", **_KFAC, rho=0.05, epsilon=0.01),
    "gradreg": optimizer_factory("gradreg-kfac", **_KFAC, gamma=0.05, epsilon=0.01,
                                 mode="forward"),
    "ekfac": optimizer_factory("ekfac", lr=0.05, inverse_every=2),
}


class _Classifier(GRNGModule):
    """The net, its grng optimizer and, optionally, a StepLR scheduler."""

    def __init__(self, make: Callable[[nn.Module], torch.optim.Optimizer],
                 scheduler: bool = False) -> None:
        super().__init__()
        self.net = _net()
        self.make = make
        self.scheduler = scheduler
        self.used_norms: list[float] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> object:
        opt = self.make(self.net)
        opt.register_step_post_hook(self._record_norm)
        if not self.scheduler:
            return opt
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 5, gamma=0.5),
                                 "interval": "step"}}

    def _record_norm(self, opt: torch.optim.Optimizer, *_: object) -> None:
        """After a step ``.grad`` holds the gradient the update used (clipped, regularized)."""
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        self.used_norms.append(float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g.float()) for g in grads]))))


class _Manual(_Classifier):
    """Manual optimization: ``manual_backward`` + ``opt.step()``, or ``opt.step(closure)`` for
    the two-pass optimizers."""

    def __init__(self, make: Callable[[nn.Module], torch.optim.Optimizer]) -> None:
        super().__init__(make)
        self.automatic_optimization = False

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        opt = self.optimizers()

        def closure() -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(self.net(x), y)
            self.manual_backward(loss)
            return loss

        if needs_closure(opt.optimizer):
            opt.step(closure)
        else:
            closure()
            opt.step()


class _Plain(L.LightningModule):
    """A plain LightningModule (not GRNGModule) training the same net with ``make``."""

    def __init__(self, make: Callable[[nn.Module], torch.optim.Optimizer]) -> None:
        super().__init__()
        self.net = _net()
        self.make = make

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make(self.net)


def _trainer(**kwargs: object) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


def _loader() -> DataLoader:
    return DataLoader(_data(), batch_size=BATCH, shuffle=False)


def _loss(net: nn.Module) -> float:
    x, y = _data().tensors
    with torch.no_grad():
        return float(F.cross_entropy(net(x), y))


def _plain_loop(make: Callable[[nn.Module], torch.optim.Optimizer],
                max_grad_norm: float | None = None) -> nn.Module:
    """The same optimizer over the same batches in a plain PyTorch loop (torch's closure)."""
    net = _net()
    opt = make(net)
    opt.max_grad_norm = max_grad_norm
    for x, y in _loader():
        opt.step(grng.make_closure(opt, functools.partial(_batch_loss, net, x, y)))
    return net


def _batch_loss(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(net(x), y)


def _steps(opt: torch.optim.Optimizer) -> int:
    return getattr(opt, "base_optimizer", opt).steps


def _check_trained(module: _Classifier, before: float) -> None:
    opt = module.trainer.optimizers[0]
    assert _steps(opt) == STEPS
    assert all(torch.isfinite(p).all() for p in module.parameters())
    after = _loss(module.net)
    assert after < 0.85 * before, (before, after)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("variant", ["plain", "clip", "scheduler"])
def test_automatic_optimization_is_a_plain_loop(name: str, variant: str) -> None:
    """Lightning's closure (training_step, zero_grad, backward) gives the parameters of a plain
    loop; with ``gradient_clip_val`` the optimizer clips the gradient its update uses once per
    step (two-pass: neither the gradient at theta nor the probe gradient is clipped)."""
    module = _Classifier(OPTIMIZERS[name], scheduler=variant == "scheduler")
    before = _loss(module.net)
    _trainer(gradient_clip_val=CLIP if variant == "clip" else None).fit(module, _loader())
    _check_trained(module, before)
    opt = module.trainer.optimizers[0]
    if variant == "scheduler":
        assert opt.param_groups[0]["lr"] == pytest.approx(opt.defaults["lr"] * 0.5 ** 3)
        return
    clip = CLIP if variant == "clip" else None
    assert opt.max_grad_norm == clip
    if clip is not None:
        assert max(module.used_norms) <= clip * (1 + 1e-5)
    reference = _plain_loop(OPTIMIZERS[name], clip)
    for p, q in zip(reference.parameters(), module.net.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_automatic_optimization_in_bf16_mixed(name: str) -> None:
    """precision="bf16-mixed" with gradient clipping (which Lightning itself refuses for
    optimizers that unscale in their step): the factors stay float32, the loss falls."""
    module = _Classifier(OPTIMIZERS[name])
    before = _loss(module.net)
    _trainer(precision="bf16-mixed", gradient_clip_val=CLIP).fit(module, _loader())
    _check_trained(module, before)
    assert max(module.used_norms) <= CLIP * (1 + 1e-5)
    curvature = getattr(module.trainer.optimizers[0], "base_optimizer",
                        module.trainer.optimizers[0])
    for layer in curvature.layers:
        state = curvature.layer_state(layer)
        for key in ("PA", "PG") if name == "rkalman" else ("A", "G"):
            assert state[key].dtype == torch.float32


def test_lightning_alone_refuses_clipping_a_grng_optimizer_in_bf16() -> None:
    """Why GRNGModule exists: a plain LightningModule under bf16-mixed cannot clip grng's
    optimizers (they unscale in their own step)."""
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        _trainer(precision="bf16-mixed", gradient_clip_val=CLIP).fit(_Plain(OPTIMIZERS["kfac"]),
                                                                     _loader())


@pytest.mark.parametrize("module", [_Plain, _Classifier])
@pytest.mark.parametrize("name", ["reng", "gradreg"])
def test_two_pass_with_accumulated_batches_is_refused(name: str, module: type) -> None:
    """Lightning's closure covers only the last accumulated micro-batch: the optimizer finds
    the earlier micro-batches' gradients when step(closure) starts and refuses, naming
    Lightning's setting, instead of silently dropping them (a plain LightningModule and
    GRNGModule alike)."""
    with pytest.raises(ValueError, match="outside the closure.*accumulate_grad_batches") as err:
        _trainer(accumulate_grad_batches=2).fit(module(OPTIMIZERS[name]), _loader())
    assert "Lightning's automatic optimization" in str(err.value)


class _Dropout(_Plain):
    """A plain LightningModule whose net has dropout; records each dropout layer's mask."""

    def __init__(self, make: Callable[[nn.Module], torch.optim.Optimizer]) -> None:
        super().__init__(make)
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(0.2), nn.Linear(32, 4))
        self.masks: list[Tensor] = []
        self.net[2].register_forward_hook(
            lambda mod, inp, out: self.masks.append((out == 0) & (inp[0] != 0)))


@pytest.mark.parametrize("name", ["reng", "gradreg"])
def test_the_probe_pass_replays_dropout_in_lightning(name: str) -> None:
    """Lightning's closure called twice per step (theta, probe) draws the same dropout masks
    both times; the loss falls."""
    module = _Dropout(OPTIMIZERS[name])
    before = _loss(module.net.eval())
    module.net.train()
    module.masks.clear()
    _trainer().fit(module, _loader())
    masks = module.masks
    assert len(masks) == 2 * STEPS
    assert all(torch.equal(masks[2 * i], masks[2 * i + 1]) for i in range(STEPS))
    assert not torch.equal(masks[0], masks[2])
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert _loss(module.net.eval()) < 0.85 * before


class _ManualWithoutClosure(_Manual):
    """Manual optimization that forgets the closure of a two-pass optimizer."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(F.cross_entropy(self.net(batch[0]), batch[1]))
        opt.step()


@pytest.mark.parametrize("name", ["reng", "gradreg"])
def test_manual_step_without_closure_gives_lightning_recipe(name: str) -> None:
    """manual_backward then opt.step() (Lightning hands step an empty closure): refused, naming
    Lightning's recipe (manual_backward inside the closure), not the Hugging Face Trainer's."""
    with pytest.raises(ValueError, match="outside the closure") as err:
        _trainer().fit(_ManualWithoutClosure(OPTIMIZERS[name]), _loader())
    assert "self.manual_backward(loss)" in str(err.value)
    assert "Trainer use" not in str(err.value)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_manual_optimization_is_a_plain_loop(name: str) -> None:
    """manual_backward + opt.step() (opt.step(closure) for RENG and GradReg) gives the
    parameters of a plain loop."""
    module = _Manual(OPTIMIZERS[name])
    before = _loss(module.net)
    _trainer().fit(module, _loader())
    _check_trained(module, before)
    reference = _plain_loop(OPTIMIZERS[name])
    for p, q in zip(reference.parameters(), module.net.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_plain_lightning_clipping_distorts_the_two_pass_gradient() -> None:
    """Why GRNGModule hands gradient_clip_val to the optimizer: Lightning's own clipping
    (inside the closure, at theta and at the probe) gives a different RENG run than clipping
    g + rho H g once."""
    module = _Plain(OPTIMIZERS["reng"])
    _trainer(gradient_clip_val=CLIP).fit(module, _loader())
    reference = _plain_loop(OPTIMIZERS["reng"], CLIP)
    with torch.no_grad():
        diff = max(float((p - q).abs().max())
                   for p, q in zip(reference.parameters(), module.net.parameters()))
    assert diff > 1e-4, diff
    assert module.trainer.optimizers[0].max_grad_norm is None
