"""Kronecker blocks of ``nn.LSTM`` and ``nn.GRU`` (docs/algorithms.md "Recurrent layers").

The fused recurrent kernel hides the gate pre-activations, so while a capture is attached the
module's forward is replaced (:mod:`grng.curvature.replacement`): a call that a capture records
runs :func:`recurrent_forward`, the same recurrence written out step by step, which reports
every block's input and output; any other call runs the fused forward.

Blocks per layer k and direction (``_reverse``), each Linear-like with rows stacked over the
time steps of every sequence (A = (1/n) sum a_bar a_bar^T, G = (1/n) sum e e^T, n = rows):

- ``ih_l{k}``: W_ih (gates x input) with b_ih, on the layer's input x_t: gi = W_ih x_t + b_ih;
- ``hh_l{k}``: W_hh (gates x hidden) with b_hh, on the previous hidden state h_{t-1}:
  gh = W_hh h_{t-1} + b_hh (one call per step: weight sharing over time);
- ``hr_l{k}`` (LSTM with ``proj_size``): W_hr on o_t * tanh(c_t), h_t = W_hr (o_t * tanh(c_t)).

Gates (torch's order): LSTM i, f, g, o: c_t = f c_{t-1} + i g, h_t = o tanh(c_t); GRU r, z, n:
n = tanh(gi_n + r gh_n), h_t = (1 - z) n + z h_{t-1}.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from grng.curvature.layers import (Handle, KroneckerLayer, LinearLayer, Recorder,
                                   register_layer)
from grng.curvature.replacement import (Report, attach_forward, recording_report,
                                        replaced_by_another)

__all__ = ["RecurrentProjection", "recurrent_forward"]


class RecurrentProjection(LinearLayer):
    """One weight of an ``nn.LSTM`` / ``nn.GRU`` (with its bias) as a Linear block named by
    ``role`` (``ih_l0``, ``hh_l0_reverse``, ``hr_l1``, ...); registered for both modules, whose
    blocks it builds (:meth:`blocks`) and observes (:meth:`attach`)."""

    def __init__(self, module: nn.Module, role: str, weight: Tensor, bias: Tensor | None,
                 max_factor_dim: int | None = None) -> None:
        super().__init__(module, weight=weight, max_factor_dim=max_factor_dim)
        self.bias = bias if bias is not None and bias.requires_grad and bias.is_leaf else None
        self.role = role
        self.suffix = "." + role

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        base = nn.LSTM if isinstance(module, nn.LSTM) else nn.GRU
        if type(module).forward is not base.forward:
            return f"{type(module).__name__} overrides {base.__name__}.forward"
        if replaced_by_another(module):
            return "its forward was replaced by another library"
        return None

    @classmethod
    def blocks(cls, module: nn.Module, max_factor_dim: int | None) -> list[KroneckerLayer]:
        """ih, hh (and hr with proj_size) per layer and direction, those whose weight is a
        trainable parameter."""
        out: list[KroneckerLayer] = []
        for name in _weight_names(module):
            weight = getattr(module, "weight_" + name)
            bias = getattr(module, "bias_" + name, None) if module.bias else None
            if weight.requires_grad and weight.is_leaf:
                out.append(cls(module, name, weight, bias, max_factor_dim))
        return out

    @classmethod
    def attach(cls, module: nn.Module, blocks: list[KroneckerLayer],
               recorder: Recorder) -> list[Handle]:
        """Route the module's recorded calls through :func:`recurrent_forward`."""
        return [attach_forward(module, {b.role: b for b in blocks}, recorder, _forward)]


def _weight_names(module: nn.Module) -> list[str]:
    """``ih_l{k}{sfx}``, ``hh_l{k}{sfx}`` (and ``hr_l{k}{sfx}``) per layer and direction."""
    names = []
    for k in range(module.num_layers):
        for sfx in ("", "_reverse")[:1 + int(module.bidirectional)]:
            kinds = ("ih", "hh", "hr") if getattr(module, "proj_size", 0) > 0 else ("ih", "hh")
            names += [f"{kind}_l{k}{sfx}" for kind in kinds]
    return names


def _forward(self: nn.Module, input: Tensor | PackedSequence, hx=None):
    """The forward of an attached LSTM/GRU: :func:`recurrent_forward` reporting to the captures
    that record this call, else the module's own (fused) forward."""
    report = recording_report(self)
    if report is None:
        return type(self).forward(self, input, hx)
    return recurrent_forward(self, report, input, hx)


_forward.__name__ = "forward"  # a pickled module's bound method unpickles as the class's forward


def recurrent_forward(m: nn.Module, report: Report, input: Tensor | PackedSequence, hx=None):
    """``m(input, hx)`` of an nn.LSTM / nn.GRU step by step (layers, directions, batch_first,
    unbatched input, PackedSequence, proj_size, inter-layer dropout as the fused CPU kernel
    draws it), reporting (role, block input, block output) for every block product."""
    lstm = isinstance(m, nn.LSTM)
    packed = isinstance(input, PackedSequence)
    dirs = 2 if m.bidirectional else 1
    if packed:
        data, batch_sizes, sorted_idx, unsorted_idx = input
        sizes = [int(b) for b in batch_sizes]
        unbatched = False
    else:
        unbatched = input.dim() == 2
        x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if m.batch_first
                                                  else input)
        steps, n = x.shape[:2]
        data, sizes = x.reshape(steps * n, x.shape[2]), [n] * steps
        sorted_idx = unsorted_idx = None
    n = sizes[0]
    out_size = m.proj_size if lstm and m.proj_size > 0 else m.hidden_size
    h0, c0 = _initial_state(m, hx, n, out_size, data, unbatched, sorted_idx, lstm)
    h_n, c_n = [], []
    for k in range(m.num_layers):
        outs = []
        for d in range(dirs):
            sfx = "_reverse" if d else ""
            j = k * dirs + d
            y, h, c = _direction(m, report, k, sfx, data, sizes, h0[j],
                                 None if c0 is None else c0[j], reverse=bool(d))
            outs.append(y)
            h_n.append(h)
            c_n.append(c)
        data = torch.cat(outs, dim=1) if dirs > 1 else outs[0]
        if m.dropout and m.training and k < m.num_layers - 1:
            data = F.dropout(data, m.dropout, True)
    h_n = torch.stack(h_n)
    hidden = (h_n, torch.stack(c_n)) if lstm else h_n
    if packed:
        if unsorted_idx is not None:
            hidden = tuple(t.index_select(1, unsorted_idx) for t in hidden) if lstm else \
                hidden.index_select(1, unsorted_idx)
        return PackedSequence(data, batch_sizes, sorted_idx, unsorted_idx), hidden
    output = data.reshape(len(sizes), n, -1)
    if unbatched:
        output = output.squeeze(1)
        hidden = tuple(t.squeeze(1) for t in hidden) if lstm else hidden.squeeze(1)
    elif m.batch_first:
        output = output.transpose(0, 1)
    return output, hidden


def _initial_state(m: nn.Module, hx, n: int, out_size: int, like: Tensor, unbatched: bool,
                   sorted_idx: Tensor | None, lstm: bool) -> tuple[Tensor, Tensor | None]:
    """(h0, c0) as (layers * directions, n, size) in the sorted order of a packed batch (zeros
    when ``hx`` is None; c0 None for a GRU)."""
    layers = m.num_layers * (2 if m.bidirectional else 1)
    if hx is None:
        h0 = like.new_zeros(layers, n, out_size)
        return h0, like.new_zeros(layers, n, m.hidden_size) if lstm else None
    h0, c0 = hx if lstm else (hx, None)
    if unbatched:
        h0, c0 = h0.unsqueeze(1), None if c0 is None else c0.unsqueeze(1)
    if sorted_idx is not None:
        h0 = h0.index_select(1, sorted_idx)
        c0 = None if c0 is None else c0.index_select(1, sorted_idx)
    return h0, c0


def _direction(m: nn.Module, report: Report, k: int, sfx: str, data: Tensor, sizes: list[int],
               h: Tensor, c: Tensor | None, reverse: bool
               ) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer in one direction over time-major packed ``data`` (sizes[t] rows at step t,
    non-increasing): (outputs in data's row order, final h, final c) per sequence.

    gh_t = W_hh h_{t-1} + b_hh + Z_t with Z a zero (rows x gates) tensor: the gradient of Z is
    every step's dL/dgh_t at once, so the hh block is reported once, with the stacked h_{t-1}
    (one record instead of one per step; the values are unchanged)."""
    role = f"l{k}{sfx}"
    w_hh = getattr(m, "weight_hh_" + role)
    b_hh = getattr(m, "bias_hh_" + role) if m.bias else None
    gi_all = F.linear(data, getattr(m, "weight_ih_" + role),
                      getattr(m, "bias_ih_" + role) if m.bias else None)
    report("ih_" + role, data, gi_all)
    Z = torch.zeros(gi_all.shape, dtype=gi_all.dtype, device=gi_all.device, requires_grad=True)
    lstm = c is not None
    if lstm:  # gates = gi + gh: one (rows x 4H) input for every step's addmm
        base = gi_all + Z if b_hh is None else gi_all + b_hh + Z
    else:
        base = Z if b_hh is None else Z + b_hh
    w_t = w_hh.t()
    # one split (its backward is one concatenation), not a slice per step (each slice's
    # backward would write a full-size zero gradient)
    base_steps, gi_steps = base.split(sizes), gi_all.split(sizes)
    outs: list[Tensor | None] = [None] * len(sizes)
    prev: list[Tensor | None] = [None] * len(sizes)
    order = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
    for t in order:
        b = sizes[t]
        h_prev = h if b == h.shape[0] else h[:b]
        prev[t] = h_prev.detach()
        gh = torch.addmm(base_steps[t], h_prev, w_t)
        if lstm:  # gh holds gi + gh: (i, f, g, o)
            i, f, _, o = torch.sigmoid(gh).chunk(4, dim=1)
            g = torch.tanh(gh.chunk(4, dim=1)[2])
            c_new = torch.addcmul(i * g, f, c if b == c.shape[0] else c[:b])
            h_new = o * torch.tanh(c_new)
            if m.proj_size > 0:  # h_t = W_hr (o tanh(c_t)), one hr record per step
                inner = h_new
                h_new = F.linear(inner, getattr(m, "weight_hr_" + role))
                report("hr_" + role, inner, h_new)
            c = torch.cat([c_new, c[b:]]) if b < c.shape[0] else c_new
        else:  # GRU (r, z, n): h_t = n + z (h_{t-1} - n)
            ri, zi, ni = gi_steps[t].chunk(3, dim=1)
            rh, zh, nh = gh.chunk(3, dim=1)
            r, z = torch.sigmoid(ri + rh), torch.sigmoid(zi + zh)
            n = torch.tanh(torch.addcmul(ni, r, nh))
            h_new = torch.addcmul(n, z, h_prev - n)
        h = torch.cat([h_new, h[b:]]) if b < h.shape[0] else h_new
        outs[t] = h_new
    report("hh_" + role, torch.cat(prev), Z)
    return torch.cat(outs), h, c


register_layer(nn.LSTM, RecurrentProjection)
register_layer(nn.GRU, RecurrentProjection)
