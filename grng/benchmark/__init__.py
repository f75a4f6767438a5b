"""Benchmark support shipped with grng (``python -m grng bench``).

* :mod:`grng.benchmark.schema`: the one long-format CSV schema every benchmark writes
  (``bench/*.py``, ``grng bench``, ``bench/gpu_check.py``);
* :mod:`grng.benchmark.timing`: :func:`~grng.benchmark.timing.measure` (CUDA events or
  ``perf_counter``, warm-up, rotating input sets; median, p20, p80);
* :mod:`grng.benchmark.ceilings`: the copy bandwidth and ``torch.matmul`` rate of the device;
* :mod:`grng.benchmark.kernels`: every op spec x provider x size x dtype;
* :mod:`grng.benchmark.plot` and :mod:`grng.benchmark.compare`: a PNG of a CSV's timings, and
  new / old per matching row of two CSVs.
"""
