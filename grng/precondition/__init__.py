"""Preconditioners behind one interface (:class:`~grng.precondition.base.Preconditioner`):
Kronecker (eigen / newton / cholesky inverses), Kalman (R-Kalman) and diagonal."""
from __future__ import annotations

from grng.precondition.base import CurvatureConfig, Preconditioner, Unit, compute_dtype
from grng.precondition.diagonal import DiagonalFisher, DiagonalKalman
from grng.precondition.kalman import KalmanConfig, KalmanPreconditioner
from grng.precondition.kronecker import KroneckerPreconditioner

__all__ = ["CurvatureConfig", "DiagonalFisher", "DiagonalKalman", "KalmanConfig",
           "KalmanPreconditioner", "KroneckerPreconditioner", "Preconditioner", "Unit",
           "compute_dtype"]
