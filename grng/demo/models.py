"""The two demo models; both take flat 64-feature rows (the CNN views them as 1x8x8)."""
from __future__ import annotations

from torch import nn

MODELS = ("cnn", "mlp")


def make_model(name: str) -> nn.Module:
    """``cnn``: Conv(1->16)-ReLU-Conv(16->32)-ReLU-MaxPool-Linear(512->10);
    ``mlp``: Linear(64->128)-ReLU-Linear(128->10)."""
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
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
