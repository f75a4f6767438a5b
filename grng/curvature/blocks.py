"""The block source: which Kronecker blocks a model has, found once when an optimizer is built
and kept apart from how their calls are observed (:mod:`grng.curvature.capture`).

A block is one layer helper instance (:mod:`grng.curvature.layers`): its parameters, sizes
(d_G, d_A), factor structures and gradient-to-matrix map (``to_matrix`` / ``split``, laid out
as its ``dim0`` says). The source here is the model's modules: each module's registered helper
builds its blocks (as :class:`grng.curvature.options.BlockOptions` say), a parameter shared by
several modules (tied weights) belongs to the first block that covers it, and with ``keep`` only
blocks whose parameters are all optimized are built. Under FSDP2 the same blocks are built on
the DTensor parameters; the communicator gathers their gradient matrices
(:mod:`grng.distributed.sharded`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from grng.curvature import attention  # noqa: F401  (registers nn.MultiheadAttention's helper)
from grng.curvature import recurrent  # noqa: F401  (registers nn.LSTM and nn.GRU helpers)
from grng.curvature.layers import KroneckerLayer, make_layers
from grng.curvature.options import BlockOptions

__all__ = ["BlockSet", "find_blocks"]


@dataclass
class BlockSet:
    """A model's blocks in model order: ``layers`` (the helpers) and their ``names``; the
    ``modules`` whose calls produce their rows, each with its blocks (what an observer attaches
    to); ``skipped``: the name of each module a helper could not cover (or whose parameters
    another block covers already) -> why."""

    layers: list[KroneckerLayer] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    modules: list[tuple[nn.Module, list[KroneckerLayer]]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def find_blocks(model: nn.Module, keep: set[int] | None = None,
                options: BlockOptions = BlockOptions()) -> BlockSet:
    """The blocks of ``model``'s supported modules, built as ``options`` say; with ``keep`` (a
    set of parameter ids) only those whose parameters are all in it."""
    found = BlockSet()
    claimed: dict[int, str] = {}  # parameter id -> name of the block that covers it
    for name, module in model.named_modules():
        blocks, reason = make_layers(module, options)
        if reason is not None:
            found.skipped[name] = reason
        mine = []
        for block in blocks:
            block_name = f"{name}{block.suffix}" if name else block.suffix.lstrip(".")
            owner_name = next((claimed[id(p)] for p in block.params if id(p) in claimed), None)
            if owner_name is not None:
                if owner_name != block_name:  # attention's out_proj is claimed by its parent
                    found.skipped[block_name] = (f"tied to {owner_name!r}, whose calls alone "
                                                 "are captured")
                continue
            if keep is not None and not all(id(p) in keep for p in block.params):
                continue
            claimed.update((id(p), block_name) for p in block.params)
            mine.append(block)
            found.layers.append(block)
            found.names.append(block_name)
        if mine:
            found.modules.append((module, mine))
    return found
