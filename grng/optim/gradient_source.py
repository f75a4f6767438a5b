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
is wrapped for the duration of that one call) so that H g can be differentiated from it; a
model without a double backward (CPU flash attention, a compiled model) falls back to
``"forward"`` with one warning (:class:`RegularizedGradient`).

The probe pass sees the first pass's randomness: the CPU generator and those of the
parameters' CUDA devices are set back to their states before the first call
(:class:`RngState`), so dropout draws the same masks at theta and at the probe point, as SAM
implementations do; otherwise the mask-to-mask difference of the two gradients, multiplied by
gamma/eps, would dominate the finite difference.

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
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
from torch import Tensor, nn

from grng.distributed.communicator import Communicator, LocalCommunicator

__all__ = ["MODES", "GradientWatch", "PlainGradient", "RegularizedGradient", "RngState",
           "call_closure", "check_gr_hyperparameters", "closure_required", "make_closure",
           "regularized_gradient"]

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


def no_double_backward(err: BaseException) -> bool:
    """Whether ``err`` is torch saying the model has no double backward (an op without a
    derivative of its backward, e.g. CPU flash attention; a torch.compile'd model)."""
    text = str(err)
    return ("double backward" in text or "donated buffer" in text
            or ("derivative for" in text and "not implemented" in text))


@dataclass
class RngState:
    """The CPU generator's state and the states of the CUDA devices the parameters are on: the
    probe pass replays the first pass's randomness (dropout masks), as SAM implementations do."""

    cpu: Tensor
    cuda: dict[int, Tensor]

    @classmethod
    def capture(cls, params: Iterable[Tensor] = ()) -> "RngState":
        """The current states (host-side copies of seed and offset on CUDA: no device
        synchronization), CUDA for the devices of ``params``."""
        devices = sorted({p.device.index or 0 for p in params if p.is_cuda})
        return cls(torch.get_rng_state(), {i: torch.cuda.get_rng_state(i) for i in devices})

    def restore(self) -> None:
        """Set the generators back to the captured states."""
        torch.set_rng_state(self.cpu)
        for i, state in self.cuda.items():
            torch.cuda.set_rng_state(state, i)


#: the frameworks whose frames ``step`` may be called from, outermost meaning first, and what a
#: two-pass optimizer (RENG, GradReg) needs there
_FRAMEWORK_HINTS: tuple[tuple[str, str], ...] = (
    ("transformers", "in the Hugging Face Trainer use grng.integrations.transformers."
                     "GRNGTrainer, which gives step() that closure"),
    ("lightning", "in Lightning's automatic optimization Lightning passes the closure; in manual "
                  "optimization call opt.step(closure) with a closure that zeroes the gradients, "
                  "runs forward and self.manual_backward(loss) and returns the loss"),
    ("pytorch_lightning", "in Lightning's automatic optimization Lightning passes the closure; "
                          "in manual optimization call opt.step(closure)"),
    ("accelerate", "with accelerate call opt.step(closure) with a closure that calls "
                   "opt.zero_grad(), runs forward and accelerator.backward(loss) for every "
                   "micro-batch of the window and returns the loss (README 'Using grng with "
                   "... accelerate')"),
)


def framework_hint() -> str:
    """What applies to the caller: the hint of the first framework in ``_FRAMEWORK_HINTS``
    with a frame on the call stack (the HF Trainer calls through accelerate), else the
    plain-loop recipe and where the frameworks' recipes are."""
    frame, found = sys._getframe(1), set()
    while frame is not None:
        found.add(str(frame.f_globals.get("__name__", "")).partition(".")[0])
        frame = frame.f_back
    for package, hint in _FRAMEWORK_HINTS:
        if package in found:
            return hint
    return ("in a plain loop pass opt.step(closure) or opt.step(grng.make_closure(opt, forward)); "
            "for Lightning, the Hugging Face Trainer and accelerate see the README's 'Using grng "
            "with ...'")


def closure_required(owner: str, why: str) -> ValueError:
    """The error of a two-pass ``step()`` called without a closure: what it needs and why, and
    what applies where it was called from (:func:`framework_hint`)."""
    return ValueError(f"{owner}.step needs a closure (torch.optim's convention: it zeroes the "
                      f"gradients, runs forward and backward and returns the loss): {why}; "
                      f"{framework_hint()}")


class GradientWatch:
    """The gradients a two-pass step left behind. ``step(closure)`` replaces ``.grad`` by the
    closure's gradient, so gradients computed since (a backward outside the closure: Lightning's
    ``accumulate_grad_batches > 1``, a hand-written accumulation loop) would be dropped
    silently; :meth:`check` refuses them. Only ``.grad`` identities and version counters are
    read (no device synchronization)."""

    def __init__(self) -> None:
        self._left: dict[int, tuple[weakref.ref, int]] = {}

    def remember(self, params: Iterable[Tensor]) -> None:
        """Record the gradients present now as not new (end of a step, ``zero_grad``)."""
        self._left = {id(p): (weakref.ref(p.grad), p.grad._version)
                      for p in params if p.grad is not None}

    def check(self, params: Iterable[Tensor], owner: str) -> None:
        """ValueError if a parameter holds a gradient that was not there (unchanged) at the last
        :meth:`remember`."""
        for p in params:
            g = p.grad
            if g is None:
                continue
            left = self._left.get(id(p))
            if left is None or left[0]() is not g or left[1] != g._version:
                raise ValueError(
                    f"{owner}.step(closure) found gradients computed outside the closure since "
                    f"the last step (a parameter of shape {tuple(p.shape)}): step(closure) "
                    "recomputes the gradient from the closure alone (at theta and at the probe "
                    "point), so they would be dropped silently. This happens with gradient "
                    "accumulation outside the closure, e.g. Lightning's Trainer("
                    "accumulate_grad_batches > 1): use a larger batch, or one closure over all "
                    "micro-batches (manual optimization); otherwise call opt.zero_grad() "
                    f"(set_to_none=True) instead of a backward before step(closure); "
                    f"{framework_hint()}")


def _loss_required() -> ValueError:
    """The error of a two-pass evaluation whose closure returned None."""
    return ValueError("a two-pass gradient (RENG, GradReg) needs a closure that returns the "
                      "loss: it calls the closure again at the probe point (or differentiates "
                      f"through its backward); {framework_hint()}")


def _refuse_sparse(params: Sequence[Tensor]) -> None:
    """ValueError if a gradient is sparse: the probe point theta + eps g needs a dense g."""
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            for q in params:
                q.grad = None
            raise ValueError(
                "the regularized gradient (RENG, GradReg) does not support sparse gradients (a "
                f"parameter of shape {tuple(p.shape)} has one): it moves the parameters along g "
                "to a probe point; use dense ones, e.g. nn.Embedding(sparse=False)")


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
        raise _loss_required()
    _refuse_sparse(params)
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
                    buffers: Sequence[Tensor], comm: Communicator, amp: _Amp | None = None,
                    rng: RngState | None = None) -> list[Tensor]:
    """g(theta + scale * grads) (averaged) from a second call of the closure, with params and
    buffers copied back bit-exactly; ``rng``: the generators' states of the first call,
    restored before this one (the same dropout masks)."""
    saved_params = [p.detach().clone() for p in params]
    saved_buffers = [b.detach().clone() for b in buffers]
    try:
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(g * (scale.to(g.device) if isinstance(scale, Tensor) else scale))
        if rng is not None:
            rng.restore()
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
        with probe_context():
            hvp = torch.autograd.grad(
                [g for g, _ in pairs], params,
                grad_outputs=[v.detach() if v_scale == 1.0 else v.detach() * v_scale
                              for _, v in pairs],
                allow_unused=True)
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
    """grad L_GR = g + gamma H g (module docstring); ``gamma``, ``epsilon``, ``mode``.

    ``mode="exact"`` on a model without a double backward (CPU flash attention, as in
    ``nn.TransformerEncoder(batch_first=True)`` and Hugging Face models with SDPA attention; a
    torch.compile'd model) falls back to ``"forward"`` with the same ``epsilon``, with one
    warning naming ``label``: :attr:`mode` is "forward" from then on. The probe pass of every
    finite difference replays the first pass's randomness (:class:`RngState`).
    """

    def __init__(self, gamma: float, epsilon: float, mode: str, label: str = "GradReg") -> None:
        check_gr_hyperparameters(gamma, epsilon, mode)
        self.gamma = gamma
        self.epsilon = epsilon
        self.mode = mode
        self.label = label

    def evaluate(self, params: Sequence[Tensor], closure: Callable[[], Tensor], *,
                 comm: Communicator | None = None,
                 probe_context: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
                 buffers: Sequence[Tensor] = (), grad_scaler: Any = None,
                 restart: Callable[[], None] = lambda: None) -> Tensor:
        """Write grad L_GR into each param's ``.grad`` (None for params without a gradient);
        returns the loss at theta, detached. See :func:`regularized_gradient`; ``restart``
        drops what a failed double-backprop pass at theta left (captured rows) before it is
        run again as a finite difference."""
        comm = comm or LocalCommunicator()
        if self.mode == "exact" and comm.no_double_backward is not None:
            self._fall_back(RuntimeError(comm.no_double_backward))
        amp = _Amp(grad_scaler) if grad_scaler is not None and grad_scaler.is_enabled() else None
        with comm.sync_context():
            used_params, result, loss = self._evaluate(list(params), closure, comm, probe_context,
                                                       buffers, amp, restart)
        for p, r in zip(used_params, result):
            p.grad = r.detach()
        return loss

    def _fall_back(self, err: RuntimeError) -> None:
        """Switch to the forward finite difference, with one warning that says why."""
        self.mode = "forward"
        warnings.warn(
            f"{self.label}: this model has no double backward ({str(err).splitlines()[0]}), so "
            f"the exact gradient regularization falls back to the forward finite difference "
            f"(gr/mode='forward', epsilon={self.epsilon}) from now on; pass it explicitly to "
            "silence this warning (docs/algorithms.md section 3)", UserWarning, stacklevel=2)

    def _evaluate(self, params: list[Tensor], closure: Callable[[], Tensor], comm: Communicator,
                  probe_context: Callable[[], ContextManager[Any]], buffers: Sequence[Tensor],
                  amp: _Amp | None, restart: Callable[[], None]
                  ) -> tuple[list[Tensor], list[Tensor], Tensor]:
        trainable = [p for p in params if p.requires_grad]
        rng = RngState.capture(trainable)
        if self.mode == "exact" and self.gamma != 0:
            for p in params:
                p.grad = None
            try:
                with _backward_keeps_graph():
                    loss = call_closure(closure, trainable)
            except RuntimeError as err:
                if not no_double_backward(err):
                    raise
                self._fall_back(err)  # run the pass at theta again, without the graph
                for p in params:
                    p.grad = None
                restart()
                rng.restore()
            else:
                return self._double_backprop(trainable, params, loss, closure, comm,
                                             probe_context, buffers, amp, rng)
        loss, averaged = _closure_gradient(closure, trainable, comm, amp)
        idx = _present(averaged)
        if not idx:
            return [], [], loss.detach()
        used, g = [trainable[i] for i in idx], [averaged[i] for i in idx]
        return used, self._finite_difference(used, g, closure, comm, probe_context, buffers,
                                             amp, rng), loss.detach()

    def _double_backprop(self, trainable: list[Tensor], params: list[Tensor], loss: Tensor | None,
                         closure: Callable[[], Tensor], comm: Communicator,
                         probe_context: Callable[[], ContextManager[Any]],
                         buffers: Sequence[Tensor], amp: _Amp | None, rng: RngState
                         ) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """g + gamma H g from the pass at theta whose backward kept its graph; a model without
        a double backward falls back to the forward finite difference here."""
        if loss is None:
            raise _loss_required()
        _refuse_sparse(trainable)
        local = [p.grad for p in trainable]
        for p in params:
            p.grad = None
        averaged = comm.average(local, trainable)
        loss = loss.detach()
        idx = _present(averaged)
        if not idx:
            return [], [], loss
        used, g = [trainable[i] for i in idx], [averaged[i] for i in idx]
        inv = 1.0 if amp is None else 1.0 / float(amp.scaler.get_scale())
        try:
            hg = _hessian_vector(used, [local[i] for i in idx], g, probe_context, comm, inv)
        except RuntimeError as err:
            if not no_double_backward(err):
                raise
            self._fall_back(err)
            g = [gi.detach() for gi in g]
            if amp is not None:  # the finite difference starts from the unscaled g
                for p, gi in zip(used, g):
                    p.grad = gi
                amp.unscale(used)
                g = [p.grad for p in used]
            return used, self._finite_difference(used, g, closure, comm, probe_context, buffers,
                                                 amp, rng), loss
        result = [gi.detach() + self.gamma * hi for gi, hi in zip(g, hg)]
        if amp is not None:  # g + gamma H g, all carrying S, unscaled once
            for p, r in zip(used, result):
                p.grad = r.detach()
            amp.unscale(used)
            result = [p.grad for p in used]
        return used, result, loss

    def _finite_difference(self, used: list[Tensor], g: list[Tensor],
                           closure: Callable[[], Tensor], comm: Communicator,
                           probe_context: Callable[[], ContextManager[Any]],
                           buffers: Sequence[Tensor], amp: _Amp | None, rng: RngState
                           ) -> list[Tensor]:
        """F-GR / B-GR (1 - gamma/eps) g + (gamma/eps) g(theta + eps g), or normalized SAM,
        from g at theta; the probe pass replays ``rng``."""
        gamma, epsilon, mode = self.gamma, self.epsilon, self.mode
        if amp is not None and not all(bool(torch.isfinite(gi).all()) for gi in g):
            return g  # overflow at theta: no probe; the caller skips
        if mode == "sam":
            dtype = functools.reduce(torch.promote_types, [gi.dtype for gi in g], torch.float32)
            norms = [torch.linalg.vector_norm(gi).to(g[0].device, dtype) for gi in g]
            norm = torch.linalg.vector_norm(torch.stack(norms))
            positive = norm > 0
            scale = torch.where(positive, abs(epsilon) / norm, torch.zeros_like(norm))
            g_probe = _probe_gradient(used, g, scale, closure, probe_context, buffers, comm, amp,
                                      rng)
            return [torch.where(positive.to(gi.device), gp, gi) for gi, gp in zip(g, g_probe)]
        if gamma == 0:
            return g
        eps = abs(epsilon) if mode == "forward" else -abs(epsilon)
        c = gamma / eps
        g_probe = _probe_gradient(used, g, eps, closure, probe_context, buffers, comm, amp, rng)
        return [gi.mul(1 - c).add_(gp, alpha=c) for gi, gp in zip(g, g_probe)]


def _present(grads: Sequence[Tensor | None]) -> list[int]:
    """The indices of the gradients that are not None."""
    return [i for i, g in enumerate(grads) if g is not None]


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
