"""Collectives of grng's data-parallel path: bucketed, asynchronous, upper triangle only.

Every function here issues the same collectives, in the same order and with the same sizes,
on every rank, whatever each rank's local data: a layer that saw no rows on a rank contributes
zeros and a count of 0. Nothing here depends on a rank's batch except tensor contents.

- :class:`FactorReducer`: sums symmetric matrices (only the d(d+1)/2 upper-triangle entries
  travel), vectors and dense blocks, each optionally preceded by a count, packed into flat
  buckets of at most ``bucket_cap_mb``; each full bucket is launched at once with
  ``all_reduce(async_op=True)`` so that packing the next one overlaps the transfer; results
  are unpacked after waiting on the handles, in the order they were added.
- :func:`broadcast_packed`: per source rank, one flat tensor holding many symmetric (upper
  triangle), dense or vector pieces, broadcast asynchronously; the receivers unpack.
- :func:`allreduce_mean`: the gradient average of a list of tensors (None = zero) plus a
  "used anywhere" flag per tensor, in one all_reduce per dtype.
- :func:`gather_rows` / :func:`scatter_rows`: one equal-sized flat tensor per rank gathered to,
  or scattered from, one rank (FSDP2's row shards to and from a block's owner); a
  :class:`FactorReducer` with ``dst`` reduces to one rank instead of all-reducing.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from grng.curvature.pieces import Piece
from grng.ops.reference import symmetrize_from_upper

__all__ = ["FactorReducer", "allreduce_mean", "broadcast_packed", "gather_rows", "global_rank",
           "pack", "scatter_rows", "unpack"]

_TRIU: dict[tuple[int, torch.device], Tensor] = {}


def triu_index(d: int, device: torch.device) -> Tensor:
    """Flat indices of the upper triangle (row-major) of a d x d matrix (cached)."""
    key = (d, torch.device(device))
    if key not in _TRIU:
        iu = torch.triu_indices(d, d, device=device)
        _TRIU[key] = iu[0] * d + iu[1]
    return _TRIU[key]


def pack(piece: Piece, value: Tensor | None, count: float, dtype: torch.dtype,
         device: torch.device) -> Tensor:
    """The flat segment of one piece (zeros when ``value`` is None)."""
    if value is None:
        seg = torch.zeros(piece.numel, dtype=dtype, device=device)
        if piece.counted:
            seg[0] = count
        return seg
    v = value.to(dtype)
    body = (v.reshape(-1).index_select(0, triu_index(piece.shape[0], v.device))
            if piece.kind == "sym" else v.reshape(-1))
    if not piece.counted:
        return body
    return torch.cat([body.new_full((1,), float(count)), body])


def unpack(piece: Piece, seg: Tensor) -> tuple[Tensor, float]:
    """(value, count) of one segment; a "sym" piece comes back exactly symmetric."""
    count = float(seg[0]) if piece.counted else 0.0
    body = seg[1:] if piece.counted else seg
    if piece.kind == "sym":
        d = piece.shape[0]
        M = body.new_zeros(d * d)
        M.index_copy_(0, triu_index(d, body.device), body)
        return symmetrize_from_upper(M.view(d, d)), count
    return body.reshape(piece.shape).clone(), count


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class _Bucket:
    dtype: torch.dtype
    device: torch.device
    slots: list[int] = field(default_factory=list)
    pieces: list[Piece] = field(default_factory=list)
    segments: list[Tensor] = field(default_factory=list)
    numel: int = 0
    flat: Tensor | None = None
    work: object = None


class FactorReducer:
    """Bucketed asynchronous SUM all-reduce of counted factors (see the module docstring), or
    SUM reduce to the group rank ``dst`` only (the other ranks get None: they keep nothing).

    ``add`` returns a slot; ``finish`` waits on every handle and returns ``(tensor, count)`` per
    slot, in slot order. One reducer can be reused: ``finish`` resets it.
    """

    def __init__(self, group: dist.ProcessGroup | None, bucket_cap_mb: float = 25.0,
                 dst: int | None = None) -> None:
        self.group = group
        self.dst = dst
        self.receives = dst is None or dist.get_rank(group) == dst
        self.cap_bytes = max(1, int(bucket_cap_mb * 2 ** 20))
        self._open: dict[tuple[torch.dtype, torch.device], _Bucket] = {}
        self._launched: list[_Bucket] = []
        self._slots = 0

    def add(self, piece: Piece, value: Tensor | None, count: float, dtype: torch.dtype,
            device: torch.device) -> int:
        """Queue one piece (None = this rank has nothing: zeros and count 0 are sent)."""
        key = (dtype, torch.device(device))
        bucket = self._open.get(key)
        if bucket is None:
            bucket = self._open[key] = _Bucket(dtype, torch.device(device))
        slot = self._slots
        self._slots += 1
        bucket.slots.append(slot)
        bucket.pieces.append(piece)
        bucket.segments.append(pack(piece, value, count, dtype, device))
        bucket.numel += piece.numel
        if bucket.numel * bucket.segments[-1].element_size() >= self.cap_bytes:
            self._launch(key)
        return slot

    def _launch(self, key: tuple[torch.dtype, torch.device]) -> None:
        bucket = self._open.pop(key)
        bucket.flat = torch.cat(bucket.segments)
        bucket.segments = []
        if self.dst is None:
            bucket.work = dist.all_reduce(bucket.flat, group=self.group, async_op=True)
        else:
            bucket.work = dist.reduce(bucket.flat, dst=global_rank(self.group, self.dst),
                                      group=self.group, async_op=True)
        self._launched.append(bucket)

    def finish(self) -> list[tuple[Tensor, float]]:
        """Launch what is still open, wait on every handle, unpack (slot order)."""
        for key in sorted(self._open, key=lambda k: (str(k[0]), str(k[1]))):
            self._launch(key)
        out: list[tuple[Tensor, float] | None] = [None] * self._slots
        for bucket in self._launched:
            bucket.work.wait()
            if not self.receives:
                continue
            offset = 0
            for slot, piece in zip(bucket.slots, bucket.pieces):
                out[slot] = unpack(piece, bucket.flat[offset:offset + piece.numel])
                offset += piece.numel
        self._launched = []
        self._slots = 0
        return out  # type: ignore[return-value]


def global_rank(group: dist.ProcessGroup | None, q: int) -> int:
    """The global rank of group rank ``q`` (what ``src`` / ``dst`` of a collective take)."""
    return dist.get_global_rank(group, q) if group is not None and group != dist.group.WORLD else q


def gather_rows(group: dist.ProcessGroup | None, dst: int, flat: Tensor, world_size: int
                ) -> list[Tensor] | None:
    """Gather each rank's equal-sized ``flat`` to group rank ``dst`` (one call): the list in
    rank order on ``dst``, None elsewhere."""
    mine = dist.get_rank(group) == dst
    bufs = [torch.empty_like(flat) for _ in range(world_size)] if mine else None
    dist.gather(flat, bufs, dst=global_rank(group, dst), group=group)
    return bufs


def scatter_rows(group: dist.ProcessGroup | None, src: int, parts: list[Tensor] | None,
                 like: Tensor) -> Tensor:
    """Scatter ``parts[r]`` (given on group rank ``src``, equal-sized like ``like``) to rank r."""
    out = torch.empty_like(like)
    mine = dist.get_rank(group) == src
    dist.scatter(out, parts if mine else None, src=global_rank(group, src), group=group)
    return out


def broadcast_packed(group: dist.ProcessGroup | None, rank: int,
                     per_source: Sequence[Sequence[tuple[Piece, Tensor | None]]],
                     dtype: torch.dtype, device: torch.device) -> list[list[Tensor]]:
    """Broadcast, from every group rank q, the pieces ``per_source[q]`` (values needed on q only).

    One asynchronous broadcast per source rank with a non-empty list (all launched before any
    wait). Returns, per source, the received values (the source gets its own values back as
    unpacked copies, so every rank ends with bit-identical tensors).
    """
    works, flats = [], []
    for q, pieces in enumerate(per_source):
        if not pieces:
            flats.append(None)
            works.append(None)
            continue
        if q == rank:
            flat = torch.cat([pack(p, v, 0.0, dtype, device) for p, v in pieces])
        else:
            flat = torch.empty(sum(p.numel for p, _ in pieces), dtype=dtype, device=device)
        src = global_rank(group, q)
        works.append(dist.broadcast(flat, src=src, group=group, async_op=True))
        flats.append(flat)
    out: list[list[Tensor]] = []
    for pieces, flat, work in zip(per_source, flats, works):
        if work is None:
            out.append([])
            continue
        work.wait()
        vals, offset = [], 0
        for p, _ in pieces:
            vals.append(unpack(p, flat[offset:offset + p.numel])[0])
            offset += p.numel
        out.append(vals)
    return out


def allreduce_mean(tensors: Sequence[Tensor | None], likes: Sequence[Tensor],
                   group: dist.ProcessGroup | None, world_size: int) -> list[Tensor | None]:
    """Mean over ranks of each tensor (a None counts as zeros, as DDP does for a locally unused
    parameter); None where the tensor was None on every rank. One all_reduce per dtype."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, like in enumerate(likes):
        by_dtype.setdefault(like.dtype, []).append(i)
    result: list[Tensor | None] = [None] * len(likes)
    pending = []
    for dtype, idx in by_dtype.items():
        device = likes[idx[0]].device
        parts = [torch.tensor([0.0 if tensors[i] is None else 1.0 for i in idx], dtype=dtype,
                              device=device)]
        for i in idx:
            t = tensors[i]
            parts.append(torch.zeros(likes[i].numel(), dtype=dtype, device=device) if t is None
                         else t.detach().reshape(-1).to(dtype))
        flat = torch.cat(parts)
        pending.append((idx, flat, dist.all_reduce(flat, group=group, async_op=True)))
    for idx, flat, work in pending:
        work.wait()
        flags = flat[:len(idx)]
        offset = len(idx)
        for j, i in enumerate(idx):
            n = likes[i].numel()
            if float(flags[j]) > 0:
                result[i] = flat[offset:offset + n].view_as(likes[i]).div_(world_size)
            offset += n
    return result
