"""Gradient accumulation (docs/numerics.md): accumulated micro-batches give the factors and step of one big batch."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optimizer_helpers import (F64, FACTORIES)

class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 2, padding=1)
        self.emb = nn.Embedding(7, 3)
        self.fc = nn.Linear(3 * 4 * 4 + 3, 3)

    def forward(self, x: Tensor, idx: Tensor) -> Tensor:
        return self.fc(torch.cat([torch.tanh(self.conv(x)).flatten(1), self.emb(idx).mean(1)], 1))


@pytest.mark.parametrize("name", ["kfac-eigen", "rkalman"])
def test_gradient_accumulation_equals_one_big_batch(name: str) -> None:
    torch.manual_seed(8)
    big = _ConvNet().double()
    acc = copy.deepcopy(big)
    o_big, o_acc = FACTORIES[name](big), FACTORIES[name](acc)
    g = torch.Generator().manual_seed(9)
    k = 3
    for _ in range(3):
        x = torch.randn(12, 2, 3, 3, generator=g, dtype=F64)
        idx = torch.randint(0, 7, (12, 2), generator=g)
        y = torch.randint(0, 3, (12,), generator=g)
        o_big.zero_grad()
        F.cross_entropy(big(x, idx), y).backward()
        o_big.step()
        o_acc.zero_grad()
        for xs, ids, ys in zip(x.chunk(k), idx.chunk(k), y.chunk(k)):
            (F.cross_entropy(acc(xs, ids), ys) / k).backward()
        o_acc.step()
        for lb, la in zip(o_big.layers, o_acc.layers):
            sb, sa = o_big.layer_state(lb), o_acc.layer_state(la)
            for key in ("PA", "PG") if name == "rkalman" else ("A", "G"):
                torch.testing.assert_close(sa[key], sb[key], rtol=1e-10, atol=1e-12)
    for p, q in zip(big.parameters(), acc.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-11)
