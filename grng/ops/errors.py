"""Exceptions raised by grng's ops."""
from __future__ import annotations


class FactorizationError(RuntimeError):
    """A factorization (eigh, Cholesky) failed even after its float64 retry."""


class BackendUnavailable(RuntimeError):
    """A backend was forced that cannot run here; the message says why."""
