"""Data-parallel (DDP) and sharded (FSDP2) support for grng's optimizers; see
docs/distributed.md.

- :func:`make_communicator`: the optimizer's communicator, local (one process), over a
  process group (:mod:`grng.distributed.communicator`), or FSDP2's when the parameters are
  DTensor row shards (:mod:`grng.distributed.sharded`); the optimizers call it and never
  branch on distributed.
- :mod:`grng.distributed.plan`: the policy of fold, refresh and directions, written once on
  the communicators' plain verbs.
- :func:`resolve_group`: which process group an optimizer communicates over (None = one process).
- :func:`refuse_sharded`: the sharded layouts that are not supported (FSDP1, 2-D meshes, ...)
  are refused at construction.
- :mod:`grng.distributed.checkpoint`: FSDP2 checkpoints with torch.distributed.checkpoint.
- :mod:`grng.distributed.comm`: the bucketed asynchronous collectives.
- :mod:`grng.distributed.assignment`: the cost-balanced layer-to-rank assignment.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist
from torch import nn

from grng.distributed.assignment import assign_layers
from grng.distributed.communicator import (STRATEGIES, Communicator, LocalCommunicator,
                                           ProcessGroupCommunicator)

__all__ = ["STRATEGIES", "Communicator", "LocalCommunicator", "ProcessGroupCommunicator",
           "assign_layers", "is_initialized", "make_communicator", "refuse_sharded",
           "resolve_group"]


def make_communicator(model: nn.Module | None, process_group: Any = None,
                      strategy: str = "comm-opt", costs: Sequence[float] = ()) -> Communicator:
    """The communicator for ``model``: over the group :func:`resolve_group` finds (``costs``:
    per Kronecker block, for the inverse assignment), else the local one."""
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed_strategy must be one of {STRATEGIES}, got {strategy!r}")
    if model is not None and _has_dtensor(model):  # FSDP2: the mesh's group, owners keep blocks
        from grng.distributed.sharded import ShardedCommunicator, shard_mesh
        mesh = shard_mesh(model)
        if process_group is not None and process_group != mesh.get_group():
            raise ValueError("process_group differs from the group of the FSDP2 mesh of the "
                             "model's parameters; leave it None")
        return ShardedCommunicator(mesh, costs, model=model)
    group = resolve_group(model, process_group)
    if group is None:
        return LocalCommunicator()
    return ProcessGroupCommunicator(group, strategy, costs, model=model)


def _dtensor_type() -> type | None:
    """DTensor if torch.distributed.tensor was imported (a DTensor can exist only then: looking
    it up in sys.modules avoids importing it, and dynamo with it, for everyone else)."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def _has_dtensor(model: nn.Module) -> bool:
    DTensor = _dtensor_type()
    return DTensor is not None and any(isinstance(p, DTensor) for p in model.parameters())


def is_initialized() -> bool:
    """torch.distributed is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def resolve_group(model: nn.Module | None, process_group: Any = None) -> Any:
    """The group to communicate over, or None for the single-process path.

    ``process_group=None`` (the default): the DDP wrapper's group when ``model`` is a
    ``DistributedDataParallel``, else the default group, and only when torch.distributed is
    initialized with more than one rank in that group. An explicit group is always used (even
    of size 1, which exercises the distributed code path).
    """
    if process_group is not None:
        if not is_initialized():
            raise ValueError("process_group was given but torch.distributed is not initialized")
        return process_group
    if not is_initialized():
        return None
    group = getattr(model, "process_group", None) if _is_ddp(model) else None
    group = group if group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def refuse_sharded(model: nn.Module, who: str = "grng", fsdp2: bool = False) -> None:
    """Raise NotImplementedError for the sharded layouts ``who`` does not support.

    Kronecker factors and preconditioners need each layer's full weight gradient and full
    layer inputs/output gradients. FSDP1's flattened FlatParameter shards are never supported
    (a shard is a slice of a flat concatenation of parameters); with ``fsdp2`` (the curvature
    optimizers) FSDP2 ``fully_shard`` models whose parameters are DTensor row shards
    (``Shard(0)``) on one 1-D mesh are (:mod:`grng.distributed.sharded`), other DTensor layouts
    (HSDP / 2-D meshes, tensor parallelism) are not. Refusing at construction is the
    documented behaviour: the result would otherwise be silently wrong.
    """
    why = None
    # a DTensor or an FSDP module can only exist if its module was imported: looking them up
    # in sys.modules avoids importing torch.distributed.tensor (and dynamo) for everyone else
    DTensor = _dtensor_type()
    fsdp_mod = sys.modules.get("torch.distributed.fsdp")
    fsdp_types: tuple[type, ...] = tuple(
        t for t in (None if fsdp2 else getattr(fsdp_mod, "FSDPModule", None),
                    getattr(fsdp_mod, "FullyShardedDataParallel", None)) if t is not None)
    for name, module in model.named_modules():
        if fsdp_types and isinstance(module, fsdp_types):
            why = f"module {name or '<root>'!r} is FSDP-wrapped ({type(module).__name__})"
            break
    if why is None and DTensor is not None:
        for name, p in model.named_parameters():
            if not (isinstance(p, DTensor) or isinstance(getattr(p, "data", None), DTensor)):
                continue
            if not fsdp2:
                why = f"parameter {name!r} is a DTensor (sharded, e.g. by fully_shard)"
                break
            from grng.distributed.sharded import shard_mesh
            try:
                shard_mesh(model)
            except NotImplementedError as err:
                why = str(err)
            break
    if why is not None:
        supported = ("FSDP2 fully_shard with Shard(0) on a 1-D mesh, or "
                     if fsdp2 else "")
        raise NotImplementedError(
            f"{who}: this FSDP / sharded layout is not supported ({why}). Kronecker factors "
            "need full weight gradients and full layer activations; with these shards the "
            f"result would be silently wrong. Use {supported}DistributedDataParallel (see "
            "docs/distributed.md).")
