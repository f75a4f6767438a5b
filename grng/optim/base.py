"""The update pipeline shared by K-FAC, RING, RENG and R-Kalman (ALGORITHMS.md section 4).

One step: (1) with a closure, evaluate the loss and its gradient; (2) skip the whole step if
any gradient is non-finite; (3) fold the captured rows into the curvature (factors or Kalman
covariances); (4) refresh inverses when due; (5) precondition each layer's [dW db]; (6) one
fused update per param group: d + rho g, KL clip, heavy-ball momentum, decoupled weight decay,
learning rate, with a non-finite guard. Subclasses override the curvature hooks only.

Every parameter of the model that needs a gradient is optimized: Linear, Conv2d and Embedding
weights (with their biases) get a Kronecker block; every other one a diagonal empirical
Fisher, D = EMA(g * g), preconditioned as g / (D + damping).
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from grng import ops
from grng.curvature.capture import CurvatureCapture
from grng.curvature.layers import KroneckerLayer, Rows
from grng.optim import validation as check


class CurvatureOptimizer(torch.optim.Optimizer):
    """Base class of grng's curvature optimizers; see the module docstring for one step."""

    def __init__(
        self,
        model: nn.Module,
        defaults: dict[str, Any],
        *,
        factor_decay: float,
        factor_every: int,
        backend: str,
        param_groups: Iterable[dict] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check.non_negative("lr", defaults["lr"])
        check.non_negative("momentum", defaults["momentum"])
        check.non_negative("weight_decay", defaults["weight_decay"])
        check.optional_positive("kl_clip", defaults["kl_clip"])
        self.factor_decay = check.in_unit_interval("factor_decay", factor_decay)
        self.factor_every = check.positive_int("factor_every", factor_every)
        self.backend = ops.validate_backend(backend)
        self.model = model
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("model has no parameters that require a gradient")
        groups = [{"params": trainable}] if param_groups is None else list(param_groups)
        super().__init__(groups, defaults)
        in_model = {id(p) for p in model.parameters()}
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in in_model:
                    raise ValueError("param_groups holds a parameter that is not in model")
                if p.is_sparse:
                    raise ValueError("sparse parameters are not supported")
        group_of = self._group_index()
        self.capture = CurvatureCapture(model, keep=set(group_of))
        for layer, name in zip(self.capture.layers, self.capture.names):
            if len({group_of[id(p)] for p in layer.params}) > 1:
                raise ValueError(f"layer {name!r}: its weight and bias must be in the same "
                                 "param group (they share one Kronecker block)")
        self._steps = 0
        self._skipped = 0

    # ----------------------------------------------------------------- public conveniences
    @property
    def layers(self) -> list[KroneckerLayer]:
        """The Kronecker-factored layers, in model order."""
        return self.capture.layers

    @property
    def steps(self) -> int:
        """Number of steps taken (skipped steps excluded)."""
        return self._steps

    @property
    def skipped_steps(self) -> int:
        """Number of steps skipped because of a non-finite gradient or direction."""
        return self._skipped

    def curvature_paused(self) -> contextlib.AbstractContextManager:
        """Context manager: forward/backward passes inside are not captured (GR probes)."""
        return self.capture.paused()

    def layer_state(self, layer: KroneckerLayer) -> dict:
        """The optimizer state of a Kronecker block (factors, inverses), keyed by its weight."""
        return self.state[layer.weight]

    # ----------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One step. ``closure`` runs the forward pass and returns the loss; backward is ours."""
        loss = self._evaluate(closure) if closure is not None else None
        if not self._all_finite(p.grad for p in self._params_with_grad()):
            self._skip("non-finite gradient")
            return loss
        factors_due = self._steps % self.factor_every == 0
        self._update_curvature(factors_due)
        self._refresh_inverses()
        directions = self._directions()
        if not self._all_finite(directions.values()):
            self._skip("non-finite preconditioned direction")
            return loss
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            bufs = None
            if group["momentum"] != 0.0:
                bufs = [self._momentum_buffer(p) for p in params]
            ok = ops.fused_update(params, [p.grad for p in params],
                                  [directions[id(p)] for p in params], bufs, group["lr"],
                                  group["momentum"], group["weight_decay"], group.get("rho", 0.0),
                                  group["kl_clip"], backend=self.backend)
            if not ok:  # unreachable after the check above unless a backend disagrees
                self._skip("non-finite combined direction")
                return loss
        self._steps += 1
        self._end_step()
        return loss

    def _evaluate(self, closure: Callable[[], Tensor]) -> Tensor:
        """Gradient of the closure's loss from scratch (existing .grad are discarded)."""
        with torch.enable_grad():
            for p in self._all_params():
                p.grad = None
            loss = closure()
            loss.backward()
        return loss.detach()

    # ---------------------------------------------------------------- curvature hooks
    def _update_curvature(self, factors_due: bool) -> None:
        """Fold this step's rows into the running factors (first update sets them)."""
        if not factors_due:
            return
        beta = self.factor_decay
        for layer in self.layers:
            captured = self.capture.rows(layer)
            if captured is None:
                continue
            st = self.layer_state(layer)
            a_rows, g_rows = captured
            if layer.diagonal_a:
                self._ema(st, "A", layer.a_diagonal(a_rows), beta)
            else:
                self._factor_ema(st, "A", a_rows, beta, layer.weight)
            self._factor_ema(st, "G", g_rows, beta, layer.weight)
        for p in self._diagonal_params():
            if p.grad is not None:
                self._ema(self.state[p], "D", p.grad.to(self._factor_dtype(p)).square(), beta)

    def _refresh_inverses(self) -> None:
        """Recompute a layer's inverse when due or when it has none yet."""

    def _precondition_layer(self, layer: KroneckerLayer, st: dict, V: Tensor, group: dict) -> Tensor:
        """The layer's direction from its gradient matrix V (d_G x d_A)."""
        raise NotImplementedError

    def _precondition_diagonal(self, p: Tensor, st: dict, group: dict) -> Tensor:
        """g / (D + damping) for a parameter without a Kronecker block (g until D exists)."""
        if "D" not in st:
            return p.grad
        return p.grad / (st["D"] + group["damping"])

    # ---------------------------------------------------------------------- internals
    def _directions(self) -> dict[int, Tensor]:
        group_of = self._group_index()
        out: dict[int, Tensor] = {}
        for layer in self.layers:
            V = layer.grad_matrix()
            if V is None:
                continue
            group = self.param_groups[group_of[id(layer.weight)]]
            D = self._precondition_layer(layer, self.layer_state(layer), V, group)
            for p, d in zip(layer.params, layer.split(D)):
                if p.grad is not None:
                    out[id(p)] = d
        for p in self._diagonal_params():
            if p.grad is not None:
                out[id(p)] = self._precondition_diagonal(p, self.state[p],
                                                         self.param_groups[group_of[id(p)]])
        return out

    def _factor_ema(self, st: dict, key: str, rows: Rows, beta: float, like: Tensor) -> None:
        """st[key] <- beta st[key] + (1 - beta) (s^2/n) X^T X; the first update sets it."""
        d = rows.X.shape[1]
        first = key not in st
        if first:
            st[key] = torch.empty(d, d, dtype=self._factor_dtype(like), device=like.device)
        b = 0.0 if first else beta
        alpha = (1.0 - b) * rows.scale ** 2 / rows.n
        ops.factor_update(st[key], rows.X, alpha, b, backend=self.backend)

    @staticmethod
    def _ema(st: dict, key: str, value: Tensor, beta: float) -> None:
        if key not in st:
            st[key] = value.clone()
        else:
            st[key].mul_(beta).add_(value, alpha=1.0 - beta)

    @staticmethod
    def _factor_dtype(p: Tensor) -> torch.dtype:
        """Factors are kept in the parameter's dtype, but at least float32."""
        return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype

    def _momentum_buffer(self, p: Tensor) -> Tensor:
        st = self.state[p]
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(p, dtype=self._factor_dtype(p))
        return st["momentum_buffer"]

    def _end_step(self) -> None:
        self.capture.clear()
        self.capture.armed = self._steps % self.factor_every == 0

    def _skip(self, why: str) -> None:
        self._skipped += 1
        self.capture.clear()
        warnings.warn(f"{type(self).__name__}: step skipped ({why}); parameters and optimizer "
                      f"state unchanged ({self._skipped} skipped so far)", RuntimeWarning,
                      stacklevel=3)

    @staticmethod
    def _all_finite(tensors: Iterable[Tensor]) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in tensors)

    def _all_params(self) -> Iterator[Tensor]:
        for group in self.param_groups:
            yield from group["params"]

    def _params_with_grad(self) -> Iterator[Tensor]:
        return (p for p in self._all_params() if p.grad is not None)

    def _group_index(self) -> dict[int, int]:
        return {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}

    def _diagonal_params(self) -> list[Tensor]:
        covered = {id(p) for layer in self.layers for p in layer.params}
        return [p for p in self._all_params() if id(p) not in covered]

    # -------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict plus grng's step counters."""
        sd = super().state_dict()
        sd["grng"] = {"steps": self._steps, "skipped": self._skipped, **self._extra_state()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a checkpoint of the same model (factor shapes are checked)."""
        sd = dict(state_dict)
        extra = sd.pop("grng", None)
        if extra is None:
            raise ValueError("state_dict lacks grng's 'grng' entry: not a grng optimizer checkpoint")
        super().load_state_dict(sd)
        for layer, name in zip(self.layers, self.capture.names):
            st = self.layer_state(layer)
            d_g, d_a = layer.dims()
            for key, d in (("A", d_a), ("G", d_g)):
                if key in st and st[key].shape[0] != d:
                    raise ValueError(f"checkpoint does not match the model: layer {name!r} factor "
                                     f"{key} has size {st[key].shape[0]}, expected {d}")
        self._steps = int(extra["steps"])
        self._skipped = int(extra["skipped"])
        self._load_extra_state(extra)
        self._end_step()

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        """Restore what :meth:`_extra_state` saved."""
