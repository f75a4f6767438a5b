"""Triton kernels of grng (registered as the ``triton`` backend of :mod:`grng.ops`)."""
