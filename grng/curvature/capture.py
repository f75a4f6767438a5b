"""Curvature capture: each layer helper's hooks report a call's input and output, tensor hooks on
the output keep its gradient.

Layers are found through the helper registry (:mod:`grng.curvature.layers`, attention in
:mod:`grng.curvature.attention`); a helper's ``attach`` decides how its calls are observed
(a forward hook that takes positional or keyword inputs; attention re-expresses its forward).
A module called several times in one forward (weight sharing) records every call; each call's
output-gradient hook fires at most once (so a double backward cannot record twice). Nothing is
recorded when capture is not armed (factors not due this step), while paused (gradient
regularization probes), under ``torch.no_grad()``, or when the output does not need a gradient.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from grng.curvature import attention  # noqa: F401  (registers nn.MultiheadAttention's helper)
from grng.curvature import recurrent  # noqa: F401  (registers nn.LSTM and nn.GRU helpers)
from grng.curvature.layers import Handle, KroneckerLayer, Rows, helper_for, make_layers
from grng.finite import all_finite


@dataclass
class _Call:
    """One forward call of a layer: its input, the first output column of the block it produced
    (None: all), and, once backward reached it, its output gradient."""

    inputs: Tensor
    column: int | None = None
    grad: Tensor | None = None


@dataclass
class _Record:
    calls: list[_Call] = field(default_factory=list)


def _place(grad: Tensor, column: int, width: int) -> Tensor:
    """The gradient of a call that produced output columns [column, column + k) of a block with
    ``width`` outputs, as full rows (zero in the columns the call did not produce)."""
    full = grad.new_zeros(*grad.shape[:-1], width)
    full[..., column:column + grad.shape[-1]] = grad
    return full


class CurvatureCapture:
    """Finds the supported layers of a model and records their rows while armed."""

    def __init__(self, model: nn.Module, keep: set[int] | None = None,
                 max_factor_dim: int | None = None) -> None:
        """Find the supported layers of ``model`` (only blocks whose parameters are all in
        ``keep``, a set of parameter ids, when given) and hook them; factor sides above
        ``max_factor_dim`` are kept diagonal. :attr:`skipped` maps the name of each module a
        helper could not cover (or whose parameters another block already covers: tied
        weights) to why."""
        self.layers: list[KroneckerLayer] = []
        self.names: list[str] = []
        self.skipped: dict[str, str] = {}
        claimed: dict[int, str] = {}  # parameter id -> name of the block that covers it
        attachments: list[tuple[nn.Module, list[KroneckerLayer]]] = []
        for name, module in model.named_modules():
            blocks, reason = make_layers(module, max_factor_dim)
            if reason is not None:
                self.skipped[name] = reason
            mine = []
            for block in blocks:
                block_name = f"{name}{block.suffix}" if name else block.suffix.lstrip(".")
                owner = next((claimed[id(p)] for p in block.params if id(p) in claimed), None)
                if owner is not None:
                    if owner != block_name:  # attention's out_proj is claimed by its parent
                        self.skipped[block_name] = (f"tied to {owner!r}, whose calls alone "
                                                    "are captured")
                    continue
                if keep is not None and not all(id(p) in keep for p in block.params):
                    continue
                claimed.update((id(p), block_name) for p in block.params)
                mine.append(block)
                self.layers.append(block)
                self.names.append(block_name)
            if mine:
                attachments.append((module, mine))
        self.armed = True
        self.loss_scale = 1.0  # the G rows carry the loss scale S of a scaled backward (GradScaler)
        self._paused = 0
        self._records: dict[int, _Record] = {id(layer): _Record() for layer in self.layers}
        self._handles: list[Handle] = []
        for module, mine in attachments:
            self._handles.extend(helper_for(module).attach(module, mine, self))

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
        """Keep one call of ``layer`` (its input now, its output's gradient when backward
        reaches it); ``column``: see :class:`grng.curvature.layers.Recorder`."""
        if not self.recording or not torch.is_grad_enabled():
            return
        if not isinstance(output, Tensor) or not output.requires_grad:
            return
        record = self._records.get(id(layer))
        if record is None:
            return
        call = _Call(inputs.detach(), column)
        record.calls.append(call)

        def grad_hook(grad: Tensor) -> None:
            if call.grad is None and self._paused == 0:
                call.grad = grad.detach()

        output.register_hook(grad_hook)

    def _calls_with_rows(self, layer: KroneckerLayer) -> list[_Call]:
        # calls with no rows (an empty batch, an expert that got no tokens) add nothing: a
        # layer with rows in no call gets no factor update this step (never a division by 0)
        return [c for c in self._records[id(layer)].calls
                if c.grad is not None and c.inputs.numel() > 0 and c.grad.numel() > 0]

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
                if c.grad is not None for t in (c.inputs, c.grad) if t.is_floating_point()]

    def all_finite(self) -> bool:
        """False when a completed call's input or output gradient holds a NaN or Inf."""
        return all_finite(self.recorded())

    def clear(self) -> None:
        """Drop everything recorded (called after every optimizer step)."""
        for record in self._records.values():
            record.calls.clear()

    def remove(self) -> None:
        """Detach the hooks from the model (and restore any replaced forward)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
