"""One helper per layer type: how a layer's captured inputs and output gradients become rows.

Conventions (docs/algorithms.md section 1): a layer's weight W (o x i) and bias b form
W_bar = [W b] (o x (i+1)); with a bias the input gets a homogeneous coordinate appended LAST.
The Kronecker block is F ~ A (x) G acting on W_bar as V -> G V A, with
A = (1/n_A) X_A^T X_A and G = (1/n_G) (s X_G)^T (s X_G), where X_A are the input rows, X_G the
rows of autograd's output gradient g_hat and s = n_G the per-example scale e = N g_hat.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grng.curvature.factors import DenseFactor, DiagonalFactor, FactorStructure, Rows

__all__ = ["Conv2dLayer", "EmbeddingLayer", "KroneckerLayer", "LinearLayer", "Rows",
           "make_layer", "register_layer", "registered_layers"]


class KroneckerLayer:
    """Base helper: a module whose [W b] gets a Kronecker factored block A (x) G.

    A helper owns its factor structures (:attr:`a_factor`, :attr:`g_factor`: dense or
    diagonal, :mod:`grng.curvature.factors`) and how rows are extracted from a call's inputs
    and output gradients; nothing outside the helpers asks which kind of layer it is.
    """

    #: the structure class of A (G is always dense)
    a_structure: type[FactorStructure] = DenseFactor

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.weight: Tensor = module.weight
        self.bias: Tensor | None = getattr(module, "bias", None)
        if self.bias is not None and not self.bias.requires_grad:
            self.bias = None

    @property
    def params(self) -> list[Tensor]:
        """The parameters this block covers: [W] or [W, b]."""
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    @property
    def a_factor(self) -> FactorStructure:
        """The structure of A (size d_A)."""
        return self.a_structure(self.dims()[1])

    @property
    def g_factor(self) -> FactorStructure:
        """The structure of G (size d_G, dense)."""
        return DenseFactor(self.dims()[0])

    def cost(self) -> float:
        """Factorization cost estimate of the block (inverse assignment across ranks)."""
        return self.g_factor.cost() + self.a_factor.cost()

    def a_rows(self, inputs: list[Tensor]) -> Rows:
        """Rows of a_bar from the inputs of every call in this forward (weight sharing stacks)."""
        raise NotImplementedError

    def g_rows(self, inputs: list[Tensor], grads: list[Tensor]) -> Rows:
        """Rows of g_hat from every call's output gradient, with scale e = n_G g_hat."""
        raise NotImplementedError

    def dims(self) -> tuple[int, int]:
        """(d_G, d_A): the sizes of G and A."""
        raise NotImplementedError

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
        return w.reshape(w.shape[0], -1)

    def _matrix_to_weight(self, mat: Tensor) -> Tensor:
        return mat.reshape(self.weight.shape)

    def _with_ones(self, rows: Tensor) -> Tensor:
        if not self.has_bias:
            return rows
        return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)


class LinearLayer(KroneckerLayer):
    """nn.Linear with any number of leading dimensions: every row is an example (N = rows)."""

    def dims(self) -> tuple[int, int]:
        o, i = self.weight.shape
        return o, i + int(self.has_bias)

    def a_rows(self, inputs: list[Tensor]) -> Rows:
        rows = torch.cat([a.reshape(-1, a.shape[-1]) for a in inputs])
        return Rows(self._with_ones(rows), rows.shape[0])

    def g_rows(self, inputs: list[Tensor], grads: list[Tensor]) -> Rows:
        rows = torch.cat([g.reshape(-1, g.shape[-1]) for g in grads])
        return Rows(rows, rows.shape[0], float(rows.shape[0]))


class Conv2dLayer(KroneckerLayer):
    """nn.Conv2d: rows are unfolded patches (channel-major, then kernel position).

    A = (1/(N T)) sum a_bar a_bar^T over the N*T patches; G = (1/N) sum e e^T, e = N g_hat.
    """

    def __init__(self, module: nn.Conv2d) -> None:
        if module.groups != 1:
            raise ValueError(
                f"Conv2d with groups={module.groups} is not supported by the Kronecker capture; "
                "exclude it from the optimizer or use groups=1")
        if module.padding_mode != "zeros":
            raise ValueError(f"Conv2d padding_mode={module.padding_mode!r} is not supported "
                             "(only 'zeros')")
        if isinstance(module.padding, str):
            raise ValueError(f"Conv2d padding={module.padding!r} (a string) is not supported; "
                             "give the padding as integers")
        super().__init__(module)

    def dims(self) -> tuple[int, int]:
        o = self.weight.shape[0]
        return o, self.weight[0].numel() + int(self.has_bias)

    def a_rows(self, inputs: list[Tensor]) -> Rows:
        m = self.module
        blocks = []
        for a in inputs:
            patches = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding,
                               stride=m.stride)  # (N, C*kh*kw, T)
            blocks.append(patches.transpose(1, 2).reshape(-1, patches.shape[1]))
        rows = torch.cat(blocks)
        return Rows(self._with_ones(rows), rows.shape[0])

    def g_rows(self, inputs: list[Tensor], grads: list[Tensor]) -> Rows:
        n_examples = sum(g.shape[0] for g in grads)
        rows = torch.cat([g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]) for g in grads])
        return Rows(rows, n_examples, float(n_examples))


class EmbeddingLayer(KroneckerLayer):
    """nn.Embedding: one-hot inputs, so A is diagonal (token counts / N), stored as a vector.

    The embedding table E (V x D) computes s = E^T onehot, so its W (o x i) is E^T (D x V).
    """

    a_structure = DiagonalFactor

    def __init__(self, module: nn.Embedding) -> None:
        if module.sparse:
            raise ValueError("nn.Embedding(sparse=True) produces sparse gradients, which grng "
                             "does not support; use sparse=False")
        super().__init__(module)
        self.bias = None

    def dims(self) -> tuple[int, int]:
        v, d = self.weight.shape
        return d, v

    def a_rows(self, inputs: list[Tensor]) -> Rows:
        """Rows are the token indices; the diagonal of A is their counts / n."""
        idx = torch.cat([i.reshape(-1) for i in inputs])
        return Rows(idx, idx.numel())

    def g_rows(self, inputs: list[Tensor], grads: list[Tensor]) -> Rows:
        rows = torch.cat([g.reshape(-1, g.shape[-1]) for g in grads])
        return Rows(rows, rows.shape[0], float(rows.shape[0]))

    def _weight_to_matrix(self, w: Tensor) -> Tensor:
        return w.transpose(0, 1)

    def _matrix_to_weight(self, mat: Tensor) -> Tensor:
        return mat.transpose(0, 1)


_REGISTRY: dict[type, type[KroneckerLayer]] = {}


def register_layer(module_type: type, helper: type[KroneckerLayer]) -> None:
    """Give every module that is an instance of ``module_type`` (subclasses included) the
    Kronecker helper ``helper``; the most specific registered type wins (method resolution
    order), so a registration for a subclass overrides its base's."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be a subclass of torch.nn.Module, got {module_type!r}")
    if not (isinstance(helper, type) and issubclass(helper, KroneckerLayer)):
        raise TypeError(f"helper must be a subclass of grng.curvature.layers.KroneckerLayer, got {helper!r}")
    _REGISTRY[module_type] = helper


def registered_layers() -> dict[type, type[KroneckerLayer]]:
    """A copy of the registry: module type -> helper."""
    return dict(_REGISTRY)


register_layer(nn.Linear, LinearLayer)
register_layer(nn.Conv2d, Conv2dLayer)
register_layer(nn.Embedding, EmbeddingLayer)


def helper_for(module: nn.Module) -> type[KroneckerLayer] | None:
    """The helper registered for the most specific type in ``module``'s MRO, or None."""
    for cls in type(module).__mro__:
        helper = _REGISTRY.get(cls)
        if helper is not None:
            return helper
    return None


def make_layer(module: nn.Module) -> KroneckerLayer | None:
    """The helper for a module whose weight is trainable, or None if no helper fits it."""
    helper = helper_for(module)
    weight = getattr(module, "weight", None)
    if helper is None or not isinstance(weight, Tensor) or not weight.requires_grad:
        return None
    return helper(module)
