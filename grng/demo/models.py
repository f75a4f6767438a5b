"""The demo's models: a CNN and an MLP on digits (flat 64-feature rows; the CNN views them as
1x8x8) and a small character-level transformer on the standard library's source.

The transformer is built only from modules grng gives curvature to or covers with its
diagonal fallback: ``nn.Embedding`` (token and position), ``nn.Linear`` (attention's query /
key / value and output projections are plain Linear layers; no ``nn.MultiheadAttention``) and
``nn.LayerNorm``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from grng.demo.text import SEQ_LEN, VOCAB_SIZE

MODELS = ("cnn", "mlp", "transformer")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention from two Linear layers (qkv and the output projection)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        weights = scores.masked_fill(mask, float("-inf")).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)) with a 4x GELU MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharTransformer(nn.Module):
    """Token + position embeddings, ``layers`` blocks, a final LayerNorm and a Linear head;
    (batch, time) character ids -> (batch, time, vocab) next-character logits."""

    def __init__(self, vocab: int = VOCAB_SIZE, dim: int = 64, heads: int = 4, layers: int = 2,
                 seq_len: int = SEQ_LEN) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq_len, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.seq_len:
            raise ValueError(f"sequence of {t} characters is longer than seq_len {self.seq_len}")
        pos = torch.arange(t, device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(pos))))


def make_model(name: str) -> nn.Module:
    """``cnn``: Conv(1->16)-ReLU-Conv(16->32)-ReLU-MaxPool-Linear(512->10);
    ``mlp``: Linear(64->128)-ReLU-Linear(128->10);
    ``transformer``: :class:`CharTransformer` (2 blocks, width 64, 4 heads, 32 characters)."""
    if name == "cnn":
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(32 * 4 * 4, 10),
        )
    if name == "mlp":
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    if name == "transformer":
        return CharTransformer()
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
