"""Test session set-up.

Without CUDA, Triton's interpreter is switched on before any kernel module is imported, so
``backend="triton"`` runs the kernels on CPU tensors. On a CUDA machine the real kernels run.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """Test problems are tiny: one intra-op thread is fastest and immune to a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Each test draws fresh but reproducible random inputs."""
    torch.manual_seed(int.from_bytes(os.urandom(2), "little") if os.environ.get("GRNG_RANDOM_SEED") else 1234)


def pytest_collection_modifyitems(config, items):
    """Skip GPU-marked tests cleanly when there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
