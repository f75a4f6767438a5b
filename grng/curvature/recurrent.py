"""Kronecker blocks of ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` (docs/algorithms.md "Recurrent
layers").

The fused recurrent kernel hides the gate pre-activations, so while a capture is attached the
module's forward is replaced (:mod:`grng.curvature.replacement`): a call that a capture records
runs :func:`recurrent_forward`, the same recurrence written out (per layer and direction: one
GEMM for the input-hidden products of every step, then the recurrence as one autograd node whose
backward through time is written out), which reports every block's input and output; any other
call runs the fused forward.

Blocks per layer k and direction (``_reverse``), each Linear-like with rows stacked over the
time steps of every sequence (A = (1/n) sum a_bar a_bar^T, G = (1/n) sum e e^T, n = rows):

- ``ih_l{k}``: W_ih (gates x input) with b_ih, on the layer's input x_t: gi = W_ih x_t + b_ih;
- ``hh_l{k}``: W_hh (gates x hidden) with b_hh, on the previous hidden state h_{t-1}:
  gh = W_hh h_{t-1} + b_hh (every step: weight sharing over time, reported once for all rows);
- ``hr_l{k}`` (LSTM with ``proj_size``): W_hr on o_t * tanh(c_t), h_t = W_hr (o_t * tanh(c_t)).

Gates (torch's order): LSTM i, f, g, o: c_t = f c_{t-1} + i g, h_t = o tanh(c_t); GRU r, z, n:
n = tanh(gi_n + r gh_n), h_t = (1 - z) n + z h_{t-1}; RNN (one gate): h_t = act(gi + gh), act
tanh or relu (``nonlinearity``).

These blocks' G grows by orders of magnitude in the first steps of training, faster than the
running factors follow: keep K-FAC's KL clip on (its default; docs/algorithms.md "Early
training and the KL clip").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from grng.curvature.factors import compute_dtype
from grng.curvature.layers import (Handle, KroneckerLayer, LinearLayer, Recorder,
                                   register_layer)
from grng.curvature.options import BlockOptions
from grng.curvature.replacement import (Report, attach_forward, recording_report,
                                        replaced_by_another)

__all__ = ["RecurrentProjection", "recurrent_block_names", "recurrent_forward"]


class RecurrentProjection(LinearLayer):
    """One weight of an ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (with its bias) as a Linear block
    named by ``role`` (``ih_l0``, ``hh_l0_reverse``, ``hr_l1``, ...); registered for the three
    modules, whose blocks it builds (:meth:`blocks`) and observes (:meth:`attach`)."""

    def __init__(self, module: nn.Module, role: str, weight: Tensor, bias: Tensor | None,
                 options: BlockOptions = BlockOptions()) -> None:
        super().__init__(module, weight=weight, options=options)
        self.bias = bias if bias is not None and bias.requires_grad and bias.is_leaf else None
        self.role = role
        self.suffix = "." + role

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        base = next(b for b in (nn.LSTM, nn.GRU, nn.RNN) if isinstance(module, b))
        if type(module).forward is not base.forward:
            return f"{type(module).__name__} overrides {base.__name__}.forward"
        if replaced_by_another(module):
            return "its forward was replaced by another library"
        return None

    @classmethod
    def blocks(cls, module: nn.Module, options: BlockOptions) -> list[KroneckerLayer]:
        """ih, hh (and hr with proj_size) per layer and direction, those whose weight is a
        trainable parameter."""
        out: list[KroneckerLayer] = []
        for name in _weight_names(module):
            weight = getattr(module, "weight_" + name)
            bias = getattr(module, "bias_" + name, None) if module.bias else None
            if weight.requires_grad and weight.is_leaf:
                out.append(cls(module, name, weight, bias, options))
        return out

    @classmethod
    def attach(cls, module: nn.Module, blocks: list[KroneckerLayer],
               recorder: Recorder) -> list[Handle]:
        """Route the module's recorded calls through :func:`recurrent_forward`."""
        return [attach_forward(module, {b.role: b for b in blocks}, recorder, _forward)]


def recurrent_block_names(layers: list[KroneckerLayer], weights: set[int]) -> list[str]:
    """``LSTM.hh_l0``, ... of the recurrent blocks among ``layers`` whose weight's ``id`` is in
    ``weights``, sorted."""
    return sorted({f"{type(b.module).__name__}.{b.role}" for b in layers
                   if isinstance(b, RecurrentProjection) and id(b.weight) in weights})


def _weight_names(module: nn.Module) -> list[str]:
    """``ih_l{k}{sfx}``, ``hh_l{k}{sfx}`` (and ``hr_l{k}{sfx}``) per layer and direction."""
    names = []
    for k in range(module.num_layers):
        for sfx in ("", "_reverse")[:1 + int(module.bidirectional)]:
            kinds = ("ih", "hh", "hr") if getattr(module, "proj_size", 0) > 0 else ("ih", "hh")
            names += [f"{kind}_l{k}{sfx}" for kind in kinds]
    return names


def _forward(self: nn.Module, input: Tensor | PackedSequence, hx=None):
    """The forward of an attached LSTM/GRU/RNN: :func:`recurrent_forward` reporting to the
    captures that record this call, else the module's own (fused) forward."""
    report = recording_report(self)
    if report is None:
        return type(self).forward(self, input, hx)
    return recurrent_forward(self, report, input, hx)


_forward.__name__ = "forward"  # a pickled module's bound method unpickles as the class's forward


def recurrent_forward(m: nn.Module, report: Report, input: Tensor | PackedSequence, hx=None):
    """``m(input, hx)`` of an nn.LSTM / GRU / RNN step by step (layers, directions, batch_first,
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
    when ``hx`` is None; c0 None for a GRU or RNN)."""
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

    The input-hidden products of every step are one GEMM before the recurrence (the ih block's
    rows are the whole sequence at once); the recurrence is one autograd node
    (:class:`_LSTMRecurrence`, :class:`_GRURecurrence`, :class:`_RNNRecurrence`) that returns
    the stacked h_{t-1} of every row, so the hh block is reported once: its G rows are the
    gradient of the per-row gates input (LSTM, RNN: gi + b_hh, whose gradient is every step's
    dL/dgh_t; GRU: b_hh broadcast over the rows)."""
    role = f"l{k}{sfx}"
    w_hh = getattr(m, "weight_hh_" + role)
    b_hh = getattr(m, "bias_hh_" + role) if m.bias else None
    gi = F.linear(data, getattr(m, "weight_ih_" + role),
                  getattr(m, "bias_ih_" + role) if m.bias else None)
    report("ih_" + role, data, gi)
    steps = _Steps(sizes, reverse)
    # one working dtype for the recurrence node, at least float32 (the state is carried through
    # every step: bfloat16 rounding of h, c and their gradients compounds over time); the
    # outputs return in gi's (the module's, or an autocast GEMM's)
    acc = compute_dtype(gi)
    h = h.to(acc)
    if isinstance(m, nn.GRU):
        rows = gi.shape[0]
        if b_hh is not None and b_hh.requires_grad:
            bh = b_hh.to(acc).expand(rows, b_hh.shape[0])
        else:  # a zero (or frozen-bias) input that carries the hh block's gradient rows
            bh = gi.new_zeros(rows, w_hh.shape[0], dtype=acc, requires_grad=True)
            bh = bh if b_hh is None else bh + b_hh.to(acc)
        y, h_n, h_prev = _GRURecurrence.apply(steps, gi.to(acc), bh, w_hh.to(acc), h)
        report("hh_" + role, h_prev, bh)
        return y.to(gi.dtype), h_n.to(gi.dtype), None
    pre = gi.to(acc) if b_hh is None else gi.to(acc) + b_hh.to(acc)
    if not pre.requires_grad:  # a frozen W_ih and input: the hh rows still need dL/dgh
        pre = pre.detach().requires_grad_(w_hh.requires_grad)
    if c is None:  # nn.RNN
        y, h_n, h_prev = _RNNRecurrence.apply(steps, pre, w_hh.to(acc), h, m.nonlinearity)
        report("hh_" + role, h_prev, pre)
        return y.to(gi.dtype), h_n.to(gi.dtype), None
    w_hr = getattr(m, "weight_hr_" + role) if m.proj_size > 0 else None
    tap = None if w_hr is None else gi.new_zeros(gi.shape[0], w_hr.shape[0], dtype=acc,
                                                requires_grad=True)
    y, h_n, c_n, h_prev, inner = _LSTMRecurrence.apply(
        steps, pre, w_hh.to(acc), h, c.to(acc), None if w_hr is None else w_hr.to(acc), tap)
    report("hh_" + role, h_prev, pre)
    if w_hr is not None:  # h_t = W_hr (o_t tanh(c_t)); tap's gradient is every dL/dh_t
        report("hr_" + role, inner, tap)
    return y.to(gi.dtype), h_n.to(gi.dtype), c_n.to(gi.dtype)


class _Steps:
    """The row layout of one direction over packed time-major data: step t owns the next
    sizes[t] rows (sizes non-increasing: the first sizes[t] sequences of the sorted batch),
    processed in ``order``. Step t continues the first k_t of its rows from the previous
    processed step's rows and starts the others from the initial state (forward direction:
    all of them; reverse: the sequences whose last step is t); a sequence's final state is its
    row at the last step it is processed in."""

    def __init__(self, sizes: list[int], reverse: bool) -> None:
        self.sizes = sizes
        self.order = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
        order = list(self.order)
        #: step -> (the previous processed step or None, k: rows continued from it)
        self.prev: dict[int, tuple[int | None, int]] = {}
        #: (step, first row, end row): the rows whose final state is that step's
        self.final: list[tuple[int, int, int]] = []
        for pos, t in enumerate(order):
            before = order[pos - 1] if pos else None
            self.prev[t] = (before, 0 if before is None else min(sizes[before], sizes[t]))
            after = sizes[order[pos + 1]] if pos + 1 < len(order) else 0
            if after < sizes[t]:
                self.final.append((t, after, sizes[t]))
        self.final.sort(key=lambda f: f[1])

    def split(self, t: Tensor) -> tuple[Tensor, ...]:
        """The per-step row blocks (views) of a tensor laid out as the data."""
        return t.split(self.sizes)

    def previous(self, t: int, outs: tuple[Tensor, ...], init: Tensor) -> Tensor:
        """The state step t reads: the previous step's rows ``outs[s][:k]`` (a view), then the
        initial state's rows of the sequences that start at t."""
        s, k = self.prev[t]
        b = self.sizes[t]
        if s is not None and k == b:
            return outs[s] if k == outs[s].shape[0] else outs[s][:k]
        if k == 0:
            return init if b == init.shape[0] else init[:b]
        return torch.cat([outs[s][:k], init[k:b]])

    def last(self, outs: tuple[Tensor, ...]) -> Tensor:
        """Every sequence's state after its last step (a new tensor, one row per sequence)."""
        pieces = [outs[t][lo:hi] for t, lo, hi in self.final]
        return pieces[0].clone() if len(pieces) == 1 else torch.cat(pieces)


def _prefixes(state: Tensor, sizes: list[int]) -> dict[int, Tensor]:
    """state[:b] (a view) for every step size b (the whole tensor when b is all of it)."""
    return {b: state if b == state.shape[0] else state[:b] for b in set(sizes)}


class _LSTMRecurrence(torch.autograd.Function):
    """The LSTM recurrence of one layer and direction as one autograd node: in ``pre`` (rows x
    4H, gi_t + b_hh), W_hh, h_0, c_0 (and W_hr with ``proj_size``; ``tap``, rows x P, only
    carries the gradient dL/dh_t of every row); out (y, h_n, c_n, the stacked h_{t-1}, the
    stacked o_t tanh(c_t)), the last two not differentiable.

    Forward (gates in torch's order i, f, g, o; s the sigmoid):
    c_t = s(f) c_{t-1} + s(i) tanh(g), h_t = s(o) tanh(c_t) [then W_hr].
    Backward through time with dh_t = dy_t + dL/dh_t from step t+1 (a buffer of one row per
    sequence, first dh_n, carries dh between steps: step t reads and rewrites its first sizes[t]
    rows; it ends as dh_0; dc likewise): dc_t += dh_t s(o) (1 - tanh^2(c_t)); d(i, f, g, o) = (dc_t tanh(g) s'(i),
    dc_t c_{t-1} s'(f), dc_t s(i) tanh'(g), dh_t tanh(c_t) s'(o)); dc_{t-1} = dc_t s(f);
    dh_{t-1} = dgates_t W_hh. The factors that do not depend on the recurrence are computed for
    every row at once, and dW_hh = dgates^T [h_{t-1}] is one GEMM over all rows. A double
    backward (``create_graph=True``) recomputes through :func:`_lstm_reference`."""

    @staticmethod
    def forward(ctx, steps: _Steps, pre: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor,
                w_hr: Tensor | None, tap: Tensor | None):
        rows, hidden = pre.shape[0], w_hh.shape[1] if w_hr is None else w_hr.shape[1]
        out_size = h0.shape[1]
        gates = torch.empty_like(pre)  # the activated gates s(i), s(f), tanh(g), s(o)
        cell = pre.new_empty(rows, hidden)
        tanh_c = torch.empty_like(cell)
        y = pre.new_empty(rows, out_size)
        inner = y if w_hr is None else torch.empty_like(cell)
        w_t = w_hh.t()
        w_rt = None if w_hr is None else w_hr.t()
        ifgo = gates.view(rows, 4, hidden)
        ys, cells = steps.split(y), steps.split(cell)
        per_step = list(zip(*(steps.split(t) for t in (
            pre, gates, gates[:, :2 * hidden], ifgo[:, 0], ifgo[:, 1], ifgo[:, 2], ifgo[:, 3],
            tanh_c, inner))))
        hp_steps: list[Tensor | None] = [None] * len(ys)
        cp_steps: list[Tensor | None] = [None] * len(ys)
        for t in steps.order:
            p, g, g_if, i, f, g_g, o, tc, inn = per_step[t]
            hp = hp_steps[t] = steps.previous(t, ys, h0)
            cp = cp_steps[t] = steps.previous(t, cells, c0)
            torch.addmm(p, hp, w_t, out=g)
            g_if.sigmoid_()
            g_g.tanh_()
            o.sigmoid_()
            torch.mul(f, cp, out=cells[t])
            cells[t].addcmul_(i, g_g)
            torch.tanh(cells[t], out=tc)
            torch.mul(o, tc, out=inn)
            if w_rt is not None:
                torch.mm(inn, w_rt, out=ys[t])
        h, c = steps.last(ys), steps.last(cells)
        h_prev, c_prev = torch.cat(hp_steps), torch.cat(cp_steps)
        ctx.steps = steps
        ctx.save_for_backward(pre, w_hh, h0, c0, w_hr, tap, gates, h_prev, c_prev, tanh_c, inner)
        if w_hr is None:
            ctx.mark_non_differentiable(h_prev)
            return y, h, c, h_prev, None
        ctx.mark_non_differentiable(h_prev, inner)
        return y, h, c, h_prev, inner

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n, _dh_prev, _dinner):
        pre, w_hh, h0, c0, w_hr, tap, gates, h_prev, c_prev, tanh_c, inner = ctx.saved_tensors
        steps = ctx.steps
        if torch.is_grad_enabled():  # create_graph: differentiate the reference recurrence
            return (None,) + _regrad(ctx, (pre, w_hh, h0, c0, w_hr, tap), lambda *a: _lstm_reference(
                steps, *a), (dy, dh_n, dc_n))
        rows, hidden = tanh_c.shape
        i, f, g, o = gates.view(rows, 4, hidden).unbind(1)
        # the factors of the recurrence that hold for every row
        k_c = o * (1 - tanh_c * tanh_c)                            # dc_t += dh_t k_c
        k_o = tanh_c * o * (1 - o)                                 # do = dh_t k_o
        k_ifg = torch.stack([g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g)], 1)
        dgates = torch.empty_like(gates)
        d4 = dgates.view(rows, 4, hidden)
        dh_all = torch.empty_like(h_prev)  # dL/dh_t of every row (output and recurrence)
        dh = torch.zeros_like(h0) if dh_n is None else dh_n.clone()
        dc = torch.zeros_like(c0) if dc_n is None else dc_n.clone()
        dhs, dcs = _prefixes(dh, steps.sizes), _prefixes(dc, steps.sizes)
        dy = torch.zeros_like(h_prev) if dy is None else dy
        d_inner = None if w_hr is None else torch.empty_like(inner)
        per_step = list(zip(*(steps.split(t) for t in (
            dy, dh_all, dgates, d4[:, :3], d4[:, 3], k_c, k_o, k_ifg, f,
            dh_all if d_inner is None else d_inner))))
        for t in reversed(steps.order):
            dy_t, dh_t, dg_t, dg_ifg, dg_o, kc, ko, kifg, f_t, dcell = per_step[t]
            b = dy_t.shape[0]
            torch.add(dhs[b], dy_t, out=dh_t)
            if w_hr is not None:
                torch.mm(dh_t, w_hr, out=dcell)
            dcs[b].addcmul_(dcell, kc)
            torch.mul(dcs[b].unsqueeze(1), kifg, out=dg_ifg)
            torch.mul(dcell, ko, out=dg_o)
            dcs[b].mul_(f_t)
            torch.mm(dg_t, w_hh, out=dhs[b])
        needs = ctx.needs_input_grad
        d_w = dgates.t().mm(h_prev) if needs[2] else None
        d_wr = dh_all.t().mm(inner) if w_hr is not None and needs[5] else None
        d_tap = dh_all if w_hr is not None and needs[6] else None
        return None, dgates, d_w, dh, dc, d_wr, d_tap


class _GRURecurrence(torch.autograd.Function):
    """The GRU recurrence of one layer and direction as one autograd node: in gi (rows x 3H,
    W_ih x_t + b_ih), bh (rows x 3H, b_hh per row), W_hh, h_0; out (y, h_n, the stacked
    h_{t-1}), the last not differentiable.

    Forward (gates r, z, n; s the sigmoid): gh_t = W_hh h_{t-1} + b_hh, r = s(gi_r + gh_r),
    z = s(gi_z + gh_z), n = tanh(gi_n + r gh_n), h_t = n + z (h_{t-1} - n).
    Backward: dn = dh_t (1 - z) tanh'(.), d(gi_r, gi_z, gi_n) = (dn gh_n s'(r),
    dh_t (h_{t-1} - n) s'(z), dn), dgh = (dgi_r, dgi_z, dn r), dh_{t-1} = dgh W_hh + dh_t z;
    per-row factors at once, dW_hh = dgh^T [h_{t-1}] one GEMM. A double backward recomputes
    through :func:`_gru_reference`."""

    @staticmethod
    def forward(ctx, steps: _Steps, gi: Tensor, bh: Tensor, w_hh: Tensor, h0: Tensor):
        rows, hidden = gi.shape[0], h0.shape[1]
        gh = torch.empty_like(gi)
        act = torch.empty_like(gi)  # s(r), s(z), n
        y = gi.new_empty(rows, hidden)
        w_t = w_hh.t()
        ys = steps.split(y)
        per_step = list(zip(*(steps.split(t) for t in (
            gi[:, :2 * hidden], gi[:, 2 * hidden:], bh, gh, gh[:, :2 * hidden],
            gh[:, 2 * hidden:], act[:, :2 * hidden], act[:, :hidden],
            act[:, hidden:2 * hidden], act[:, 2 * hidden:]))))
        hp_steps: list[Tensor | None] = [None] * len(ys)
        for t in steps.order:
            gi_rz, gi_n, bh_t, gh_t, gh_rz, gh_n, rz, r, z, n = per_step[t]
            hp = hp_steps[t] = steps.previous(t, ys, h0)
            torch.addmm(bh_t, hp, w_t, out=gh_t)
            torch.add(gi_rz, gh_rz, out=rz).sigmoid_()
            torch.addcmul(gi_n, r, gh_n, out=n).tanh_()
            torch.addcmul(n, z, hp - n, out=ys[t])
        h, h_prev = steps.last(ys), torch.cat(hp_steps)
        ctx.steps = steps
        ctx.save_for_backward(gi, bh, w_hh, h0, gh, act, h_prev)
        ctx.mark_non_differentiable(h_prev)
        return y, h, h_prev

    @staticmethod
    def backward(ctx, dy, dh_n, _dh_prev):
        gi, bh, w_hh, h0, gh, act, h_prev = ctx.saved_tensors
        steps = ctx.steps
        if torch.is_grad_enabled():  # create_graph: differentiate the reference recurrence
            return (None,) + _regrad(ctx, (gi, bh, w_hh, h0), lambda *a: _gru_reference(
                steps, *a), (dy, dh_n))
        rows, hidden = h_prev.shape
        r, z, n = act.view(rows, 3, hidden).unbind(1)
        gh_n = gh[:, 2 * hidden:]
        k_n = (1 - z) * (1 - n * n)                                 # dgi_n = dh_t k_n
        # dgh = dh_t (k_n gh_n s'(r), (h_{t-1} - n) s'(z), k_n r)
        k_gh = torch.stack([k_n * gh_n * r * (1 - r), (h_prev - n) * z * (1 - z), k_n * r], 1)
        dgh = torch.empty_like(gh)
        dh_all = torch.empty_like(h_prev)
        dh = torch.zeros_like(h0) if dh_n is None else dh_n.clone()
        dhs = _prefixes(dh, steps.sizes)
        dy = torch.zeros_like(h_prev) if dy is None else dy
        per_step = list(zip(*(steps.split(t) for t in (
            dy, dh_all, dgh, dgh.view(rows, 3, hidden), k_gh, z))))
        for t in reversed(steps.order):
            dy_t, dh_t, dgh_t, dgh3, kgh, z_t = per_step[t]
            b = dy_t.shape[0]
            torch.add(dhs[b], dy_t, out=dh_t)
            torch.mul(dh_t.unsqueeze(1), kgh, out=dgh3)
            torch.addmm(dh_t * z_t, dgh_t, w_hh, out=dhs[b])
        dgi = dgh.clone()
        torch.mul(dh_all, k_n, out=dgi[:, 2 * hidden:])
        needs = ctx.needs_input_grad
        d_w = dgh.t().mm(h_prev) if needs[3] else None
        return None, dgi, dgh, d_w, dh


class _RNNRecurrence(torch.autograd.Function):
    """The Elman recurrence of one layer and direction as one autograd node: in ``pre`` (rows x
    H, gi_t + b_hh), W_hh, h_0 and the nonlinearity ("tanh" or "relu"); out (y, h_n, the stacked
    h_{t-1}), the last not differentiable.

    Forward: h_t = act(pre_t + W_hh h_{t-1}). Backward: dpre_t = (dy_t + dh) act'(.), with
    act' from the output (1 - h_t^2, or [h_t > 0]) for all rows at once, dh_{t-1} = dpre_t W_hh;
    dW_hh = dpre^T [h_{t-1}] one GEMM. A double backward recomputes through
    :func:`_rnn_reference`."""

    @staticmethod
    def forward(ctx, steps: _Steps, pre: Tensor, w_hh: Tensor, h0: Tensor, nonlinearity: str):
        y = torch.empty_like(pre)
        w_t = w_hh.t()
        ys, pres = steps.split(y), steps.split(pre)
        activate = torch.tanh_ if nonlinearity == "tanh" else torch.relu_
        hp_steps: list[Tensor | None] = [None] * len(ys)
        for t in steps.order:
            hp = hp_steps[t] = steps.previous(t, ys, h0)
            activate(torch.addmm(pres[t], hp, w_t, out=ys[t]))
        h, h_prev = steps.last(ys), torch.cat(hp_steps)
        ctx.steps, ctx.nonlinearity = steps, nonlinearity
        ctx.save_for_backward(pre, w_hh, h0, y, h_prev)
        ctx.mark_non_differentiable(h_prev)
        return y, h, h_prev

    @staticmethod
    def backward(ctx, dy, dh_n, _dh_prev):
        pre, w_hh, h0, y, h_prev = ctx.saved_tensors
        steps, nonlinearity = ctx.steps, ctx.nonlinearity
        if torch.is_grad_enabled():  # create_graph: differentiate the reference recurrence
            return (None,) + _regrad(ctx, (pre, w_hh, h0), lambda *a: _rnn_reference(
                steps, *a, nonlinearity), (dy, dh_n)) + (None,)
        slope = 1 - y * y if nonlinearity == "tanh" else (y > 0).to(y.dtype)  # act'(.)
        dpre = torch.empty_like(y)
        dh = torch.zeros_like(h0) if dh_n is None else dh_n.clone()
        dhs = _prefixes(dh, steps.sizes)
        dy = torch.zeros_like(y) if dy is None else dy
        per_step = list(zip(*(steps.split(t) for t in (dy, dpre, slope))))
        for t in reversed(steps.order):
            dy_t, dp_t, slope_t = per_step[t]
            b = dy_t.shape[0]
            torch.add(dhs[b], dy_t, out=dp_t).mul_(slope_t)
            torch.mm(dp_t, w_hh, out=dhs[b])
        d_w = dpre.t().mm(h_prev) if ctx.needs_input_grad[2] else None
        return None, dpre, d_w, dh, None


def _regrad(ctx, inputs: tuple, reference, grads: tuple) -> tuple:
    """The input gradients of ``reference(*inputs)`` (its first outputs matched with ``grads``)
    as a differentiable graph: a double backward through a recurrence node."""
    wanted = [x for x, need in zip(inputs, ctx.needs_input_grad[1:]) if need and x is not None]
    with torch.enable_grad():
        outs = reference(*inputs)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
        found = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                    create_graph=True, allow_unused=True)
    it = iter(found)
    result = [next(it) if need and x is not None else None
              for x, need in zip(inputs, ctx.needs_input_grad[1:])]
    return tuple(result)


def _lstm_reference(steps: _Steps, pre: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor,
                    w_hr: Tensor | None, tap: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The LSTM recurrence of :class:`_LSTMRecurrence` in plain differentiable ops (y, h_n,
    c_n); the zero ``tap`` is added to every h_t (its gradient: dL/dh_t)."""
    h, c = h0, c0
    outs: list[Tensor | None] = [None] * len(steps.sizes)
    for t in steps.order:
        p = steps.split(pre)[t]
        b = p.shape[0]
        i, f, g, o = (p + h[:b] @ w_hh.t()).chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c[:b] + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if w_hr is not None:
            h_new = h_new @ w_hr.t() + steps.split(tap)[t]
        h, c = torch.cat([h_new, h[b:]]), torch.cat([c_new, c[b:]])
        outs[t] = h_new
    return torch.cat(outs), h, c


def _gru_reference(steps: _Steps, gi: Tensor, bh: Tensor, w_hh: Tensor,
                   h0: Tensor) -> tuple[Tensor, Tensor]:
    """The GRU recurrence of :class:`_GRURecurrence` in plain differentiable ops (y, h_n)."""
    h = h0
    outs: list[Tensor | None] = [None] * len(steps.sizes)
    for t in steps.order:
        gi_t, bh_t = steps.split(gi)[t], steps.split(bh)[t]
        b = gi_t.shape[0]
        ri, zi, ni = gi_t.chunk(3, dim=1)
        rh, zh, nh = (bh_t + h[:b] @ w_hh.t()).chunk(3, dim=1)
        r, z = torch.sigmoid(ri + rh), torch.sigmoid(zi + zh)
        n = torch.tanh(ni + r * nh)
        h_new = n + z * (h[:b] - n)
        h = torch.cat([h_new, h[b:]])
        outs[t] = h_new
    return torch.cat(outs), h


def _rnn_reference(steps: _Steps, pre: Tensor, w_hh: Tensor, h0: Tensor,
                   nonlinearity: str) -> tuple[Tensor, Tensor]:
    """The recurrence of :class:`_RNNRecurrence` in plain differentiable ops (y, h_n)."""
    activate = torch.tanh if nonlinearity == "tanh" else torch.relu
    h = h0
    outs: list[Tensor | None] = [None] * len(steps.sizes)
    for t in steps.order:
        p = steps.split(pre)[t]
        b = p.shape[0]
        h_new = activate(p + h[:b] @ w_hh.t())
        h = torch.cat([h_new, h[b:]])
        outs[t] = h_new
    return torch.cat(outs), h


register_layer(nn.LSTM, RecurrentProjection)
register_layer(nn.GRU, RecurrentProjection)
register_layer(nn.RNN, RecurrentProjection)
