"""scikit-learn's digits (1,797 8x8 images, shipped inside scikit-learn: no download).

One fixed split for every run: a seeded permutation cut 60 / 20 / 20 into train, validation
and test. Features are standardized with the train split's mean and standard deviation only
(pixels that are constant on the train split keep a unit scale). The seeds of a demo run vary
the model initialization and the batch order, never the split.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SPLIT_SEED = 0
FRACTIONS = (0.6, 0.2, 0.2)


@dataclass(frozen=True)
class Split:
    """Features x (n x 64, float32, standardized), labels y (n, int64), dataset row indices."""

    x: Tensor
    y: Tensor
    index: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device), self.y.to(device), self.index)

    def head(self, n: int) -> Split:
        """The first ``n`` rows."""
        return Split(self.x[:n], self.y[:n], self.index[:n])


@dataclass(frozen=True)
class Digits:
    train: Split
    val: Split
    test: Split
    mean: Tensor
    std: Tensor

    def to(self, device: torch.device | str) -> Digits:
        return Digits(self.train.to(device), self.val.to(device), self.test.to(device),
                      self.mean, self.std)


def load_digits_splits(split_seed: int = SPLIT_SEED,
                       fractions: tuple[float, float, float] = FRACTIONS) -> Digits:
    """The train / validation / test splits of digits, standardized with train statistics."""
    from sklearn.datasets import load_digits

    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) <= 0:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    raw = load_digits()
    x = torch.as_tensor(raw.data, dtype=torch.float32)
    y = torch.as_tensor(raw.target, dtype=torch.int64)
    n = x.shape[0]
    gen = torch.Generator().manual_seed(split_seed)
    perm = torch.randperm(n, generator=gen)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    idx_train, idx_val, idx_test = perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]
    mean = x[idx_train].mean(0)
    std = x[idx_train].std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))

    def make(idx: Tensor) -> Split:
        return Split(((x[idx] - mean) / std).contiguous(), y[idx].contiguous(), idx.sort().values)

    return Digits(make(idx_train), make(idx_val), make(idx_test), mean, std)
