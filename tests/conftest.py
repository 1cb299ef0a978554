"""Shared fixtures: every op test runs once per available backend.

Without CUDA the Triton kernels run on CPU tensors under the interpreter, which must be
switched on before fastvae.kernels is first imported.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastvae  # noqa: E402  (after TRITON_INTERPRET)
from fastvae import _backend  # noqa: E402

BACKENDS = [name for name in fastvae.available_backends() if name != "auto"]
HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running (large shapes or compilation)")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # The marker, not item.keywords: those hold folder names too (a checkout named "gpu").
        if item.get_closest_marker("gpu") is not None and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The name of each available backend, in force (``use_backend``) during the test."""
    with fastvae.use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
