"""Curvature capture, the observation of a model's blocks: each layer helper's hooks report a
call's input and output; the input is kept on the output's gradient hook, i.e. on the autograd
graph, until backward reaches it.

The blocks are found apart (:func:`grng.curvature.blocks.find_blocks`, through the helper
registry of :mod:`grng.curvature.layers`); a helper's ``attach`` decides how its module's calls
are observed (a forward hook that takes positional or keyword inputs; attention and the
recurrent layers re-express their forward). A module called several times in one forward
(weight sharing) records every call. Nothing is recorded when capture is not armed (factors
not due this step), while paused (gradient regularization probes), under ``torch.no_grad()``,
or when the output does not need a gradient.

Lifetime (docs/numerics.md "The capture's lifetime"):

- the model holds the capture only weakly: the hooks are module-level callables holding weak
  references (a pickled or deep-copied model carries inert hooks), and :meth:`remove` runs when
  the capture is collected, so an optimizer that is closed or deleted stops capturing;
- a call is *pending* from its forward until backward reaches its output: its input is held by
  the gradient hook on the output, so a graph that is dropped without backward (validation with
  gradients on, generation) frees it with the graph;
- a call is *completed* when its output gradient arrives; the capture keeps its (input, output
  gradient) until the step folds them (:meth:`clear`) or the gradient they belong to is dropped
  (:meth:`discard`: ``zero_grad``; or a new forward finds the layer's weight gradient unset);
- several backward passes through one forward (``retain_graph=True``) add their output
  gradients, so G is that of the summed loss, as the parameter gradient is; a gradient that
  itself needs a gradient (``create_graph=True``) is kept alone, since a later pass may be of a
  function of the gradients (a gradient penalty);
- a block weight that receives a gradient although none of the capture's forward hooks ran
  since the last step means something bypassed them (a compiled graph traced before they were
  attached): a RuntimeError says so instead of steps without curvature.
"""
from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from grng.curvature.blocks import BlockSet
from grng.curvature.layers import Handle, KroneckerLayer, Rows, dead_reference, helper_for
from grng.finite import all_finite

BYPASSED = (
    "{name}: the weight of layer {layer!r} received a gradient but none of the curvature "
    "capture's forward hooks ran since the last step, so its factors would never be updated. "
    "This happens when torch.compile reuses a graph traced without the hooks (a compiled model "
    "of the same class ran a forward first); grng has now dropped torch.compile's cached graphs, "
    "so repeating this forward and backward retraces them with the hooks. It also happens when "
    "the layer's weight is used without calling the layer (grng cannot capture that)")


@dataclass(eq=False)
class _Call:
    """One forward call of a layer: its input (dropped once the call is cleared), the first
    output column of the block it produced (None: all), the step epoch it was recorded in, and,
    once backward reached it, its output gradient (summed over backward passes when
    ``summable``)."""

    inputs: Tensor | None
    column: int | None
    epoch: int
    grad: Tensor | None = None
    summable: bool = True


@dataclass
class _Record:
    calls: list[_Call] = field(default_factory=list)  # the completed calls


class _GradHook:
    """The output-gradient hook of one call: it holds the call (and with it the input), so the
    call lives exactly as long as the autograd graph that holds the hook."""

    __slots__ = ("capture", "key", "call")

    def __init__(self, capture: CurvatureCapture, key: int, call: _Call) -> None:
        self.capture = weakref.ref(capture)
        self.key = key
        self.call = call

    def __call__(self, grad: Tensor) -> None:
        capture = self.capture()
        if capture is not None:
            capture._complete(self.key, self.call, grad)


class _BypassCheck:
    """Post-accumulate-grad hook of a block weight: raises when the weight got a gradient while
    none of the capture's forward hooks ran since the last step (see the module docstring)."""

    __slots__ = ("capture", "name")

    def __init__(self, capture: CurvatureCapture | None, name: str) -> None:
        self.capture = dead_reference if capture is None else weakref.ref(capture)
        self.name = name

    def __call__(self, weight: Tensor) -> None:
        capture = self.capture()
        if capture is not None and capture.recording and not capture.observed:
            forget_compiled_graphs()  # a stale compiled graph is retraced, with the hooks
            raise RuntimeError(BYPASSED.format(name=capture.owner, layer=self.name))

    def __reduce__(self) -> tuple:  # a pickled (or copied) parameter carries no capture
        return (_BypassCheck, (None, self.name))


def _place(grad: Tensor, column: int, width: int) -> Tensor:
    """The gradient of a call that produced output columns [column, column + k) of a block with
    ``width`` outputs, as full rows (zero in the columns the call did not produce)."""
    full = grad.new_zeros(*grad.shape[:-1], width)
    full[..., column:column + grad.shape[-1]] = grad
    return full


def _detach_all(handles: list[Handle]) -> None:
    """Remove every hook of a capture (its finalizer: it must not reference the capture)."""
    for handle in handles:
        handle.remove()
    handles.clear()


def forget_compiled_graphs() -> None:
    """Drop torch.compile's cached graphs (when dynamo is loaded): a graph traced before hooks
    were attached (or after they were removed) would be reused for any module of the same class,
    since dynamo does not guard on module hooks; the next compiled call retraces."""
    dynamo = sys.modules.get("torch._dynamo")
    reset = getattr(dynamo, "reset_code_caches", None)
    if reset is not None:
        reset()


class CurvatureCapture:
    """Observes the blocks of a model and records their rows while armed."""

    def __init__(self, blocks: BlockSet, owner: object = None) -> None:
        """Hook the modules of ``blocks`` (:func:`grng.curvature.blocks.find_blocks`).
        ``owner``: the optimizer that owns the capture (named in errors; see
        :meth:`owned_by`)."""
        self.layers: list[KroneckerLayer] = blocks.layers
        self.names: list[str] = blocks.names
        self.owner = type(self).__name__ if owner is None else type(owner).__name__
        self._owner_id = id(owner)  # not a reference: the capture never keeps its owner alive
        self.armed = True
        self.loss_scale = 1.0  # the G rows carry the loss scale S of a scaled backward (GradScaler)
        #: whether a forward hook of this capture ran since the last :meth:`clear`
        self.observed = False
        self._paused = 0
        self._epoch = 0  # counts the clears: a pending call of an earlier step is stale
        self._records: dict[int, _Record] = {id(layer): _Record() for layer in self.layers}
        self._handles: list[Handle] = []
        for module, mine in blocks.modules:
            self._handles.extend(helper_for(module).attach(module, mine, self))
        for layer, name in zip(self.layers, self.names):
            if layer.weight.is_leaf:
                self._handles.append(layer.weight.register_post_accumulate_grad_hook(
                    _BypassCheck(self, name)))
        self._finalizer = weakref.finalize(self, _detach_all, self._handles)
        self._finalizer.atexit = False
        forget_compiled_graphs()

    def owned_by(self, optimizer: object) -> bool:
        """Whether ``optimizer`` is the capture's owner, not an object sharing its attributes
        (Lightning's ``LightningOptimizer`` copies the optimizer's ``__dict__``: its collection
        must not detach the owner's hooks)."""
        return id(optimizer) == self._owner_id

    @property
    def attached(self) -> bool:
        """Whether the hooks are on the model (False after :meth:`remove`)."""
        return self._finalizer.alive

    @property
    def recording(self) -> bool:
        """True when a forward with gradients enabled would be recorded now."""
        return self.armed and self._paused == 0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Record nothing inside (gradient-regularization probes, extra evaluations)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def record(self, layer: KroneckerLayer, inputs: Tensor, output: Tensor,
               column: int | None = None) -> None:
        """Keep one call of ``layer`` (its input now, on the output's gradient hook; its output's
        gradient when backward reaches it); ``column``: see
        :class:`grng.curvature.layers.Recorder`."""
        self.observed = True
        if not self.recording or not torch.is_grad_enabled():
            return
        if not isinstance(output, Tensor) or not output.requires_grad:
            return
        record = self._records.get(id(layer))
        if record is None:
            return
        if record.calls and layer.weight.grad is None:  # their gradient was dropped
            self._drop(record)
        call = _Call(inputs.detach(), column, self._epoch)
        output.register_hook(_GradHook(self, id(layer), call))

    def _complete(self, key: int, call: _Call, grad: Tensor) -> None:
        """Backward reached a call's output: keep its gradient (or add a later pass's)."""
        if self._paused or call.epoch != self._epoch or call.inputs is None:
            return
        if call.grad is None:
            call.grad = grad.detach()
            call.summable = not grad.requires_grad
            self._records[key].calls.append(call)
        elif call.summable:
            call.grad = call.grad + grad.detach()

    def _calls_with_rows(self, layer: KroneckerLayer) -> list[_Call]:
        # calls with no rows (an empty batch, an expert that got no tokens) add nothing: a
        # layer with rows in no call gets no factor update this step (never a division by 0)
        return [c for c in self._records[id(layer)].calls
                if c.inputs.numel() > 0 and c.grad.numel() > 0]

    def has_rows(self, layer: KroneckerLayer) -> bool:
        """Whether :meth:`rows` would return rows (nothing is concatenated)."""
        return bool(self._calls_with_rows(layer))

    def rows(self, layer: KroneckerLayer) -> tuple[Rows, Rows] | None:
        """(A rows, G rows) of the completed calls since the last :meth:`clear`, or None."""
        calls = self._calls_with_rows(layer)
        if not calls:
            return None
        inputs = [c.inputs for c in calls]
        width = layer.dims()[0]
        grads = [c.grad if c.column is None else _place(c.grad, c.column, width) for c in calls]
        g_rows = layer.g_rows(inputs, grads)
        if self.loss_scale != 1.0:
            g_rows.scale /= self.loss_scale
        return layer.a_rows(inputs), g_rows

    def recorded(self) -> list[Tensor]:
        """Every floating input and output gradient of the completed calls (what :meth:`rows`
        would use), for the step's one non-finite check."""
        return [t for record in self._records.values() for c in record.calls
                for t in (c.inputs, c.grad) if t.is_floating_point()]

    def all_finite(self) -> bool:
        """False when a completed call's input or output gradient holds a NaN or Inf."""
        return all_finite(self.recorded())

    def unfolded_calls(self) -> int:
        """The number of completed calls held (rows not yet folded), over all layers."""
        return sum(len(record.calls) for record in self._records.values())

    @staticmethod
    def _drop(record: _Record) -> None:
        for call in record.calls:
            call.inputs = call.grad = None
        record.calls.clear()

    def discard(self) -> None:
        """Drop the completed calls (their gradient was zeroed: ``zero_grad``); calls still
        waiting for their backward stay (a forward may precede ``zero_grad``)."""
        for record in self._records.values():
            self._drop(record)

    def clear(self) -> None:
        """Drop everything recorded, pending calls included (called after every optimizer
        step)."""
        self.discard()
        self._epoch += 1
        self.observed = False

    def detach(self) -> None:
        """Detach the hooks from the model (and restore any replaced forward); what happens
        when the capture is collected. Idempotent."""
        self._finalizer()

    def remove(self) -> None:
        """:meth:`detach`, drop the recorded calls, and drop torch.compile's cached graphs (a
        graph traced with the hooks would keep running them). Idempotent."""
        self.clear()
        if self.attached:
            self.detach()
            forget_compiled_graphs()
