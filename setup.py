"""Build script: the pure-Python package plus the optional compiled extension ``grng.ops._C``.

The Triton kernels live in the top-level ``kernels/`` folder and are packaged as
``grng.kernels`` (a top-level ``kernels`` import name would collide with a PyPI package); the
C++/CUDA sources in ``csrc/`` are packaged as ``grng/ops/csrc`` so that an install without
the compiled extension can build it on first use (``grng/ops/ext_loader.py``). The extension
build rules are in ``tools/extension.py``; a failed or skipped extension leaves the package
importable and the op dispatch falls back to the other backends.
"""
from __future__ import annotations

import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))
from extension import extension_build_args  # noqa: E402

packages = [p for p in find_packages(include=["grng", "grng.*"])] + ["grng.kernels", "grng.ops.csrc"]

setup(
    packages=packages,
    package_dir={"grng.kernels": "kernels", "grng.ops.csrc": "csrc"},
    package_data={"grng": ["demo/*.json"], "grng.ops.csrc": ["*.cpp", "*.cu", "*.h"]},
    **extension_build_args(),
)
