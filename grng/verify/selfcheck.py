"""The first-use self-check: every (op, backend) that ``backend="auto"`` would pick on a device
is run once per process against the reference before an optimizer steps with it.

Some of :data:`grng.ops.dispatch.AUTO_ORDER`'s entries are predicted by the cost model, not
measured (the CUDA ones: no GPU has run them yet), so a kernel that is wrong on the device it
meets must not silently train a model. When an optimizer is built with ``backend="auto"``,
:func:`check_auto_order` runs each backend of each op that AUTO_ORDER lists for the parameters'
device type, that is live and implements the op, and that this process has not checked on that
device with that implementation, through :func:`grng.verify.checks.check_case` (the conformance
rule of ``grng verify``: error vs the float64 reference at most 2x the reference's own plus the
rounding floor; poisoned outputs, exact symmetry, in-place returns) on fresh random inputs of an
odd size (:data:`SIZE`), in float32 and the parameters' floating dtypes the op takes, for every
input variant of the op's spec (layouts, batches, and the masked ops' flag-False "skip" cases).
A check that raises or fails rejects that backend for that op on that device type for the rest
of the process (:func:`grng.ops.dispatch.reject`: the next backend of the order, then the
reference, runs), with one warning naming the op, the backend and the error, and pointing at
``grng verify``. It runs at construction, never inside ``step()`` (it reads results on the host).

``GRNG_SKIP_SELFCHECK=1`` in the environment skips it (for a process that has already run
``grng verify`` on its device, or a test suite that builds optimizers by the thousand).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterable

import torch

from grng.ops import dispatch, registry
from grng.ops.dispatch import Impl
from grng.verify.checks import Check, check_case, dtype_name, live_backends, shape_label

#: the matrix side of the self-check's inputs: odd, so that no tile divides it
SIZE = 17
#: the environment variable that skips the self-check when set to "1"
SKIP_ENV = "GRNG_SKIP_SELFCHECK"

# (device, op, backend) -> the implementation checked there (a re-registered one is checked again)
_CHECKED: dict[tuple[str, str, str], Impl] = {}


def _dtypes(spec: registry.OpSpec, dtypes: Iterable[torch.dtype]) -> list[torch.dtype]:
    """float32 and the given dtypes, those the op takes, without repeats."""
    out: list[torch.dtype] = []
    for dt in (torch.float32, *dtypes):
        if dt in spec.dtypes and dt not in out:
            out.append(dt)
    return out


def _first_failure(spec: registry.OpSpec, backend: str, dtypes: list[torch.dtype],
                   device: torch.device) -> Check | None:
    """The first failing check of ``backend``'s op over dtypes x variants (None: all passed)."""
    for dt in dtypes:
        for variant in spec.variants:
            try:
                row = check_case(spec, backend, dt, SIZE, variant, device)
            except Exception as err:  # noqa: BLE001 - inputs the backend's supports() fails on
                row = Check(spec.name, backend, dtype_name(dt), shape_label(SIZE, variant),
                            passed=False, note=f"raised {type(err).__name__}: {err}")
            if row.passed is False:
                return row
    return None


def check_auto_order(device: str | torch.device,
                     dtypes: Iterable[torch.dtype] = ()) -> list[Check]:
    """Check, once per process, every backend AUTO_ORDER lists for ``device``'s type; reject
    (and warn about) each that fails. Returns the failing rows of this call."""
    if os.environ.get(SKIP_ENV) == "1":
        return []
    dev = torch.device(device)
    order = dispatch.AUTO_ORDER.get(dev.type, {})
    if not order:
        return []
    live = set(live_backends(dev, {b for backends in order.values() for b in backends})[0])
    floating = [dt for dt in dtypes if dt.is_floating_point]
    failures = []
    for op, backends in order.items():
        spec = registry.spec(op)
        for backend in backends:
            impl = dispatch.implementation(op, backend)
            key = (str(dev), op, backend)
            if backend not in live or impl is None or _CHECKED.get(key) is impl:
                continue
            _CHECKED[key] = impl
            row = _first_failure(spec, backend, _dtypes(spec, floating), dev)
            if row is None:
                continue
            dispatch.reject(op, backend, dev.type)
            failures.append(row)
            warnings.warn(
                f"grng: backend {backend!r} failed its first-use check of {op} on {dev} "
                f"({row.dtype}, {row.shape}: {row.note}); backend='auto' will not use it for {op} "
                f"on {dev.type} in this process (next in AUTO_ORDER, else the reference). "
                f"Run `python -m grng verify --device {dev.type}` for the full check.",
                RuntimeWarning, stacklevel=3)
    return failures


__all__ = ["SIZE", "SKIP_ENV", "check_auto_order"]
