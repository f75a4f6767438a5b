"""grng: fast second-order optimizers with gradient regularization."""
from __future__ import annotations

__version__ = "0.1.0"

from grng.ops.dispatch import backends  # noqa: E402

__all__ = ["backends", "__version__"]
