"""Every registered (op, backend, dtype, size) against the float64 reference, by one rule.

Generated from the op-spec registry (:mod:`grng.ops.specs`) and the dispatch tables: a new op
or backend is covered without an edit here. Each test runs every layout variant of its op
(contiguous, strided, and op-specific ones such as beta = 0 on a NaN factor) through
:func:`grng.verify.checks.check_case`: error against the float64 reference at most 2x the
same-precision reference's plus the rounding floor, fresh outputs NaN-poisoned, symmetry
exact where promised, in-place ops return their argument. Sizes: 1, 123 and 769 (the
reference, as the rule's baseline, at 1 and 123; Triton under its CPU interpreter at 1 and 33:
``tests/test_triton_kernels.py`` takes it to 123 and 257).
"""
from __future__ import annotations

import pytest
import torch

from grng.ops import dispatch, registry
from grng.verify.checks import check_case, live_backends

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LIVE = live_backends(DEVICE)[0]  # imports the Triton and ext backends where they load


def sizes(backend: str) -> tuple[int, ...]:
    """The sizes a backend is checked at on this machine."""
    if backend == "reference":
        return (1, 123)
    if backend == "triton" and DEVICE == "cpu":
        return (1, 33)
    return (1, 123, 769)


CASES = [pytest.param(op, backend, dtype, n, id=f"{op}-{backend}-{str(dtype)[6:]}-{n}")
         for op, spec in registry.SPECS.items()
         for backend in ("reference", "triton", "ext")
         if backend == "reference" or dispatch.implementation(op, backend) is not None
         for dtype in spec.dtypes
         for n in sizes(backend)]


@pytest.mark.parametrize("op,backend,dtype,n", CASES)
def test_conforms(op: str, backend: str, dtype: torch.dtype, n: int) -> None:
    if backend not in LIVE:
        pytest.skip(f"{backend} is not live here: {live_backends(DEVICE)[1][backend]}")
    spec = registry.spec(op)
    rows = [check_case(spec, backend, dtype, n, variant, DEVICE, seed=0) for variant in spec.variants]
    failed = [r for r in rows if r.passed is False]
    assert not failed, "\n".join(f"{r.shape}: {r.note}" for r in failed)
    ran = [r for r in rows if r.passed]
    if not ran:  # e.g. a backend that refuses float64, or ext's batched inverse above d = 128
        pytest.skip("; ".join(sorted({r.note for r in rows})))


def test_every_op_has_a_complete_spec() -> None:
    """Each spec's generator yields fresh, finite (or deliberately NaN-poisoned) random inputs."""
    assert set(registry.SPECS) == {"factor_update", "eigh", "eigen_apply", "newton_schulz_step",
                                   "cholesky_inverse", "kalman_update", "fused_update",
                                   "batched_spd_inverse", "fused_update_masked",
                                   "newton_schulz_masked", "cholesky_inverse_masked",
                                   "kalman_update_masked"}
    for name, spec in registry.SPECS.items():
        assert spec.variants[0] == "contiguous" and spec.bench_variant in spec.variants
        a = spec.inputs(7, spec.dtypes[0], "cpu", seed=1)
        b = spec.inputs(7, spec.dtypes[0], "cpu", seed=2)
        tensors = [t for t in _flat(a)]
        assert tensors, name
        assert all(bool((t != 0).any()) for t in tensors if t.is_floating_point()), f"{name}: zeros"
        assert any(not torch.equal(x, y) for x, y in zip(_flat(a), _flat(b))), f"{name}: not random"
        assert spec.flops(7) > 0 and spec.bytes(7, spec.dtypes[0]) > 0
        with pytest.raises(ValueError, match="variant"):
            spec.inputs(7, spec.dtypes[0], "cpu", 0, "no-such-variant")
        with pytest.raises(ValueError, match="n must be"):
            spec.inputs(0, spec.dtypes[0], "cpu", 0)


def test_strided_variant_is_not_contiguous() -> None:
    for name, spec in registry.SPECS.items():
        args = spec.inputs(9, spec.dtypes[0], "cpu", 0, "strided")
        assert any(not t.is_contiguous() for t in _flat(args) if t.dim() >= 2), name


def test_implement_requires_a_spec_and_a_backend() -> None:
    with pytest.raises(KeyError, match="no op spec named 'nope'"):
        registry.implement("nope", "ext", lambda *a: None)
    with pytest.raises(ValueError, match="backend must be one of"):
        registry.implement("factor_update", "cuda", lambda *a: None)
    with pytest.raises(ValueError, match="already defined"):
        registry.define(registry.spec("eigh"))


def _flat(args: tuple) -> list[torch.Tensor]:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += [t for t in a if isinstance(t, torch.Tensor)]
    return out
