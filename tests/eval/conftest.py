"""Evaluation tests use tiny tensors: one intra-op thread is faster than many on a shared CPU."""
import pytest

from tests.fixtures import one_thread

_one_thread = pytest.fixture(autouse=True, name="_one_thread")(one_thread)
