"""``grng verify``: every registered op on every live backend against the float64 reference.

:func:`check_ops` runs one :func:`~grng.verify.checks.check_case` per (op, backend, dtype,
size, variant) that the backend implements (the rule is in :mod:`grng.verify.checks`);
:func:`check_steps` runs K-FAC, RING, R-Kalman and EKFAC steps through each backend against
the float64 reference steps. Both return :class:`Check` rows; ``passed is False`` is a failure,
``passed is None`` a check that did not run (the note says why).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

import torch

from grng.benchmark.ceilings import dtype_of
from grng.ops import dispatch, registry
from grng.verify.checks import (
    INTERPRETER_MAX_N,
    Check,
    check_case,
    dtype_name,
    live_backends,
    shape_label,
)
from grng.verify.steps import STEP_CHECKS, check_steps

DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float64")
SIZES: tuple[int, ...] = (1, 123, 769)


def _dtype(name: str | torch.dtype) -> torch.dtype:
    """A dtype verify checks (one of DTYPES), by name or itself; ValueError naming ``dtypes``."""
    if not isinstance(name, torch.dtype) and name not in DTYPES:
        raise ValueError(f"dtypes must be among {sorted(DTYPES)}, got {name!r}")
    return dtype_of(name)


def plan(device: str | torch.device, backends: Sequence[str] | None = None,
         dtypes: Iterable[str | torch.dtype] = DTYPES, sizes: Iterable[int] = SIZES,
         ops: Sequence[str] | None = None,
         variants: Sequence[str] | None = None) -> list[tuple[str, str, torch.dtype, int, str]]:
    """The (op, backend, dtype, n, variant) cases :func:`check_ops` runs, in order.

    ``variants`` None means every variant of each op; otherwise the named ones an op has.
    """
    names = list(registry.SPECS) if ops is None else list(ops)
    for op in names:
        registry.spec(op)
    chosen = live_backends(device)[0] if backends is None else list(backends)
    for b in chosen:
        dispatch.validate_backend(b)
    dts = [_dtype(d) for d in dtypes]
    ns = [int(n) for n in sizes]
    if any(n < 1 for n in ns):
        raise ValueError(f"sizes must be positive, got {ns}")
    cases = []
    for op in names:
        spec = registry.spec(op)
        for backend in chosen:
            if backend != "reference" and dispatch.implementation(op, backend) is None:
                continue
            for dt in dts:
                if dt not in spec.dtypes:
                    continue
                for n in ns:
                    for v in spec.variants:
                        if variants is None or v in variants:
                            cases.append((op, backend, dt, n, v))
    return cases


def check_ops(device: str | torch.device, backends: Sequence[str] | None = None,
              dtypes: Iterable[str | torch.dtype] = DTYPES, sizes: Iterable[int] = SIZES,
              ops: Sequence[str] | None = None, seed: int = 0, deadline: float | None = None,
              *, variants: Sequence[str] | None = None,
              progress: Callable[[Check], None] | None = None,
              interpreter_max_n: int | None = None) -> list[Check]:
    """Check every registered op x backend x dtype x size (x layout variant) on ``device``.

    ``backends`` None means every backend live on the device (:func:`live_backends`); a
    backend is checked only on the ops it implements itself, and only at the dtypes the op
    takes (float64 where it does). ``deadline`` is a ``time.monotonic()`` value after which
    the remaining cases come back unrun (``passed`` None, note "deadline"). ``progress`` is
    called with each finished row; ``interpreter_max_n`` caps the sizes Triton's CPU
    interpreter gets (default :data:`INTERPRETER_MAX_N`).
    """
    rows = []
    for op, backend, dt, n, variant in plan(device, backends, dtypes, sizes, ops, variants):
        if deadline is not None and time.monotonic() > deadline:
            row = Check(op, backend, dtype_name(dt), shape_label(n, variant),
                        note="skipped: deadline passed")
        else:
            row = check_case(registry.spec(op), backend, dt, n, variant, device, seed,
                             interpreter_max_n=interpreter_max_n or INTERPRETER_MAX_N)
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


__all__ = ["DTYPES", "INTERPRETER_MAX_N", "SIZES", "STEP_CHECKS", "Check", "check_case",
           "check_ops", "check_steps", "live_backends", "plan"]
