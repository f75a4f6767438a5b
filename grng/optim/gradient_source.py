"""Gradient sources: how a step's gradient is evaluated from the closure (docs/algorithms.md
section 3, docs/architecture.md).

- :class:`PlainGradient`: g = grad L (one forward, one backward).
- :class:`RegularizedGradient`: grad L_GR = g + gamma H g of L_GR = L + (gamma/2) ||g||^2
  (Karakida et al., ICML 2023), by one of

  - ``"forward"`` (F-GR): (1 - gamma/eps) g(theta) + (gamma/eps) g(theta + eps g), eps = +|epsilon|;
  - ``"backward"`` (B-GR): the same finite difference with eps = -|epsilon|;
  - ``"exact"`` (double backprop): g + gamma H g, H g = grad_theta (g . v) at v = g held constant;
  - ``"sam"`` (normalized SAM): g(theta + epsilon g / ||g||); gamma unused. Unnormalized SAM
    g(theta + eps g) is F-GR with gamma = eps.

  On a quadratic loss the finite differences are exact, so F-GR, B-GR and DB agree to rounding.

The closure follows torch.optim's convention (as for ``torch.optim.LBFGS`` and SAM): it zeroes
the gradients, runs the forward AND the backward pass and returns the loss; a two-pass source
calls it once at theta and once at the probe point (after moving the parameters). A closure
that returns None leaves the gradients as it found them (the plain source uses them). For
``"exact"`` the closure's backward is run with ``create_graph=True`` (``torch.autograd.backward``
is wrapped for the duration of that one call) so that H g can be differentiated from it.

Every gradient is averaged through the communicator's ``average`` hook (the identity in one
process; the mean over ranks under data parallelism, where all passes run inside the
communicator's ``sync_context`` -- DDP's ``no_sync`` -- so exactly two averages are taken per
step: g at theta, and the probe gradient or H g). The probe evaluation (and the Hessian-vector
pass) runs inside ``probe_context`` so that curvature capture sees only theta. Buffers (BatchNorm
statistics) are copied back after the probe forward and parameters are restored bit-exactly.

Mixed precision: with a GradScaler the closure backpropagates ``scaler.scale(loss)``; each
gradient evaluation is averaged while still scaled (as DDP does) and then unscaled exactly once
through ``scaler.unscale_`` (so ``scaler.update()`` sees each inf check); the probe point is
formed from the unscaled gradient; a non-finite gradient at theta means no probe (the caller
skips).
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ContextManager

import torch
from torch import Tensor, nn

from grng.distributed.communicator import Communicator, LocalCommunicator

__all__ = ["MODES", "PlainGradient", "RegularizedGradient", "call_closure",
           "check_gr_hyperparameters", "make_closure", "regularized_gradient"]

MODES: tuple[str, ...] = ("forward", "backward", "exact", "sam")

FORWARD_ONLY = (
    "the closure returned a loss that still needs its backward pass, and no gradient changed: "
    "since grng 0.2 a closure follows torch.optim's convention (as for torch.optim.LBFGS): it "
    "zeroes the gradients, runs the forward AND the backward pass and returns the loss. Wrap a "
    "forward-only function with grng.make_closure(optimizer, forward), or write "
    "`def closure(): opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); return loss`")


def make_closure(target: Any, forward: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """torch.optim's closure from a forward-only ``forward``: zero the gradients of ``target``
    (an optimizer, a module, or an iterable of tensors), loss = forward(), loss.backward(),
    return loss."""
    if isinstance(target, (torch.optim.Optimizer, nn.Module)):
        zero = functools.partial(target.zero_grad, set_to_none=True)
    else:
        tensors = list(target)

        def zero() -> None:
            for t in tensors:
                t.grad = None

    def closure() -> Tensor:
        zero()
        loss = forward()
        loss.backward()
        return loss

    return closure


def call_closure(closure: Callable[[], Tensor | None], params: Sequence[Tensor]) -> Tensor | None:
    """``closure()`` under ``torch.enable_grad()``; a RuntimeError says what to change when it
    is a forward-only closure (its loss needs a backward and no gradient of ``params`` moved)."""
    if not callable(closure):
        raise TypeError(f"closure must be callable, got {type(closure).__name__}")
    before = [(p.grad, None if p.grad is None else p.grad._version) for p in params]
    with torch.enable_grad():
        loss = closure()
    if (isinstance(loss, Tensor) and loss.requires_grad and params
            and all(p.grad is g and (g is None or g._version == v)
                    for p, (g, v) in zip(params, before))):
        raise RuntimeError(FORWARD_ONLY)
    return loss


@contextlib.contextmanager
def _backward_keeps_graph() -> Iterator[None]:
    """Inside: every ``backward`` builds the graph of its gradients (create_graph=True), so a
    torch-convention closure's gradient can be differentiated again (double backprop)."""
    original = torch.autograd.backward

    def backward(tensors: Any, grad_tensors: Any = None, retain_graph: Any = None,
                 create_graph: bool = False, grad_variables: Any = None, inputs: Any = None) -> None:
        original(tensors, grad_tensors, retain_graph=True, create_graph=True, inputs=inputs)

    torch.autograd.backward = backward  # type: ignore[assignment]
    try:
        with warnings.catch_warnings():  # the parameter <-> .grad reference cycle is intended
            warnings.filterwarnings("ignore", message=".*create_graph=True.*")
            yield
    finally:
        torch.autograd.backward = original  # type: ignore[assignment]


def _double_backward_error(err: RuntimeError) -> RuntimeError:
    return RuntimeError(
        "the exact (double backprop) gradient regularization needs a double backward, which this "
        f"model does not support ({err}); a torch.compile'd model does not: use the finite "
        "differences (mode/gr='forward' or 'backward') or an uncompiled model")


def check_gr_hyperparameters(gamma: float, epsilon: float, mode: str) -> None:
    """Require gamma >= 0 finite, epsilon != 0 finite, mode in MODES (ValueError naming it)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, value in (("gamma", gamma), ("epsilon", epsilon)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    if not math.isfinite(epsilon) or epsilon == 0:
        raise ValueError(f"epsilon must be a finite nonzero number, got {epsilon!r}")


class _Amp:
    """A torch.amp.GradScaler seen by one gradient evaluation.

    unscale_ may be called once per "optimizer" between updates, so each evaluation gets its
    own view (an object with ``param_groups``); the views of the last call stay referenced
    (``_LIVE``) so their ids cannot be reused before ``scaler.update()``.
    """

    _LIVE: dict[int, list] = {}

    def __init__(self, scaler: Any) -> None:
        self.scaler = scaler
        self.views: list = []
        _Amp._LIVE[id(scaler)] = self.views

    def unscale(self, params: Sequence[Tensor]) -> None:
        view = type("_AmpView", (), {})()
        view.param_groups = [{"params": list(params)}]
        self.views.append(view)
        self.scaler.unscale_(view)


def _closure_gradient(closure: Callable[[], Tensor], params: Sequence[Tensor],
                      comm: Communicator, amp: _Amp | None = None
                      ) -> tuple[Tensor, list[Tensor | None]]:
    """(loss, averaged grad_params L) from one call of a torch-convention closure; ``.grad``
    is reset to None around it. With ``amp``: the closure backpropagated the scaled loss; its
    gradients are averaged, then unscaled once."""
    for p in params:
        p.grad = None
    loss = call_closure(closure, params)
    if loss is None:
        raise ValueError("a two-pass gradient (RENG, GradReg) needs a closure that returns the "
                         "loss: it calls the closure again at the probe point")
    grads = comm.average([p.grad for p in params], params)
    if amp is not None:
        for p, g in zip(params, grads):
            p.grad = g
        amp.unscale(params)
        grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    return loss, grads


def _probe_gradient(params: Sequence[Tensor], grads: Sequence[Tensor], scale: float | Tensor,
                    closure: Callable[[], Tensor], probe_context: Callable[[], ContextManager[Any]],
                    buffers: Sequence[Tensor], comm: Communicator, amp: _Amp | None = None
                    ) -> list[Tensor]:
    """g(theta + scale * grads) (averaged) from a second call of the closure, with params and
    buffers copied back bit-exactly."""
    saved_params = [p.detach().clone() for p in params]
    saved_buffers = [b.detach().clone() for b in buffers]
    try:
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(g * (scale.to(g.device) if isinstance(scale, Tensor) else scale))
        with probe_context():
            _, probe_grads = _closure_gradient(closure, params, comm, amp)
    finally:
        with torch.no_grad():
            for p, saved in zip(params, saved_params):
                p.copy_(saved)
            for b, saved in zip(buffers, saved_buffers):
                b.copy_(saved)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, probe_grads)]


def _hessian_vector(params: Sequence[Tensor], local: Sequence[Tensor], vectors: Sequence[Tensor],
                    probe_context: Callable[[], ContextManager[Any]], comm: Communicator,
                    v_scale: float = 1.0) -> list[Tensor]:
    """H v averaged = grad_theta (g_local(theta) . v), v held constant (``local`` has its graph);
    ``v_scale`` multiplies v (1/S for loss-scaled gradients)."""
    pairs = [(g, v) for g, v in zip(local, vectors) if g is not None and g.requires_grad]
    hvp: Sequence[Tensor | None] = [None] * len(params)
    if pairs:
        try:
            with probe_context():
                hvp = torch.autograd.grad(
                    [g for g, _ in pairs], params,
                    grad_outputs=[v.detach() if v_scale == 1.0 else v.detach() * v_scale
                                  for _, v in pairs],
                    allow_unused=True)
        except RuntimeError as err:
            if "double backward" not in str(err):
                raise
            raise _double_backward_error(err) from err
    hvp = comm.average(list(hvp), params)
    return [torch.zeros_like(p) if h is None else h for p, h in zip(params, hvp)]


class PlainGradient:
    """g = grad L from a torch-convention closure (it zeroes, runs forward and backward)."""

    def evaluate(self, params: Sequence[Tensor], closure: Callable[[], Tensor | None], *,
                 grad_scaler: Any = None, unscale: Callable[[], None] | None = None
                 ) -> Tensor | None:
        """Call the closure; returns its loss (detached; None when it returned None, which
        leaves the gradients present as they are). ``unscale`` unscales the gradients after a
        closure that backpropagated ``grad_scaler.scale(loss)``."""
        loss = call_closure(closure, params)
        if loss is None:
            return None
        if grad_scaler is not None and unscale is not None:
            unscale()
        return loss.detach() if isinstance(loss, Tensor) else torch.as_tensor(loss)


class RegularizedGradient:
    """grad L_GR = g + gamma H g (module docstring); ``gamma``, ``epsilon``, ``mode``."""

    def __init__(self, gamma: float, epsilon: float, mode: str) -> None:
        check_gr_hyperparameters(gamma, epsilon, mode)
        self.gamma = gamma
        self.epsilon = epsilon
        self.mode = mode

    def evaluate(self, params: Sequence[Tensor], closure: Callable[[], Tensor], *,
                 comm: Communicator | None = None,
                 probe_context: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
                 buffers: Sequence[Tensor] = (), grad_scaler: Any = None) -> Tensor:
        """Write grad L_GR into each param's ``.grad`` (None for params without a gradient);
        returns the loss at theta, detached. See :func:`regularized_gradient`."""
        comm = comm or LocalCommunicator()
        amp = _Amp(grad_scaler) if grad_scaler is not None and grad_scaler.is_enabled() else None
        with comm.sync_context():
            used_params, result, loss = self._evaluate(list(params), closure, comm, probe_context,
                                                       buffers, amp)
        for p, r in zip(used_params, result):
            p.grad = r.detach()
        return loss

    def _evaluate(self, params: list[Tensor], closure: Callable[[], Tensor], comm: Communicator,
                  probe_context: Callable[[], ContextManager[Any]], buffers: Sequence[Tensor],
                  amp: _Amp | None) -> tuple[list[Tensor], list[Tensor], Tensor]:
        gamma, epsilon, mode = self.gamma, self.epsilon, self.mode
        trainable = [p for p in params if p.requires_grad]
        double_backprop = mode == "exact" and gamma != 0
        if double_backprop:
            for p in params:
                p.grad = None
            try:
                with _backward_keeps_graph():
                    loss = call_closure(closure, trainable)
            except RuntimeError as err:
                if "double backward" not in str(err):
                    raise
                raise _double_backward_error(err) from err
            if loss is None:
                raise ValueError("a two-pass gradient (RENG, GradReg) needs a closure that "
                                 "returns the loss")
            local = [p.grad for p in trainable]
            for p in params:
                p.grad = None
            averaged = comm.average(local, trainable)
        else:
            loss, local = _closure_gradient(closure, trainable, comm, amp)
            averaged = local
        if not trainable:
            return [], [], loss.detach()
        idx = [i for i, gi in enumerate(averaged) if gi is not None]
        if not idx:
            return [], [], loss.detach()
        used = [trainable[i] for i in idx]
        g = [averaged[i] for i in idx]
        loss = loss.detach()

        if double_backprop:
            inv = 1.0 if amp is None else 1.0 / float(amp.scaler.get_scale())
            hg = _hessian_vector(used, [local[i] for i in idx], g, probe_context, comm, inv)
            result = [gi.detach() + gamma * hi for gi, hi in zip(g, hg)]
            if amp is not None:  # g + gamma H g, all carrying S, unscaled once
                for p, r in zip(used, result):
                    p.grad = r.detach()
                amp.unscale(used)
                result = [p.grad for p in used]
            return used, result, loss
        if amp is not None and not all(bool(torch.isfinite(gi).all()) for gi in g):
            return used, g, loss  # overflow at theta: no probe; the caller skips
        if mode == "sam":
            dtype = functools.reduce(torch.promote_types, [gi.dtype for gi in g], torch.float32)
            norms = [torch.linalg.vector_norm(gi).to(g[0].device, dtype) for gi in g]
            norm = torch.linalg.vector_norm(torch.stack(norms))
            positive = norm > 0
            scale = torch.where(positive, abs(epsilon) / norm, torch.zeros_like(norm))
            g_probe = _probe_gradient(used, g, scale, closure, probe_context, buffers, comm, amp)
            result = [torch.where(positive.to(gi.device), gp, gi) for gi, gp in zip(g, g_probe)]
        elif gamma == 0:
            result = g
        else:
            eps = abs(epsilon) if mode == "forward" else -abs(epsilon)
            c = gamma / eps
            g_probe = _probe_gradient(used, g, eps, closure, probe_context, buffers, comm, amp)
            result = [gi.mul(1 - c).add_(gp, alpha=c) for gi, gp in zip(g, g_probe)]
        return used, result, loss


def regularized_gradient(
    params: list[Tensor],
    closure: Callable[[], Tensor],
    gamma: float,
    epsilon: float,
    mode: str,
    *,
    probe_context: Callable[[], ContextManager] = contextlib.nullcontext,
    buffers: Sequence[Tensor] = (),
    grad_scaler: Any = None,
    comm: Communicator | None = None,
) -> Tensor:
    """Write grad L_GR = g + gamma H g (L_GR = L + (gamma/2)||g||^2) into each param's ``.grad``.

    ``closure()`` follows torch.optim's convention: it zeroes the gradients, runs the forward
    and the backward pass and returns the loss (``grng.make_closure(params, forward)`` makes
    one from a forward-only function). It is called under ``torch.enable_grad()``, once at
    theta and, for ``"forward"``, ``"backward"`` and ``"sam"``, once more at the probe point
    inside ``probe_context()`` (``"exact"`` keeps the graph of its backward and runs the
    Hessian-vector pass there instead). ``buffers`` are copied back after the probe forward and
    params are bit-identical afterwards.

    Existing ``.grad`` values are discarded (set to None before each call). Params without a gradient at
    theta (unused, or ``requires_grad=False``) get ``.grad = None`` and are not moved; a param
    used at theta but not at the probe counts a zero probe gradient. ``grad_scaler``: see the
    module docstring; call ``scaler.update()`` after the optimizer step. ``comm``: the
    communicator whose ``average`` makes each gradient global (default: one process).

    With gamma == 0, ``"forward"``, ``"backward"`` and ``"exact"`` return the plain gradient
    after one pass. ``"sam"`` ignores gamma and probes at radius |epsilon| (g itself when
    ||g|| == 0). Returns the loss at theta, detached.
    """
    return RegularizedGradient(gamma, epsilon, mode).evaluate(
        params, closure, comm=comm, probe_context=probe_context, buffers=buffers,
        grad_scaler=grad_scaler)
