"""One helper per layer type: how a layer's captured inputs and output gradients become rows.

Conventions (docs/algorithms.md section 1): a layer's weight W (o x i) and bias b form
W_bar = [W b] (o x (i+1)); with a bias the input gets a homogeneous coordinate appended LAST.
The Kronecker block is F ~ A (x) G acting on W_bar as V -> G V A, with
A = (1/n_A) X_A^T X_A and G = (1/n_G) (s X_G)^T (s X_G), where X_A are the input rows, X_G the
rows of autograd's output gradient g_hat and s = n_G the per-example scale e = N g_hat.

Helpers are found through a registry matched along the module's method resolution order
(:func:`register_layer`: a type, or a dotted class name such as
``"transformers.pytorch_utils.Conv1D"`` so that a library need not be imported to be covered).
A helper says why a module gets no block (:meth:`KroneckerLayer.unsupported`), which blocks a
module has (:meth:`KroneckerLayer.blocks`: one for most layers, several for attention) and how
its calls are observed (:meth:`KroneckerLayer.attach`); docs/algorithms.md "Layer helpers".
"""
from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Callable
from functools import cached_property
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from grng.curvature.factors import (BlockDiagonalFactor, DenseFactor, DiagonalFactor,
                                    FactorStructure, Rows)
from grng.curvature.options import BlockOptions

__all__ = ["PATCH_CHUNK_ELEMENTS", "Conv1dLayer", "Conv2dLayer", "Conv3dLayer", "ConvLayer",
           "EmbeddingLayer", "ForwardHook", "Handle", "KroneckerLayer", "LinearLayer", "Recorder",
           "Rows", "TransposedLinearLayer", "WeightNormLayer", "dead_reference", "helper_for",
           "make_layers", "register_layer", "registered_layers", "weight_norm_parts"]

#: the most elements of unfolded patches a convolution's capture holds besides its row matrix
#: (64 MiB in float32; at least one example at a time)
PATCH_CHUNK_ELEMENTS = 1 << 24


class Recorder(Protocol):
    """What a helper's hooks report each call to (the capture,
    :class:`grng.curvature.capture.CurvatureCapture`)."""

    #: set by the hooks on every call they see (recorded or not): the hooks are alive
    observed: bool

    @property
    def recording(self) -> bool:
        """Whether a call now would be recorded (armed and not paused)."""

    def record(self, layer: KroneckerLayer, inputs: Tensor, output: Tensor,
               column: int | None = None) -> None:
        """One call of ``layer``: its input and output (whose gradient is the G row source).
        ``column``: the call produced only the block's output columns from ``column`` on (the
        others are zero for this call's rows); None: all of them."""


class ForwardHook:
    """A module's forward hook (``with_kwargs=True``) that reports each call to a recorder for
    each of the module's blocks. It holds the module and the recorder weakly, so the model
    never keeps a capture alive, and it pickles (and deep-copies) as an inert hook: a saved or
    copied model carries no capture."""

    def __init__(self, module: nn.Module | None, blocks: list[KroneckerLayer],
                 recorder: Recorder | None) -> None:
        self.module = dead_reference if module is None else weakref.ref(module)
        self.blocks = blocks
        self.recorder = dead_reference if recorder is None else weakref.ref(recorder)

    def __call__(self, mod: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
        recorder = self.recorder()
        if recorder is None or mod is not self.module():
            return
        recorder.observed = True
        if not recorder.recording:
            return
        for block in self.blocks:
            recorder.record(block, block.layer_input(args, kwargs), output)

    def __reduce__(self) -> tuple:
        return (ForwardHook, (None, [], None))


def dead_reference() -> None:
    """Called like a weak reference whose object is gone: returns None."""


class Handle(Protocol):
    """What undoes one :meth:`KroneckerLayer.attach` (a hook handle or equivalent)."""

    def remove(self) -> None:
        """Detach."""


class KroneckerLayer:
    """Base helper: a module whose [W b] gets a Kronecker factored block A (x) G.

    A helper owns its factor structures (:attr:`a_factor`, :attr:`g_factor`: dense or
    diagonal, :mod:`grng.curvature.factors`) and how rows are extracted from a call's inputs
    and output gradients; nothing outside the helpers asks which kind of layer it is. A factor
    side larger than ``options.max_factor_dim`` is kept diagonal (docs/algorithms.md "Factor
    size limit"; :class:`grng.curvature.options.BlockOptions`).
    """

    #: the structure class of A (G is dense unless above ``max_factor_dim``)
    a_structure: type[FactorStructure] = DenseFactor
    #: which Kronecker side the weight's dim 0 is: "G" (its rows are outputs: Linear, Conv) or
    #: "A" (its rows are inputs: Embedding's V x D table, transformers' in x out Conv1D); the
    #: gradient matrix (d_G x d_A) is the weight's [dim 0, the rest] laid out so
    dim0 = "G"
    #: appended to the module's name to name the block (a module with several blocks)
    suffix = ""

    def __init__(self, module: nn.Module, *, weight: Tensor | None = None,
                 options: BlockOptions = BlockOptions()) -> None:
        """``weight``: the trainable tensor laid out as the module's weight (default
        ``module.weight``; a weight-normed layer passes its direction v); ``options``: how the
        block is built (the factor size limit)."""
        self.module = module
        self.weight: Tensor = module.weight if weight is None else weight
        bias = getattr(module, "bias", None)
        self.bias: Tensor | None = (bias if isinstance(bias, Tensor) and bias.requires_grad
                                    and bias.is_leaf else None)
        self.options = options
        names = list(inspect.signature(type(module).forward).parameters)
        self._input_name = names[1] if len(names) > 1 else ""

    # ----------------------------------------------------------------- registry protocol
    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        """Why ``module`` can get no Kronecker block (None when it can): its parameters then
        get the diagonal fallback, named in the construction warning and ``opt.coverage()``."""
        if parametrize.is_parametrized(module, "weight"):
            if weight_norm_parts(module) is None:
                return ("its weight is parametrized (torch.nn.utils.parametrize) by something "
                        "other than one weight_norm")
            return None
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and weight.requires_grad and not weight.is_leaf:
            return ("its weight is computed in the forward, not a parameter (e.g. the deprecated "
                    "torch.nn.utils.weight_norm; torch.nn.utils.parametrizations.weight_norm is "
                    "supported)")
        return None

    @classmethod
    def beyond_limit(cls, module: nn.Module, options: BlockOptions) -> str | None:
        """Why ``module`` gets no block under ``options``' ``max_factor_dim`` (None: it gets
        one; a dense side above the limit is kept diagonal inside the block,
        :meth:`BlockOptions.side`)."""
        return None

    @classmethod
    def blocks(cls, module: nn.Module, options: BlockOptions) -> list[KroneckerLayer]:
        """The blocks of a supported ``module`` whose weight is trainable: one for most layers
        (on W = g v / ||v|| for a weight-normed one, :class:`WeightNormLayer`)."""
        parts = weight_norm_parts(module)
        if parts is not None:
            v, g, dim = parts
            if not v.requires_grad:
                return []
            return [WeightNormLayer(cls(module, weight=v, options=options), g, dim)]
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or not weight.requires_grad:
            return []
        return [cls(module, options=options)]

    @classmethod
    def attach(cls, module: nn.Module, blocks: list[KroneckerLayer],
               recorder: Recorder) -> list[Handle]:
        """Report each call of ``module`` (input given positionally or by keyword) to
        ``recorder``, for each of its ``blocks``; returns the handles that undo it."""

        hook = ForwardHook(module, blocks, recorder)
        return [module.register_forward_hook(hook, with_kwargs=True)]

    # ------------------------------------------------------------------------- block
    @property
    def params(self) -> list[Tensor]:
        """The parameters this block covers: [W] or [W, b]."""
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    @cached_property
    def a_factor(self) -> FactorStructure:
        """The structure of A (size d_A; built once: the preconditioners ask every step)."""
        return self.options.side(self.a_structure, self.dims()[1])

    @cached_property
    def g_factor(self) -> FactorStructure:
        """The structure of G (size d_G; dense unless above ``max_factor_dim``; built once)."""
        return self.options.side(DenseFactor, self.dims()[0])

    def cost(self) -> float:
        """Factorization cost estimate of the block (inverse assignment across ranks)."""
        return self.g_factor.cost() + self.a_factor.cost()

    def layer_input(self, args: tuple, kwargs: dict) -> Tensor:
        """The input of one call, given positionally or by keyword (``layer(input=x)``)."""
        if args:
            return args[0]
        if self._input_name in kwargs:
            return kwargs[self._input_name]
        raise TypeError(f"{type(self.module).__name__} was called without its input "
                        f"{self._input_name!r}; grng cannot capture this call")

    def a_rows(self, inputs: list[Tensor]) -> Rows:
        """Rows of a_bar from the inputs of every call in this forward (weight sharing stacks)."""
        raise NotImplementedError

    def g_rows(self, inputs: list[Tensor], grads: list[Tensor]) -> Rows:
        """Rows of g_hat from every call's output gradient, with scale e = n_G g_hat."""
        raise NotImplementedError

    def dims(self) -> tuple[int, int]:
        """(d_G, d_A): the sizes of G and A: the weight's dim 0 and the product of the others,
        on the sides :attr:`dim0` says, with the bias's homogeneous coordinate on A."""
        rows, rest = self.weight.shape[0], math.prod(self.weight.shape[1:])
        d_g, d_a = (rows, rest) if self.dim0 == "G" else (rest, rows)
        return d_g, d_a + int(self.has_bias)

    def matrix_shape(self) -> tuple[int, ...]:
        """The shape of :meth:`grad_matrix`: (d_G, d_A), or (groups, d_G / groups,
        d_A / groups) for block-diagonal factors (a grouped convolution)."""
        return self.dims()

    def grad_matrix(self) -> Tensor | None:
        """The gradient as the d_G x d_A matrix [dW db], or None if the layer got no gradient."""
        return self.to_matrix([p.grad for p in self.params])

    def to_matrix(self, tensors: list[Tensor | None]) -> Tensor | None:
        """Lay [W-shaped, b-shaped] tensors out as one d_G x d_A matrix (None if W's is None)."""
        w = tensors[0]
        if w is None:
            return None
        mat = self._weight_to_matrix(w)
        if self.has_bias:
            b = tensors[1]
            col = torch.zeros_like(mat[:, :1]) if b is None else b.reshape(-1, 1).to(mat.dtype)
            mat = torch.cat([mat, col], dim=1)
        return mat

    def split(self, mat: Tensor) -> list[Tensor]:
        """Inverse of :meth:`to_matrix`: the d_G x d_A matrix back to [W-shaped, b-shaped]."""
        if self.has_bias:
            w_part, b_part = mat[:, :-1], mat[:, -1]
            return [self._matrix_to_weight(w_part), b_part.reshape(self.bias.shape)]
        return [self._matrix_to_weight(mat)]

    def _weight_to_matrix(self, w: Tensor) -> Tensor:
        """W-shaped ``w`` as d_G x (d_A without the bias column): [dim 0, the rest], transposed
        when dim 0 is the A side."""
        mat = w.reshape(w.shape[0], -1)
        return mat if self.dim0 == "G" else mat.transpose(0, 1)

    def _matrix_to_weight(self, mat: Tensor) -> Tensor:
        """Inverse of :meth:`_weight_to_matrix`."""
        if self.dim0 == "G":
            return mat.reshape(self.weight.shape)
        return mat.transpose(0, 1).reshape(self.weight.shape)

    def _with_ones(self, parts: list[Tensor]) -> Tensor:
        """The row blocks ``parts`` stacked, with a ones column where the layer has a bias, in
        one contiguous (rows x d [+ 1]) tensor written once (one block without a bias: itself
        where already contiguous, no copy)."""
        if not self.has_bias:
            return _stacked_rows(parts)
        if len(parts) == 1:  # one pass: constant padding writes each row once
            return F.pad(parts[0], (0, 1), value=1.0)
        out = parts[0].new_empty(sum(p.shape[0] for p in parts), parts[0].shape[1] + 1)
        start = 0
        for p in parts:
            out[start:start + p.shape[0], :-1].copy_(p)
            start += p.shape[0]
        out[:, -1] = 1
        return out

    def _patch_rows(self, inputs: list[Tensor], unfold: Callable[[Tensor], Tensor]) -> Rows:
        """Rows of a_bar from patches: ``unfold(x)`` gives the (k, d, T) patches of k batched
        examples x; they are written a chunk of examples at a time into ONE (rows x d [+ 1])
        buffer whose bias column is 1, so the peak is the row matrix plus one chunk (not a copy
        per stage: unfold, transpose, concatenate, append the ones)."""
        shapes = [unfold(a[:1]).shape for a in inputs]  # (1, d, T) per call
        d = shapes[0][1]
        total = sum(a.shape[0] * shape[2] for a, shape in zip(inputs, shapes))
        out = inputs[0].new_empty(total, d + int(self.has_bias))
        if self.has_bias:
            out[:, d] = 1
        row = 0
        for a, (_, _, t) in zip(inputs, shapes):
            for chunk in a.split(max(1, PATCH_CHUNK_ELEMENTS // max(1, d * t))):
                k = chunk.shape[0]
                out[row:row + k * t, :d].view(k, t, d).copy_(unfold(chunk).transpose(1, 2))
                row += k * t
        return Rows(out, total)


def _stacked_rows(parts: list[Tensor]) -> Tensor:
    """Row blocks stacked into one contiguous tensor: one block as it is where contiguous (the
    fold only reads it), several concatenated."""
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts)


class LinearLayer(KroneckerLayer):
    """nn.Linear with any number of leading dimensions: every row is an example (N = rows)."""

    def a_rows(self, inputs: list[Tensor]) -> Rows:
        parts = [a.reshape(-1, a.shape[-1]) for a in inputs]
        return Rows(self._with_ones(parts), sum(p.shape[0] for p in parts))

    def g_rows(self, inputs: list[Tensor], grads: list[Tensor]) -> Rows:
        rows = _stacked_rows([g.reshape(-1, g.shape[-1]) for g in grads])
        return Rows(rows, rows.shape[0], float(rows.shape[0]))


class TransposedLinearLayer(LinearLayer):
    """A Linear whose weight is stored in x out, y = x W + b (transformers' ``Conv1D`` of GPT-2):
    W_bar = [W^T b], so the gradient matrix (d_G x d_A) is the transpose of the stored one
    (dim 0 is the A side)."""

    dim0 = "A"

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        reason = super().unsupported(module)
        if reason is not None or parametrize.is_parametrized(module, "weight"):
            return reason
        weight = getattr(module, "weight", None)
        nf = getattr(module, "nf", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2 or (nf is not None
                                                                   and weight.shape[1] != nf):
            return (f"{type(module).__name__} is registered as an in x out Linear but its weight "
                    f"is not (in, nf={nf}): shape "
                    f"{None if not isinstance(weight, Tensor) else tuple(weight.shape)}")
        return None


class ConvLayer(KroneckerLayer):
    """What the convolution helpers share: with ``groups`` > 1 (grouped, depthwise) the block
    is block-diagonal, one A_j (x) G_j per group j on that group's [W_j b_j]
    (O/g x (C/g k [+1])): A and G are :class:`BlockDiagonalFactor` stacks, the rows and the
    gradient matrix carry a leading group dimension (docs/algorithms.md "Grouped
    convolutions"). With groups = 1 it is one dense A (x) G.
    """

    @property
    def groups(self) -> int:
        return self.module.groups

    def _group_dims(self) -> tuple[int, int]:
        """(O / g, C / g k [+1]): one group's d_G and d_A."""
        return self.weight.shape[0] // self.groups, self.weight[0].numel() + int(self.has_bias)

    def dims(self) -> tuple[int, int]:
        o, i = self._group_dims()
        return o * self.groups, i * self.groups

    #: patches are cut only with zero padding given as integers (Conv2d's F.unfold, Conv3d's
    #: Tensor.unfold; Conv1d pads with F.pad first)
    ZERO_INTEGER_PADDING_ONLY = False

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        reason = super().unsupported(module)
        if not cls.ZERO_INTEGER_PADDING_ONLY:
            return reason
        kind = type(module).__name__
        if reason is None and module.padding_mode != "zeros":
            return (f"{kind} padding_mode={module.padding_mode!r} has no Kronecker capture "
                    "(only 'zeros')")
        if reason is None and isinstance(module.padding, str):
            return (f"{kind} padding={module.padding!r} (a string) has no Kronecker capture; "
                    "give the padding as integers")
        return reason

    @classmethod
    def beyond_limit(cls, module: nn.Module, options: BlockOptions) -> str | None:
        """A grouped convolution whose per-group block side (O/g or C/g k [+1]) exceeds
        ``max_factor_dim`` gets the diagonal fallback: the limit bounds each dense block, and a
        diagonal side next to a block-diagonal one is not a structure the inverses take."""
        weight = getattr(module, "weight", None)
        if module.groups == 1 or not isinstance(weight, Tensor):
            return None
        bias = getattr(module, "bias", None)
        sides = (("G", weight.shape[0] // module.groups),
                 ("A", weight[0].numel() + int(isinstance(bias, Tensor) and bias.requires_grad)))
        over = [f"{side} {size}" for side, size in sides if options.above_limit(size)]
        if not over:
            return None
        return (f"its per-group factor side ({', '.join(over)}; groups={module.groups}) is above "
                f"max_factor_dim={options.max_factor_dim}; raise max_factor_dim to keep its "
                "block-diagonal factors")

    def matrix_shape(self) -> tuple[int, ...]:
        if self.groups == 1:
            return self.dims()
        return (self.groups, *self._group_dims())

    @cached_property
    def a_factor(self) -> FactorStructure:
        if self.groups == 1:
            return self.options.side(self.a_structure, self.dims()[1])
        return BlockDiagonalFactor(self.groups, self._group_dims()[1])

    @cached_property
    def g_factor(self) -> FactorStructure:
        if self.groups == 1:
            return self.options.side(DenseFactor, self.dims()[0])
        return BlockDiagonalFactor(self.groups, self._group_dims()[0])

    def _patch_rows(self, inputs: list[Tensor], unfold: Callable[[Tensor], Tensor]) -> Rows:
        """A rows from the (k, C k, T) patches ``unfold`` cuts (channel-major): the one chunked
        buffer [rows 1] of :meth:`KroneckerLayer._patch_rows`, or per group
        (g, rows, C/g k [+1])."""
        if self.groups == 1:
            return super()._patch_rows(inputs, unfold)
        rows = torch.cat([unfold(a).transpose(1, 2).reshape(-1, self.weight[0].numel()
                                                               * self.groups) for a in inputs])
        grouped = rows.reshape(rows.shape[0], self.groups, -1).transpose(0, 1)
        if self.has_bias:
            grouped = torch.cat([grouped, grouped.new_ones(*grouped.shape[:2], 1)], dim=2)
        return Rows(grouped.contiguous(), rows.shape[0])

    def _grad_rows(self, rows: Tensor, n_examples: int) -> Rows:
        """G rows from the output-gradient rows (rows x O): as they are, or per group
        (g, rows, O/g); scale e = N g_hat."""
        if self.groups != 1:
            rows = rows.reshape(rows.shape[0], self.groups, -1).transpose(0, 1).contiguous()
        return Rows(rows, n_examples, float(n_examples))

    def to_matrix(self, tensors: list[Tensor | None]) -> Tensor | None:
        """[W b] as d_G x d_A, or per group (g, O/g, C/g k [+1])."""
        if self.groups == 1:
            return super().to_matrix(tensors)
        w = tensors[0]
        if w is None:
            return None
        mat = w.reshape(self.groups, w.shape[0] // self.groups, -1)
        if self.has_bias:
            b = tensors[1]
            col = (torch.zeros_like(mat[..., :1]) if b is None
                   else b.reshape(self.groups, -1, 1).to(mat.dtype))
            mat = torch.cat([mat, col], dim=2)
        return mat

    def split(self, mat: Tensor) -> list[Tensor]:
        if self.groups == 1:
            return super().split(mat)
        if self.has_bias:
            return [mat[..., :-1].reshape(self.weight.shape), mat[..., -1].reshape(self.bias.shape)]
        return [mat.reshape(self.weight.shape)]


class Conv2dLayer(ConvLayer):
    """nn.Conv2d: rows are unfolded patches (channel-major, then kernel position).

    A = (1/(N T)) sum a_bar a_bar^T over the N*T patches; G = (1/N) sum e e^T, e = N g_hat.
    """

    ZERO_INTEGER_PADDING_ONLY = True

    def a_rows(self, inputs: list[Tensor]) -> Rows:
        m = self.module
        return self._patch_rows(inputs, lambda a: F.unfold(  # (N, C*kh*kw, T)
            a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride))

    def g_rows(self, inputs: list[Tensor], grads: list[Tensor]) -> Rows:
        n_examples = sum(g.shape[0] for g in grads)
        rows = torch.cat([g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]) for g in grads])
        return self._grad_rows(rows, n_examples)


class Conv1dLayer(ConvLayer):
    """nn.Conv1d: rows are unfolded 1-D patches (channel-major, then kernel position), the
    padding (any ``padding_mode``, ``"same"``/``"valid"``) applied first as the layer does.

    A = (1/(N T)) sum a_bar a_bar^T over the N*T patches; G = (1/N) sum e e^T, e = N g_hat
    (an unbatched (C, L) call is one example).
    """

    def _padding(self) -> tuple[int, int]:
        """(left, right) zero or ``padding_mode`` padding, as nn.Conv1d computes it."""
        m = self.module
        if m.padding == "valid":
            return 0, 0
        if m.padding == "same":
            total = m.dilation[0] * (m.kernel_size[0] - 1)
            return total // 2, total - total // 2
        return m.padding[0], m.padding[0]

    def a_rows(self, inputs: list[Tensor]) -> Rows:
        m = self.module
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode

        def unfold(a: Tensor) -> Tensor:  # (N, C*k, T)
            return F.unfold(F.pad(a, self._padding(), mode=mode).unsqueeze(-1),
                            (m.kernel_size[0], 1), dilation=(m.dilation[0], 1),
                            stride=(m.stride[0], 1))

        return self._patch_rows([a if a.dim() == 3 else a.unsqueeze(0) for a in inputs], unfold)

    def g_rows(self, inputs: list[Tensor], grads: list[Tensor]) -> Rows:
        grads = [g if g.dim() == 3 else g.unsqueeze(0) for g in grads]
        n_examples = sum(g.shape[0] for g in grads)
        rows = torch.cat([g.transpose(1, 2).reshape(-1, g.shape[1]) for g in grads])
        return self._grad_rows(rows, n_examples)


class Conv3dLayer(ConvLayer):
    """nn.Conv3d (zero padding given as integers): rows are 3-D patches cut by
    ``Tensor.unfold`` (channel-major, then kernel position), as Conv2d's unfolded patches.

    A = (1/(N T)) sum a_bar a_bar^T over the N*T patches; G = (1/N) sum e e^T, e = N g_hat.
    """

    ZERO_INTEGER_PADDING_ONLY = True

    def a_rows(self, inputs: list[Tensor]) -> Rows:
        m = self.module
        p = m.padding

        def unfold(a: Tensor) -> Tensor:  # (N, C k_d k_h k_w, D' H' W')
            a = F.pad(a, (p[2], p[2], p[1], p[1], p[0], p[0]))
            for dim, (k, s, d) in enumerate(zip(m.kernel_size, m.stride, m.dilation)):
                a = a.unfold(2 + dim, d * (k - 1) + 1, s)[..., ::d]  # (N, C, D', H', W', k...)
            return a.permute(0, 1, 5, 6, 7, 2, 3, 4).reshape(a.shape[0], -1,
                                                             a.shape[2] * a.shape[3] * a.shape[4])

        return self._patch_rows([a if a.dim() == 5 else a.unsqueeze(0) for a in inputs], unfold)

    def g_rows(self, inputs: list[Tensor], grads: list[Tensor]) -> Rows:
        grads = [g if g.dim() == 5 else g.unsqueeze(0) for g in grads]
        n_examples = sum(g.shape[0] for g in grads)
        rows = torch.cat([g.permute(0, 2, 3, 4, 1).reshape(-1, g.shape[1]) for g in grads])
        return self._grad_rows(rows, n_examples)


class EmbeddingLayer(KroneckerLayer):
    """nn.Embedding: one-hot inputs, so A is diagonal (token counts / N), stored as a vector.

    The embedding table E (V x D) computes s = E^T onehot, so its W (o x i) is E^T (D x V):
    dim 0 is the A side.
    """

    a_structure = DiagonalFactor
    dim0 = "A"

    def __init__(self, module: nn.Embedding, **kwargs) -> None:
        if module.sparse:
            raise ValueError("nn.Embedding(sparse=True) produces sparse gradients, which grng "
                             "does not support; use sparse=False")
        super().__init__(module, **kwargs)
        self.bias = None

    def a_rows(self, inputs: list[Tensor]) -> Rows:
        """Rows are the token indices; the diagonal of A is their counts / n."""
        idx = torch.cat([i.reshape(-1) for i in inputs])
        return Rows(idx, idx.numel())

    def g_rows(self, inputs: list[Tensor], grads: list[Tensor]) -> Rows:
        rows = torch.cat([g.reshape(-1, g.shape[-1]) for g in grads])
        return Rows(rows, rows.shape[0], float(rows.shape[0]))


def weight_norm_parts(module: nn.Module) -> tuple[Tensor, Tensor, int] | None:
    """(v, g, dim) when ``module.weight`` is parametrized by exactly one
    ``torch.nn.utils.parametrizations.weight_norm`` (W = g v / ||v||), else None."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    plist = module.parametrizations["weight"]
    if len(plist) != 1 or type(plist[0]).__name__ != "_WeightNorm":
        return None
    return plist.original1, plist.original0, int(plist[0].dim)


class WeightNormLayer(KroneckerLayer):
    """A layer under ``torch.nn.utils.parametrizations.weight_norm``, W = g v / ||v|| (norms over
    every dim but ``dim``; over all of them for dim = -1): the block is the effective W's, built
    by the layer's own helper ``inner`` on v's layout; the chain rule maps gradients and
    directions: grad_W = v_hat grad_g + (||v|| / g) grad_v, and a direction D on W becomes
    delta_g = <v_hat, D>, delta_v = (||v|| / g)(D - v_hat delta_g), which moves W by exactly D
    to first order (docs/algorithms.md "Weight-normed layers"). Where g = 0 the tangential part
    is unreachable through v and delta_v is 0.
    """

    def __init__(self, inner: KroneckerLayer, g: Tensor, dim: int) -> None:
        super().__init__(inner.module, weight=inner.weight, options=inner.options)
        self.inner = inner
        self.dim0 = inner.dim0
        self.bias = inner.bias
        self.a_structure = inner.a_structure
        self.suffix = inner.suffix
        self.g = g
        self.dim = dim

    @property
    def params(self) -> list[Tensor]:
        """[v, g, b] (g while trainable, b when the layer has a trainable bias)."""
        out = [self.weight] + ([self.g] if self.g.requires_grad else [])
        return out + ([self.bias] if self.bias is not None else [])

    def dims(self) -> tuple[int, int]:
        return self.inner.dims()

    def matrix_shape(self) -> tuple[int, ...]:
        return self.inner.matrix_shape()

    @cached_property
    def a_factor(self) -> FactorStructure:
        return self.inner.a_factor

    @cached_property
    def g_factor(self) -> FactorStructure:
        return self.inner.g_factor

    def layer_input(self, args: tuple, kwargs: dict) -> Tensor:
        return self.inner.layer_input(args, kwargs)

    def a_rows(self, inputs: list[Tensor]) -> Rows:
        return self.inner.a_rows(inputs)

    def g_rows(self, inputs: list[Tensor], grads: list[Tensor]) -> Rows:
        return self.inner.g_rows(inputs, grads)

    def _reduce(self, x: Tensor) -> Tensor:
        """Sum over every dim but ``dim`` (keepdim), i.e. g's shape; all dims for dim = -1."""
        if self.dim == -1:
            return x.sum()
        return x.sum(dim=[d for d in range(x.dim()) if d != self.dim], keepdim=True)

    def _geometry(self) -> tuple[Tensor, Tensor]:
        """(v_hat, ||v|| / g), the latter 0 where g = 0."""
        v, g = self.weight.detach(), self.g.detach()
        norms = torch.norm_except_dim(v, 2, self.dim)
        scale = torch.where(g != 0, norms / g, torch.zeros_like(g))
        return v / norms, scale

    def to_matrix(self, tensors: list[Tensor | None]) -> Tensor | None:
        """[dv, dg, db] (as :attr:`params`) to the d_G x d_A gradient of [W b]."""
        dv = tensors[0]
        if dv is None:
            return None
        rest = list(tensors[1:])
        dg = rest.pop(0) if self.g.requires_grad else None
        v_hat, scale = self._geometry()
        grad_w = dv * scale
        if dg is not None:
            grad_w = grad_w + v_hat * dg
        return self.inner.to_matrix([grad_w, rest[0] if self.has_bias else None])

    def split(self, mat: Tensor) -> list[Tensor]:
        """A direction on [W b] to [delta_v, delta_g, delta_b] (as :attr:`params`)."""
        parts = self.inner.split(mat)
        D = parts[0]
        v_hat, scale = self._geometry()
        dg = self._reduce(v_hat * D)
        dv = (D - v_hat * dg) * scale
        return [dv] + ([dg] if self.g.requires_grad else []) + parts[1:]


_REGISTRY: dict[type | str, type[KroneckerLayer]] = {}


def register_layer(module_type: type | str, helper: type[KroneckerLayer]) -> None:
    """Give every module that is an instance of ``module_type`` (subclasses included) the
    Kronecker helper ``helper``; the most specific registered type wins (method resolution
    order), so a registration for a subclass overrides its base's.

    ``module_type`` may be a dotted class name, ``"package.module.Class"``, matched against
    each class's ``__module__`` and ``__qualname__``: a library's layer is covered without
    importing the library (transformers' ``Conv1D`` is registered so).
    """
    if isinstance(module_type, str):
        module_name, _, class_name = module_type.rpartition(".")
        if not module_name or not class_name:
            raise ValueError(f"module_type as a string must be a dotted class name "
                             f"'package.module.Class', got {module_type!r}")
    elif not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be a subclass of torch.nn.Module or a dotted class "
                        f"name, got {module_type!r}")
    if not (isinstance(helper, type) and issubclass(helper, KroneckerLayer)):
        raise TypeError(f"helper must be a subclass of grng.curvature.layers.KroneckerLayer, "
                        f"got {helper!r}")
    _REGISTRY[module_type] = helper


def registered_layers() -> dict[type | str, type[KroneckerLayer]]:
    """A copy of the registry: module type (or dotted class name) -> helper."""
    return dict(_REGISTRY)


register_layer(nn.Linear, LinearLayer)
register_layer(nn.Conv1d, Conv1dLayer)
register_layer(nn.Conv2d, Conv2dLayer)
register_layer(nn.Conv3d, Conv3dLayer)
register_layer(nn.Embedding, EmbeddingLayer)
register_layer("transformers.pytorch_utils.Conv1D", TransposedLinearLayer)


def helper_for(module: nn.Module) -> type[KroneckerLayer] | None:
    """The helper registered for the most specific class in ``module``'s MRO, or None."""
    for cls in type(module).__mro__:
        helper = _REGISTRY.get(cls) or _REGISTRY.get(f"{cls.__module__}.{cls.__qualname__}")
        if helper is not None:
            return helper
    return None


def make_layers(module: nn.Module, options: BlockOptions = BlockOptions()
                ) -> tuple[list[KroneckerLayer], str | None]:
    """(blocks, None) for a module its helper covers (no block when its weight is frozen);
    ([], why) when its helper cannot cover it; ([], None) when no helper is registered."""
    helper = helper_for(module)
    if helper is None:
        return [], None
    reason = helper.unsupported(module) or helper.beyond_limit(module, options)
    if reason is not None:
        return [], reason
    return helper.blocks(module, options), None
