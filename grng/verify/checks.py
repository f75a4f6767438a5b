"""One conformance check: a backend's op on fresh random inputs against the float64 reference.

The rule (the same in the test suite, ``grng verify`` and ``bench/gpu_check.py``): with T the
reference op run on the inputs cast to float64, B the backend's output and R the reference op
run on the inputs as given (the same low precision), for every compared output

    max|B - T| / max|T|  <=  2 max|R - T| / max|T|  +  floor,

floor = 2 eps(dtype of B), times sqrt(K) for float64 outputs, K the op's reduction length
(:func:`grng.ops.registry.rounding_floor` says why). For float32 and bfloat16 this is exactly
the rule of ``tests/test_triton_kernels.py``. Besides:
fresh outputs start as NaN (:func:`grng.ops.registry.poisoned`), so an unwritten element is a
non-finite output and fails; outputs the spec promises symmetric must be exactly symmetric; an
in-place op must return its argument; dtypes and shapes must equal the reference's.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from grng.ops import dispatch, registry
from grng.ops.registry import OpSpec

# Above this size a check of the Triton backend under its CPU interpreter is skipped (the
# interpreter is ~5000x slower than a GPU; n = 123 takes about half a second per check).
INTERPRETER_MAX_N = 128


@dataclass
class Check:
    """One row of a verification: ``passed`` is True, False, or None when it did not run (the
    ``note`` says why). ``error`` and ``ref_error`` are max-abs errors against the float64
    reference relative to its largest entry; ``ratio`` = error / ref_error (None when the
    same-precision reference is exact)."""

    op: str
    backend: str
    dtype: str
    shape: str
    error: float | None = None
    ref_error: float | None = None
    ratio: float | None = None
    passed: bool | None = None
    note: str = ""

    @property
    def verdict(self) -> str:
        """"pass", "FAIL" or "skip"."""
        return {True: "pass", False: "FAIL", None: "skip"}[self.passed]

    def as_dict(self) -> dict[str, object]:
        """The fields and the verdict, JSON-ready (inf as the string "inf")."""
        out = asdict(self)
        for k in ("error", "ref_error", "ratio"):
            if isinstance(out[k], float) and not math.isfinite(out[k]):
                out[k] = str(out[k])
        out["verdict"] = self.verdict
        return out


def live_backends(device: str | torch.device, among: Iterable[str] | None = None
                  ) -> tuple[list[str], dict[str, str]]:
    """(backends that can run on ``device``, {backend: why not} for the others), of ``among``
    (default: every backend; only those are loaded)."""
    dev = torch.device(device)
    live, not_live = [], {}
    names = dispatch.BACKENDS[1:] if among is None else among
    for name, status in ((n, dispatch.backend_status(n)) for n in names):
        if not status.startswith("live"):
            not_live[name] = status
        elif name == "triton" and dev.type == "cpu" and not dispatch.interpreter_enabled():
            not_live[name] = f"{status}; set TRITON_INTERPRET=1 before importing grng to check it on the CPU"
        elif dev.type == "cuda" and not torch.cuda.is_available():
            not_live[name] = "no CUDA device here"
        else:
            live.append(name)
    return live, not_live


def shape_label(n: int, variant: str) -> str:
    """The ``shape`` cell of a check: "n=123", or "n=123 strided" for a non-default variant."""
    return f"n={n}" + ("" if variant == "contiguous" else f" {variant}")


def case_seed(seed: int, *parts: object) -> int:
    """A reproducible seed per case, derived from the run's seed and the case's coordinates."""
    return zlib.crc32(":".join(str(p) for p in (seed, *parts)).encode())


def dtype_name(dtype: torch.dtype) -> str:
    """"float32", "bfloat16", ..."""
    return str(dtype).removeprefix("torch.")


def map_tensors(obj: object, fn) -> object:
    """Apply ``fn`` to every tensor in nested tuples / lists (other values unchanged)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(o, fn) for o in obj)
    return obj


def _to_f64(t: Tensor) -> Tensor:
    """A float64 copy (always a copy: a float64 input must not alias the backend's in-place
    target, or the float64 truth would run on the backend's output)."""
    return t.to(torch.float64, copy=True) if t.is_floating_point() else t.clone()


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The index of element ``flat`` of a row-major tensor of ``shape`` (torch.unravel_index
    without its import of sympy: half a second on the first check of a process)."""
    index = []
    for size in reversed(shape):
        flat, i = divmod(flat, size)
        index.append(i)
    return tuple(reversed(index))


def compare(got: Tensor, same: Tensor, truth: Tensor, reduction: int) -> dict[str, object]:
    """Errors of one output: relative max-abs error, the reference's, the floor, worst index."""
    truth64 = truth.detach().to(torch.float64)
    scale = float(truth64.abs().max()) if truth64.numel() else 0.0
    scale = scale if scale > 0.0 and math.isfinite(scale) else 1.0
    floor = registry.rounding_floor(got.dtype, reduction) if got.is_floating_point() else 0.0
    if got.numel() == 0:
        return dict(error=0.0, ref_error=0.0, floor=floor, worst=None, got=None, want=None)
    g = got.detach().to(torch.float64)
    diff = (g - truth64).abs()
    bad = ~torch.isfinite(g) & torch.isfinite(truth64)
    if bool(bad.any()):
        flat = int(torch.nonzero(bad.reshape(-1))[0])
        err = math.inf
    else:
        flat = int(torch.argmax(diff.reshape(-1)))
        err = float(diff.reshape(-1)[flat]) / scale
    ref_err = float((same.detach().to(torch.float64) - truth64).abs().max()) / scale
    worst = _unravel(flat, tuple(got.shape))
    return dict(error=err, ref_error=ref_err, floor=floor, worst=worst,
                got=float(g.reshape(-1)[flat]), want=float(truth64.reshape(-1)[flat]))


def check_case(spec: OpSpec, backend: str, dtype: torch.dtype, n: int, variant: str,
               device: str | torch.device, seed: int = 0, *,
               interpreter_max_n: int = INTERPRETER_MAX_N) -> Check:
    """Run ``backend``'s ``spec`` op once on fresh inputs and judge it by the module's rule.

    Under Triton's CPU interpreter, sizes above ``interpreter_max_n`` are skipped (too slow).
    """
    dev = torch.device(device)
    row = Check(spec.name, backend, dtype_name(dtype), shape_label(n, variant))
    if backend == "reference":
        fn = spec.reference
    else:
        impl = dispatch.implementation(spec.name, backend)
        if impl is None:
            row.note = f"{backend} has no own {spec.name} (the dispatch runs the reference)"
            return row
        if backend == "triton" and dev.type == "cpu" and n > interpreter_max_n:
            row.note = f"n > {interpreter_max_n} is too slow in Triton's CPU interpreter: run on CUDA"
            return row
        fn = impl.fn
    args = spec.inputs(n, dtype, dev, case_seed(seed, spec.name, n, dtype, variant), variant)
    if backend != "reference" and not impl.supports(*args):
        row.note = f"{backend} does not accept these inputs ({row.dtype}: {spec.shape(n)})"
        return row
    same_args = map_tensors(args, lambda t: t.clone())
    args64 = map_tensors(args, _to_f64)
    try:
        with registry.poisoned():
            result = fn(*args)
    except Exception as err:  # noqa: BLE001 - any failure of the backend is a failed check
        row.passed, row.note = False, f"raised {type(err).__name__}: {err}"
        return row
    same_result = spec.reference(*same_args)
    truth_result = spec.reference(*args64)
    got = spec.outputs(args, result)
    same = spec.outputs(same_args, same_result)
    truth = spec.outputs(args64, truth_result)
    problems = []
    if spec.returns_arg is not None and result is not args[spec.returns_arg]:
        problems.append(f"must return its argument {spec.returns_arg} (in place)")
    worst: tuple[float, dict[str, object], int] | None = None
    for i, (g, s, t) in enumerate(zip(got, same, truth)):
        name = spec.output_names[i] if i < len(spec.output_names) else f"output {i}"
        if g.shape != s.shape or g.dtype != s.dtype:
            problems.append(f"{name}: {tuple(g.shape)} {g.dtype}, expected {tuple(s.shape)} {s.dtype}")
            continue
        if i in spec.symmetric and not torch.equal(g, g.transpose(-2, -1)):
            problems.append(f"{name} is not exactly symmetric")
        c = compare(g, s, t, spec.reduction(n))
        allowed = 2.0 * c["ref_error"] + c["floor"]
        use = c["error"] / allowed if allowed > 0 else (0.0 if c["error"] == 0 else math.inf)
        if use > 1.0:
            what = "non-finite (unwritten?)" if c["error"] == math.inf else "off"
            problems.append(f"{name} {what} at {list(c['worst'])}: {c['got']:.6g} vs {c['want']:.6g}, "
                            f"error {c['error']:.2e} > allowed {allowed:.2e}")
        if worst is None or use > worst[0]:
            worst = (use, c, i)
    if worst is not None:
        c = worst[1]
        row.error, row.ref_error = float(c["error"]), float(c["ref_error"])
        row.ratio = row.error / row.ref_error if row.ref_error > 0 else None
        if not problems and row.ref_error == 0.0:
            row.note = f"reference exact here: within the rounding floor {c['floor']:.1e}"
    row.passed = not problems
    if problems:
        row.note = "; ".join(problems)
    return row


__all__ = ["Check", "INTERPRETER_MAX_N", "case_seed", "check_case", "compare", "dtype_name",
           "live_backends", "map_tensors", "shape_label"]
