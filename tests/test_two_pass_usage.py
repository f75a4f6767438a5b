"""The two-pass optimizers (RENG, GradReg) as a user meets them (issue 24): ``gr="exact"`` on
models without a double backward falls back to the finite difference with one warning; the
probe pass replays the first pass's dropout masks; gradients accumulated outside the closure
are refused, not dropped; sparse gradients and missing closures get errors that say what to do.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from grng import RENG, GradReg, KFAC, make_closure
from grng.optim.cases import optimizer_factory

F64 = torch.float64


def _encoder(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=dropout, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False),
                         nn.Linear(16, 3))


def _encoder_data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, 16, generator=g)
    return x, (x[..., :3].sum(-1) > 0).long() + (x[..., 3] > 1).long()


def _encoder_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1))


def _fallback_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "no double backward" in str(w.message)]


def test_reng_at_its_defaults_trains_a_transformer_encoder_with_one_warning() -> None:
    """nn.TransformerEncoder(batch_first=True) runs CPU flash attention (no double backward):
    RENG() falls back to gr="forward" with one warning, and its first step equals
    RENG(gr="forward")'s; the loss falls and the parameters stay finite."""
    model = _encoder()
    twin = copy.deepcopy(model)
    x, y = _encoder_data()
    opt = RENG(model, lr=0.05, damping=0.05)
    ref = RENG(twin, lr=0.05, damping=0.05, gr="forward")
    assert opt.gr == "exact"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        before = float(opt.step(make_closure(opt, lambda: _encoder_loss(model, x, y))))
        ref.step(make_closure(ref, lambda: _encoder_loss(twin, x, y)))
        for p, q in zip(twin.parameters(), model.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
        losses = [float(opt.step(make_closure(opt, lambda: _encoder_loss(model, x, y))))
                  for _ in range(5)]
    warned = _fallback_warnings(record)
    assert len(warned) == 1 and "gr/mode='forward', epsilon=0.01" in warned[0], warned
    assert opt.gr == "forward" and opt.gradient_source.mode == "forward"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.9 * before, (before, losses)


def test_reng_at_its_defaults_trains_a_tiny_llama() -> None:
    """A Hugging Face Llama from LlamaConfig (SDPA attention, no download): RENG() trains."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    opt = RENG(model)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        losses = [float(opt.step(make_closure(opt, lambda: model(input_ids=ids, labels=ids).loss)))
                  for _ in range(4)]
    assert len(_fallback_warnings(record)) == 1
    assert opt.gr == "forward"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("where", ["exact", "compiled"])
def test_gradreg_exact_falls_back_too(where: str) -> None:
    """GradReg(mode="exact") on an SDPA encoder, and RENG on a torch.compile'd MLP (aot_autograd
    has no double backward): one warning, mode "forward" from then on, training proceeds."""
    if where == "exact":
        model = _encoder()
        x, y = _encoder_data()
        opt: torch.optim.Optimizer = GradReg(torch.optim.SGD(model.parameters(), lr=0.1),
                                             gamma=0.01, epsilon=0.01, mode="exact", model=model)
        loss_fn: Callable[[], Tensor] = lambda: _encoder_loss(model, x, y)  # noqa: E731
    else:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        compiled = torch.compile(model, backend="aot_eager")
        x = torch.randn(32, 6, generator=torch.Generator().manual_seed(3))
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        opt = RENG(model, lr=0.05, damping=0.05)
        loss_fn = lambda: F.cross_entropy(compiled(x), y)  # noqa: E731
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        losses = [float(opt.step(make_closure(opt, loss_fn))) for _ in range(6)]
    assert len(_fallback_warnings(record)) == 1
    assert getattr(opt, "mode", getattr(opt, "gr", None)) == "forward"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0], losses


def test_the_fallback_under_a_grad_scaler_equals_forward_with_it() -> None:
    """With a GradScaler (closure recipe) the fallen-back step unscales g once and equals
    RENG(gr="forward", grad_scaler=...)'s step; the scale is unchanged (no inf)."""
    model = _encoder()
    twin = copy.deepcopy(model)
    x, y = _encoder_data()
    runs = []
    for net, gr in ((model, "exact"), (twin, "forward")):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        opt = RENG(net, lr=0.05, damping=0.05, gr=gr, grad_scaler=scaler)

        def closure(net: nn.Module = net, opt: RENG = opt,
                    scaler: torch.amp.GradScaler = scaler) -> Tensor:
            opt.zero_grad()
            loss = _encoder_loss(net, x, y)
            scaler.scale(loss).backward()
            return loss

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(2):
                opt.step(closure)
                scaler.update()
        runs.append((opt, scaler))
    assert runs[0][0].gr == "forward" and runs[0][1].get_scale() == 2.0 ** 10
    for p, q in zip(twin.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


class _NoGraphBackward(nn.Module):
    """An MLP whose backward refuses create_graph=True inside the pass at theta, with the
    message torch.compile's donated buffers give (inductor raises it in the closure's
    backward, not in the Hessian-vector pass)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(6, 16).to(F64), nn.Linear(16, 3).to(F64)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        if h.requires_grad:
            h.register_hook(self._refuse_graph)
        return self.fc2(torch.tanh(h))

    @staticmethod
    def _refuse_graph(grad: Tensor) -> None:
        if torch.is_grad_enabled():  # the engine enables grad mode only for create_graph=True
            raise RuntimeError("This backward function was compiled with non-empty donated "
                               "buffers which requires create_graph=False and retain_graph=False")


def test_a_failed_pass_at_theta_is_rerun_as_a_finite_difference() -> None:
    """When the pass at theta itself fails under create_graph=True, RENG() drops what it
    captured, reruns it without the graph and takes the F-GR step: factors and parameters equal
    RENG(gr="forward")'s, with one warning."""
    model, twin = _NoGraphBackward(), _NoGraphBackward()
    x = torch.randn(32, 6, dtype=F64, generator=torch.Generator().manual_seed(5))
    y = (x[:, 0] > 0).long()
    opt = RENG(model, lr=0.05, damping=0.05, factor_every=1, inverse_every=1)
    ref = RENG(twin, lr=0.05, damping=0.05, factor_every=1, inverse_every=1, gr="forward")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.step(make_closure(opt, lambda: F.cross_entropy(model(x), y)))
            ref.step(make_closure(ref, lambda: F.cross_entropy(twin(x), y)))
    assert len(_fallback_warnings(record)) == 1 and opt.gr == "forward"
    for a, b in zip(opt.layers, ref.layers):
        for key in ("A", "G"):
            assert torch.equal(opt.layer_state(a)[key], ref.layer_state(b)[key])
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


# ----------------------------------------------------------------- dropout masks replayed
class _Masks:
    """Records, per forward of each nn.Dropout of a model, which outputs were dropped."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[Tensor] = []
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.register_forward_hook(lambda mod, inp, out: self.calls.append(
                    (out == 0) & (inp[0] != 0)))


def _dropout_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Dropout(0.3), nn.Linear(32, 32),
                         nn.Tanh(), nn.Dropout(0.3), nn.Linear(32, 3)).to(F64)


TWO_PASS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "reng-forward": optimizer_factory("reng-forward", lr=0.05, damping=0.05, rho=0.05),
    "reng-backward": optimizer_factory("reng-forward", lr=0.05, damping=0.05, rho=0.05,
                                       gr="backward"),
    "gradreg-forward-kfac": optimizer_factory("gradreg-kfac", lr=0.05, damping=0.05, gamma=0.05,
                                              epsilon=0.01),
    "gradreg-sam-adamw": optimizer_factory("sam-adamw", lr=1e-2, epsilon=0.05),
}


@pytest.mark.parametrize("name", list(TWO_PASS))
def test_the_probe_pass_sees_the_first_pass_dropout_masks(name: str) -> None:
    """Each step's probe pass draws the same dropout masks as its pass at theta (different
    masks from step to step), and the run trains."""
    model = _dropout_mlp()
    masks = _Masks(model)
    opt = TWO_PASS[name](model)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 6, generator=g, dtype=F64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    losses = []
    for _ in range(8):
        losses.append(float(opt.step(make_closure(opt, lambda: F.cross_entropy(model(x), y)))))
    calls = masks.calls
    assert len(calls) == 8 * 2 * 2  # steps x passes x dropout layers
    for step in range(8):
        first, probe = calls[4 * step: 4 * step + 2], calls[4 * step + 2: 4 * step + 4]
        for a, b in zip(first, probe):
            assert a.any() and torch.equal(a, b)
    assert not torch.equal(calls[0], calls[4])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert float(F.cross_entropy(model(x), y)) < 0.8 * losses[0]


def test_the_rng_stream_after_a_step_is_that_of_one_pass() -> None:
    """After a step the generator is where one pass at theta leaves it: a run draws the same
    random numbers whatever the optimizer (the probe consumes nothing of its own)."""
    model = _dropout_mlp()
    x = torch.randn(16, 6, dtype=F64)
    y = torch.zeros(16, dtype=torch.long)
    opt = RENG(model, lr=0.05, damping=0.05, gr="forward")
    torch.manual_seed(7)
    opt.step(make_closure(opt, lambda: F.cross_entropy(model(x), y)))
    after_step = torch.rand(3)
    torch.manual_seed(7)
    F.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(torch.rand(3), after_step, rtol=0, atol=0)


# --------------------------------------------------- gradients accumulated outside the closure
@pytest.mark.parametrize("name", ["reng-forward", "gradreg-forward-kfac"])
def test_gradients_accumulated_outside_the_closure_are_refused(name: str) -> None:
    """A backward outside step(closure) since the last step (what Lightning's
    accumulate_grad_batches > 1 does) raises instead of being dropped; the usual loop, a
    zero_grad(set_to_none=False) before the step and the gradients a step leaves do not."""
    model = _dropout_mlp().eval()
    opt = TWO_PASS[name](model)
    x = torch.randn(16, 6, dtype=F64)
    y = torch.zeros(16, dtype=torch.long)
    closure = make_closure(opt, lambda: F.cross_entropy(model(x), y))
    opt.step(closure)
    opt.step(closure)                       # the gradients the last step left are no news
    opt.zero_grad(set_to_none=False)
    opt.step(closure)                       # zeroed in place by the optimizer: fine
    F.cross_entropy(model(x[:8]), y[:8]).backward()   # a micro-batch outside the closure
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="outside the closure.*accumulate_grad_batches"):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    opt.zero_grad()
    opt.step(closure)


def test_gradreg_refuses_sparse_gradients_clearly() -> None:
    """GradReg around an nn.Embedding(sparse=True): a ValueError that names the cause."""
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True))
    opt = GradReg(torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.1, epsilon=0.01)
    idx = torch.randint(0, 10, (3,))
    with pytest.raises(ValueError, match=r"sparse gradients.*nn.Embedding\(sparse=False\)"):
        opt.step(make_closure(opt, lambda: model(idx).pow(2).sum()))
    assert model[0].weight.grad is None


def test_gradreg_has_measured_defaults() -> None:
    """GradReg(base) needs no gamma/epsilon: the defaults of bench/gradreg_defaults.py."""
    from grng.optim.gradreg import DEFAULT_EPSILON, DEFAULT_GAMMA

    model = _dropout_mlp()
    opt = GradReg(torch.optim.AdamW(model.parameters()), model=model)
    assert (opt.gamma, opt.epsilon, opt.mode) == (DEFAULT_GAMMA, DEFAULT_EPSILON, "forward")
    summary = Path(__file__).resolve().parents[1] / "bench/results/gradreg_defaults.md"
    assert f"**gamma={DEFAULT_GAMMA}, epsilon={DEFAULT_EPSILON}**" in summary.read_text()


@pytest.mark.parametrize("make", [optimizer_factory("reng-forward"), optimizer_factory("fgr-sgd")])
def test_the_closure_error_of_a_plain_call_names_the_plain_loop(make: Callable) -> None:
    opt = make(_dropout_mlp())
    with pytest.raises(ValueError, match="needs a closure") as err:
        opt.step()
    assert "plain loop" in str(err.value) and "Hugging Face Trainer use" not in str(err.value)
