"""Build script: the pure-Python package plus the optional compiled extension ``grng._C``.

The Triton kernels live in the top-level ``kernels/`` folder and are packaged as
``grng.kernels`` (a top-level ``kernels`` import name would collide with a PyPI package).
The extension build rules are in ``tools/extension.py``; a failed or skipped extension leaves
the package importable and the op dispatch falls back to the other backends.
"""
from __future__ import annotations

import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))
from extension import extension_build_args  # noqa: E402

packages = [p for p in find_packages(include=["grng", "grng.*"])] + ["grng.kernels"]

setup(
    packages=packages,
    package_dir={"grng.kernels": "kernels"},
    package_data={"grng": ["demo/*.json"]},
    **extension_build_args(),
)
