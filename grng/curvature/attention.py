"""Kronecker blocks of ``nn.MultiheadAttention`` (docs/algorithms.md "Attention").

``F.multi_head_attention_forward`` applies the projection weights itself (``out_proj``'s forward
is never called, ``in_proj_weight`` is a bare parameter), so no module hook sees a projection's
input and output. While a capture is attached, the module's ``forward`` is replaced by
:func:`attention_forward`, torch's computation op for op, which reports every projection's input
and output to the capture; a call no capture records (not armed, paused, no gradient) runs the
module's own forward, fast path included. ``capture.remove()`` restores the module.

Blocks (each Linear-like: rows are tokens, A = (1/N) sum a_bar a_bar^T, G = (1/N) sum e e^T):

- ``in_proj`` (packed ``in_proj_weight`` 3E x E and ``in_proj_bias``): ONE block, the Linear
  W_in applied to the query, key and value tokens. Self-attention is one call (A from x, G from
  the 3E output gradient); cross-attention is weight sharing over two calls (query tokens give
  the q columns, key/value tokens the k, v columns; the other columns of a row are 0, as the
  unused outputs of that call), stacked like every other shared layer (N = all rows);
- ``q_proj``, ``k_proj``, ``v_proj`` (kdim or vdim != embed_dim: separate weights of different
  input sizes): one weight-only block each; the packed ``in_proj_bias`` gets the diagonal;
- ``out_proj``: a block on the attention output before the projection (on the effective weight
  when ``out_proj`` is weight-normed, :class:`grng.curvature.layers.WeightNormLayer`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grng.curvature.layers import (Handle, KroneckerLayer, LinearLayer, Recorder, WeightNormLayer,
                                   register_layer, weight_norm_parts)
from grng.curvature.options import BlockOptions
from grng.curvature.replacement import (Report, attach_forward, recording_report,
                                        replaced_by_another)

__all__ = ["AttentionProjection", "attention_forward"]


class AttentionProjection(LinearLayer):
    """One projection of an ``nn.MultiheadAttention`` as a Linear block named by ``role``
    (``in_proj``, ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``); registered for
    nn.MultiheadAttention, whose blocks it builds (:meth:`blocks`) and observes (:meth:`attach`).
    """

    def __init__(self, module: nn.Module, role: str, weight: Tensor, bias: Tensor | None,
                 options: BlockOptions = BlockOptions()) -> None:
        super().__init__(module, weight=weight, options=options)
        self.bias = bias if bias is not None and bias.requires_grad else None
        self.role = role
        self.suffix = "." + role

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        if type(module).forward is not nn.MultiheadAttention.forward:
            return f"{type(module).__name__} overrides MultiheadAttention.forward"
        if replaced_by_another(module):
            return "its forward was replaced by another library"
        return None

    @classmethod
    def blocks(cls, module: nn.Module, options: BlockOptions) -> list[KroneckerLayer]:
        """in_proj (or q_proj, k_proj, v_proj) and out_proj, those whose weight is a trainable
        parameter (or a weight-normed out_proj's direction v)."""
        out: list[KroneckerLayer] = []

        def add(role: str, weight: Tensor | None, bias: Tensor | None) -> None:
            if weight is not None and weight.requires_grad and weight.is_leaf:
                out.append(cls(module, role, weight, bias, options))

        if module._qkv_same_embed_dim:
            add("in_proj", module.in_proj_weight, module.in_proj_bias)
        else:
            add("q_proj", module.q_proj_weight, None)
            add("k_proj", module.k_proj_weight, None)
            add("v_proj", module.v_proj_weight, None)
        parts = weight_norm_parts(module.out_proj)
        if parts is None:
            add("out_proj", module.out_proj.weight, module.out_proj.bias)
        elif parts[0].requires_grad:
            v, g, dim = parts
            inner = cls(module, "out_proj", v, module.out_proj.bias, options)
            out.append(WeightNormLayer(inner, g, dim))
        return out

    @classmethod
    def attach(cls, module: nn.Module, blocks: list[KroneckerLayer],
               recorder: Recorder) -> list[Handle]:
        """Route the module's forward through :func:`attention_forward` while attached."""
        roles = {getattr(b, "inner", b).role: b for b in blocks}
        return [attach_forward(module, roles, recorder, _forward)]


def _forward(self: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
             key_padding_mask: Tensor | None = None, need_weights: bool = True,
             attn_mask: Tensor | None = None, average_attn_weights: bool = True,
             is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
    """The forward of an attached nn.MultiheadAttention: :func:`attention_forward` reporting to
    the captures that record this call, else the module's own forward. (A deep copy of the
    module is attached to no capture, so it runs its own forward.)"""
    report = recording_report(self)
    if report is None:
        return type(self).forward(self, query, key, value, key_padding_mask, need_weights,
                                  attn_mask, average_attn_weights, is_causal)
    return attention_forward(self, report, query, key, value, key_padding_mask, need_weights,
                             attn_mask, average_attn_weights, is_causal)


_forward.__name__ = "forward"  # a pickled module's bound method unpickles as the class's forward


def _float_mask(mask: Tensor | None, name: str, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask as an additive float mask (-inf where True); a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported")
    return mask


def _in_projection(m: nn.MultiheadAttention, report: Report, query: Tensor, key: Tensor,
                   value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """torch's in-projection (packed: one, two or three F.linear calls as q, k, v alias each
    other; separate weights: three), each call reported with its block's output columns."""
    E = query.shape[-1]
    if not m._qkv_same_embed_dim:
        b_q, b_k, b_v = (None,) * 3 if m.in_proj_bias is None else m.in_proj_bias.chunk(3)
        q = F.linear(query, m.q_proj_weight, b_q)
        k = F.linear(key, m.k_proj_weight, b_k)
        v = F.linear(value, m.v_proj_weight, b_v)
        for role, inputs, output in (("q_proj", query, q), ("k_proj", key, k),
                                     ("v_proj", value, v)):
            report(role, inputs, output, None)
        return q, k, v
    w, b = m.in_proj_weight, m.in_proj_bias
    if key is value and query is key:  # self-attention: one call, all 3E columns
        proj = F.linear(query, w, b)
        report("in_proj", query, proj, None)
        proj = (proj.unflatten(-1, (3, E)).unsqueeze(0).transpose(0, -2).squeeze(-2)
                .contiguous())
        return proj[0], proj[1], proj[2]
    if key is value:  # encoder-decoder attention: q columns from the query, k, v from the key
        w_q, w_kv = w.split([E, E * 2])
        b_q, b_kv = (None, None) if b is None else b.split([E, E * 2])
        q = F.linear(query, w_q, b_q)
        kv = F.linear(key, w_kv, b_kv)
        report("in_proj", query, q, 0)
        report("in_proj", key, kv, E)
        kv = kv.unflatten(-1, (2, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        return q, kv[0], kv[1]
    w_q, w_k, w_v = w.chunk(3)
    b_q, b_k, b_v = (None,) * 3 if b is None else b.chunk(3)
    q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    for inputs, output, column in ((query, q, 0), (key, k, E), (value, v, 2 * E)):
        report("in_proj", inputs, output, column)
    return q, k, v


def attention_forward(m: nn.MultiheadAttention, report: Report, query: Tensor, key: Tensor,
                      value: Tensor, key_padding_mask: Tensor | None = None,
                      need_weights: bool = True, attn_mask: Tensor | None = None,
                      average_attn_weights: bool = True, is_causal: bool = False
                      ) -> tuple[Tensor, Tensor | None]:
    """``m(query, key, value, ...)`` by nn.MultiheadAttention's general path
    (``F.multi_head_attention_forward``), op for op, with each projection's input and output
    passed to ``report(role, input, output, column)`` (docs/algorithms.md "Attention")."""
    is_batched = query.dim() == 3
    key_padding_mask = _float_mask(key_padding_mask, "key_padding_mask", query.dtype)
    attn_mask = _float_mask(attn_mask, "attn_mask", query.dtype)
    if m.batch_first and is_batched:  # the transposes keep the q/k/v aliasing
        if key is value:
            if query is key:
                query = key = value = query.transpose(1, 0)
            else:
                query, key = (x.transpose(1, 0) for x in (query, key))
                value = key
        else:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    num_heads = m.num_heads
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the "
                           "Transformer module method `generate_square_subsequent_mask` to "
                           "create this mask.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None
    elif key_padding_mask is not None:
        is_causal = False
    if embed_dim != m.embed_dim:
        raise AssertionError(f"was expecting embedding dimension of {m.embed_dim}, but got "
                             f"{embed_dim}")
    head_dim = embed_dim // num_heads
    separate = not m._qkv_same_embed_dim
    if key.shape[:2] != value.shape[:2] if separate else key.shape != value.shape:
        raise AssertionError(f"key shape {tuple(key.shape)} does not match value shape "
                             f"{tuple(value.shape)}")
    q, k, v = _in_projection(m, report, query, key, value)

    src_len = key.shape[0]
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but "
                                   f"should be {(tgt_len, src_len)}.")
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but "
                                   f"should be {(bsz * num_heads, tgt_len, src_len)}.")
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
    if m.bias_k is not None and m.bias_v is not None:
        k = torch.cat([k, m.bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, m.bias_v.repeat(1, bsz, 1)])
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    if m.add_zero_attn:
        zeros = (bsz * num_heads, 1, head_dim)
        k = torch.cat([k, torch.zeros(zeros, dtype=k.dtype, device=k.device)], dim=1)
        v = torch.cat([v, torch.zeros(zeros, dtype=v.dtype, device=v.device)], dim=1)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    src_len = k.size(1)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (bsz, src_len):
            raise AssertionError(f"expected key_padding_mask of shape {(bsz, src_len)}, got "
                                 f"{tuple(key_padding_mask.shape)}")
        key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len)
                            .expand(-1, num_heads, -1, -1).reshape(bsz * num_heads, 1, src_len))
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    dropout_p = m.dropout if m.training else 0.0

    weights = None
    if need_weights:
        q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
        if is_causal and attn_mask is None:
            raise AssertionError("FIXME: is_causal not implemented for need_weights")
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        attended = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not is_batched:
            weights = weights.squeeze(0)
    else:
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
        q = q.view(bsz, num_heads, tgt_len, head_dim)
        k = k.view(bsz, num_heads, src_len, head_dim)
        v = v.view(bsz, num_heads, src_len, head_dim)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        attended = attended.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    out = F.linear(attended, m.out_proj.weight, m.out_proj.bias)
    report("out_proj", attended, out, None)
    out = out.view(tgt_len, bsz, out.size(1))
    if not is_batched:
        out = out.squeeze(1)
    if m.batch_first and is_batched:
        out = out.transpose(1, 0)
    return out, weights


register_layer(nn.MultiheadAttention, AttentionProjection)
