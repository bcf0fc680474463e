"""Which implementation (backend) serves each accelerated op, and why.

Every op module in nanotrain.ops registers its backends here in order of preference, the
pure-PyTorch reference last. For a call, `select(op, device, dtype, **props)` returns the first
backend whose availability check passes; checks run lazily and their answers are cached per
(device, dtype, props). A user can force a backend:

    NANOTRAIN_KERNELS=attention=triton,muon=reference nanotrain ...
    nanotrain --kernels attention=triton ...

and tests force one with the `forced(...)` context manager. A forced backend that cannot run is
an error (never a silent fallback); an automatic fallback is logged once with its reason.

A backend's check is `check(device, dtype, **props) -> str | None`: None means usable, a string
says why not (shown in the startup report). Triton backends set `interpreter=True`: on CPU
tensors they run only under TRITON_INTERPRET=1 and only when forced (the interpreter is for
tests, far too slow to be picked automatically).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from nanotrain.errors import UserError

log = logging.getLogger("nanotrain.ops")

ENV_VAR = "NANOTRAIN_KERNELS"
Check = Callable[..., "str | None"]


def always(device: torch.device, dtype: torch.dtype, **props) -> str | None:
    """The check of a backend that runs everywhere (the references)."""
    return None


@dataclass(frozen=True)
class Backend:
    op: str
    name: str
    fn: Callable
    check: Check = always
    description: str = ""
    interpreter: bool = False  # a Triton backend: on CPU only when forced under TRITON_INTERPRET=1


class BackendUnavailable(UserError):
    """A forced backend cannot run here (or an op/backend name is unknown)."""


@dataclass
class _State:
    backends: dict[str, list[Backend]] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)  # from set_overrides (CLI)
    cache: dict[tuple, tuple[Backend, list[tuple[str, str]]]] = field(default_factory=dict)
    logged: set = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


_state = _State()
_local = threading.local()  # stack of forced-choice dicts from `forced(...)`


def register(op: str, name: str, fn: Callable, check: Check = always, description: str = "",
             interpreter: bool = False) -> Backend:
    """Add a backend for `op` after those already registered (so: register in preference order)."""
    backend = Backend(op, name, fn, check, description, interpreter)
    with _state.lock:
        existing = _state.backends.setdefault(op, [])
        existing[:] = [b for b in existing if b.name != name] + [backend]
        _state.cache.clear()
    return backend


def unregister(op: str, name: str | None = None) -> None:
    """Remove backend `name` of `op` (all of the op's backends when name is None); for tests' fake ops."""
    with _state.lock:
        if name is None:
            _state.backends.pop(op, None)
        elif op in _state.backends:
            _state.backends[op] = [b for b in _state.backends[op] if b.name != name]
        _state.cache.clear()


def ops() -> list[str]:
    _load_op_modules()
    return list(_state.backends)


def backends(op: str) -> list[Backend]:
    _load_op_modules()
    if op not in _state.backends:
        raise BackendUnavailable(f"unknown op '{op}'; known ops: {', '.join(_state.backends) or 'none'}.")
    return list(_state.backends[op])


def parse_overrides(spec: str | None) -> dict[str, str]:
    """Parse 'attention=triton,muon=reference' into a dict; raise a UserError on bad syntax."""
    out: dict[str, str] = {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        op, sep, name = item.partition("=")
        if not sep or not op.strip() or not name.strip():
            raise BackendUnavailable(
                f"bad kernel choice '{item}': write OP=BACKEND, e.g. attention=triton,muon=reference.")
        out[op.strip()] = name.strip()
    return out


def _validate_names(choices: dict[str, str]) -> None:
    for op, name in choices.items():
        names = [b.name for b in backends(op)]
        if name not in names:
            raise BackendUnavailable(f"unknown backend '{name}' for op '{op}'; choose one of: {', '.join(names)}.")


def set_overrides(spec: str | dict[str, str] | None) -> None:
    """Set the process-wide forced choices (the CLI's --kernels). Validates op and backend names."""
    choices = parse_overrides(spec) if isinstance(spec, str) or spec is None else dict(spec)
    _validate_names(choices)
    with _state.lock:
        _state.overrides = choices
        _state.cache.clear()


@contextlib.contextmanager
def forced(**choices: str) -> Iterator[None]:
    """Force backends inside a block: `with forced(attention="triton"): ...` (tests use this)."""
    _validate_names(choices)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(choices)
    try:
        yield
    finally:
        stack.pop()


def forced_choice(op: str) -> tuple[str, str] | None:
    """The forced backend name for `op` and where it was forced, or None."""
    for choices in reversed(getattr(_local, "stack", None) or []):
        if op in choices:
            return choices[op], "forced in code"
    if op in _state.overrides:
        return _state.overrides[op], "--kernels"
    env = _env_overrides(os.environ.get(ENV_VAR))
    if op in env:
        return env[op], ENV_VAR
    return None


@functools.lru_cache(maxsize=8)
def _env_overrides(spec: str | None) -> dict[str, str]:
    """parse_overrides of the environment variable, parsed once per value (select runs on every op call)."""
    return parse_overrides(spec)


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _why_not(backend: Backend, device: torch.device, dtype: torch.dtype, is_forced: bool, props: dict) -> str | None:
    if backend.interpreter and device.type == "cpu":
        if not _interpreter_on():
            return "Triton needs a CUDA GPU (on CPU only under TRITON_INTERPRET=1, for tests)"
        if not is_forced:
            return "the Triton interpreter runs on CPU only when forced (it is for tests)"
    try:
        return backend.check(device, dtype, **props)
    except Exception as e:  # a broken check must not take the run down; it says why instead
        return f"availability check failed: {type(e).__name__}: {e}"


def select(op: str, device: torch.device | str, dtype: torch.dtype, **props) -> Backend:
    """The backend that serves `op` for this device/dtype/shape properties (see module doc)."""
    device = torch.device(device)
    choice = forced_choice(op)
    key = (op, device.type, device.index, dtype, tuple(sorted(props.items())), choice)
    hit = _state.cache.get(key)
    if hit is not None:
        return hit[0]
    candidates = backends(op)
    skipped: list[tuple[str, str]] = []
    if choice is not None:
        name, source = choice
        matches = [b for b in candidates if b.name == name]
        if not matches:
            raise BackendUnavailable(
                f"{source} asks for backend '{name}' for op '{op}', which does not exist; "
                f"choose one of: {', '.join(b.name for b in candidates)}.")
        reason = _why_not(matches[0], device, dtype, True, props)
        if reason is not None:
            raise BackendUnavailable(
                f"{source} forces {op}={name}, but it cannot run here: {reason}. "
                f"Remove {op}={name} from {source} to let nanotrain choose.")
        chosen = matches[0]
    else:
        chosen = None
        for b in candidates:
            reason = _why_not(b, device, dtype, False, props)
            if reason is None:
                chosen = b
                break
            skipped.append((b.name, reason))
        if chosen is None:
            raise BackendUnavailable(f"no backend of op '{op}' can run on {device} with {dtype}: {skipped}")
        for name, reason in skipped:
            msg_key = (op, name, reason)
            if msg_key not in _state.logged:
                _state.logged.add(msg_key)
                log.info("%s: not using %s: %s", op, name, reason)
    _state.cache[key] = (chosen, skipped)
    return chosen


def explain(op: str, device: torch.device | str, dtype: torch.dtype, **props) -> tuple[Backend, list[tuple[str, str]]]:
    """The chosen backend and, for each preferred one not chosen, why (for the startup report)."""
    chosen = select(op, device, dtype, **props)
    device = torch.device(device)
    reasons = []
    for b in backends(op):
        if b.name == chosen.name:
            break
        reasons.append((b.name, _why_not(b, device, dtype, False, props) or "not chosen"))
    return chosen, reasons


def report(device: torch.device | str, dtype: torch.dtype, props: dict[str, dict] | None = None,
           only: list[str] | None = None) -> list[str]:
    """One line per op: which backend serves it on this device and why the faster ones do not.

    `props` optionally gives per-op shape properties, e.g. {"attention": {"head_dim": 128}}; `only`
    limits the report to the ops a run uses. On a GPU, an op left on its reference gets a warning.
    """
    lines = []
    for op in (ops() if only is None else only):
        try:
            chosen, reasons = explain(op, device, dtype, **(props or {}).get(op, {}))
        except BackendUnavailable as e:
            lines.append(f"✗ {op}: {e}")
            continue
        choice = forced_choice(op)
        how = f" (forced by {choice[1]})" if choice else ""
        desc = f": {chosen.description}" if chosen.description else ""
        lines.append(f"✓ {op}: {chosen.name}{desc}{how}")
        for name, reason in reasons:
            lines.append(f"    not {name}: {reason}")
        if chosen.name == "reference" and reasons and torch.device(device).type == "cuda":
            lines.append(f"    WARNING: {op} runs on the slow pure-PyTorch reference path")
    return lines


_OP_MODULES = ("attention", "newton_schulz", "fp8", "packing")


def _load_op_modules() -> None:
    """Import every op module so that all backends are registered (they register on import)."""
    import importlib

    for name in _OP_MODULES:
        try:
            importlib.import_module(f"nanotrain.ops.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"nanotrain.ops.{name}":
                raise


def clear_cache() -> None:
    """Forget cached choices (after the environment changed, e.g. in tests)."""
    with _state.lock:
        _state.cache.clear()
