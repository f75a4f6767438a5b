"""Preconditioners behind one interface (:class:`~grng.precondition.base.Preconditioner`):
Kronecker (eigen / newton / cholesky inverses), Kalman (R-Kalman), diagonal, and Adam in the
Kronecker eigenbasis (EKFAC) with its diagonal Adam."""
from __future__ import annotations

from grng.precondition.adam import AdamSettings, DiagonalAdam
from grng.precondition.base import CurvatureConfig, Preconditioner, Unit, compute_dtype
from grng.precondition.diagonal import DiagonalFisher, DiagonalKalman
from grng.precondition.kalman import KalmanConfig, KalmanPreconditioner
from grng.precondition.eigenbasis import EigenbasisPreconditioner
from grng.precondition.kronecker import KroneckerPreconditioner

__all__ = ["AdamSettings", "CurvatureConfig", "DiagonalAdam", "DiagonalFisher",
           "EigenbasisPreconditioner", "DiagonalKalman", "KalmanConfig",
           "KalmanPreconditioner", "KroneckerPreconditioner", "Preconditioner", "Unit",
           "compute_dtype"]
