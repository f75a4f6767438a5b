"""In-repo benchmark models: an MLP, a ResNet-style CNN and a GPT-style causal transformer.

The transformer's attention is built from nn.Linear layers so the K-FAC family captures them;
``GPT_SIZES["gpt2-small"]`` gives GPT-2 small's sizes (12 layers, 12 heads, width 768, vocabulary
50257). As in GPT-2 the output head is tied to the token embedding (one vocab x width matrix):
the K-FAC family covers it once, as the embedding (a diagonal vocab-sized A and a width x width
G), where an untied head would ask for a vocab x vocab G factor (10 GB in fp32 at 50257).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def mlp(d_in: int = 784, width: int = 512, depth: int = 3, d_out: int = 10) -> nn.Module:
    """depth hidden Linear+ReLU layers of ``width``."""
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """x + conv(relu(bn(conv(relu(bn(x))))))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.relu(self.bn1(x)))
        return x + self.conv2(F.relu(self.bn2(h)))


def resnet(channels: int = 32, blocks: int = 2, classes: int = 10) -> nn.Module:
    """A small pre-activation ResNet for 3 x 32 x 32 inputs."""
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), *[ResidualBlock(channels) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of the causal transformer."""

    vocab: int = 512
    context: int = 64
    width: int = 128
    heads: int = 4
    layers: int = 2


GPT_SIZES = {
    "tiny": GPTConfig(),
    "small": GPTConfig(vocab=4096, context=128, width=256, heads=8, layers=4),
    "gpt2-small": GPTConfig(vocab=50257, context=1024, width=768, heads=12, layers=12),
}


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention from two nn.Linear layers (qkv and output projection)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        shape = (b, t, self.heads, c // self.heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.width)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.width)
        self.fc = nn.Linear(cfg.width, 4 * cfg.width)
        self.out = nn.Linear(4 * cfg.width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A GPT-style causal language model on token ids (B x T) -> logits (B x T x vocab);
    logits = ln(h) E^T with E the token embedding (tied head)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.width)
        self.pos = nn.Embedding(cfg.context, cfg.width)
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.layers)])
        self.ln = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=False, device="meta")
        self.head.weight = self.tok.weight  # tied: one parameter, no separate head matrix
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        return self.head(self.ln(self.blocks(x)))
