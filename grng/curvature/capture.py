"""Curvature capture: forward hooks keep each layer's inputs, tensor hooks its output gradients.

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
from torch.utils.hooks import RemovableHandle

from grng.curvature.layers import KroneckerLayer, Rows, make_layer
from grng.finite import all_finite


@dataclass
class _Call:
    """One forward call of a layer: its input and, once backward reached it, its output gradient."""

    inputs: Tensor
    grad: Tensor | None = None


@dataclass
class _Record:
    calls: list[_Call] = field(default_factory=list)


class CurvatureCapture:
    """Finds the supported layers of a model and records their rows while armed."""

    def __init__(self, model: nn.Module, keep: set[int] | None = None) -> None:
        """Find the supported layers of ``model`` (only those whose parameters are all in
        ``keep``, a set of parameter ids, when given) and hook them."""
        self.layers: list[KroneckerLayer] = []
        self.names: list[str] = []
        seen: set[int] = set()
        for name, module in model.named_modules():
            layer = make_layer(module)
            if layer is None or id(layer.weight) in seen:
                continue
            if keep is not None and not all(id(p) in keep for p in layer.params):
                continue
            seen.update(id(p) for p in layer.params)
            self.layers.append(layer)
            self.names.append(name)
        self.armed = True
        self.loss_scale = 1.0  # the G rows carry the loss scale S of a scaled backward (GradScaler)
        self._paused = 0
        self._records: dict[int, _Record] = {id(layer.module): _Record() for layer in self.layers}
        self._handles: list[RemovableHandle] = [
            layer.module.register_forward_hook(self._forward_hook) for layer in self.layers
        ]

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

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        if not self.recording or not torch.is_grad_enabled():
            return
        if not isinstance(output, Tensor) or not output.requires_grad:
            return
        record = self._records.get(id(module))
        if record is None:  # copy.deepcopy(model) copies this hook onto modules that are not ours
            return
        call = _Call(inputs[0].detach())
        record.calls.append(call)

        def grad_hook(grad: Tensor) -> None:
            if call.grad is None and self._paused == 0:
                call.grad = grad.detach()

        output.register_hook(grad_hook)

    def rows(self, layer: KroneckerLayer) -> tuple[Rows, Rows] | None:
        """(A rows, G rows) of the completed calls since the last :meth:`clear`, or None."""
        # calls with no rows (an empty batch, an expert that got no tokens) add nothing: a
        # layer with rows in no call gets no factor update this step (never a division by 0)
        calls = [c for c in self._records[id(layer.module)].calls
                 if c.grad is not None and c.inputs.numel() > 0 and c.grad.numel() > 0]
        if not calls:
            return None
        inputs = [c.inputs for c in calls]
        g_rows = layer.g_rows(inputs, [c.grad for c in calls])
        if self.loss_scale != 1.0:
            g_rows.scale /= self.loss_scale
        return layer.a_rows(inputs), g_rows

    def all_finite(self) -> bool:
        """False when a completed call's input or output gradient (what :meth:`rows` would use)
        holds a NaN or Inf."""
        return all_finite(t for record in self._records.values() for c in record.calls
                          if c.grad is not None for t in (c.inputs, c.grad) if t.is_floating_point())

    def clear(self) -> None:
        """Drop everything recorded (called after every optimizer step)."""
        for record in self._records.values():
            record.calls.clear()

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
