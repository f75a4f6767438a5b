"""The op-spec registry: each op is declared once (:class:`OpSpec`); backends implement specs.

An op's spec (:mod:`grng.ops.specs`) holds everything any part of grng needs to know about it:
its signature and one-line math, the reference implementation, a random-input generator, which
outputs to compare and how, whether outputs are exactly symmetric, and its FLOP and byte counts.
:func:`define` adds a spec and registers its reference as the ``reference`` backend of the
dispatch; a backend module registers its implementation of a spec with :func:`implement`.
The conformance test, ``grng verify`` and ``grng bench`` are generated from the registry, so a
new op or backend needs no edit to them.

Fresh outputs: a backend allocates each output that the op returns fresh through
:func:`new_output` (or registers a hook with :func:`add_poison_hook` that makes its own
allocator do the same), so that :func:`poisoned` can fill them with NaN and an element the
backend forgets to write shows up in the check.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor

from grng.ops import dispatch

#: (n, dtype, device, seed, variant) -> the op's positional arguments
InputMaker = Callable[[int, torch.dtype, torch.device, int, str], tuple]
#: (arguments after the call, the call's result) -> the tensors compared against the reference
OutputPicker = Callable[[tuple, object], tuple[Tensor, ...]]


@dataclass(frozen=True)
class OpSpec:
    """One op, declared once.

    ``dtypes`` are the case dtypes the op takes (what ``dtype`` means for the op, e.g. the dtype
    of X for the factor update, is said in ``dtype_role``). ``variants`` name the input layouts
    and coefficient sets ``make_inputs`` can build ("contiguous" first: the one benchmarked
    unless ``bench_variant`` says otherwise). ``outputs`` picks the compared tensors (for an
    in-place op, the mutated arguments); ``symmetric`` indexes those that must be exactly
    symmetric; ``returns_arg`` is the index of the argument an in-place op returns;
    ``output_names`` label the compared tensors in reports.
    ``reduction(n)`` is the length of the longest sum behind one output element (it sizes the
    float64 rounding floor of the tolerance rule, :func:`rounding_floor`); ``flops(n)`` and
    ``bytes(n, dtype)`` count the useful work and the minimal memory traffic of one call.
    """

    name: str
    signature: str
    math: str
    reference: Callable
    make_inputs: InputMaker
    outputs: OutputPicker
    dtypes: tuple[torch.dtype, ...]
    dtype_role: str
    shape: Callable[[int], str]
    reduction: Callable[[int], int]
    flops: Callable[[int], float]
    bytes: Callable[[int, torch.dtype], float]
    variants: tuple[str, ...] = ("contiguous", "strided")
    bench_variant: str = "contiguous"
    symmetric: tuple[int, ...] = ()
    returns_arg: int | None = None
    output_names: tuple[str, ...] = ()

    def inputs(self, n: int, dtype: torch.dtype, device: str | torch.device, seed: int,
               variant: str = "contiguous") -> tuple:
        """Fresh random arguments at size ``n`` (validated: a known dtype, variant and n >= 1)."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if dtype not in self.dtypes:
            raise ValueError(f"dtype {dtype} is not one of {self.name}'s dtypes {self.dtypes}")
        if variant not in self.variants:
            raise ValueError(f"variant must be one of {self.variants} for {self.name}, got {variant!r}")
        return self.make_inputs(n, dtype, torch.device(device), seed, variant)


SPECS: dict[str, OpSpec] = {}
_POISON_HOOKS: list[Callable[[], AbstractContextManager]] = []
_POISONED = [False]


def define(spec: OpSpec) -> OpSpec:
    """Add ``spec`` to the registry and register its reference as the ``reference`` backend."""
    if spec.name in SPECS:
        raise ValueError(f"op {spec.name!r} is already defined")
    SPECS[spec.name] = spec
    dispatch.register(spec.name, "reference", spec.reference)
    return spec


def spec(op: str) -> OpSpec:
    """The spec of ``op``; KeyError naming the known ops when there is none."""
    try:
        return SPECS[op]
    except KeyError:
        raise KeyError(f"no op spec named {op!r}; defined ops: {sorted(SPECS)}") from None


def implement(op: str, backend: str, fn: Callable,
              supports: Callable[..., bool] | None = None) -> None:
    """Register ``fn`` as ``backend``'s implementation of the defined op ``op``.

    ``fn`` takes the spec's positional signature; ``supports(*args)`` says whether it accepts
    the inputs (the dispatch falls back or raises otherwise). ``backend`` must be one of the
    dispatch's backends (:data:`grng.ops.dispatch.BACKENDS`, not "auto" or "reference").
    """
    spec(op)
    if backend not in dispatch.BACKENDS or backend in ("auto", "reference"):
        raise ValueError(f"backend must be one of {dispatch.BACKENDS[2:]} to implement {op!r}, "
                         f"got {backend!r}")
    dispatch.register(op, backend, fn, supports)


def add_poison_hook(hook: Callable[[], AbstractContextManager]) -> None:
    """Register a context-manager factory entered by :func:`poisoned` (a backend's own allocator)."""
    _POISON_HOOKS.append(hook)


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    """Within the block, fresh outputs (:func:`new_output` and the hooks) start as NaN."""
    with contextlib.ExitStack() as stack:
        for hook in _POISON_HOOKS:
            stack.enter_context(hook())
        before, _POISONED[0] = _POISONED[0], True
        try:
            yield
        finally:
            _POISONED[0] = before


def nan_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """A fresh buffer filled with NaN (what :func:`new_output` returns while poisoned)."""
    return torch.full(shape, math.nan, dtype=dtype, device=device)


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """A fresh output buffer: uninitialized, or NaN-filled inside :func:`poisoned`."""
    if _POISONED[0] and dtype.is_floating_point:
        return nan_output(shape, dtype, device)
    return torch.empty(shape, dtype=dtype, device=device)


def rounding_floor(dtype: torch.dtype, reduction: int) -> float:
    """The tolerance rule's floor, relative to the output's largest entry: 2 eps(dtype), times
    sqrt(K) for a float64 output (K = the op's reduction length).

    In low precision the same-precision reference's own error already measures the rounding of
    its sums, so the floor only covers a final rounding of the output (two units in the last
    place of the largest entry, as where the reference happens to be exact, e.g. at size 1). A
    float64 output's "same precision" run is the float64 truth itself (error 0), so there the
    floor carries the allowance for another summation order, a tile split or a fused
    multiply-add: about sqrt(K) units in the last place for a K-term sum of random terms.
    """
    k = max(1, reduction) if dtype == torch.float64 else 1
    return 2.0 * torch.finfo(dtype).eps * math.sqrt(k)


__all__ = ["OpSpec", "SPECS", "add_poison_hook", "define", "implement", "nan_output",
           "new_output", "poisoned", "rounding_floor", "spec"]
