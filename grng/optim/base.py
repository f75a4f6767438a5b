"""The step pipeline shared by K-FAC, RING, RENG and R-Kalman (docs/algorithms.md section 4,
docs/architecture.md).

One step: (1) the gradient source evaluates the closure's loss and gradient (plain or
regularized); (2) the whole step is skipped if any gradient, the loss or a captured row is
non-finite (agreed across ranks by the communicator); (3) the Kronecker preconditioner folds
the captured rows in and the diagonal one the gradients of the other parameters; (4) inverses
are refreshed when due; (5) each preconditioner's per-step ``update`` phase; (6) each unit's
gradient is preconditioned (``apply``, pure); (7) one fused update per param group: d + rho g,
KL clip, heavy-ball momentum, decoupled weight decay, learning rate, with a non-finite guard.
Where a step can fail, a gate (:mod:`grng.optim.gate`) decides: the host gate reads the flag
and returns early, the device gate (``sync_free``) selects on the device. A member of the
family is a binding of (gradient source, block preconditioner, diagonal preconditioner); the
communicator is local or a process group's.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from grng import ops
from grng.curvature.blocks import Block, find_blocks
from grng.curvature.capture import CurvatureCapture
from grng.curvature.coverage import CoverageReport, coverage_report, warn_at_construction
from grng.curvature.factors import Rows
from grng.curvature.options import MAX_FACTOR_DIM, BlockOptions
from grng.curvature.state import StateView
from grng.distributed import STRATEGIES, make_communicator, refuse_sharded
from grng.distributed.plan import block_directions
from grng.finite import all_finite, finite_flag
from grng.optim import checkpoint
from grng.optim import validation as check
from grng.optim.amp import AmpHandoff
from grng.optim.gate import DeviceGate, HostGate
from grng.optim.gradient_source import PlainGradient
from grng.optim.skip_report import DeviceSkipReport
from grng.optim.precision import PRECISIONS, matmul_precision, storage_dtypes, warn_if_inert
from grng.precondition.base import CurvatureConfig, Preconditioner, Unit, compute_dtype


def _own_arithmetic(precision: str) -> contextlib.ExitStack:
    """The optimizer's own arithmetic: autocast off (CPU, and CUDA where present: under autocast
    a matmul would run in bf16/fp16 and the factors lose their float32; nothing entered when it
    is off), and TF32 allowed or not as ``precision`` says."""
    stack = contextlib.ExitStack()
    for device in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device):
            stack.enter_context(torch.autocast(device, enabled=False))
    stack.enter_context(matmul_precision(precision))
    return stack


def _devices(params: Iterable[Tensor]) -> dict[torch.device, set[torch.dtype]]:
    """The devices the parameters live on, each with its parameters' dtypes."""
    out: dict[torch.device, set[torch.dtype]] = {}
    for p in params:
        out.setdefault(p.device, set()).add(p.dtype)
    return out


def _check_auto_order(params: Iterable[Tensor]) -> None:
    """The first-use self-check of ``backend="auto"``'s picks on the parameters' devices
    (grng.verify.selfcheck; imported here: grng.verify imports the optimizers' cases)."""
    from grng.verify.selfcheck import check_auto_order

    for device, dtypes in _devices(params).items():
        check_auto_order(device, sorted(dtypes, key=str))


@dataclass
class StepCounters:
    """A curvature optimizer's step bookkeeping: steps taken (the fold/refresh schedule counts
    them), steps skipped on the host path and on the device (``sync_free``), and this step's
    plan. Kept in a plain object: torch.compile replays attribute mutations of such an object
    after a compiled step, but not of the optimizer's own attributes."""

    steps: int = 0
    skipped: int = 0
    skipped_on_device: Tensor | None = None
    plan: tuple[bool, tuple[bool, ...]] | None = None
    report: DeviceSkipReport = field(default_factory=DeviceSkipReport)


class CurvatureOptimizer(torch.optim.Optimizer):
    """Base class of grng's curvature optimizers; see the module docstring for one step.

    Subclasses pass their ``block`` and ``diagonal`` preconditioners (built from
    :attr:`config`) through :meth:`_bind`; the gradient source defaults to the plain gradient.
    """

    #: the hyperparameters every param group carries and their checks
    GROUP_CHECKS: dict[str, Callable[[str, Any], Any]] = {
        "lr": check.non_negative, "momentum": check.non_negative,
        "weight_decay": check.non_negative, "kl_clip": check.optional_positive,
        "rho": check.non_negative, "damping": check.positive,
    }

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
        inverse_dtype: torch.dtype | None = None,
        grad_scaler: Any = None,
        max_grad_norm: float | None = None,
        max_factor_dim: int | None = MAX_FACTOR_DIM,
        sync_free: bool | None = None,
        precision: str = "fp32",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(check.model_first(type(self).__name__, model))
        refuse_sharded(model, type(self).__name__, fsdp2=True)
        check.choice("distributed_strategy", distributed_strategy, STRATEGIES)
        for key, value in defaults.items():
            if key in self.GROUP_CHECKS:
                self.GROUP_CHECKS[key](key, value)
        self.factor_decay = check.in_unit_interval("factor_decay", factor_decay)
        self.factor_every = check.positive_int("factor_every", factor_every)
        self.backend = ops.validate_backend(backend)
        self.precision = check.choice("precision", precision, PRECISIONS)
        factor_dtype, inverse_dtype = storage_dtypes(self.precision, factor_dtype, inverse_dtype)
        self.factor_dtype = check.storage_dtype("factor_dtype", factor_dtype)
        self.inverse_dtype = check.storage_dtype("inverse_dtype", inverse_dtype)
        if sync_free is None:  # CUDA steps avoid host synchronization; a CPU "sync" is free
            sync_free = any(p.is_cuda for p in model.parameters())
        self.sync_free = check.boolean("sync_free", sync_free)
        warn_if_inert(self.precision, any(p.is_cuda for p in model.parameters()),
                      type(self).__name__)
        self.config = CurvatureConfig(self.factor_decay, self.backend, self.factor_dtype,
                                      self.inverse_dtype, self.sync_free,
                                      apply_in_storage=self.precision == "bf16")
        self.amp = AmpHandoff(check.grad_scaler("grad_scaler", grad_scaler))
        self.max_grad_norm = check.optional_positive("max_grad_norm", max_grad_norm)
        #: how the model's layers become blocks (the factor size limit)
        self.block_options = BlockOptions(
            None if max_factor_dim is None else check.positive_int("max_factor_dim",
                                                                   max_factor_dim))
        self.model = model
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("model has no parameters that require a gradient")
        if self.backend == "auto":  # once per process and device: AUTO_ORDER's picks vs the reference
            _check_auto_order(trainable)
        groups = [{"params": trainable}] if param_groups is None else list(param_groups)
        super().__init__(groups, defaults)
        for group in self.param_groups:
            self._check_group(group)
        # a layer's weight and bias may sit in different groups (decay / no-decay): the block's
        # direction is computed jointly with the weight's group's curvature hyperparameters
        # (damping), the update applies each parameter's own group's lr, weight decay, ...
        self._built_momentum = [group["momentum"] for group in self.param_groups]
        #: the model's Kronecker blocks (the block source), observed by the capture
        self.block_set = find_blocks(model, set(self._group_index()), self.block_options)
        self.capture = CurvatureCapture(self.block_set, owner=self)
        warn_at_construction(self.coverage(), type(self).__name__)
        self.counters = StepCounters()
        self.distributed_strategy = distributed_strategy
        self.comm = make_communicator(model, process_group, distributed_strategy,
                                      [layer.cost() for layer in self.block_set.layers])
        self.gradient_source: Any = PlainGradient()
        self.block: Preconditioner
        self.diagonal: Preconditioner
        self._blocks: list[Unit] = []
        self._bound: list[Unit] = []
        self._diagonal_units: dict[int, Unit] = {}

    def _bind(self, block: Preconditioner, diagonal: Preconditioner,
              gradient_source: Any = None) -> None:
        """Attach the preconditioners (and the gradient source) this optimizer is made of."""
        self.block, self.diagonal = block, diagonal
        if gradient_source is not None:
            self.gradient_source = gradient_source
        self._blocks = [Unit(i, layer, layer.params, block.new_state(layer.params, layer))
                        for i, layer in enumerate(self.block_set.layers)]

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
        for key, rule in self.GROUP_CHECKS.items():
            if key in group:
                rule(key, group[key])
        in_model = {id(p) for p in self.model.parameters()}
        for p in group["params"]:
            if id(p) not in in_model:
                raise ValueError("param_groups holds a parameter that is not in model")
            if p.is_sparse:
                raise ValueError("sparse parameters are not supported")

    # ----------------------------------------------------------------- public conveniences
    @property
    def layers(self) -> list[Block]:
        """The Kronecker-factored layers, in model order."""
        return self.block_set.layers

    def coverage(self) -> CoverageReport:
        """Every parameter of the model and what it gets: a Kronecker block (name, d_G x d_A,
        diagonal sides), the diagonal fallback (and why) or nothing (frozen); ``print`` it for
        a table (docs/algorithms.md "Coverage")."""
        return coverage_report(self.model, self.block_set, set(self._group_index()),
                               self.block_options)

    @property
    def grad_scaler(self) -> Any:
        """The GradScaler given at construction (None without one)."""
        return self.amp.grad_scaler

    @property
    def steps(self) -> int:
        """Number of steps taken (skipped steps excluded; with ``sync_free`` a device counter
        is read: one host sync)."""
        return self._steps - self._skipped_device_count()

    @property
    def skipped_steps(self) -> int:
        """Number of steps skipped: a non-finite gradient, loss, captured row or direction, or a
        GradScaler overflow (docs/numerics.md); with ``sync_free`` a device counter is read
        (one host sync); those skips are warned a step or two late, when the count's
        asynchronous copy has reached the host (grng/optim/skip_report.py)."""
        return self._skipped + self._skipped_device_count()

    def _skipped_device_count(self) -> int:
        """Steps the sync-free path skipped (a device counter, read here)."""
        return 0 if self._skipped_on_device is None else int(self._skipped_on_device)

    def curvature_paused(self) -> contextlib.AbstractContextManager:
        """Context manager: forward/backward passes inside are not captured (GR probes)."""
        return self.capture.paused()

    def layer_state(self, layer: Block) -> StateView:
        """The typed state of a Kronecker block (mapping view: factors, inverses, covariances)."""
        return self._blocks[self.layers.index(layer)].state

    def curvature_state(self, p: Tensor) -> StateView:
        """The typed curvature state that covers parameter ``p`` (its block's, or its own
        diagonal state)."""
        for unit in self._blocks:
            if any(q is p for q in unit.params):
                return unit.state
        return self._diagonal_unit(p).state

    def skip_step(self, why: str, warn: bool = True) -> None:
        """Count a skipped step and drop its captured rows (warned unless ``warn`` is False,
        as for GradScaler overflows); parameters and optimizer state stay unchanged."""
        self._skipped += 1
        self._release_views()
        self.capture.clear()
        if warn:
            warnings.warn(f"{type(self).__name__}: step skipped ({why}); parameters and optimizer "
                          f"state unchanged ({self._skipped} skipped so far)", RuntimeWarning,
                          stacklevel=3)

    def set_loss_scale(self, scale: float | None) -> None:
        """The GradScaler loss scale S the gradients of this step were computed with (and then
        unscaled): the captured output-gradient rows still carry it."""
        self.amp.set_closure_scale(scale)

    # ----------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One step on the gradients present, or on those of ``closure``, which (as for
        torch.optim.LBFGS) zeroes the gradients, runs forward and backward and returns the
        loss; a closure that returns None leaves the gradients present to be used."""
        check.momentum_not_cycled(type(self).__name__, self.param_groups, self._built_momentum)
        loss = self._evaluate(closure) if closure is not None else None
        params = list(self._params_with_grad())
        if not params:  # nothing to step on: the step count and the schedule stay where they are
            self.capture.clear()
            warnings.warn(f"{type(self).__name__}.step(): no parameter has a gradient (call "
                          "backward() first, or pass a closure); nothing changed and the "
                          "fold/refresh schedule did not advance", RuntimeWarning, stacklevel=2)
            return loss
        for p in params:
            if p.grad.is_sparse:
                raise ValueError(f"{type(self).__name__} does not support sparse gradients (a "
                                 f"parameter of shape {tuple(p.shape)} has one); use dense ones, "
                                 "e.g. nn.Embedding(sparse=False)")
        proceed, scale = self.amp.handoff(self, [p.grad for p in params])
        quiet = not self.amp.active
        if not proceed:
            self.skip_step("GradScaler found inf/NaN gradients", warn=False)
            return loss
        self.capture.loss_scale = scale
        if self.max_grad_norm is not None and params:  # ||g|| <= max_grad_norm, what d uses
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        grads = [self.comm.local(p.grad) for p in params]  # this rank's part (FSDP2: shards)
        losses = [] if loss is None else [loss]
        # one check (one flag across ranks) for gradients, loss and captured rows
        flag = finite_flag([*grads, *losses], foldable=self.capture.recorded())
        diagonal = self._diagonal_units_now()
        self._bound = self.comm.bind_local(diagonal)
        gate = self._gate(diagonal)
        if not gate.admit(flag, lambda: self._non_finite_reason(grads, losses), warn=quiet):
            return loss
        blocks = [u for u in self._blocks if u.layer.weight.grad is not None]
        held = [u for u in blocks if self.comm.holds(u.index)]  # every block unless sharded
        with _own_arithmetic(self.precision):  # fp32 GEMMs even inside torch.autocast
            fold, due = self._schedule()
            gate.keep_statistics(self._blocks, due, diagonal, fold)
            if fold:
                with gate.folding():
                    self._fold(diagonal)
            self._refresh()
            gate.restore_statistics()
            self._bound += self.comm.gather_gradients(blocks)
            flag = gate.per_step_flag()  # None, or the device gate's flag for masked updates
            gate.keep_per_step([u for pre, units in ((self.block, held), (self.diagonal, diagonal))
                                if not pre.masks_per_step for u in units])
            for pre, units in ((self.block, held), (self.diagonal, diagonal)):
                if flag is not None and pre.masks_per_step:
                    pre.update(units, flag)
                else:
                    pre.update(units)
            directions = self._directions(blocks, diagonal)
        if not gate.accept(directions) or not gate.commit(self._update_groups(), directions):
            return loss
        self._advance()
        return loss

    def _gate(self, diagonal: list[Unit]) -> HostGate | DeviceGate:
        """The host gate, or with ``sync_free`` the device gate unless this step must read the
        host anyway: a GradScaler hand-off, a refresh that synchronizes (eigen), or a unit's
        first use (``needs_first_use``: no old value to select on the device)."""
        if not self.sync_free or self.amp.active:
            return HostGate(self)
        fold, due = self._schedule()
        if any(due) and self.block.refresh_synchronizes():
            return HostGate(self)
        first = any(self.block.needs_first_use(u, fold and self.capture.has_rows(u.layer))
                    for u in self._blocks if self.comm.keeps_inverse(u.index)) or any(
                    self.diagonal.needs_first_use(u, fold) for u in diagonal)
        if self.comm.any_rank(first):  # ranks that hold different blocks agree on the gate
            return HostGate(self)
        return DeviceGate(self, type(self).__name__, next(self._params_with_grad()).device)

    def _advance(self) -> None:
        """Count the step and re-arm the capture."""
        self.counters.steps += 1
        self._end_step()

    def _fold(self, diagonal: list[Unit]) -> None:
        """Fold this step's captured rows into the blocks and the gradients into the
        ``diagonal`` units."""
        self._fold_blocks([(u, self.capture.rows(u.layer)) for u in self._blocks])
        self.diagonal.fold([(u, None) for u in diagonal], self.comm)

    def _fold_blocks(self, units: list[tuple[Unit, tuple[Rows, Rows] | None]]) -> None:
        """The blocks' fold, M <- beta M + (1 - beta) M_batch at the config's decay."""
        self.block.fold(units, self.comm)

    def _update_groups(self) -> Iterator[tuple[dict[str, Any], list[Tensor], list[Tensor] | None]]:
        """(group, its parameters with a gradient, their momentum buffers or None) per group."""
        for group in self.param_groups:
            gparams = [p for p in group["params"] if p.grad is not None]
            if not gparams:
                continue
            bufs = None
            if group["momentum"] != 0.0:
                bufs = [self._momentum_buffer(p) for p in gparams]
            yield group, gparams, bufs

    def _non_finite_reason(self, grads: list[Tensor], losses: list[Tensor]) -> str:
        """What the failed check found (on this rank; another rank's when nothing here)."""
        if not all_finite(grads):
            return "non-finite gradient"
        if not all_finite(losses):
            return "non-finite loss"
        if not self.capture.all_finite():
            return "non-finite captured activations or output gradients"
        foldable = finite_flag([], foldable=self.capture.recorded())
        if foldable is not None and not bool(foldable):  # finite, but X^T X would overflow
            return ("captured activations or output gradients so large that folding them would "
                    "overflow a factor")
        return "non-finite loss or captured rows on another rank"

    def _evaluate(self, closure: Callable[[], Tensor]) -> Tensor | None:
        """The gradient source's evaluation of the closure (it zeroes and backpropagates)."""
        scaler = self.amp.scaler()
        loss = self.gradient_source.evaluate(
            list(self._all_params()), closure, grad_scaler=scaler,
            unscale=None if scaler is None else lambda: scaler.unscale_(self))
        if scaler is not None and loss is not None:
            self.set_loss_scale(float(scaler.get_scale()))
        return loss

    def _refresh(self) -> None:
        """Refresh the block inverses (due every ``inverse_every`` steps where defined)."""
        group_of = self._group_index()
        dampings = [self.param_groups[group_of[id(u.layer.weight)]].get("damping", 0.0)
                    for u in self._blocks]
        self.block.refresh(self._blocks, self.comm, list(self._schedule()[1]), dampings)

    def _inverse_due(self) -> list[bool]:
        """Per block, whether this step refreshes its inverse (never, by default)."""
        return [False] * len(self._blocks)

    def _directions(self, units: list[Unit], diagonal: list[Unit]) -> dict[int, Tensor]:
        """id(p) -> direction, for every parameter with a gradient (``units``: the blocks
        with one; ``diagonal``: the diagonal units with one)."""
        group_of = self._group_index()

        def compute(indices: list[int]) -> dict[int, Tensor]:
            items = []
            for i in indices:
                unit = self._blocks[i]
                V = self.block.gradient_matrix(unit)
                if V is not None:
                    items.append((unit, V, self.param_groups[group_of[id(unit.layer.weight)]]))
            return {u.index: D for (u, _, _), D in zip(items, self.block.apply_many(items))}

        def layout(i: int) -> tuple[tuple[int, ...], torch.dtype, torch.device]:
            w = self._blocks[i].layer.weight
            return self._blocks[i].layer.matrix_shape(), compute_dtype(w), w.device

        def split(i: int, D: Tensor) -> list[Tensor]:
            return self._blocks[i].layer.split(D)

        block_dirs = block_directions(self.comm, self._blocks, compute, layout, split)
        out: dict[int, Tensor] = {}
        for unit in units:
            ds = block_dirs.get(unit.index)
            if ds is None:
                continue
            for p, d in zip(unit.layer.params, ds):
                if p.grad is not None:
                    out[id(p)] = d
        items = [(unit, unit.like.grad, self.param_groups[group_of[id(unit.params[0])]])
                 for unit in diagonal]
        for (unit, _, _), d in zip(items, self.diagonal.apply_many(items)):
            out[id(unit.params[0])] = d
        return out

    # ---------------------------------------------------------------------- internals
    def _diagonal_unit(self, p: Tensor) -> Unit:
        unit = self._diagonal_units.get(id(p))
        if unit is None:
            unit = Unit(-1, None, [p], self.diagonal.new_state([p], None))
            self._diagonal_units[id(p)] = unit
        return unit

    def _diagonal_units_now(self) -> list[Unit]:
        """The diagonal units of the parameters without a block that have a gradient."""
        return [self._diagonal_unit(p) for p in self._diagonal_params() if p.grad is not None]

    def _momentum_buffer(self, p: Tensor) -> Tensor:
        st = self.state[p]
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(p, dtype=compute_dtype(p))
        return st["momentum_buffer"]

    def _end_step(self) -> None:
        self._release_views()
        self.capture.clear()
        self.capture.armed = self._fold_due(self._steps)
        self.counters.plan = None

    def _fold_due(self, step: int) -> bool:
        """Whether step ``step`` folds its captured rows into the factors: every
        ``factor_every`` steps."""
        return step % self.factor_every == 0

    def _release_views(self) -> None:
        """Drop what the communicator bound for this step (sharded parameters: the diagonal
        units' local views and the blocks' gathered gradients); nothing otherwise."""
        for unit in getattr(self, "_bound", ()):
            if unit.view is not None:
                unit.view.grad = None
            unit.view = unit.gathered = None
        self._bound = []

    def _schedule(self) -> tuple[bool, tuple[bool, ...]]:
        """(fold this step, per block: refresh its inverse this step), from the step counter;
        computed once per step."""
        counters = self.counters
        if counters.plan is None:
            counters.plan = (self._fold_due(counters.steps), tuple(self._inverse_due()))
        return counters.plan

    # the counters under the names the checkpoint and the subclasses use
    @property
    def _steps(self) -> int:
        return self.counters.steps

    @_steps.setter
    def _steps(self, value: int) -> None:
        self.counters.steps = value

    @property
    def _skipped(self) -> int:
        return self.counters.skipped

    @_skipped.setter
    def _skipped(self, value: int) -> None:
        self.counters.skipped = value

    @property
    def _skipped_on_device(self) -> Tensor | None:
        return self.counters.skipped_on_device

    @_skipped_on_device.setter
    def _skipped_on_device(self, value: Tensor | None) -> None:
        self.counters.skipped_on_device = value

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
        """torch.optim's state dict plus the curvature state (under the names of
        docs/algorithms.md) and grng's step counters (see :mod:`grng.optim.checkpoint`)."""
        self._refuse_plain_checkpoint()
        return checkpoint.save(self, super().state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a checkpoint of the same model (shapes checked before anything is loaded)."""
        self._refuse_plain_checkpoint()
        checkpoint.load(self, state_dict, super().load_state_dict)
        self._end_step()

    def _refuse_plain_checkpoint(self) -> None:
        """Sharded parameters (FSDP2): a rank's state is a shard of the whole (row shards, the
        blocks it owns), which torch.optim's format cannot say; NotImplementedError naming
        grng.distributed.checkpoint, the torch.distributed.checkpoint path."""
        if self.comm.shards_parameters:
            raise NotImplementedError(
                f"{type(self).__name__} of an FSDP2 model: save and load its sharded state with "
                "grng.distributed.checkpoint.save(opt, path) / load(opt, path) "
                "(torch.distributed.checkpoint; docs/distributed.md)")

    def _curvature_units(self) -> list[tuple[Unit, Preconditioner]]:
        """Every unit with its preconditioner (blocks, then diagonal parameters)."""
        out = [(u, self.block) for u in self._blocks]
        out += [(self._diagonal_unit(p), self.diagonal) for p in self._diagonal_params()]
        return out

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        """Restore what :meth:`_extra_state` saved."""

    # -------------------------------------------------------------- the capture's lifetime
    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim's zero_grad, and the curvature rows captured for the gradients it drops
        (rows not yet folded; a forward still waiting for its backward keeps its rows). Inside
        :meth:`curvature_paused` (the optimizer's own probes) the rows are kept."""
        super().zero_grad(set_to_none)
        capture = getattr(self, "capture", None)
        if capture is not None and capture.recording:
            capture.discard()

    def close(self) -> None:
        """Remove the curvature hooks from the model and drop the captured rows; the optimizer
        captures nothing afterwards (idempotent; also on ``with`` exit and on collection)."""
        capture = getattr(self, "capture", None)
        if capture is not None:
            capture.remove()

    def __enter__(self) -> CurvatureOptimizer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # only the hooks (a collection may run anywhere, inside a torch.compile trace too), and
        # only the owner's: a wrapper sharing this __dict__ (LightningOptimizer) is collected first
        capture = getattr(self, "capture", None)
        if capture is not None and capture.owned_by(self):
            capture.detach()
