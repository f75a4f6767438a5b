"""One helper per layer type: how a layer's captured inputs and output gradients become rows.

Conventions (ALGORITHMS.md section 1): a layer's weight W (o x i) and bias b form
W_bar = [W b] (o x (i+1)); with a bias the input gets a homogeneous coordinate appended LAST.
The Kronecker block is F ~ A (x) G acting on W_bar as V -> G V A, with
A = (1/n_A) X_A^T X_A and G = (1/n_G) (s X_G)^T (s X_G), where X_A are the input rows, X_G the
rows of autograd's output gradient g_hat and s = n_G the per-example scale e = N g_hat.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Rows:
    """Observation rows of one factor: factor = (scale^2 / n) X^T X."""

    X: Tensor
    n: int
    scale: float = 1.0


class KroneckerLayer:
    """Base helper: a module whose [W b] gets a Kronecker factored block A (x) G."""

    diagonal_a: bool = False

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

    diagonal_a = True

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

    def a_diagonal(self, rows: Rows) -> Tensor:
        """diag(A) = token counts / n."""
        counts = torch.bincount(rows.X, minlength=self.weight.shape[0])
        return counts.to(self.weight.dtype) / rows.n

    def g_rows(self, inputs: list[Tensor], grads: list[Tensor]) -> Rows:
        rows = torch.cat([g.reshape(-1, g.shape[-1]) for g in grads])
        return Rows(rows, rows.shape[0], float(rows.shape[0]))

    def _weight_to_matrix(self, w: Tensor) -> Tensor:
        return w.transpose(0, 1)

    def _matrix_to_weight(self, mat: Tensor) -> Tensor:
        return mat.transpose(0, 1)


LAYER_TYPES: dict[type, type[KroneckerLayer]] = {
    nn.Linear: LinearLayer,
    nn.Conv2d: Conv2dLayer,
    nn.Embedding: EmbeddingLayer,
}


def make_layer(module: nn.Module) -> KroneckerLayer | None:
    """The helper for a module whose weight is trainable, or None if no helper fits it."""
    helper = LAYER_TYPES.get(type(module))
    weight = getattr(module, "weight", None)
    if helper is None or weight is None or not weight.requires_grad:
        return None
    return helper(module)
