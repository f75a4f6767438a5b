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
from grng.distributed import STRATEGIES, refuse_sharded, resolve_group
from grng.distributed.curvature import DistributedCurvature
from grng.finite import all_finite
from grng.optim import validation as check


def _autocast_disabled() -> contextlib.ExitStack:
    """Switch autocast off (CPU, and CUDA where present) for the optimizer's own arithmetic:
    under autocast a matmul would run in bf16/fp16 and the factors lose their float32."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", enabled=False))
    if torch.cuda.is_available():
        stack.enter_context(torch.autocast("cuda", enabled=False))
    return stack


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
        process_group: Any = None,
        distributed_strategy: str = "comm-opt",
        factor_dtype: torch.dtype | None = None,
        grad_scaler: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        refuse_sharded(model, type(self).__name__)
        check.choice("distributed_strategy", distributed_strategy, STRATEGIES)
        check.non_negative("lr", defaults["lr"])
        check.non_negative("momentum", defaults["momentum"])
        check.non_negative("weight_decay", defaults["weight_decay"])
        check.optional_positive("kl_clip", defaults["kl_clip"])
        self.factor_decay = check.in_unit_interval("factor_decay", factor_decay)
        self.factor_every = check.positive_int("factor_every", factor_every)
        self.backend = ops.validate_backend(backend)
        self.factor_dtype = check.storage_dtype("factor_dtype", factor_dtype)
        self.grad_scaler = check.grad_scaler("grad_scaler", grad_scaler)
        self._closure_scale: float | None = None  # loss scale S of the closure's backward (GradScaler)
        self._amp_active = False
        self.model = model
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("model has no parameters that require a gradient")
        groups = [{"params": trainable}] if param_groups is None else list(param_groups)
        super().__init__(groups, defaults)
        in_model = {id(p) for p in model.parameters()}
        for group in self.param_groups:  # a group's own values get the defaults' checks
            for key in ("lr", "momentum", "weight_decay"):
                check.non_negative(key, group[key])
            check.optional_positive("kl_clip", group["kl_clip"])
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
        # data parallel (docs/distributed.md); None = the single-process path, unchanged
        self.distributed_strategy = distributed_strategy
        group = resolve_group(model, process_group)
        self._dist = None if group is None else DistributedCurvature(self, group, distributed_strategy)
        if self._dist is not None and factor_dtype is not None:
            raise ValueError("factor_dtype is not supported with a process group (single process only)")

    # torch.amp.GradScaler.step(opt) hands step() opt.grad_scale and opt.found_inf instead of
    # unscaling and inf-checking itself: the captured output gradients carry the loss scale too
    _step_supports_amp_scaling = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim's add_param_group plus grng's checks (ValueError naming the key).

        Parameters added after construction get the diagonal fallback, even when they would
        complete a Kronecker layer: the Kronecker blocks are fixed when the optimizer is built.
        """
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    def _check_group(self, group: dict[str, Any]) -> None:
        for key in ("lr", "momentum", "weight_decay", "rho"):
            if key in group:
                check.non_negative(key, group[key])
        if "damping" in group:
            check.positive("damping", group["damping"])
        if "kl_clip" in group:
            check.optional_positive("kl_clip", group["kl_clip"])
        in_model = {id(p) for p in self.model.parameters()}
        for p in group["params"]:
            if id(p) not in in_model:
                raise ValueError("param_groups holds a parameter that is not in model")
            if p.is_sparse:
                raise ValueError("sparse parameters are not supported")

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
        """Number of steps skipped: a non-finite gradient, loss, captured row or direction, or a
        GradScaler overflow (docs/numerics.md)."""
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
        for p in self._params_with_grad():
            if p.grad.is_sparse:
                raise ValueError(f"{type(self).__name__} does not support sparse gradients (a "
                                 f"parameter of shape {tuple(p.shape)} has one); use dense ones, "
                                 "e.g. nn.Embedding(sparse=False)")
        if not self._amp_handoff():
            return loss
        if not all_finite(p.grad for p in self._params_with_grad()):
            self._skip("non-finite gradient", warn=not self._amp_active)
            return loss
        if not self._everywhere(loss is None or all_finite([loss])):
            self._skip("non-finite loss", warn=not self._amp_active)
            return loss
        if not self._everywhere(self.capture.all_finite()):
            self._skip("non-finite captured activations or output gradients",
                       warn=not self._amp_active)
            return loss
        factors_due = self._steps % self.factor_every == 0
        with _autocast_disabled():  # a step taken inside torch.autocast keeps its GEMMs in fp32
            self._update_curvature(factors_due)
            self._refresh_inverses()
            directions = self._directions()
        if not all_finite(directions.values()):
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
        """Gradient of the closure's loss from scratch (existing .grad are discarded).

        With ``grad_scaler``: backward of ``scaler.scale(loss)``, then ``scaler.unscale_(self)``
        (which records the inf check that ``scaler.update()`` reads)."""
        with torch.enable_grad():
            for p in self._all_params():
                p.grad = None
            loss = closure()
            scaler = self._active_scaler()
            if scaler is None:
                loss.backward()
            else:
                scaler.scale(loss).backward()
                scaler.unscale_(self)
                self._closure_scale = float(scaler.get_scale())
        return loss.detach()

    def _active_scaler(self) -> Any:
        scaler = getattr(self, "grad_scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def _amp_handoff(self) -> bool:
        """Apply torch.amp.GradScaler's hand-over; False when the step is skipped (overflow).

        The captured output-gradient rows carry the loss scale S of the backward pass: their
        row scale is divided by S (``capture.loss_scale``). ``scaler.step(opt)`` sets
        ``opt.found_inf`` and ``opt.grad_scale`` (S, or None when the user already called
        ``scaler.unscale_(opt)``); gradients are unscaled here exactly once. A closure evaluated
        with ``grad_scaler`` (or GradReg's) already unscaled them. A plain ``opt.step()`` with
        ``grad_scaler`` set expects ``scaler.unscale_(opt)`` to have been called.
        """
        scale, self._closure_scale = self._closure_scale, None
        if scale is None:
            scaler = self._active_scaler()
            scale = 1.0 if scaler is None else float(scaler.get_scale())
        self._amp_active = scale != 1.0 or self._active_scaler() is not None
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None:
            self._amp_active = True
            if float(found_inf) > 0.0:
                self._skip("GradScaler found inf/NaN gradients", warn=False)
                return False
            grad_scale = getattr(self, "grad_scale", None)
            if grad_scale is not None:
                inv = grad_scale.double().reciprocal().float()
                for p in self._params_with_grad():
                    p.grad.mul_(inv.to(p.grad.device))
                scale = float(grad_scale)
            elif self._active_scaler() is not None:
                scale = float(self._active_scaler().get_scale())
            else:
                raise RuntimeError(
                    f"scaler.unscale_(opt) was called before scaler.step(opt): pass "
                    f"grad_scaler=scaler to {type(self).__name__} so that the captured output "
                    "gradients (which carry the loss scale) can be unscaled too")
        self.capture.loss_scale = scale
        return True

    # ---------------------------------------------------------------- curvature hooks
    def _update_curvature(self, factors_due: bool) -> None:
        """Fold this step's rows into the running factors (first update sets them)."""
        if self._dist is not None:  # batch factors all-reduced, then blended
            return self._dist.update_factors(self, factors_due)
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

    def _everywhere(self, ok: bool) -> bool:
        """A local check made global under a process group (every rank skips alike: a rank
        skipping alone would desynchronize the collectives); ``ok`` itself in one process."""
        return ok if self._dist is None else self._dist.all_true(ok)

    def _refresh_inverses(self) -> None:
        """Recompute a layer's inverse when due or when it has none yet."""

    def _precondition_layer(self, layer: KroneckerLayer, st: dict, V: Tensor, group: dict) -> Tensor:
        """The layer's direction from its gradient matrix V (d_G x d_A)."""
        raise NotImplementedError

    def _precondition_diagonal(self, p: Tensor, st: dict, group: dict) -> Tensor:
        """g / (D + damping) for a parameter without a Kronecker block (g until D exists)."""
        if "D" not in st:
            return p.grad
        return p.grad / (st["D"].to(self._factor_dtype(p)) + group["damping"])

    # ---------------------------------------------------------------------- internals
    def _directions(self) -> dict[int, Tensor]:
        if self._dist is not None:  # mem-opt: owners precondition and broadcast
            shared = self._dist.directions(self)
            if shared is not None:
                return shared
        group_of = self._group_index()
        out: dict[int, Tensor] = {}
        for layer in self.layers:
            V = layer.grad_matrix()
            if V is None:
                continue
            group = self.param_groups[group_of[id(layer.weight)]]
            self._put_layer_direction(layer, self._precondition_layer(
                layer, self.layer_state(layer), V, group), out)
        self._put_diagonal_directions(out, group_of)
        return out

    @staticmethod
    def _put_layer_direction(layer: KroneckerLayer, D: Tensor, out: dict[int, Tensor]) -> None:
        """Split a layer's d_G x d_A direction into ``out`` entries of its parameters."""
        for p, d in zip(layer.params, layer.split(D)):
            if p.grad is not None:
                out[id(p)] = d

    def _put_diagonal_directions(self, out: dict[int, Tensor], group_of: dict[int, int]) -> None:
        """The direction of every parameter without a Kronecker block, into ``out``."""
        for p in self._diagonal_params():
            if p.grad is not None:
                out[id(p)] = self._precondition_diagonal(p, self.state[p],
                                                         self.param_groups[group_of[id(p)]])

    def _factor_ema(self, st: dict, key: str, rows: Rows, beta: float, like: Tensor) -> None:
        """st[key] <- beta st[key] + (1 - beta) (s^2/n) X^T X; the first update sets it.

        Accumulated in ``_factor_dtype`` (>= float32); with ``factor_dtype`` set, stored in that
        dtype (upcast for the update, rounded back after it)."""
        d = rows.X.shape[1]
        first = key not in st
        compute = self._factor_dtype(like)
        if first:
            work = torch.empty(d, d, dtype=compute, device=like.device)
        else:
            work = st[key] if st[key].dtype == compute else st[key].to(compute)
        b = 0.0 if first else beta
        alpha = (1.0 - b) * rows.scale ** 2 / rows.n
        ops.factor_update(work, rows.X, alpha, b, backend=self.backend)
        storage = getattr(self, "factor_dtype", None) or compute
        st[key] = work if work.dtype == storage else work.to(storage)

    def _ema(self, st: dict, key: str, value: Tensor, beta: float) -> None:
        storage = getattr(self, "factor_dtype", None) or value.dtype
        if key not in st:
            st[key] = value.clone() if value.dtype == storage else value.to(storage)
        elif st[key].dtype == value.dtype:
            st[key].mul_(beta).add_(value, alpha=1.0 - beta)
        else:  # low-precision storage: blend in the value's (>= float32) dtype, store back
            st[key] = st[key].to(value.dtype).mul_(beta).add_(value, alpha=1.0 - beta).to(storage)

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

    def _skip(self, why: str, warn: bool = True) -> None:
        """Count a skipped step and drop its captured rows (GradScaler overflows: no warning)."""
        self._skipped += 1
        self.capture.clear()
        if warn:
            warnings.warn(f"{type(self).__name__}: step skipped ({why}); parameters and optimizer "
                          f"state unchanged ({self._skipped} skipped so far)", RuntimeWarning,
                          stacklevel=3)

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
        self._check_checkpoint_shapes(sd)
        super().load_state_dict(sd)
        self._restore_state_dtypes(sd)
        self._steps = int(extra["steps"])
        self._skipped = int(extra["skipped"])
        self._load_extra_state(extra)
        if self._dist is not None:
            self._dist.forget_refreshes()
        self._end_step()

    def _check_checkpoint_shapes(self, sd: dict[str, Any]) -> None:
        """Raise ValueError, before anything is loaded, when a saved state tensor does not fit
        its parameter: a factor or inverse (keys ending in A / G) of a Kronecker block against
        the block's sizes, any other state tensor (momentum, diagonal Fisher) against p.shape."""
        saved = [i for g in sd.get("param_groups", []) for i in g["params"]]
        params = list(self._all_params())
        if len(saved) != len(params):
            return  # torch.optim's own check raises on the group sizes
        state_of = {id(p): sd.get("state", {}).get(i, {}) for i, p in zip(saved, params)}
        sizes = {id(layer.weight): (name, layer.dims())
                 for layer, name in zip(self.layers, self.capture.names)}
        for p in params:
            for key, value in state_of[id(p)].items():
                if not isinstance(value, Tensor) or value.dim() == 0:
                    continue
                if id(p) in sizes and key != "momentum_buffer" and key[-1:] in ("A", "G"):
                    name, (d_g, d_a) = sizes[id(p)]
                    d = d_a if key.endswith("A") else d_g
                    if any(s != d for s in value.shape):
                        raise ValueError(f"checkpoint does not match the model: layer {name!r} "
                                         f"state {key!r} has shape {tuple(value.shape)}, "
                                         f"expected size {d}")
                elif value.shape != p.shape:
                    raise ValueError(f"checkpoint does not match the model: state {key!r} has "
                                     f"shape {tuple(value.shape)} for a parameter of shape "
                                     f"{tuple(p.shape)}")

    def _restore_state_dtypes(self, sd: dict[str, Any]) -> None:
        """torch.optim casts every floating state tensor to its parameter's dtype on load; grng
        keeps factors, inverses and buffers in their own dtypes (>= float32, or the storage
        dtypes asked for), so each is re-made from the saved tensor: on the parameter's device,
        in the dtype this optimizer keeps it in (a float64 checkpoint loads into a float32 model
        as float32; a bfloat16 model's float32 factors are not rounded through bfloat16)."""
        saved = [i for g in sd["param_groups"] for i in g["params"]]
        for i, p in zip(saved, self._all_params()):
            for key, value in sd.get("state", {}).get(i, {}).items():
                if isinstance(value, Tensor) and value.is_floating_point() and p.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=self._state_dtype(p, key),
                                                  copy=True)

    def _state_dtype(self, p: Tensor, key: str) -> torch.dtype:
        """The dtype a state entry is kept in: factors (A, G, D) in ``factor_dtype`` when set,
        everything else (and factors by default) in ``_factor_dtype(p)``."""
        if key in ("A", "G", "D") and getattr(self, "factor_dtype", None) is not None:
            return self.factor_dtype
        return self._factor_dtype(p)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        """Restore what :meth:`_extra_state` saved."""
