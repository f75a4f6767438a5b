"""The grng demo: every optimizer at its defaults on scikit-learn's digits (CNN, MLP) and on
the Python standard library's source (a character-level transformer); ``python -m grng.demo``.

See ``docs/demo.md``. Needs the ``demo`` extra (scikit-learn, matplotlib, tqdm and the peers
sophia-opt and heavyball); a peer that is not installed gets a row saying so.
"""
from __future__ import annotations

from grng.demo.cli import main

__all__ = ["main"]
