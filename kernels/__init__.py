"""Triton kernels of grng, registered as the ``triton`` backend of :mod:`grng.ops`.

One module per op (kernel(s) and launcher): :mod:`.factor_update`, :mod:`.eigen_apply`,
:mod:`.newton_schulz`, :mod:`.kalman_update`; shared tile code in :mod:`._tiles`. Each op
accepts CUDA tensors, or CPU tensors when Triton's interpreter is on (TRITON_INTERPRET=1).
"""
from __future__ import annotations

from grng.ops.dispatch import register

from . import eigen_apply, factor_update, kalman_update, newton_schulz

register("factor_update", "triton", factor_update.factor_update, factor_update.supports)
register("eigen_apply", "triton", eigen_apply.eigen_apply, eigen_apply.supports)
register("newton_schulz_step", "triton", newton_schulz.newton_schulz_step, newton_schulz.supports)
register("kalman_update", "triton", kalman_update.kalman_update, kalman_update.supports)
