"""Benchmark support shipped with grng: one long-format CSV schema for every benchmark.

:mod:`grng.benchmark.schema` defines the row every benchmark writes (``bench/*.py``,
``python -m grng bench``, ``bench/gpu_check.py``); results are plotted and compared from rows.
"""
