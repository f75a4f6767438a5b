"""Triton kernels of grng, implementing the ``triton`` backend of :mod:`grng.ops`.

One module per op (kernel(s), launcher and glue, with the op's sync-free "masked" variant
where it has one): :mod:`.factor_update`, :mod:`.eigen_apply`, :mod:`.newton_schulz`,
:mod:`.kalman_update`, :mod:`.fused_update` (the multi-tensor masked update),
:mod:`.adam_moments` (EKFAC's masked moment step); shared tile code
in :mod:`._tiles`. Every launcher is a ``torch.library`` custom op (:mod:`._library`), so that
``torch.compile(opt.step)`` calls it without a graph break. Each op
accepts CUDA tensors, or CPU tensors when Triton's interpreter is on (TRITON_INTERPRET=1).
Importing this package registers the kernels against the op specs (:mod:`grng.ops.registry`)
and a poison hook, so that ``grng verify`` sees NaN in every output element a kernel leaves
unwritten.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from grng.ops import registry

from . import _tiles, adam_moments, eigen_apply, factor_update, fused_update, kalman_update, newton_schulz


@contextlib.contextmanager
def _nan_tile_outputs() -> Iterator[None]:
    """Within the block the kernels' fresh outputs (``_tiles.new_output``) start as NaN."""
    original = _tiles.new_output
    _tiles.new_output = registry.nan_output
    try:
        yield
    finally:
        _tiles.new_output = original


# From the repository root this folder is also importable as a top-level ``kernels`` (a probe
# such as transformers' for the hub-kernels package does that): that second copy must not
# replace the registered implementations.
if __name__ == "grng.kernels":
    registry.implement("factor_update", "triton", factor_update.factor_update, factor_update.supports)
    registry.implement("factor_update_masked", "triton", factor_update.factor_update_masked,
                       factor_update.supports_masked)
    registry.implement("eigen_apply", "triton", eigen_apply.eigen_apply, eigen_apply.supports)
    registry.implement("newton_schulz_step", "triton", newton_schulz.newton_schulz_step,
                       newton_schulz.supports)
    registry.implement("kalman_update", "triton", kalman_update.kalman_update,
                       kalman_update.supports)
    registry.implement("fused_update_masked", "triton", fused_update.fused_update_masked,
                       fused_update.supports)
    registry.implement("newton_schulz_masked", "triton", newton_schulz.newton_schulz_masked,
                       newton_schulz.supports_masked)
    registry.implement("kalman_update_masked", "triton", kalman_update.kalman_update_masked,
                       kalman_update.supports)
    registry.implement("adam_moments_masked", "triton", adam_moments.adam_moments_masked,
                       adam_moments.supports)
    registry.add_poison_hook(_nan_tile_outputs)
