"""R-Kalman's observations of the global batch, planned by the Kalman preconditioner and carried
by the communicator's plain verbs (``all_gather``, ``reduce_sum``, ``all_gather_rows``; the
identity in one process), docs/distributed.md "R-Kalman observations".

Per covariance factor P with rows X_r (m_r rows, n_r examples, scale s_r) on rank r:

- a diagonal P observes diag(M_batch) = sum_r s_r^2 sum_rows x * x / sum_r n_r (summed to all);
- a dense P observes H with noise r = n / ((1 - beta) s^2): the rows relative to a common scale
  s (the first rank with rows), E_r = (s_r / s) X_r (X_r itself where s_r = s, as in one
  process), sketched H = sum_r Omega_r E_r (Omega = the k x m shared-seed sketch, cut per rank)
  when the global rows m exceed ``kalman_rank``, else H = the rows of every rank, gathered.
  (H / c, r / c^2) gives the same update as (H, r), so the choice of s changes only rounding.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from grng.curvature.pieces import Piece
from grng.distributed.communicator import Communicator
from grng.distributed.plan import TensorSum

__all__ = ["KalmanItem", "Observation", "global_observations"]


@dataclass
class KalmanItem:
    """One covariance factor P of R-Kalman and this rank's rows for it."""

    structure: Any  # grng.curvature.factors.FactorStructure
    rows: Any  # grng.curvature.factors.Rows | None
    P: Tensor  # on a rank that does not hold the block: a stand-in of P's shape (never written)
    like: Tensor


@dataclass
class Observation:
    """What a Kalman update folds in: (H, r) for a dense P (r = observation noise), or
    ``diag`` = diag(M_batch) for a diagonal P."""

    H: Tensor | None = None
    r: float = 0.0
    diag: Tensor | None = None


def global_observations(items: list[KalmanItem], comm: Communicator, beta: float, rank: int,
                        sketch: Callable[[int, Tensor], Tensor]) -> list[Observation | None]:
    """The global batch's observation of each item (None: no rank has rows); every rank issues
    the same collectives in the same order."""
    table = [(0.0, 0.0, 0.0) if it.rows is None  # (rows m, examples n, scale s)
             else (float(it.rows.X.shape[0]), float(it.rows.n), float(it.rows.scale))
             for it in items]
    every = comm.all_gather(table)  # [rank][item] -> (m, n, s), host numbers
    sums: list[TensorSum] = []  # summed to every rank
    plan: list[tuple[str, int, int, float] | None] = []
    gathers: list[tuple[Tensor | None, int, torch.dtype, list[int]]] = []
    for i, it in enumerate(items):
        m_r = [int(ranks[i][0]) for ranks in every]
        n_total = int(sum(ranks[i][1] for ranks in every))
        if n_total == 0:
            plan.append(None)
            continue
        P = it.P
        if it.structure.diagonal:
            counts = None if it.rows is None else it.structure.diag_sum(it.rows, P.dtype)
            sums.append(TensorSum(Piece("vec", (P.shape[0],)), counts, P.dtype, P.device))
            plan.append(("diag", len(sums) - 1, n_total, 1.0))
            continue
        s = every[next(r for r, m in enumerate(m_r) if m > 0)][i][2]
        E = None if it.rows is None else _relative_rows(it.rows, P.dtype, s)
        if sum(m_r) > rank:
            omega = sketch(sum(m_r), P)  # the same draws on every rank
            offset = sum(m_r[:comm.rank])
            H = None if E is None else omega[:, offset:offset + E.shape[0]] @ E
            sums.append(TensorSum(Piece("full", (rank, P.shape[0])), H, P.dtype, P.device))
            plan.append(("sketch", len(sums) - 1, n_total, s))
        else:
            plan.append(("rows", len(gathers), n_total, s))
            gathers.append((E, P.shape[0], P.dtype, m_r))
    reduced = [t.value() for t in comm.reduce_sum(sums, [None] * len(sums))]
    gathered = comm.all_gather_rows(gathers)
    out: list[Observation | None] = []
    for entry in plan:
        if entry is None:
            out.append(None)
            continue
        kind, ref, n_total, s = entry
        if kind == "diag":
            out.append(Observation(diag=reduced[ref].div_(n_total)))
            continue
        H = reduced[ref] if kind == "sketch" else gathered[ref]
        out.append(Observation(H=H, r=n_total / ((1.0 - beta) * s ** 2)))
    return out


def _relative_rows(rows: Any, dtype: torch.dtype, s: float) -> Tensor:
    """(s_r / s) X_r in ``dtype`` (no product where s_r = s)."""
    X = rows.X.to(dtype)
    return X if rows.scale == s else X * (rows.scale / s)
