"""The grng demo: every optimizer on scikit-learn's digits (``python -m grng.demo``).

See ``docs/demo.md``. Needs the ``demo`` extra (scikit-learn, matplotlib, tqdm);
``sophia-opt`` is optional.
"""
from __future__ import annotations

from grng.demo.cli import main

__all__ = ["main"]
