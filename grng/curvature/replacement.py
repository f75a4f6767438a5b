"""Replacing a module's forward while a capture observes it (docs/algorithms.md "Layer helpers").

Some layers compute their products inside one fused op (``nn.MultiheadAttention``'s
``F.multi_head_attention_forward``, the fused LSTM/GRU/RNN kernels), so no hook sees a block's input
and output. Their helpers set the module's ``forward`` to an equivalent written-out computation
that reports each block's input and output; a call that no capture records runs the module's own
forward. Each attached capture is one *tap* (recorder, {role: block}); the last tap removed
restores the module. A deep copy of the module is attached to no capture (the taps are kept by
module identity), so it runs its own forward.
"""
from __future__ import annotations

import types
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

from grng.curvature.layers import Handle, KroneckerLayer, Recorder

__all__ = ["Report", "Tap", "attach_forward", "recording_report", "replaced_by_another"]

#: role, block input, block output, first output column of the block (None: all)
Report = Callable[[str, Tensor, Tensor, "int | None"], None]

#: one capture's attachment to a module: (weak reference to the recorder, {role: block}); the
#: module never keeps a capture (or its optimizer) alive
Tap = tuple["weakref.ref[Recorder]", dict[str, KroneckerLayer]]

# module -> the taps of the captures attached to it
_TAPS: weakref.WeakKeyDictionary[nn.Module, list[Tap]] = weakref.WeakKeyDictionary()


def replaced_by_another(module: nn.Module) -> bool:
    """Whether the module's forward was replaced by something other than grng."""
    return "forward" in vars(module) and module not in _TAPS


def attach_forward(module: nn.Module, blocks: dict[str, KroneckerLayer], recorder: Recorder,
                   forward: Callable[..., object]) -> Handle:
    """Tap ``module`` for ``recorder`` (blocks by role) and set its forward to ``forward``
    (bound to the module) while any tap is attached; the handle removes this tap."""
    entry = (weakref.ref(recorder), blocks)
    _TAPS.setdefault(module, []).append(entry)
    if "forward" not in vars(module):
        module.forward = types.MethodType(forward, module)
    return _Detach(module, entry)


def recording_report(module: nn.Module) -> Report | None:
    """The report of the taps that record a call of ``module`` now (None: none records, or
    gradients are off: run the module's own forward); every live tap's recorder is told that
    its module ran (``observed``: a step whose layers got gradients without it is a bypassed
    capture, e.g. a stale torch.compile graph)."""
    taps = []
    for ref, blocks in _TAPS.get(module, ()):
        recorder = ref()
        if recorder is not None:
            recorder.observed = True
            if recorder.recording:
                taps.append((recorder, blocks))
    if not taps or not torch.is_grad_enabled():
        return None

    def report(role: str, inputs: Tensor, output: Tensor, column: int | None = None) -> None:
        for recorder, blocks in taps:
            if role in blocks:
                recorder.record(blocks[role], inputs, output, column)

    return report


class _Detach:
    """Handle of one capture's attachment; the last one out restores the module's forward."""

    def __init__(self, module: nn.Module, entry: Tap) -> None:
        self.module = weakref.ref(module)
        self.entry = entry

    def remove(self) -> None:
        module = self.module()
        taps = None if module is None else _TAPS.get(module)
        if taps is None:
            return
        taps[:] = [t for t in taps if t is not self.entry]
        if not taps:
            del _TAPS[module]
            vars(module).pop("forward", None)
