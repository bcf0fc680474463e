"""The compiled extension nanotrain._C, loaded lazily: whether it is there, how it was built, which ops it has.

The extension registers its ops with the torch dispatcher (TORCH_LIBRARY(nanotrain, ...)), so once loaded
they are called as torch.ops.nanotrain.<name>. This module also registers their fake (meta)
implementations, which torch.compile and torch.library.opcheck need; the C++ library names this module
(set_python_module) so that torch can point here when a fake is missing.

Set NANOTRAIN_NO_EXT=1 to run as if the extension were absent (tests use this; so can a user who suspects
a broken build). Nothing here imports nanotrain._C at import time: `import nanotrain` never needs it.
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

REINSTALL = "reinstall with `pip install --no-build-isolation -e .`"
DISABLE_VAR = "NANOTRAIN_NO_EXT"

_absent_reason: str | None = None
_fakes_registered = False


@functools.lru_cache(maxsize=None)
def load_extension() -> ModuleType | None:
    """nanotrain._C, imported once (its ops and fakes registered), or None when it is absent or disabled."""
    global _absent_reason
    if os.environ.get(DISABLE_VAR) == "1":
        _absent_reason = f"disabled by {DISABLE_VAR}=1"
        return None
    try:
        module = importlib.import_module("nanotrain._C")
    except ImportError as e:  # not built (pure-Python install), or built against another torch
        missing = isinstance(e, ModuleNotFoundError) and e.name == "nanotrain._C"
        _absent_reason = "not built" if missing else f"cannot load it ({e})"
        return None
    global _fakes_registered
    if not _fakes_registered:  # once per process, also when a test clears the cache of load_extension
        _register_fakes()
        _fakes_registered = True
    return module


def extension_status() -> str:
    """One line for the startup report, e.g. 'built with CUDA 13.0 for sm_80+sm_90a (torch 2.14.1)'."""
    module = load_extension()
    if module is None:
        how = "unset NANOTRAIN_NO_EXT" if _absent_reason and DISABLE_VAR in _absent_reason else REINSTALL
        return f"absent: {_absent_reason}: {how}"
    info = build_info()
    built_for = f"torch {info['torch_version']}"
    if info["torch_version"].split("+")[0] != torch.__version__.split("+")[0]:
        built_for += f", but torch {torch.__version__} runs: {REINSTALL}"
    if info["with_cuda"]:
        return f"built with CUDA {info['cuda_version']} for {info['cuda_arches']} ({built_for})"
    return f"built CPU-only ({built_for})"


def build_info() -> dict:
    """The facts compiled into the extension: with_cuda, cuda_arches, cuda_version, torch_version ({} if absent)."""
    module = load_extension()
    if module is None:
        return {}
    return {
        "with_cuda": bool(module.WITH_CUDA),
        "cuda_arches": module.CUDA_ARCHES,
        "cuda_version": module.CUDA_VERSION,
        "torch_version": module.TORCH_VERSION,
    }


def has_op(name: str) -> bool:
    """Whether torch.ops.nanotrain.<name> exists (the extension is loaded and defines it)."""
    if load_extension() is None:
        return False
    try:
        getattr(torch.ops.nanotrain, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def has_kernel(name: str, dispatch_key: str) -> bool:
    """Whether op nanotrain::<name> has a kernel for `dispatch_key` ("CPU", "CUDA") in this build."""
    return has_op(name) and torch._C._dispatch_has_kernel_for_dispatch_key(f"nanotrain::{name}", dispatch_key)


def _register_fakes() -> None:
    """Shapes and dtypes of each op's outputs without computing them (torch.compile, opcheck)."""

    @torch.library.register_fake("nanotrain::best_fit_pack")
    def _best_fit_pack_fake(tokens, offsets, num_rows, row_len):
        # rows: (R, row_len) with R <= num_rows known only after packing (an abandoned row ends the call).
        num_done = torch.library.get_ctx().new_dynamic_size(min=0, max=num_rows)
        rows = tokens.new_empty((num_done, row_len))
        consumed = offsets.new_empty((offsets.shape[0] - 1,), dtype=torch.bool)
        cropped = offsets.new_empty((), dtype=torch.int64)
        return rows, consumed, cropped

