"""One dispatch for every op: pick the backend (reference, triton, ext) per call.

Backends register their implementations against the op specs
(:func:`grng.ops.registry.implement`, which calls :func:`register` here). The ``reference``
backend is always live. ``triton`` (``grng.kernels``) and ``ext`` (the compiled
``grng.ops._C``) are imported lazily on first use; an import failure is recorded and reported
by :func:`backends`, never raised at ``import grng``.

``backend="auto"`` walks :data:`AUTO_ORDER` for the tensors' device type and takes the first
backend that implements the op and accepts the inputs; the CUDA order per op is the one the
kernel benchmark measured fastest (``bench/results``). A forced backend that cannot run
raises :class:`BackendUnavailable`; a forced backend that lacks one op (there is, e.g., no
Triton eigendecomposition) uses the reference for that op.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from grng.ops.errors import BackendUnavailable

BACKENDS: tuple[str, ...] = ("auto", "reference", "triton", "ext")

# Modules that register a backend's implementations when imported.
_BACKEND_MODULES: dict[str, str] = {"triton": "grng.kernels", "ext": "grng.ops.ext"}

# backend="auto": per device type, per op, the backends to try in order (reference is last).
# "cuda" stays empty (auto = reference) until bench/kernels.py, run on a GPU, measures a backend
# faster than the reference for an op; only such a measurement may add an entry here.
AUTO_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    # measured in bench/results/ext.csv (2-core EPYC): ext 1.2-16x faster than the reference here;
    # ext's batched Newton-Schulz and large-d batched Cholesky lose to MKL, so they stay out
    "cpu": {"fused_update": ("ext",), "factor_update": ("ext",), "kalman_update": ("ext",),
            # bench/results/masked_cpu.csv (one thread, shared 2-core machine): ext's masked
            # update 4-74x and masked Kalman update 1.3-4x faster than the reference, n 64-1024;
            # the masked fold 3-8x at n 64-1024 (load 8: the machine was shared)
            "fused_update_masked": ("ext",), "kalman_update_masked": ("ext",),
            "factor_update_masked": ("ext",),
            # bench/results/adam_moments_cpu.md (one thread, load 9): ext's masked moment step
            # 2.1-4.7x faster than the reference at 64x65 to 1024x1025
            "adam_moments_masked": ("ext",)},
    "cuda": {},
}


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op; ``supports(*args)`` says if it takes the inputs."""

    fn: Callable
    supports: Callable[..., bool]


_IMPLS: dict[str, dict[str, Impl]] = {}
_LOADED: dict[str, str] = {"reference": "live"}
# what a live backend's module says about how it was found (its LIVE_NOTE), shown by backends()
_NOTES: dict[str, str] = {}


def _always(*_args, **_kwargs) -> bool:
    return True


def register(op: str, backend: str, fn: Callable, supports: Callable[..., bool] | None = None) -> None:
    """Register ``fn`` as ``backend``'s implementation of ``op``."""
    _IMPLS.setdefault(op, {})[backend] = Impl(fn, supports or _always)


def implementation(op: str, backend: str) -> Impl | None:
    """``backend``'s own implementation of ``op`` (None when it has none: the dispatch would
    run the reference instead)."""
    return _IMPLS.get(op, {}).get(backend)


def _load(backend: str) -> str:
    """Import a backend's module once; return 'live' or the reason it is not."""
    if backend not in _LOADED:
        try:
            module = importlib.import_module(_BACKEND_MODULES[backend])
            _LOADED[backend] = "live"
            _NOTES[backend] = getattr(module, "LIVE_NOTE", "")
        except Exception as err:  # noqa: BLE001 - any import failure makes the backend unavailable
            _LOADED[backend] = f"unavailable: {type(err).__name__}: {err}"
    return _LOADED[backend]


def backends() -> dict[str, str]:
    """Say which backends are live and, for the others, why not."""
    report = {}
    for name in BACKENDS[1:]:
        status = _load(name)
        if name == "triton" and status == "live" and not torch.cuda.is_available():
            status = ("live (TRITON_INTERPRET=1: kernels run on CPU tensors)"
                      if interpreter_enabled() else "live on CUDA tensors only (no CUDA device here)")
        elif status == "live" and _NOTES.get(name):
            status = f"live ({_NOTES[name]})"
        report[name] = status
    return report


def interpreter_enabled() -> bool:
    """True when Triton's interpreter runs kernels on CPU tensors (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def validate_backend(backend: str) -> str:
    """Check a ``backend=`` argument; raise ValueError naming it when unknown."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _device_type(args: tuple) -> str:
    for a in args:
        if isinstance(a, Tensor):
            return a.device.type
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], Tensor):
            return a[0].device.type
    return "cpu"


def resolve(op: str, backend: str, *args) -> Callable:
    """The implementation of ``op`` that ``backend`` selects for these arguments."""
    impls = _IMPLS[op]
    if backend == "reference":
        return impls["reference"].fn
    if backend == "auto":
        for name in AUTO_ORDER.get(_device_type(args), {}).get(op, ()):
            if _load(name) == "live" and name in impls and impls[name].supports(*args):
                return impls[name].fn
        return impls["reference"].fn
    status = _load(validate_backend(backend))
    if status != "live":
        raise BackendUnavailable(f"backend {backend!r} cannot run: {status}")
    impl = impls.get(backend)
    if impl is None:
        return impls["reference"].fn
    if not impl.supports(*args):
        raise BackendUnavailable(
            f"backend {backend!r} does not accept these inputs for {op} "
            f"(device {_device_type(args)!r}; Triton on CPU needs TRITON_INTERPRET=1)")
    return impl.fn


def accepts(op: str, backend: str, *args) -> bool:
    """Whether ``backend`` runs ``op`` on these arguments (with its own implementation or, where
    it has none, the reference), e.g. batched inputs that a kernel does not take."""
    try:
        resolve(op, backend, *args)
    except BackendUnavailable:
        return False
    return True


def call(op: str, backend: str, *args):
    """Run ``op`` on ``args`` with the implementation ``backend`` selects."""
    return resolve(op, backend, *args)(*args)
