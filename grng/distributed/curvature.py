"""The data-parallel curvature path of :class:`grng.optim.base.CurvatureOptimizer`.

Created only when the optimizer resolved a process group; a single-process optimizer never
touches this module. Per step, on every rank, in the same order:

1. factors (K-FAC / RING / RENG): each rank forms its batch Gram matrices
   S_r = s_r^2 X_r^T X_r (``ops.factor_update(M_batch, X, s^2, 0)``) and row counts n_r;
   :class:`~grng.distributed.comm.FactorReducer` all-reduces [n_r, triu(S_r)] in buckets
   (asynchronously, each bucket launched as soon as it is full); the global batch factor is
   sum_r S_r / sum_r n_r -- exactly the factor one process computes on the concatenated global
   batch, because the per-example output gradient e = n_r g_hat_r = dl/ds does not depend on
   how the batch is split (DDP averages the per-rank mean losses: with equal local batches
   that is the mean loss over the global batch). Then M <- beta M + (1 - beta) M_global
   (first update sets). A rank without rows sends zeros and a count of 0; a factor with a
   global count of 0 is not updated (on every rank alike).
2. inverses (K-FAC family): each layer has an owner rank (cost-balanced, see
   :mod:`~grng.distributed.assignment`); only the owner factorizes. ``comm-opt``: the owners
   broadcast the inverse representation (eigen: Q and l; newton/cholesky: the upper triangle
   of the symmetric inverses), every rank preconditions every layer. ``mem-opt``: the owner
   keeps its inverses, preconditions its layers and broadcasts the directions (one
   d_G x d_A block per layer per step); the other ranks never hold those inverses.
3. R-Kalman: the observation rows must be the global batch's. Counts (rows, examples) of every
   factor are all-gathered first; a factor whose global row count exceeds ``kalman_rank`` is
   sketched with an Omega (k x m_global) drawn identically on every rank from the optimizer's
   seeded generator (the same draws as one process), so H = Omega E_global = sum_r Omega_r E_r
   travels as one k x d all-reduce; smaller factors all-gather their (padded) rows. Every rank
   then performs the identical Kalman update.

Parameters without a Kronecker block (diagonal Fisher) use the DDP-averaged gradient, which is
already global: no communication.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from grng import ops
from grng.distributed.assignment import assign_layers, layer_cost
from grng.distributed.comm import FactorReducer, Piece, broadcast_packed

if TYPE_CHECKING:
    from grng.optim.base import CurvatureOptimizer


class DistributedCurvature:
    """Per-optimizer distributed state: group, rank, layer owners, strategy, reducer."""

    def __init__(self, opt: CurvatureOptimizer, group, strategy: str,
                 bucket_cap_mb: float = 25.0) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.strategy = strategy
        self.costs = [layer_cost(*layer.dims(), layer.diagonal_a) for layer in opt.layers]
        self.owner = assign_layers(self.costs, self.world_size)
        self.reducer = FactorReducer(group, bucket_cap_mb)
        self._refreshed: set[int] = set()

    def all_true(self, ok: bool) -> bool:
        """True on every rank iff ``ok`` on every rank (one tiny all-reduce)."""
        flag = torch.tensor([0.0 if ok else 1.0])
        if dist.get_backend(self.group) == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, group=self.group)
        return float(flag) == 0.0

    # ----------------------------------------------------------------------- factors
    def update_factors(self, opt: CurvatureOptimizer, factors_due: bool) -> None:
        """Step 1 of the module docstring (and the local diagonal-Fisher EMA)."""
        if not factors_due:
            return
        beta = opt.factor_decay
        plan = []  # (st, key, slot)
        for layer in opt.layers:
            captured = opt.capture.rows(layer)
            st = opt.layer_state(layer)
            dtype = opt._factor_dtype(layer.weight)
            device = layer.weight.device
            d_g, d_a = layer.dims()
            a_rows, g_rows = captured if captured is not None else (None, None)
            if layer.diagonal_a:
                counts = None
                if a_rows is not None:  # diag(A) * n = token counts
                    counts = torch.bincount(a_rows.X, minlength=d_a).to(dtype)
                slot = self.reducer.add(Piece("vec", (d_a,), True), counts,
                                        0.0 if a_rows is None else a_rows.n, dtype, device)
            else:
                slot = self.reducer.add(Piece("sym", (d_a, d_a), True), _gram(a_rows, d_a, dtype, device, opt.backend),
                                        0.0 if a_rows is None else a_rows.n, dtype, device)
            plan.append((st, "A", slot))
            slot = self.reducer.add(Piece("sym", (d_g, d_g), True), _gram(g_rows, d_g, dtype, device, opt.backend),
                                    0.0 if g_rows is None else g_rows.n, dtype, device)
            plan.append((st, "G", slot))
        results = self.reducer.finish()
        for st, key, slot in plan:
            total, n = results[slot]
            if n <= 0:
                continue
            M = total.div_(n)
            if key not in st:
                st[key] = M
            else:
                st[key].mul_(beta).add_(M, alpha=1.0 - beta)
        for p in opt._diagonal_params():
            if p.grad is not None:
                opt._ema(opt.state[p], "D", p.grad.to(opt._factor_dtype(p)).square(), beta)

    # ---------------------------------------------------------------------- inverses
    def refresh_inverses(self, opt, due: bool) -> None:
        """Step 2: the owner of each due layer refreshes its inverse; comm-opt broadcasts it."""
        group_of = opt._group_index()
        entries = []  # (owner, piece, value on the owner, (st, key))
        for i, layer in enumerate(opt.layers):
            st = opt.layer_state(layer)
            if "A" not in st or "G" not in st:
                continue  # the same on every rank: factors are global
            never = (not opt.inverse.ready(st)) if self.strategy == "comm-opt" else (i not in self._refreshed)
            if not (due or never):
                continue
            self._refreshed.add(i)
            q = self.owner[i]
            if q == self.rank:
                damping = opt.param_groups[group_of[id(layer.weight)]]["damping"]
                opt.inverse.refresh(st, damping, opt.backend)
            if self.strategy != "comm-opt":
                continue
            for key, piece in _inverse_pieces(opt.inverse.name, layer):
                entries.append((q, piece, st.get(key) if q == self.rank else None, (st, key),
                                st["G"].dtype, st["G"].device))
        # the owner too takes the unpacked copy: the same memory layout (an eigh Q is
        # column-major) makes every rank's later GEMMs round identically
        for (st, key), v in self._exchange(entries):
            st[key] = v

    def directions(self, opt) -> dict[int, Tensor] | None:
        """mem-opt: owners precondition their layers and broadcast the directions (None for
        comm-opt: every rank preconditions every layer itself)."""
        if self.strategy == "comm-opt":
            return None
        group_of = opt._group_index()
        entries = []
        for i, layer in enumerate(opt.layers):
            d_g, d_a = layer.dims()
            dtype = opt._factor_dtype(layer.weight)
            device = layer.weight.device
            q = self.owner[i]
            D = None
            if q == self.rank:
                V = layer.grad_matrix()
                flag = 0.0
                if V is not None:
                    group = opt.param_groups[group_of[id(layer.weight)]]
                    D = opt._precondition_layer(layer, opt.layer_state(layer), V, group).to(dtype)
                    flag = 1.0
                D = torch.cat([D.reshape(-1) if D is not None else torch.zeros(d_g * d_a, dtype=dtype, device=device),
                               torch.full((1,), flag, dtype=dtype, device=device)])
            # a fixed layout: every layer, d_G*d_A entries plus a "has a gradient" flag
            entries.append((q, Piece("full", (d_g * d_a + 1,)), D, layer, dtype, device))
        out: dict[int, Tensor] = {}
        for layer, v in self._exchange(entries):
            if float(v[-1]) == 0.0:
                continue
            d_g, d_a = layer.dims()
            opt._put_layer_direction(layer, v[:-1].view(d_g, d_a), out)
        opt._put_diagonal_directions(out, group_of)
        return out

    def _exchange(self, entries) -> list[tuple[object, Tensor]]:
        """Broadcast each entry's value from its owner: one packed asynchronous broadcast per
        (dtype, device) and owner rank. Entries: (owner, piece, value or None, target, dtype,
        device); returns (target, value) for every entry, on every rank."""
        groups: dict[tuple[torch.dtype, torch.device], list] = {}
        for e in entries:
            groups.setdefault((e[4], torch.device(e[5])), []).append(e)
        out = []
        for (dtype, device) in sorted(groups, key=lambda k: (str(k[0]), str(k[1]))):
            es = groups[(dtype, device)]
            per_source = [[(e[1], e[2]) for e in es if e[0] == q] for q in range(self.world_size)]
            received = broadcast_packed(self.group, self.rank, per_source, dtype, device)
            for q in range(self.world_size):
                out.extend(zip([e[3] for e in es if e[0] == q], received[q]))
        return out

    def forget_refreshes(self) -> None:
        """After loading a checkpoint: mem-opt refreshes every inverse at the next step."""
        self._refreshed.clear()

    # ----------------------------------------------------------------------- R-Kalman
    def kalman_update(self, opt, factors_due: bool) -> None:
        """Step 3 of the module docstring, then the local diagonal updates."""
        if not factors_due:
            return
        beta = opt.factor_decay
        layers = opt.layers
        local = []  # per layer: (a_rows, g_rows) or (None, None)
        for layer in layers:
            captured = opt.capture.rows(layer)
            local.append(captured if captured is not None else (None, None))
        # (a) counts: per factor (rows m, examples n), all-gathered
        counts = torch.zeros(len(layers), 2, 2, dtype=torch.int64)
        for i, (a_rows, g_rows) in enumerate(local):
            for j, rows in enumerate((a_rows, g_rows)):
                if rows is not None:
                    counts[i, j, 0] = rows.X.shape[0]
                    counts[i, j, 1] = rows.n
        counts = _on_comm_device(counts, self.group)
        gathered = [torch.empty_like(counts) for _ in range(self.world_size)]
        dist.all_gather(gathered, counts, group=self.group)
        allc = torch.stack([g.cpu() for g in gathered])  # (R, L, 2, 2)
        # (b) sketched factors: all-reduce Omega_r E_r; small ones: all-gather padded rows
        reducer = self.reducer
        plan = []  # per layer: None (skip) or list of (key, kind, slot/info, n_total)
        gather_parts: list[tuple] = []  # (max rows, d, layer, factor, E or None, dtype)
        for i, layer in enumerate(layers):
            n_g = int(allc[:, i, 1, 1].sum())
            if n_g == 0 and int(allc[:, i, 0, 1].sum()) == 0:
                plan.append(None)
                continue
            st = opt.layer_state(layer)
            opt._init_covariances(layer, st)
            entries = []
            for j, (key, rows) in enumerate((("PA", local[i][0]), ("PG", local[i][1]))):
                P = st[key]
                m_r = allc[:, i, j, 0].tolist()
                n_total = int(allc[:, i, j, 1].sum())
                if n_total == 0:
                    continue
                if key == "PA" and layer.diagonal_a:
                    d_a = P.shape[0]
                    cnt = None if rows is None else torch.bincount(rows.X, minlength=d_a).to(P.dtype)
                    slot = reducer.add(Piece("vec", (d_a,)), cnt, 0.0, P.dtype, P.device)
                    entries.append((key, "diag", slot, n_total))
                    continue
                d = P.shape[0]
                E = None if rows is None else rows.X.to(P.dtype) * rows.scale  # e rows
                m_total = sum(m_r)
                if m_total > opt.kalman_rank:
                    omega = opt._sketch(m_total, P)  # the same draws on every rank
                    off = sum(m_r[:self.rank])
                    H_r = None if E is None else omega[:, off:off + E.shape[0]] @ E
                    slot = reducer.add(Piece("full", (opt.kalman_rank, d)), H_r, 0.0, P.dtype, P.device)
                    entries.append((key, "sketch", slot, n_total))
                else:
                    entries.append((key, "rows", len(gather_parts), n_total))
                    gather_parts.append((max(m_r), d, i, j, E, P.dtype))
            plan.append(entries)
        gathered_rows = self._gather_rows(gather_parts, allc)
        reduced = reducer.finish()
        # (c) identical updates on every rank, in layer order
        for layer, entries in zip(layers, plan):
            if entries is None:
                continue
            st = opt.layer_state(layer)
            for key, kind, ref, n_total in entries:
                if kind == "diag":
                    opt._diagonal_update(st, key, reduced[ref][0].div_(n_total))
                elif kind == "sketch":
                    opt._kalman_apply(st, key, reduced[ref][0], n_total / (1.0 - beta))
                else:
                    opt._kalman_apply(st, key, gathered_rows[ref], n_total / (1.0 - beta))
        opt._update_diagonal_params()

    def _gather_rows(self, parts, allc) -> list[Tensor]:
        """All-gather each factor's rows (padded to the largest rank's count), one call per
        dtype; returns the global rows in rank order (rank 0's, then rank 1's, ...)."""
        out: list[Tensor | None] = [None] * len(parts)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for idx, part in enumerate(parts):
            by_dtype.setdefault(part[5], []).append(idx)
        for dtype in sorted(by_dtype, key=str):
            idxs = by_dtype[dtype]
            device = next((parts[k][4].device for k in idxs if parts[k][4] is not None), None)
            device = device if device is not None else torch.device("cpu")
            segs = []
            for idx in idxs:
                mmax, d, _, _, E, _ = parts[idx]
                seg = torch.zeros(mmax, d, dtype=dtype, device=device)
                if E is not None:
                    seg[:E.shape[0]] = E
                segs.append(seg.reshape(-1))
            flat = _on_comm_device(torch.cat(segs), self.group)
            bufs = [torch.empty_like(flat) for _ in range(self.world_size)]
            dist.all_gather(bufs, flat, group=self.group, async_op=True).wait()
            for idx in idxs:
                blocks = []
                mmax, d, i, j, _, _ = parts[idx]
                offset = sum(parts[k][0] * parts[k][1] for k in idxs[:idxs.index(idx)])
                for r, buf in enumerate(bufs):
                    m_r = int(allc[r, i, j, 0])
                    blocks.append(buf[offset:offset + mmax * d].view(mmax, d)[:m_r])
                out[idx] = torch.cat(blocks)
        return out  # type: ignore[return-value]


def _gram(rows, d: int, dtype: torch.dtype, device: torch.device, backend: str) -> Tensor | None:
    """s^2 X^T X (this rank's unnormalized batch factor), or None without rows."""
    if rows is None:
        return None
    M = torch.empty(d, d, dtype=dtype, device=device)
    ops.factor_update(M, rows.X, rows.scale ** 2, 0.0, backend=backend)
    return M


def _inverse_pieces(name: str, layer) -> list[tuple[str, Piece]]:
    """The state keys (and how they travel) of an inverse representation."""
    d_g, d_a = layer.dims()
    if name == "eigen":
        pieces = [("lG", Piece("vec", (d_g,))), ("QG", Piece("full", (d_g, d_g))),
                  ("lA", Piece("vec", (d_a,)))]
        if not layer.diagonal_a:
            pieces.append(("QA", Piece("full", (d_a, d_a))))
        return pieces
    return [("XG", Piece("sym", (d_g, d_g))),
            ("XA", Piece("vec", (d_a,)) if layer.diagonal_a else Piece("sym", (d_a, d_a)))]


def _on_comm_device(t: Tensor, group) -> Tensor:
    """NCCL needs CUDA tensors; gloo takes CPU ones (the counts are built on the CPU)."""
    backend = dist.get_backend(group)
    if backend == "nccl" and not t.is_cuda:
        return t.cuda()
    return t
