"""Test setup: Triton runs under its interpreter on machines without CUDA (set before any import of
triton), and `gpu`-marked tests are skipped where there is no CUDA device."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Each test draws its own random inputs, reproducibly within the test."""
    torch.manual_seed(1234)
    yield
