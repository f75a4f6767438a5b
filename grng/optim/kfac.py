"""K-FAC: d = P(g), P the damped Kronecker-factored inverse (ALGORITHMS.md sections 1, 2, 4)."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from grng.curvature.inverse import INVERSES, make_inverse
from grng.curvature.layers import KroneckerLayer
from grng.optim import validation as check
from grng.optim.base import CurvatureOptimizer


class KFAC(CurvatureOptimizer):
    """Kronecker-factored natural gradient (the rho = 0 member of the GRNG family).

    ``KFAC(model, lr, damping)`` then ``loss.backward(); opt.step()``, or ``opt.step(closure)``
    with a closure that runs the forward pass and returns the loss (the optimizer runs the
    backward). Factors A, G are updated every ``factor_every`` steps as
    M <- factor_decay M + (1 - factor_decay) M_batch (the first update sets M); inverses are
    refreshed every ``inverse_every`` steps with ``inverse`` = "eigen" (exact damping,
    (A (x) G + damping I)^-1), "newton" (Newton-Schulz, factored Tikhonov damping) or
    "cholesky" (the same damping by Cholesky).

    ``factor_dtype`` / ``inverse_dtype`` (None, torch.bfloat16, float32, float64) store the
    factors / inverses in that dtype (bf16 halves the curvature memory; arithmetic stays in
    float32 or wider). ``grad_scaler`` (a torch.amp.GradScaler) is needed only for the closure
    recipe or when ``scaler.unscale_(opt)`` precedes ``scaler.step(opt)``; ``scaler.step(opt)``
    alone works without it. See docs/numerics.md.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.01,
        damping: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        factor_decay: float = 0.95,
        factor_every: int = 1,
        inverse_every: int = 10,
        inverse: str = "eigen",
        kl_clip: float | None = None,
        backend: str = "auto",
        *,
        param_groups: Iterable[dict] | None = None,
        process_group: object = None,
        distributed_strategy: str = "comm-opt",
        factor_dtype: torch.dtype | None = None,
        inverse_dtype: torch.dtype | None = None,
        grad_scaler: object = None,
        **extra_defaults: float,
    ) -> None:
        check.positive("damping", damping)
        self.inverse_dtype = check.storage_dtype("inverse_dtype", inverse_dtype)
        self.inverse_every = check.positive_int("inverse_every", inverse_every)
        self.inverse = make_inverse(check.choice("inverse", inverse, INVERSES))
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay,
                        kl_clip=kl_clip, **extra_defaults)
        super().__init__(model, defaults, factor_decay=factor_decay, factor_every=factor_every,
                         backend=backend, param_groups=param_groups, process_group=process_group,
                         distributed_strategy=distributed_strategy, factor_dtype=factor_dtype,
                         grad_scaler=grad_scaler)
        for group in self.param_groups:
            check.positive("damping", group["damping"])
        if self._dist is not None and inverse_dtype is not None:
            raise ValueError("inverse_dtype is not supported with a process group (single process only)")

    def _refresh_inverses(self) -> None:
        due = self._steps % self.inverse_every == 0
        if self._dist is not None:  # owners factorize; comm-opt broadcasts the inverses
            return self._dist.refresh_inverses(self, due)
        group_of = self._group_index()
        todo = []  # (layer, state, damping) of every layer whose inverse is due or missing
        for layer in self.layers:
            st = self.layer_state(layer)
            if "A" in st and "G" in st and (due or not self.inverse.ready(st)):
                todo.append((layer, st, self.param_groups[group_of[id(layer.weight)]]["damping"]))
        if self.factor_dtype is None and self.inverse_dtype is None:
            self.inverse.refresh_many([(st, damping) for _, st, damping in todo], self.backend)
            return
        # low-precision storage: factorize in >= float32, store in inverse_dtype
        work = [self._upcast(st, layer.weight) for layer, st, _ in todo]
        self.inverse.refresh_many([(w, damping) for w, (_, _, damping) in zip(work, todo)],
                                  self.backend)
        for w, (layer, st, _) in zip(work, todo):
            storage = self.inverse_dtype or self._factor_dtype(layer.weight)
            for key in self.inverse.keys:
                if key in w:
                    st[key] = w[key].to(storage)

    def _precondition_layer(self, layer: KroneckerLayer, st: dict, V: Tensor, group: dict) -> Tensor:
        """P(V); the plain gradient until the layer has factors."""
        if not self.inverse.ready(st):
            return V
        if self.inverse_dtype is not None:  # applied in >= float32
            st = self._upcast(st, layer.weight)
        return self.inverse.apply(st, V, group["damping"], self.backend)

    def _upcast(self, st: dict, like: Tensor) -> dict:
        """A shallow copy of a layer's state with factors and inverses in ``_factor_dtype``."""
        compute = self._factor_dtype(like)
        return {k: (v.to(compute) if isinstance(v, Tensor) and v.is_floating_point() else v)
                for k, v in st.items() if k in ("A", "G", *self.inverse.keys)}

    def _state_dtype(self, p: Tensor, key: str) -> torch.dtype:
        if key in self.inverse.keys and self.inverse_dtype is not None:
            return self.inverse_dtype
        return super()._state_dtype(p, key)
