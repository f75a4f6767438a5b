"""The ``precision`` option of the curvature optimizers: the arithmetic their own matmuls use
(docs/performance.md "Precision").

- ``"fp32"`` (default): factors, inverses and their application in float32 (float64 for a
  float64 model), exact float32 products;
- ``"tf32"``: the same storage, but float32 matmuls on CUDA (cuBLAS and grng's Triton dots) may
  use TF32 tensor cores during ``step()`` (10-bit mantissa products, float32 accumulation);
  torch's global setting is restored after the step. A CPU has no TF32: there it changes nothing
  (warned at construction);
- ``"bf16"``: factors and inverses stored in bfloat16 (``factor_dtype`` / ``inverse_dtype``) and
  the inverse applied in bfloat16 operands with float32 accumulation (tensor cores on a GPU),
  the direction returned in float32.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")


def storage_dtypes(precision: str, factor_dtype: torch.dtype | None,
                   inverse_dtype: torch.dtype | None) -> tuple[torch.dtype | None, torch.dtype | None]:
    """(factor_dtype, inverse_dtype) for ``precision``: bf16 sets both unless they are given,
    and a given one that is not bf16 contradicts it (ValueError naming both)."""
    if precision != "bf16":
        return factor_dtype, inverse_dtype
    for name, value in (("factor_dtype", factor_dtype), ("inverse_dtype", inverse_dtype)):
        if value not in (None, torch.bfloat16):
            raise ValueError(f"precision='bf16' stores factors and inverses in bfloat16; "
                             f"{name}={value} contradicts it (leave {name} unset)")
    return torch.bfloat16, torch.bfloat16


def warn_if_inert(precision: str, on_cuda: bool, owner: str) -> None:
    """Say so when ``precision='tf32'`` cannot change anything (no CUDA parameters)."""
    if precision == "tf32" and not on_cuda:
        warnings.warn(f"{owner}(precision='tf32'): TF32 exists only on CUDA; this model's "
                      "parameters are not on CUDA, so its matmuls stay exact float32",
                      RuntimeWarning, stacklevel=4)


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """Inside: CUDA float32 matmuls may use TF32 when ``precision`` is "tf32" (torch's setting,
    which grng's Triton launchers read too, is restored on exit); otherwise nothing changes."""
    if precision != "tf32":
        yield
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        old = matmul.fp32_precision
        matmul.fp32_precision = "tf32"
        try:
            yield
        finally:
            matmul.fp32_precision = old
    else:
        old_flag = matmul.allow_tf32
        matmul.allow_tf32 = True
        try:
            yield
        finally:
            matmul.allow_tf32 = old_flag
