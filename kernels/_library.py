"""The Triton launchers as ``torch.library`` custom ops, so that a compiled step can call them.

``torch.compile`` cannot trace into a Triton launcher (autotuning, host-side grids, Python
loops over launches): a plain call is a graph break, or an error under ``fullgraph=True``.
Each launcher is therefore wrapped as the custom op ``grng_triton::<name>`` with a fake
(meta) implementation that only says the shapes and dtypes of its outputs; dynamo then puts
one opaque node in the graph, and the launcher runs when the graph runs. The registry's
``triton`` implementations call these ops (``torch.ops.grng_triton.<name>``), eagerly and
compiled alike.

Custom ops may not return an input: an in-place launcher's op returns nothing (or a fresh
flag), and the Python wrapper that the dispatch calls returns the mutated argument.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

NAMESPACE = "grng_triton"


def triton_op(name: str, mutates_args: Iterable[str], fake: Callable,
              tags: tuple[torch.Tag, ...] = ()) -> Callable[[Callable], object]:
    """Decorator: ``fn`` registered as the custom op ``grng_triton::name`` (its schema inferred
    from ``fn``'s type hints, ``mutates_args`` the arguments it writes, ``tags`` e.g.
    ``torch.Tag.cudagraph_unsafe``), with ``fake`` as its fake implementation; returns the op
    (``torch.ops.grng_triton.name``).

    When the op exists already (this package imported a second time under another name, e.g.
    as a top-level ``kernels``), the existing op is returned and nothing is registered again.
    """
    def register(fn: Callable) -> object:
        if hasattr(getattr(torch.ops, NAMESPACE), name):
            return getattr(getattr(torch.ops, NAMESPACE), name)
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=tuple(mutates_args),
                                     tags=tags)
        op.register_fake(fake)
        return getattr(getattr(torch.ops, NAMESPACE), name)
    return register
