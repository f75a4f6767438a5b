"""One dispatch for every op: pick the backend (reference, triton, ext) per call.

Backends register their implementations against the op specs
(:func:`grng.ops.registry.implement`, which calls :func:`register` here). The ``reference``
backend is always live. ``triton`` (``grng.kernels``) and ``ext`` (the compiled
``grng.ops._C``) are imported lazily on first use; an import failure is recorded and reported
by :func:`backends`, never raised at ``import grng``.

``backend="auto"`` walks :data:`AUTO_ORDER` for the tensors' device type and takes the first
backend that implements the op and accepts the inputs and that the first-use self-check has
not rejected (:func:`reject`); the CUDA order per op is the one the cost model predicts fastest
until a GPU measures it (``AUTO_ORDER`` says which entry is which). A forced backend that
cannot run raises :class:`BackendUnavailable`; a forced backend that lacks one op (there is,
e.g., no Triton eigendecomposition) uses the reference for that op.
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
# Each entry says where it comes from: *measured* (a benchmark on that device type showed the
# backend faster than the reference) or *predicted* (the cost model, grng.benchmark.costmodel,
# charges the op as grng's kernel in its rows, bench/results/costmodel.md, and no device of that
# type has measured it yet). A predicted entry is confirmed or removed by a GPU run of
# bench/gpu_check.py (its kernels stage: auto_order_verdicts). When an optimizer is built with
# backend="auto", each entry for its parameters' device type is first checked once per process
# against the reference on small random inputs (grng.verify.selfcheck): a backend that fails is
# rejected for that op and device type (reject) and the next one, then the reference, runs.
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
    # PREDICTED, not measured (no GPU has run these kernels yet): the cost model's "grng's
    # kernels" rows (bench/results/costmodel.md, "CUDA defaults, grng's kernels": 1.43x AdamW on
    # GPT-2 small / H100 against 2.21x with the reference ops; "EKFAC CUDA defaults ..., grng's
    # kernels": 1.58x against 2.58x) charge these ops as kernels (StepConfig.fold_kernel,
    # fused_update, moments_kernel). bench/gpu_check.py's AUTO_ORDER stage confirms or removes them.
    "cuda": {
        # fold_kernel: the one-triangle fold with M read and written in the epilogue, Triton's
        # sym_update (compiled for sm_90 on tensor cores: bench/results/sm90_compile.md); the
        # extension's block-row fold next
        "factor_update": ("triton", "ext"), "factor_update_masked": ("triton", "ext"),
        # fused_update: the update in two launches, Triton's multi-tensor kernel (any mix of
        # dtypes); the extension's (one dtype per call) next; the unmasked one only ext has
        "fused_update_masked": ("triton", "ext"), "fused_update": ("ext",),
        # moments_kernel: EKFAC's masked moment step in one elementwise launch, the extension's
        # (no Python launcher) first, Triton's next
        "adam_moments_masked": ("ext", "triton"),
    },
}


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op; ``supports(*args)`` says if it takes the inputs."""

    fn: Callable
    supports: Callable[..., bool]


_IMPLS: dict[str, dict[str, Impl]] = {}
#: (device type, op, backend) -> the implementation the first-use self-check rejected there
#: (grng.verify.selfcheck); backend="auto" skips it. Keyed by the implementation object, so a
#: backend re-registered with another implementation is checked again.
_REJECTED: dict[tuple[str, str, str], Impl] = {}
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
    return {name: backend_status(name) for name in BACKENDS[1:]}


def backend_status(name: str) -> str:
    """One backend's line of :func:`backends` (loading only that backend)."""
    status = _load(name)
    if name == "triton" and status == "live" and not torch.cuda.is_available():
        status = ("live (TRITON_INTERPRET=1: kernels run on CPU tensors)"
                  if interpreter_enabled() else "live on CUDA tensors only (no CUDA device here)")
    elif status == "live" and _NOTES.get(name):
        status = f"live ({_NOTES[name]})"
    return status


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
        device_type = _device_type(args)
        for name in AUTO_ORDER.get(device_type, {}).get(op, ()):
            if (_load(name) == "live" and name in impls
                    and _REJECTED.get((device_type, op, name)) is not impls[name]
                    and impls[name].supports(*args)):
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


def reject(op: str, backend: str, device_type: str) -> None:
    """Make ``backend="auto"`` skip ``backend``'s current implementation of ``op`` on
    ``device_type`` for the rest of the process (the first-use self-check found it wrong)."""
    impl = implementation(op, backend)
    if impl is not None:
        _REJECTED[(device_type, op, backend)] = impl


def rejected(op: str, backend: str, device_type: str) -> bool:
    """Whether the self-check rejected ``backend``'s current implementation of ``op`` there."""
    impl = implementation(op, backend)
    return impl is not None and _REJECTED.get((device_type, op, backend)) is impl


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
