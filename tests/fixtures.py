"""Fixture bodies shared by several test folders (each folder's conftest.py decides where they apply)."""
from __future__ import annotations

from collections.abc import Iterator

import torch


def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is faster than many on a shared CPU (restored after the test)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
