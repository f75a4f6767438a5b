"""Gradient regularization (Karakida et al., ICML 2023), SAM and flooding.

The regularized loss is L_GR(theta) = L(theta) + (gamma/2) ||grad L(theta)||^2, whose gradient
is g + gamma * H g (g = grad L, H = Hessian of L). Four ways to get it:

- ``"forward"`` (F-GR): (1 - gamma/eps) g(theta) + (gamma/eps) g(theta + eps g), eps = +|epsilon|.
  Cost: two forward and two backward passes.
- ``"backward"`` (B-GR): the same finite difference with eps = -|epsilon|. Same cost.
- ``"exact"`` (double backprop, DB): g + gamma * H g, H g by differentiating g . v (v = g held
  constant). Cost: one forward, one backward that keeps its graph (``create_graph=True``) and a
  second backward through it -- more time and memory than F-GR.
- ``"sam"`` (normalized SAM): g(theta + epsilon g / ||g||); gamma is unused. Unnormalized SAM
  g(theta + eps g) is F-GR with gamma = eps. Cost: two forward and two backward passes.

On a quadratic loss the finite differences are exact, so F-GR, B-GR and DB agree to rounding.

The probe evaluation g(theta + eps g) (and, for DB, the Hessian-vector pass) runs inside a
caller-supplied ``probe_context`` so that curvature-capturing optimizers (K-FAC family) can pause
their factor hooks there: the curvature is captured only at theta.

BatchNorm: the probe runs a second forward pass in training mode, which would update running
statistics (and ``num_batches_tracked``) a second time, at the wrong point. Buffers passed in
``buffers`` (``GradReg(..., model=model)`` passes every buffer of the model) are snapshotted
before the probe forward and copied back after it, so they are updated once per step, by the
evaluation at theta only. Parameters are likewise restored by copying saved values back (never
by subtracting the shift), so they are bit-identical afterwards.

``flood`` (Ishida et al. 2020) is the loss transform |L - b| + b; near the flood level two
consecutive steps perform an F-GR step implicitly.
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, ContextManager

import warnings

import torch
from torch import Tensor

from grng.distributed import refuse_sharded, resolve_group
from grng.distributed.gradreg import regularized_gradient as ddp_regularized_gradient

__all__ = ["GradReg", "flood", "regularized_gradient"]

MODES = ("forward", "backward", "exact", "sam")


def _check_hyperparameters(gamma: float, epsilon: float, mode: str) -> None:
    """Require gamma >= 0 finite, epsilon != 0 finite, mode in MODES."""
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
    """A torch.amp.GradScaler seen by one regularized-gradient evaluation.

    Every loss is scaled by S before its backward and every gradient evaluation (theta, the
    probe; for "exact" the combined g + gamma H g) is unscaled exactly once through the public
    ``scaler.unscale_``, which also records its inf check for ``scaler.update()``. unscale_ may
    be called once per "optimizer" between updates, so each evaluation gets its own view (an
    object with ``param_groups``); the views of the last call stay referenced (``_LIVE``) so
    their ids cannot be reused before ``scaler.update()``.
    """

    _LIVE: dict[int, list] = {}

    def __init__(self, scaler) -> None:
        self.scaler = scaler
        self.views: list = []
        _Amp._LIVE[id(scaler)] = self.views

    def scale(self, loss: Tensor) -> Tensor:
        return self.scaler.scale(loss)

    def unscale(self, params: Sequence[Tensor]) -> None:
        view = type("_AmpView", (), {})()
        view.param_groups = [{"params": list(params)}]
        self.views.append(view)
        self.scaler.unscale_(view)


def _backward_gradient(loss: Tensor, params: Sequence[Tensor], amp: _Amp | None = None
                       ) -> list[Tensor | None]:
    """grad_params L via loss.backward(inputs=params), read from ``.grad`` (then reset to None).

    ``backward`` rather than ``autograd.grad`` so that accumulate-grad hooks run, among them
    DistributedDataParallel's gradient all-reduce. Expects ``.grad`` to be None on entry.
    With ``amp``: the backward of the scaled loss, unscaled once.
    """
    if amp is None:
        loss.backward(inputs=list(params))
    else:
        amp.scale(loss).backward(inputs=list(params))
        amp.unscale(params)
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    return grads


def _probe_gradient(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    scale: float | Tensor,
    closure: Callable[[], Tensor],
    probe_context: Callable[[], ContextManager[Any]],
    buffers: Sequence[Tensor],
    amp: _Amp | None = None,
) -> list[Tensor]:
    """g(theta + scale * grads), with params and buffers copied back bit-exactly afterwards."""
    saved_params = [p.detach().clone() for p in params]
    saved_buffers = [b.detach().clone() for b in buffers]
    try:
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(g * (scale.to(g.device) if isinstance(scale, Tensor) else scale))
        with probe_context(), torch.enable_grad():
            probe_grads = _backward_gradient(closure(), params, amp)
    finally:
        with torch.no_grad():
            for p, saved in zip(params, saved_params):
                p.copy_(saved)
            for b, saved in zip(buffers, saved_buffers):
                b.copy_(saved)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, probe_grads)]


def _hessian_vector(
    params: Sequence[Tensor], grads: Sequence[Tensor], probe_context: Callable[[], ContextManager[Any]],
    v_scale: float = 1.0,
) -> list[Tensor]:
    """H g = grad_theta (g(theta) . v) at v = g held constant (grads built with create_graph=True).

    ``v_scale`` multiplies v (1/S when the grads carry a loss scale S: v is then the unscaled g).
    """
    differentiable = [g for g in grads if g.requires_grad]
    if not differentiable:
        return [torch.zeros_like(p) for p in params]
    try:
        with probe_context():
            hvp = torch.autograd.grad(
                differentiable, params,
                grad_outputs=[g.detach() if v_scale == 1.0 else g.detach() * v_scale for g in differentiable],
                allow_unused=True,
            )
    except RuntimeError as err:
        if "double backward" not in str(err):
            raise
        raise RuntimeError(
            "the exact (double backprop) gradient regularization needs a double backward, which "
            f"this model does not support ({err}); a torch.compile'd model does not: use the "
            "finite differences (mode/gr='forward' or 'backward') or an uncompiled model") from err
    return [torch.zeros_like(p) if h is None else h for p, h in zip(params, hvp)]


def regularized_gradient(
    params: list[torch.Tensor],
    closure: Callable[[], torch.Tensor],
    gamma: float,
    epsilon: float,
    mode: str,
    *,
    probe_context: Callable[[], ContextManager] = contextlib.nullcontext,
    buffers: Sequence[torch.Tensor] = (),
    grad_scaler: Any = None,
) -> torch.Tensor:
    """Write grad L_GR = g + gamma H g (L_GR = L + (gamma/2)||g||^2) into each param's ``.grad``.

    ``closure()`` runs the forward pass and returns the scalar loss without calling
    ``backward``; it is called under ``torch.enable_grad()``, once at theta and, for
    ``"forward"``, ``"backward"`` and ``"sam"``, once more at the probe point inside
    ``probe_context()`` (``"exact"`` runs its Hessian-vector pass there instead). ``buffers`` are
    copied back after the probe forward and params are bit-identical afterwards.

    Existing ``.grad`` values are discarded (set to None first). First-order gradients are taken
    by ``loss.backward(inputs=params)``, so no other leaf's ``.grad`` is touched and
    DistributedDataParallel all-reduces both evaluations; ``"exact"`` (gamma > 0) uses
    ``torch.autograd.grad(create_graph=True)``, which DDP does not synchronize. Params without a
    gradient at theta (unused, or ``requires_grad=False``) get ``.grad = None`` and are not moved;
    a param used at theta but not at the probe counts a zero probe gradient.

    ``grad_scaler`` (a ``torch.amp.GradScaler``, for mixed precision): every loss is scaled
    before its backward and every gradient evaluation is unscaled exactly once by
    ``scaler.unscale_`` (so ``scaler.update()`` sees each inf check); the probe point is formed
    from the unscaled gradient; if the gradient at theta is not finite there is no probe and the
    non-finite gradient is left in ``.grad`` (the caller skips the step). Call
    ``scaler.update()`` after the optimizer step.

    With gamma == 0, ``"forward"``, ``"backward"`` and ``"exact"`` return the plain gradient
    after one pass. ``"sam"`` ignores gamma and probes at radius |epsilon| (g itself when
    ||g|| == 0).
    Returns the loss at theta, detached.
    """
    _check_hyperparameters(gamma, epsilon, mode)
    params = list(params)
    for p in params:
        p.grad = None
    trainable = [p for p in params if p.requires_grad]
    double_backprop = mode == "exact" and gamma != 0
    amp = _Amp(grad_scaler) if grad_scaler is not None and grad_scaler.is_enabled() else None
    with torch.enable_grad():
        loss = closure()
        if not trainable:
            return loss.detach()
        if double_backprop:
            scaled = loss if amp is None else amp.scale(loss)
            grads = torch.autograd.grad(scaled, trainable, allow_unused=True, create_graph=True)
        else:
            grads = _backward_gradient(loss, trainable, amp)
    used = [(p, g) for p, g in zip(trainable, grads) if g is not None]
    if not used:
        return loss.detach()
    used_params = [p for p, _ in used]
    g = [gi for _, gi in used]

    if amp is not None and double_backprop:  # g + gamma H g, all carrying S, unscaled once
        inv = 1.0 / float(amp.scaler.get_scale())
        hg = _hessian_vector(used_params, g, probe_context, v_scale=inv)
        for p, gi, hi in zip(used_params, g, hg):
            p.grad = (gi.detach() + gamma * hi).detach()
        amp.unscale(used_params)
        return loss.detach()
    if amp is not None and not all(bool(torch.isfinite(gi).all()) for gi in g):
        for p, gi in zip(used_params, g):  # overflow at theta: no probe; the caller skips
            p.grad = gi.detach()
        return loss.detach()

    if mode == "sam":
        dtype = functools.reduce(torch.promote_types, [gi.dtype for gi in g], torch.float32)
        norms = [torch.linalg.vector_norm(gi).to(g[0].device, dtype) for gi in g]
        norm = torch.linalg.vector_norm(torch.stack(norms))
        positive = norm > 0
        scale = torch.where(positive, abs(epsilon) / norm, torch.zeros_like(norm))
        g_probe = _probe_gradient(used_params, g, scale, closure, probe_context, buffers, amp)
        result = [torch.where(positive.to(gi.device), gp, gi) for gi, gp in zip(g, g_probe)]
    elif gamma == 0:
        result = g
    elif mode == "exact":
        hg = _hessian_vector(used_params, g, probe_context)
        result = [gi.detach() + gamma * hi for gi, hi in zip(g, hg)]
    else:
        eps = abs(epsilon) if mode == "forward" else -abs(epsilon)
        c = gamma / eps
        g_probe = _probe_gradient(used_params, g, eps, closure, probe_context, buffers, amp)
        result = [gi.mul(1 - c).add_(gp, alpha=c) for gi, gp in zip(g, g_probe)]

    for p, r in zip(used_params, result):
        p.grad = r.detach()
    return loss.detach()


class GradReg(torch.optim.Optimizer):
    """Descend on L_GR = L + (gamma/2)||grad L||^2: regularized gradient, then ``base_optimizer.step()``.

    Wraps any ``torch.optim.Optimizer`` (SGD, AdamW, grng's K-FAC family). The wrapper shares the
    base's ``param_groups``, ``state`` and ``defaults``, so LR schedulers and ``zero_grad`` act on
    the base through it. ``step(closure)`` needs a closure that runs the forward pass and returns
    the loss without calling ``backward``. If the base exposes ``curvature_paused()`` (a context
    manager), the probe evaluation runs inside it so curvature is captured only at theta.

    Pass ``model=`` to protect BatchNorm statistics: every buffer of the model is restored after
    the probe forward, so running statistics are updated once per step. Without it the probe
    forward of ``"forward"``, ``"backward"`` and ``"sam"`` updates them a second time.

    Mixed precision: pass ``grad_scaler=`` (a ``torch.amp.GradScaler``); ``step(closure)`` then
    scales each loss, unscales each gradient evaluation once (the probe point is formed from
    the unscaled gradient), skips the base step on inf/NaN, and the caller runs
    ``scaler.update()`` after ``step`` (never ``scaler.step(opt)``). A non-finite loss or
    regularized gradient skips the step (parameters and state unchanged; counted in
    ``skipped_steps``; warned unless it is a GradScaler overflow).
    For mode ``"sam"`` gamma is unused (normalized SAM with radius |epsilon|); unnormalized SAM is
    ``mode="forward"`` with gamma == epsilon.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        gamma: float,
        epsilon: float,
        mode: str = "forward",
        *,
        model: torch.nn.Module | None = None,
        process_group: Any = None,
        grad_scaler: Any = None,
    ) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}"
            )
        _check_hyperparameters(gamma, epsilon, mode)
        if model is not None and not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be None or a torch.nn.Module, got {type(model).__name__}")
        from grng.optim.validation import grad_scaler as _check_scaler

        self.grad_scaler = _check_scaler("grad_scaler", grad_scaler)
        self._own_skipped = 0
        if model is not None:
            refuse_sharded(model, "GradReg")
        self.process_group = process_group  # data parallel: docs/distributed.md
        self.base_optimizer = base_optimizer
        self.gamma = gamma
        self.epsilon = epsilon
        self.mode = mode
        self.model = model
        self._share_base()

    def _share_base(self) -> None:
        """Alias param_groups, state and defaults to the base optimizer's.

        Optimizer.__init__ would build param groups of its own; Optimizer.__setstate__ (its
        unpickling path) instead adopts the given containers and installs the hook registries
        and step profiling.
        """
        base = self.base_optimizer
        shared = {"defaults": base.defaults, "state": base.state, "param_groups": base.param_groups}
        super().__setstate__(shared)

    def __getstate__(self) -> dict[str, Any]:
        """Optimizer's state plus the base optimizer and GradReg's settings (pickle, deepcopy)."""
        own = {name: getattr(self, name, None)
               for name in ("base_optimizer", "gamma", "epsilon", "mode", "model", "grad_scaler")}
        own["_own_skipped"] = getattr(self, "_own_skipped", 0)
        return {**super().__getstate__(), **own}

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """theta <- base step on grad L_GR = g + gamma H g; returns L(theta) before the step."""
        if closure is None:
            raise ValueError(
                "GradReg.step needs a closure that runs the forward pass and returns the loss "
                "(without calling backward): the regularized gradient evaluates the loss twice"
            )
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        params = list({id(p): p for group in self.param_groups for p in group["params"]}.values())
        pg = resolve_group(self.model, getattr(self, "process_group", None))
        scaler = getattr(self, "grad_scaler", None)
        amp = scaler is not None and scaler.is_enabled()
        if pg is not None and amp:
            raise NotImplementedError("GradReg(grad_scaler=...) under a process group is not supported")
        gr = (functools.partial(regularized_gradient, grad_scaler=scaler) if pg is None
              else functools.partial(ddp_regularized_gradient, group=pg, model=self.model))
        loss = gr(
            params,
            closure,
            self.gamma,
            self.epsilon,
            self.mode,
            probe_context=getattr(self.base_optimizer, "curvature_paused", contextlib.nullcontext),
            buffers=list(self.model.buffers()) if self.model is not None else (),
        )
        base = self.base_optimizer
        finite = bool(torch.isfinite(loss).all()) and all(
            bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)
        if not finite:  # parameters and optimizer state unchanged
            if hasattr(base, "_skip") and hasattr(base, "curvature_paused"):
                base._skip("non-finite loss or regularized gradient", warn=not amp)  # counts, drops rows
            else:
                self._own_skipped = getattr(self, "_own_skipped", 0) + 1
                if not amp:
                    warnings.warn(f"GradReg: step skipped (non-finite loss or regularized gradient); "
                                  f"parameters and optimizer state unchanged "
                                  f"({self._own_skipped} skipped so far)", RuntimeWarning, stacklevel=2)
            return loss
        if amp and hasattr(base, "_closure_scale"):  # the base's captured G rows carry S
            base._closure_scale = float(scaler.get_scale())
        base.step()
        return loss

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite loss or gradient (the base's count for grng bases)."""
        base_count = getattr(self.base_optimizer, "skipped_steps", None)
        return base_count if isinstance(base_count, int) else getattr(self, "_own_skipped", 0)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Delegate to the base optimizer: .grad <- None (or 0)."""
        self.base_optimizer.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Delegate to the base optimizer (the group list is shared)."""
        self.base_optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """Base optimizer's state dict plus {"gradreg": {gamma, epsilon, mode}}."""
        state = self.base_optimizer.state_dict()
        state["gradreg"] = {"gamma": self.gamma, "epsilon": self.epsilon, "mode": self.mode}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of state_dict: GradReg hyperparameters, then the base's state."""
        state_dict = dict(state_dict)
        own = state_dict.pop("gradreg", None)
        if own is not None:
            _check_hyperparameters(own["gamma"], own["epsilon"], own["mode"])
            self.gamma, self.epsilon, self.mode = own["gamma"], own["epsilon"], own["mode"]
        self.base_optimizer.load_state_dict(state_dict)
        self._share_base()


def flood(loss: Tensor, b: float) -> Tensor:
    """Flooding: |L - b| + b, so the gradient is -grad L while L < b (Ishida et al. 2020)."""
    if not math.isfinite(b) or b < 0:
        raise ValueError(f"flood level b must be a finite number >= 0, got {b!r}")
    return (loss - b).abs() + b
