"""The capture's lifetime (docs/numerics.md "The capture's lifetime", issue 23): the hooks live
and die with the optimizer, captured inputs with the autograd graph, rows with the gradient they
belong to; checkpoints check the kind of curvature state; Conv patches fill one buffer;
torch.compile captures (or fails loudly). Each case runs for K-FAC, RING, RENG and R-Kalman.
Leaks are asserted on object lifetimes (weak references, hook dicts); the memory figures are in
``bench/capture_memory.py``."""
from __future__ import annotations

import copy
import gc
import io
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef

import grng
from grng.curvature import layers as layer_helpers
from grng.curvature.layers import ForwardHook
from grng.optim.cases import optimizer_factory
from optimizer_helpers import F64, FACTORIES, _assert_same, _data, _mlp

# the members that capture (the eigenbasis member through K-FAC's capture)
FACTORIES = {**FACTORIES, "ekfac": optimizer_factory("ekfac", lr=1e-2, inverse_every=2)}
NAMES = ["kfac-eigen", "ring", "reng-forward", "rkalman", "ekfac"]


def _needs_closure(name: str) -> bool:
    return name.startswith("reng")


def _step(name: str, opt, model: nn.Module, x: Tensor, y: Tensor, backward=None):
    """One training step in the loop style ``forward; backward; step; zero_grad`` (RENG: the
    same inside ``step(closure)``); ``backward(out, y)`` runs the backward pass(es)."""
    backward = backward or (lambda out, y: F.cross_entropy(out, y).backward())

    def closure() -> Tensor:
        opt.zero_grad()
        out = model(x)
        backward(out, y)
        return F.cross_entropy(out.detach(), y)

    if _needs_closure(name):
        opt.step(closure)
    else:
        backward(model(x), y)
        opt.step()
        opt.zero_grad()


def _hooks_of(model: nn.Module) -> list:
    """Every grng hook on the model's modules and parameters."""
    out = [h for m in model.modules() for h in m._forward_hooks.values()
           if isinstance(h, ForwardHook)]
    return out + [h for p in model.parameters()
                  for h in (p._post_accumulate_grad_hooks or {}).values()]


# ------------------------------------------------------------------ case 1: the hooks' owner


@pytest.mark.parametrize("name", NAMES)
def test_deleted_optimizer_stops_capturing_and_is_collected(name: str) -> None:
    model = _mlp()
    opt = FACTORIES[name](model)
    x, y = _data(1)[0]
    _step(name, opt, model, x, y)
    assert _hooks_of(model)
    ref, capture = weakref.ref(opt), weakref.ref(opt.capture)
    del opt
    gc.collect()
    assert ref() is None and capture() is None
    assert _hooks_of(model) == []
    adamw = torch.optim.AdamW(model.parameters())  # the fine-tuning phase: nothing is recorded
    F.cross_entropy(model(x), y).backward()
    adamw.step()


@pytest.mark.parametrize("name", NAMES)
def test_second_optimizer_never_stepped_is_collected(name: str) -> None:
    model = _mlp()
    first = FACTORIES[name](model)
    second = FACTORIES[name](model)
    ref = weakref.ref(second.capture)
    del second
    gc.collect()
    assert ref() is None
    assert len([h for h in _hooks_of(model) if isinstance(h, ForwardHook)]) == len(
        {id(layer.module) for layer in first.layers})
    x, y = _data(1)[0]
    _step(name, first, model, x, y)
    assert first.steps == 1


@pytest.mark.parametrize("name", NAMES)
def test_live_second_optimizer_never_stepped_holds_at_most_one_batch(name: str) -> None:
    model = _mlp()
    first, second = FACTORIES[name](model), FACTORIES[name](model)
    for x, y in _data(4):
        _step(name, first, model, x, y)  # its zero_grad sets the gradients to None
        assert second.capture.unfolded_calls() <= len(second.layers)
    assert second.capture.unfolded_calls() > 0  # it does record (the last batch)


@pytest.mark.parametrize("name", NAMES)
def test_close_and_context_manager_remove_the_hooks(name: str) -> None:
    model = _mlp()
    x, y = _data(1)[0]
    with FACTORIES[name](model) as opt:
        _step(name, opt, model, x, y)
        assert _hooks_of(model)
    assert _hooks_of(model) == [] and not opt.capture.attached
    F.cross_entropy(model(x), y).backward()
    assert opt.capture.unfolded_calls() == 0
    opt.close()  # idempotent


def test_collecting_a_wrapper_that_shares_the_optimizer_dict_keeps_the_hooks() -> None:
    """Lightning's LightningOptimizer is an instance of a subclass of the optimizer's class with
    a copy of its ``__dict__``; its collection must not detach the optimizer's capture."""
    model = _mlp()
    opt = grng.KFAC(model)
    wrapper = object.__new__(type("LightningKFAC", (type(opt),), {}))
    wrapper.__dict__.update(opt.__dict__)
    del wrapper
    gc.collect()
    assert opt.capture.attached and _hooks_of(model)


# ---------------------------------------------- case 2: forwards that are never backpropagated


@pytest.mark.parametrize("name", NAMES)
def test_forward_without_backward_is_freed_with_its_graph(name: str) -> None:
    model = _mlp()
    opt = FACTORIES[name](model)
    x, y = _data(1)[0]
    _step(name, opt, model, x, y)
    refs = []
    for _ in range(5):  # validation with gradients on, never backpropagated
        batch = torch.randn(64, 4, dtype=F64)
        refs.append(StorageWeakRef(batch.untyped_storage()))
        loss = F.cross_entropy(model(batch), torch.zeros(64, dtype=torch.long))
        del batch, loss
    gc.collect()
    assert all(r.expired() for r in refs)
    assert opt.capture.unfolded_calls() == 0


@pytest.mark.parametrize("name", NAMES)
def test_rows_are_not_held_after_the_step_by_a_kept_loss(name: str) -> None:
    model = _mlp()
    opt = FACTORIES[name](model)
    x, y = _data(1)[0]
    x = x.clone()
    ref = StorageWeakRef(x.untyped_storage())
    kept = []
    _step(name, opt, model, x, y, backward=lambda out, y: kept.append(
        F.cross_entropy(out, y)) or kept[-1].backward())
    del x
    gc.collect()
    assert kept and ref.expired()  # the loss (and its graph's hooks) live, the input does not


# ------------------------------------------------------------------ case 3: pickling the model


@pytest.mark.parametrize("name", NAMES)
def test_model_pickles_with_a_live_and_a_deleted_optimizer(name: str) -> None:
    model = _mlp()
    opt = FACTORIES[name](model)
    x, y = _data(1)[0]
    _step(name, opt, model, x, y)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    twin = copy.deepcopy(model)
    for other in (loaded, twin):  # inert hooks: nothing reaches the live optimizer
        F.cross_entropy(other(x), y).backward()
        torch.testing.assert_close(other(x), model(x))
    assert opt.capture.unfolded_calls() == 0
    del opt
    gc.collect()
    torch.save(model, io.BytesIO())


# ----------------------------------------------- case 4: several backward passes, one forward


def _two_losses(out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return F.cross_entropy(out, y), 0.3 * out.square().mean()


@pytest.mark.parametrize("name", NAMES)
def test_two_backward_passes_give_the_summed_loss_curvature(name: str) -> None:
    torch.manual_seed(3)
    model = _mlp()
    twin = copy.deepcopy(model)
    o_two, o_sum = FACTORIES[name](model), FACTORIES[name](twin)

    def two(out: Tensor, y: Tensor) -> None:
        l1, l2 = _two_losses(out, y)
        l1.backward(retain_graph=True)
        l2.backward()

    def summed(out: Tensor, y: Tensor) -> None:
        sum(_two_losses(out, y)).backward()

    for x, y in _data(3):
        _step(name, o_two, model, x, y, two)
        _step(name, o_sum, twin, x, y, summed)
    # Adam's normalization (EKFAC) divides gradients at rounding level by about eps: the two
    # summations of a cancelling gradient differ there by ~1e-11 after the step
    atol = 1e-10 if name == "ekfac" else 1e-13
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=atol)
    for la, lb in zip(o_two.layers, o_sum.layers):
        for key, value in o_sum.layer_state(lb).items():
            torch.testing.assert_close(o_two.layer_state(la)[key], value, rtol=1e-11,
                                       atol=1e-12)


def test_two_backward_passes_g_against_float64_summed_loss_factor() -> None:
    lin = nn.Linear(4, 3).double()
    x, y = torch.randn(9, 4, dtype=F64), torch.randint(0, 3, (9,))
    out = lin(x)
    g_sum, = torch.autograd.grad(sum(_two_losses(out, y)), out)
    g_first, = torch.autograd.grad(_two_losses(out, y)[0], out)
    e, e_first = 9 * g_sum, 9 * g_first
    opt = grng.KFAC(lin, lr=0.0)
    l1, l2 = _two_losses(lin(x), y)
    l1.backward(retain_graph=True)
    l2.backward()
    opt.step()
    G = opt.layer_state(opt.layers[0])["G"]
    torch.testing.assert_close(G, e.T @ e / 9, rtol=1e-12, atol=1e-14)
    assert (G - e_first.T @ e_first / 9).abs().max() > 1e-3  # the first loss alone differs


# ------------------------------------------------------- case 5: a batch dropped after backward


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", ["finite", "nan"])
@pytest.mark.parametrize("guard", ["opt.zero_grad", "model.zero_grad"])
def test_dropped_batch_leaves_no_rows(name: str, bad: str, guard: str) -> None:
    torch.manual_seed(5)
    model = _mlp()
    clean = copy.deepcopy(model)
    opt, o_clean = FACTORIES[name](model), FACTORIES[name](clean)
    data = _data(4)
    for i, (x, y) in enumerate(data):
        if i == 2:  # on a factor step, the user's own guard drops a batch after its backward
            xb = 5.0 * torch.randn_like(x) if bad == "finite" else x.clone().fill_(float("nan"))
            F.cross_entropy(model(xb), y).backward()
            opt.zero_grad() if guard == "opt.zero_grad" else model.zero_grad()
        _step(name, opt, model, x, y)
        _step(name, o_clean, clean, x, y)
    assert opt.skipped_steps == 0
    for p, q in zip(model.parameters(), clean.parameters()):
        assert torch.equal(p, q)
    _assert_same(opt.state_dict(), o_clean.state_dict())


def test_zero_grad_between_forward_and_backward_keeps_the_rows() -> None:
    """``out = model(x); opt.zero_grad(); loss.backward(); opt.step()`` (a common loop) keeps
    the rows of the forward that precedes zero_grad."""
    torch.manual_seed(6)
    model = _mlp()
    twin = copy.deepcopy(model)
    opt, o_twin = grng.KFAC(model, lr=0.1), grng.KFAC(twin, lr=0.1)
    for x, y in _data(2):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        o_twin.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        o_twin.step()
    _assert_same(opt.state_dict(), o_twin.state_dict())


# --------------------------------------------------- case 6: checkpoint state kinds on resume


def _partial(name: str, model: nn.Module):
    """Built on the first Linear, the second added with add_param_group (diagonal fallback)."""
    opt = FACTORIES[name](model, param_groups=[{"params": list(model[0].parameters())}])
    opt.add_param_group({"params": [p for m in list(model)[1:] for p in m.parameters()]})
    return opt


def _run(name: str, model: nn.Module, opt, data) -> None:
    for x, y in data:
        _step(name, opt, model, x, y)


@pytest.mark.parametrize("name", NAMES)
def test_resume_after_add_param_group_is_exact_or_a_clear_error(name: str) -> None:
    torch.manual_seed(7)
    data = _data(5)
    model = _mlp()
    start = copy.deepcopy(model.state_dict())
    opt = _partial(name, model)
    _run(name, model, opt, data[:3])
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    _run(name, model, opt, data[3:])

    resumed = _mlp()
    resumed.load_state_dict(saved[0])
    o_resumed = _partial(name, resumed)  # built as the saved one was: loads, continues exactly
    o_resumed.load_state_dict(saved[1])
    _run(name, resumed, o_resumed, data[3:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)

    full = _mlp()
    full.load_state_dict(saved[0])
    # the first parameter of the layer whose saved state kind differs is named (EKFAC's bias
    # keeps Adam moments of its own on the diagonal, so its bias is met first)
    with pytest.raises(ValueError, match=r"'3\.(weight|bias)'.*diagonal.*(Kronecker )?block.*"
                                         r"add_param_group"):
        FACTORIES[name](full).load_state_dict(saved[1])

    other = _mlp()  # the reverse: a full run's checkpoint into the add_param_group build
    other.load_state_dict(start)
    o_full = FACTORIES[name](other)
    _run(name, other, o_full, data[:1])
    with pytest.raises(ValueError, match=r"'3\.weight'.*Kronecker block.*diagonal unit"):
        _partial(name, _mlp()).load_state_dict(o_full.state_dict())


# ----------------------------------------------------------- case 8: Conv capture in one buffer


@pytest.mark.parametrize("bias", [True, False])
def test_conv_rows_in_chunks_equal_the_whole_unfold(bias: bool, monkeypatch) -> None:
    conv2 = nn.Conv2d(3, 4, (2, 3), stride=(2, 1), padding=(1, 2), dilation=(1, 2),
                      bias=bias).double()
    conv1 = nn.Conv1d(3, 5, 3, padding="same", padding_mode="reflect", bias=bias).double()
    calls2 = [torch.randn(5, 3, 6, 7, dtype=F64), torch.randn(2, 3, 5, 6, dtype=F64)[..., ::2]]
    calls1 = [torch.randn(4, 3, 9, dtype=F64), torch.randn(3, 11, dtype=F64)]  # one unbatched
    for module, calls in ((conv2, calls2), (conv1, calls1)):
        helper = layer_helpers.helper_for(module)(module)
        whole = helper.a_rows(calls)
        monkeypatch.setattr(layer_helpers, "PATCH_CHUNK_ELEMENTS", 1)  # one example a chunk
        chunked = helper.a_rows(calls)
        monkeypatch.undo()
        assert whole.n == chunked.n == whole.X.shape[0]
        assert torch.equal(whole.X, chunked.X)
        # against torch's own unfold, laid out (rows, C*k [+ 1])
        if module is conv2:
            ref = torch.cat([F.unfold(a, module.kernel_size, dilation=module.dilation,
                                      padding=module.padding, stride=module.stride)
                             .transpose(1, 2).reshape(-1, 3 * 6) for a in calls])
            if bias:
                ref = torch.cat([ref, torch.ones(ref.shape[0], 1, dtype=F64)], 1)
            assert torch.equal(whole.X, ref)


# -------------------------------------------------------------------- case 9: torch.compile


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 9), nn.Linear(9, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize("name", NAMES)
def test_compiled_model_of_a_class_compiled_before_the_optimizer_captures(name: str) -> None:
    """A compiled model of the same class ran a forward with gradients (an AdamW warm start)
    before the optimizer was built: the capture still records, as in eager mode."""
    torch._dynamo.reset()
    torch.manual_seed(9)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    warm = torch.compile(_Net(), backend="aot_eager")
    F.cross_entropy(warm(x), y).backward()
    eager = _Net()
    model = copy.deepcopy(eager)
    o_eager, o_comp = FACTORIES[name](eager), FACTORIES[name](model)
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(2):
        _step(name, o_eager, eager, x, y)
        _step(name, o_comp, compiled, x, y)
    for la, lb in zip(o_eager.layers, o_comp.layers):
        for key in ("A", "G", "PA", "PG"):
            if key in o_eager.layer_state(la):
                torch.testing.assert_close(o_comp.layer_state(lb)[key],
                                           o_eager.layer_state(la)[key], rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()


class _Functional(nn.Module):
    """Uses its Linear's weight without calling the Linear: the capture's hooks never run."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.fc.weight, self.fc.bias)


@pytest.mark.parametrize("name", NAMES)
def test_bypassed_hooks_fail_loudly_on_the_first_step(name: str) -> None:
    model = _Functional()
    opt = FACTORIES[name](model)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    with pytest.raises(RuntimeError, match="'fc'.*none of the curvature capture's forward hooks"):
        _step(name, opt, model, x, y)


def test_paused_forward_then_backward_is_not_a_bypass() -> None:
    model = _mlp()
    opt = grng.KFAC(model, lr=0.1)
    x, y = _data(1)[0]
    with opt.curvature_paused():
        loss = F.cross_entropy(model(x), y)
    loss.backward()  # the hooks ran (paused): no error, no rows
    opt.step()
    assert "A" not in opt.layer_state(opt.layers[0])
