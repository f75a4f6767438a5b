"""Sharded checkpoints of a curvature optimizer under FSDP2, with torch.distributed.checkpoint
(DCP; docs/distributed.md "FSDP2").

:func:`save` writes, from every rank at once (``dcp.save``):

- per parameter (``grng.param.<name>.<key>``): the momentum buffer and the diagonal
  preconditioner's state (the diagonal Fisher's D, R-Kalman's variances, EKFAC's Adam moments
  of a parameter without a block) as DTensor row shards of the parameter's global shape (0-dim
  values, the same on every rank, as plain tensors);
- per Kronecker block (``grng.block.<layer>.<key>``): its factors, inverse, covariances and
  moments, written by the block's owner only (no other rank holds them);
- ``grng.counters`` and ``grng.param_groups``: the step counters, the preconditioner's extra
  state (R-Kalman's sketch generators) and the hyperparameters of every param group.

:func:`load` reads the checkpoint's metadata, allocates what this rank will hold at its world
size (its row shards; the blocks it owns now, which may be others than the saver's) and loads
them in place (``dcp.load``), so a checkpoint written on 2 ranks resumes on 3. At the same
world size the resumed run is bit for bit the uninterrupted one.
"""
from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any, Protocol

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

__all__ = ["load", "save"]

PREFIX = "grng"


class ShardedOptimizer(Protocol):
    """What a sharded checkpoint needs of a curvature optimizer (grng.optim.base)."""

    comm: Any
    state: Any
    model: Any
    capture: Any
    block: Any
    diagonal: Any
    param_groups: list[dict[str, Any]]
    counters: Any
    _blocks: list[Any]

    def _all_params(self) -> Iterator[Tensor]: ...

    def _diagonal_unit(self, p: Tensor) -> Any: ...

    def _diagonal_params(self) -> list[Tensor]: ...

    def _extra_state(self) -> dict[str, Any]: ...

    def _load_extra_state(self, extra: dict[str, Any]) -> None: ...

    def _end_step(self) -> None: ...


def _names(opt: ShardedOptimizer) -> dict[int, str]:
    return {id(p): name for name, p in opt.model.named_parameters()}


def _as_shard(local: Tensor, p: DTensor) -> Tensor:
    """``local`` (this rank's rows of a ``p``-shaped tensor) as a DTensor row shard; a 0-dim
    value (the same on every rank) as it is."""
    if local.dim() == 0:
        return local
    return DTensor.from_local(local, p.device_mesh, [Shard(0)], run_check=False,
                              shape=p.shape, stride=p.stride())


def state_to_save(opt: ShardedOptimizer) -> dict[str, Any]:
    """The flat DCP state dict of this rank (module docstring)."""
    _require_sharded(opt)
    names = _names(opt)
    sd: dict[str, Any] = {}
    for p in opt._all_params():
        name = names[id(p)]
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            sd[f"{PREFIX}.param.{name}.momentum_buffer"] = buf
    for p in opt._diagonal_params():
        for key, t in opt._diagonal_unit(p).state.tensors().items():
            sd[f"{PREFIX}.param.{names[id(p)]}.{key}"] = _as_shard(t, p)
    for unit, layer_name in zip(opt._blocks, opt.block_set.names):
        if opt.comm.holds(unit.index):
            tensors = unit.state.tensors()
            for key, t in tensors.items():
                sd[f"{PREFIX}.block.{layer_name}.{key}"] = t
            # the memory layout too (an eigh Q is column-major): the resumed GEMMs round alike
            sd[f"{PREFIX}.layout.{layer_name}"] = _blob({k: t.stride() for k, t in tensors.items()})
    on_device = 0 if opt.counters.skipped_on_device is None else int(opt.counters.skipped_on_device)
    sd[f"{PREFIX}.counters"] = _blob({"steps": opt.counters.steps,
                                      "skipped": opt.counters.skipped,
                                      "skipped_on_device": on_device, **opt._extra_state()})
    sd[f"{PREFIX}.param_groups"] = _blob([{k: v for k, v in g.items() if k != "params"}
                                          for g in opt.param_groups])
    return sd


def _blob(obj: Any) -> io.BytesIO:
    """``obj`` as one DCP item (DCP would otherwise flatten a dict or list into keys); DCP
    saves the buffer as an object, :func:`_unblob` reads it back."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def _unblob(buf: io.BytesIO) -> Any:
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def save(opt: ShardedOptimizer, checkpoint_id: str) -> None:
    """Write ``opt``'s sharded state to the directory ``checkpoint_id`` (every rank calls it)."""
    dcp.save(state_to_save(opt), checkpoint_id=checkpoint_id)


def load(opt: ShardedOptimizer, checkpoint_id: str) -> None:
    """Restore ``opt`` from :func:`save`'s directory, at this or another world size (every rank
    calls it; the model's parameters are restored by the caller, e.g. with DCP as well)."""
    _require_sharded(opt)
    meta = dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    names = _names(opt)
    target: dict[str, Any] = {f"{PREFIX}.counters": io.BytesIO(),
                              f"{PREFIX}.param_groups": io.BytesIO()}
    per_param: dict[str, tuple[Tensor, str]] = {}
    for p in opt._all_params():
        base = f"{PREFIX}.param.{names[id(p)]}."
        for key in [k for k in meta if k.startswith(base)]:
            size, dtype = tuple(meta[key].size), meta[key].properties.dtype
            if len(size) == 0:
                target[key] = torch.zeros((), dtype=dtype, device=p.device)
            else:
                local = opt.comm.local(p)
                rows = (local.shape[0], *size[1:])
                target[key] = _as_shard(torch.zeros(rows, dtype=dtype, device=p.device), p)
            per_param[key] = (p, key[len(base):])
    per_block: dict[str, tuple[Any, str]] = {}
    for unit, layer_name in zip(opt._blocks, opt.block_set.names):
        if not opt.comm.holds(unit.index):
            continue
        base = f"{PREFIX}.block.{layer_name}."
        for key in [k for k in meta if k.startswith(base)]:
            target[key] = torch.zeros(tuple(meta[key].size), dtype=meta[key].properties.dtype,
                                      device=unit.like.device)
            per_block[key] = (unit, key[len(base):])
        if f"{PREFIX}.layout.{layer_name}" in meta:
            target[f"{PREFIX}.layout.{layer_name}"] = io.BytesIO()
    dcp.load(target, checkpoint_id=checkpoint_id)
    diagonal: dict[int, dict[str, Tensor]] = {}
    for key, (p, name) in per_param.items():
        value = target[key]
        if name == "momentum_buffer":
            opt.state[p]["momentum_buffer"] = value
        else:
            diagonal.setdefault(id(p), {})[name] = opt.comm.local(value)
    for p in opt._diagonal_params():
        opt.diagonal.load(opt._diagonal_unit(p), diagonal.get(id(p), {}))
    blocks: dict[int, dict[str, Tensor]] = {}
    layouts = {u.index: _unblob(target[f"{PREFIX}.layout.{n}"]) for u, n in
               zip(opt._blocks, opt.block_set.names) if f"{PREFIX}.layout.{n}" in target}
    for key, (unit, name) in per_block.items():
        value = target[key]
        stride = layouts.get(unit.index, {}).get(name)
        if stride is not None and tuple(stride) != value.stride():
            value = torch.empty_strided(value.shape, stride, dtype=value.dtype,
                                        device=value.device).copy_(value)
        blocks.setdefault(unit.index, {})[name] = value
    for unit in opt._blocks:
        if opt.comm.holds(unit.index):
            opt.block.load(unit, blocks.get(unit.index, {}))
    for group, saved in zip(opt.param_groups, _unblob(target[f"{PREFIX}.param_groups"])):
        group.update(saved)
    counters = _unblob(target[f"{PREFIX}.counters"])
    opt.counters.steps = int(counters["steps"])
    opt.counters.skipped = int(counters["skipped"])
    on_device = int(counters.get("skipped_on_device", 0))
    opt.counters.skipped_on_device = torch.tensor(on_device) if on_device else None
    opt._load_extra_state(counters)
    opt._end_step()


def _require_sharded(opt: ShardedOptimizer) -> None:
    if not getattr(opt.comm, "shards_parameters", False):
        raise ValueError("grng.distributed.checkpoint is for optimizers of FSDP2 (fully_shard) "
                         "models; use opt.state_dict() / load_state_dict() otherwise")
