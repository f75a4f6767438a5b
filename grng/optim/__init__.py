"""grng optimizers: K-FAC family (K-FAC, RING, RENG, R-Kalman) and gradient regularization."""
