"""Gradient regularization (F-GR, B-GR, double backprop, SAM) under data parallelism.

DDP all-reduces gradients from hooks on the parameters' gradient accumulators, which fire only
for ``backward()``: ``torch.autograd.grad`` (used by gradient regularization, and required by
double backprop, which DDP does not support) bypasses them. So every pass here runs inside
``model.no_sync()`` (DDP then neither prepares its reducer nor communicates) and grng does the
averaging itself, exactly where the mathematics needs a global quantity:

- pass 1, at theta: the local gradient g_r, then ONE all-reduce: g = mean_r g_r. It must be
  global before the probe point is formed, so that every rank probes the same
  theta + eps g (and, for SAM, uses the same ||g||);
- pass 2, ``forward``/``backward``/``sam``: the local probe gradient g_r(theta + eps g), then
  ONE all-reduce (the global probe gradient). ``exact``: the local Hessian-vector product
  H_r g with the GLOBAL g as the vector, then ONE all-reduce: H g = mean_r H_r g (the global
  loss is the mean of the local mean losses);
- the combination (1 - c) g + c g_probe, or g + gamma H g, is computed identically on every
  rank from global quantities, so no third all-reduce is needed.

Two all-reduces of the gradient size per step (one for ``gamma == 0``), against the one of
plain DDP: the second is unavoidable (the probe gradient is a new global quantity); DDP's own
all-reduce is never issued. Each all-reduce is one flat buffer per dtype plus one "used
anywhere" flag per parameter, so a parameter unused on one rank cannot desynchronize the ranks
(it counts as a zero gradient there, as in DDP). The loss returned is the local one.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any, ContextManager

import torch
import torch.distributed as dist
from torch import Tensor

from grng.distributed.comm import allreduce_mean


def sync_context(model: Any) -> Callable[[], ContextManager[Any]]:
    """``model.no_sync`` for a DDP model, else a null context."""
    return getattr(model, "no_sync", contextlib.nullcontext) if model is not None else contextlib.nullcontext


def regularized_gradient(
    params: list[Tensor],
    closure: Callable[[], Tensor],
    gamma: float,
    epsilon: float,
    mode: str,
    *,
    group: Any,
    model: Any = None,
    probe_context: Callable[[], ContextManager] = contextlib.nullcontext,
    buffers: Sequence[Tensor] = (),
) -> Tensor:
    """:func:`grng.optim.gradreg.regularized_gradient` with the global-batch gradients (above)."""
    from grng.optim.gradreg import _check_hyperparameters, _probe_gradient

    _check_hyperparameters(gamma, epsilon, mode)
    world = dist.get_world_size(group)
    params = list(params)
    for p in params:
        p.grad = None
    trainable = [p for p in params if p.requires_grad]
    double_backprop = mode == "exact" and gamma != 0

    with sync_context(model)():
        with torch.enable_grad():
            loss = closure()
            local = (torch.autograd.grad(loss, trainable, allow_unused=True, create_graph=double_backprop)
                     if trainable else ())
        if not trainable:
            return loss.detach()
        global_g = allreduce_mean(list(local), trainable, group, world)  # all-reduce 1
        idx = [i for i, gi in enumerate(global_g) if gi is not None]
        if not idx:
            return loss.detach()
        used_params = [trainable[i] for i in idx]
        g = [global_g[i] for i in idx]

        if mode == "sam":
            dtype = functools.reduce(torch.promote_types, [gi.dtype for gi in g], torch.float32)
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(gi).to(g[0].device, dtype) for gi in g]))
            positive = norm > 0
            scale = torch.where(positive, abs(epsilon) / norm, torch.zeros_like(norm))
            g_probe = allreduce_mean(_probe_gradient(used_params, g, scale, closure, probe_context, buffers),
                                     used_params, group, world)  # all-reduce 2
            result = [torch.where(positive.to(gi.device), _zero_if_none(gp, gi), gi) for gi, gp in zip(g, g_probe)]
        elif gamma == 0:
            result = g
        elif mode == "exact":
            pairs = [(local[i], global_g[i]) for i in idx if local[i] is not None and local[i].requires_grad]
            if pairs:
                with probe_context():
                    hvp = torch.autograd.grad([a for a, _ in pairs], used_params,
                                              grad_outputs=[b for _, b in pairs], allow_unused=True)
            else:
                hvp = [None] * len(used_params)
            hg = allreduce_mean(list(hvp), used_params, group, world)  # all-reduce 2
            result = [gi + gamma * _zero_if_none(hi, gi) for gi, hi in zip(g, hg)]
        else:
            eps = abs(epsilon) if mode == "forward" else -abs(epsilon)
            c = gamma / eps
            g_probe = allreduce_mean(_probe_gradient(used_params, g, eps, closure, probe_context, buffers),
                                     used_params, group, world)  # all-reduce 2
            result = [gi.mul(1 - c).add_(_zero_if_none(gp, gi), alpha=c) for gi, gp in zip(g, g_probe)]

    for p, r in zip(used_params, result):
        p.grad = r.detach()
    return loss.detach()


def _zero_if_none(t: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if t is None else t
