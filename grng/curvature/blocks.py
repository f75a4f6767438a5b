"""Blocks and the block source: which Kronecker blocks a model has, found once when an optimizer
is built and kept apart from how their calls are observed (:mod:`grng.curvature.capture`).

A block (:class:`Block`, what the step, the preconditioners and the communicators ask of it) is
its parameters, sizes (d_G, d_A), factor structures and gradient-to-matrix map (``to_matrix`` /
``split``, laid out as its ``dim0`` says); a layer helper instance (:mod:`grng.curvature.layers`)
is one, and also knows how its module's calls are observed (``attach``, ``layer_input``,
``a_rows``, ``g_rows``), which only the capture asks. The source here is the model's modules: each module's registered helper
builds its blocks (as :class:`grng.curvature.options.BlockOptions` say), a parameter shared by
several modules (tied weights) belongs to the first block that covers it, and with ``keep`` only
blocks whose parameters are all optimized are built. Under FSDP2 the same blocks are built on
the DTensor parameters; the communicator gathers their gradient matrices
(:mod:`grng.distributed.sharded`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor, nn

from grng.curvature import attention  # noqa: F401  (registers nn.MultiheadAttention's helper)
from grng.curvature import recurrent  # noqa: F401  (registers nn.LSTM, nn.GRU, nn.RNN helpers)
from grng.curvature.factors import FactorStructure
from grng.curvature.layers import KroneckerLayer, make_layers
from grng.curvature.options import BlockOptions

__all__ = ["Block", "BlockSet", "find_blocks"]


class Block(Protocol):
    """One Kronecker block F ~ A (x) G on [W b], as everything outside its observation sees it
    (``tests/test_architecture.py`` checks that the optimizers, preconditioners and
    communicators ask nothing else of a layer)."""

    #: the parameters the block covers ([W] or [W, b]; a weight-normed layer's [v, g, b])
    params: list[Tensor]
    #: the tensor laid out as the module's weight (its device and dtype place the state)
    weight: Tensor
    #: which Kronecker side the weight's dim 0 is ("G" or "A")
    dim0: str

    @property
    def a_factor(self) -> FactorStructure:
        """The structure of A (size d_A)."""

    @property
    def g_factor(self) -> FactorStructure:
        """The structure of G (size d_G)."""

    def dims(self) -> tuple[int, int]:
        """(d_G, d_A)."""

    def matrix_shape(self) -> tuple[int, ...]:
        """The gradient matrix's shape: (d_G, d_A), or (groups, d_G / groups, d_A / groups)."""

    def grad_matrix(self) -> Tensor | None:
        """The gradient as the gradient matrix (None without a gradient)."""

    def to_matrix(self, tensors: list[Tensor | None]) -> Tensor | None:
        """Tensors shaped as :attr:`params` laid out as the gradient matrix."""

    def split(self, mat: Tensor) -> list[Tensor]:
        """The gradient matrix back to tensors shaped as :attr:`params`."""

    def cost(self) -> float:
        """The factorization cost estimate (owner assignment across ranks)."""


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
