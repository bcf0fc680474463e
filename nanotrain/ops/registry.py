"""Which implementation (backend) serves each accelerated op, and why, chosen once and self-checked.

Every op module in nanotrain.ops registers its backends here in order of preference, the
pure-PyTorch reference last. `resolve(op, device, dtype, **props)` returns the first backend whose
availability check passes (and, for a fused backend, whose self-check passes); answers are cached per
(device, dtype, props). It runs when the model (or the optimizer) is built, which stores the
resolved callables, never inside the compiled forward. `select` is the same function under its old
name. A user can force a backend:

    NANOTRAIN_KERNELS=attention=triton,muon=reference nanotrain ...
    nanotrain --kernels attention=triton ...

and tests force one with the `forced(...)` context manager. A forced backend that cannot run is
an error (never a silent fallback); an automatic fallback is logged once with its reason.

A backend's check is `check(device, dtype, **props) -> str | None`: None means usable, a string
says why not (shown in the startup report). Triton backends set `interpreter=True`: on CPU
tensors they run only under TRITON_INTERPRET=1 and only when forced (the interpreter is for
tests, far too slow to be picked automatically).

Self-check: each op module registers, beside its reference, a check function
`self_check(fn, device, dtype, **props) -> CheckResult` that runs a backend's callable once on small
random inputs against the reference with DESIGN.md's bounds. The first time a fused backend (our
Triton or CUDA kernels; not the reference, not SDPA) would serve an op for a case (device, dtype,
props such as head_dim, window kind, GQA), the registry runs that check. A mismatch, an exception or
a NaN disables the backend for that case for the run: the next backend serves, with one warning line
naming the op, the case, the error and the bound. A forced backend that fails is an error. The
checks run on CUDA devices; `self_check_devices("cpu")` lets tests run them on interpreter
backends; NANOTRAIN_KERNEL_CHECK=0 skips them. `check_all()` runs every check of every fused
backend that can run here (`nanotrain --kernels --check`).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, TextIO

import torch

from nanotrain.errors import UserError

log = logging.getLogger("nanotrain.ops")

ENV_VAR = "NANOTRAIN_KERNELS"
CHECK_VAR = "NANOTRAIN_KERNEL_CHECK"  # "0" skips the self-checks
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
    fused: bool = False  # one of our kernels: self-checked against the reference before it serves


class BackendUnavailable(UserError):
    """A forced backend cannot run here (or an op/backend name is unknown)."""


@dataclass(frozen=True)
class CheckResult:
    """What a self-check measured: `value` of `metric` against `bound` (an upper bound on an error, or a
    lower bound when higher_is_better, e.g. an SQNR in dB). A NaN value never passes."""
    value: float
    bound: float
    metric: str = "max error"
    higher_is_better: bool = False

    @property
    def passed(self) -> bool:
        if not math.isfinite(self.value):
            return False
        return self.value >= self.bound if self.higher_is_better else self.value <= self.bound

    def describe(self) -> str:
        return f"{self.metric} {self.value:.3g} (bound {'>=' if self.higher_is_better else '<='} {self.bound:.3g})"


SelfCheck = Callable[..., CheckResult]  # (fn, device, dtype, **props) -> CheckResult


@dataclass(frozen=True)
class CheckRow:
    """One self-check run: op, backend, case, its result (or the exception it raised) and its time."""
    op: str
    backend: str
    case: str
    result: CheckResult | None
    error: str | None
    ms: float

    @property
    def passed(self) -> bool:
        return self.error is None and self.result is not None and self.result.passed

    def describe(self) -> str:
        return self.error if self.error is not None else self.result.describe()


@dataclass
class _State:
    backends: dict[str, list[Backend]] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)  # from set_overrides (CLI)
    cache: dict[tuple, tuple[Backend, list[tuple[str, str]]]] = field(default_factory=dict)
    logged: set = field(default_factory=set)
    lock: threading.RLock = field(default_factory=threading.RLock)
    self_checks: dict[str, tuple[SelfCheck, list[dict], torch.dtype]] = field(default_factory=dict)
    verdicts: dict[tuple, CheckRow] = field(default_factory=dict)  # per case, for the run
    check_devices: list[str] = field(default_factory=list)  # device types besides cuda (tests)


_state = _State()
_local = threading.local()  # stack of forced-choice dicts from `forced(...)`


def register(op: str, name: str, fn: Callable, check: Check = always, description: str = "",
             interpreter: bool = False, fused: bool | None = None, before: str | None = None) -> Backend:
    """Add a backend for `op` after those already registered (so: register in preference order), or just
    ahead of the backend named `before` (e.g. a new CUDA kernel ahead of "triton").

    `fused` (default: `interpreter`, i.e. Triton backends) marks one of our kernels, which the op's
    self-check (register_self_check) verifies before it serves a case."""
    backend = Backend(op, name, fn, check, description, interpreter, interpreter if fused is None else fused)
    with _state.lock:
        existing = _state.backends.setdefault(op, [])
        rest = [b for b in existing if b.name != name]
        names = [b.name for b in rest]
        if before is not None and before not in names:
            raise BackendUnavailable(f"cannot register {op}={name} before '{before}': {op} has no such backend.")
        at = names.index(before) if before is not None else len(rest)
        existing[:] = rest[:at] + [backend] + rest[at:]
        _state.cache.clear()
    return backend


def register_self_check(op: str, check: SelfCheck, cases: list[dict] | None = None,
                        cuda_dtype: torch.dtype = torch.bfloat16) -> None:
    """Set the self-check of `op`: `check(fn, device, dtype, **props) -> CheckResult` runs a backend's
    callable on small random inputs against the reference. `cases` are the props `check_all` runs, in
    `cuda_dtype` on a GPU (the dtype training calls the op with) and float32 on the CPU."""
    with _state.lock:
        _state.self_checks[op] = (check, list(cases or [{}]), cuda_dtype)
        _state.cache.clear()


def unregister(op: str, name: str | None = None) -> None:
    """Remove backend `name` of `op` (all of the op's backends when name is None); for tests' fake ops."""
    with _state.lock:
        if name is None:
            _state.backends.pop(op, None)
            _state.self_checks.pop(op, None)
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
    """parse_overrides of the environment variable, parsed once per value (resolve runs on every public op call)."""
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
        reason = backend.check(device, dtype, **props)
    except Exception as e:  # a broken check must not take the run down; it says why instead
        return f"availability check failed: {type(e).__name__}: {e}"
    if reason is not None or not self_check_applies(backend, device):
        return reason
    row = _verdict(backend, device, dtype, props)
    return None if row.passed else f"self-check failed for {row.case}: {row.describe()}"


# ----------------------------------------------------------------------------------------------------------
# Self-checks


def self_check_applies(backend: Backend, device: torch.device) -> bool:
    """Whether `backend` is self-checked before it serves on `device` (fused, the op has a check, on CUDA or a
    device type a test enabled, and NANOTRAIN_KERNEL_CHECK is not 0)."""
    if not backend.fused or backend.op not in _state.self_checks:
        return False
    if os.environ.get(CHECK_VAR, "1").strip() == "0":
        return False
    return device.type == "cuda" or device.type in _state.check_devices


@contextlib.contextmanager
def self_check_devices(*device_types: str) -> Iterator[None]:
    """Run self-checks on these device types too (tests: `with self_check_devices("cpu"):` checks the
    interpreter backends as if the CPU were a GPU). Forgets cached choices and verdicts on entry and exit."""
    with _state.lock:
        before = list(_state.check_devices)
        _state.check_devices.extend(device_types)
        _state.cache.clear()
        _state.verdicts.clear()
    try:
        yield
    finally:
        with _state.lock:
            _state.check_devices[:] = before
            _state.cache.clear()
            _state.verdicts.clear()


def case_name(device: torch.device, dtype: torch.dtype, props: dict) -> str:
    """A case as the warning line and the check table show it, e.g. 'cuda bfloat16 head_dim=128 window=short'."""
    words = [device.type, str(dtype).replace("torch.", "")] + [f"{k}={v}" for k, v in sorted(props.items())]
    return " ".join(words)


def run_self_check(backend: Backend, device: torch.device | str, dtype: torch.dtype, **props) -> CheckRow:
    """Run the op's self-check on `backend` once (no caching); an exception is a failure, not a crash."""
    device = torch.device(device)
    check = _state.self_checks[backend.op][0]
    start = time.perf_counter()
    result, error = None, None
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            result = check(backend.fn, device, dtype, **props)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # a kernel that raises is a failed check: say what it raised
        error = f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    ms = (time.perf_counter() - start) * 1000.0
    return CheckRow(backend.op, backend.name, case_name(device, dtype, props), result, error, ms)


def _verdict(backend: Backend, device: torch.device, dtype: torch.dtype, props: dict) -> CheckRow:
    """The self-check of `backend` for this case, run once per run; a failure prints one warning line."""
    key = (backend.op, backend.name, device.type, device.index, dtype, tuple(sorted(props.items())))
    with _state.lock:
        row = _state.verdicts.get(key)
        if row is None:
            row = run_self_check(backend, device, dtype, **props)
            _state.verdicts[key] = row
            if not row.passed:
                log.warning("%s: backend %s failed its self-check for %s: %s; it is disabled for this case",
                            backend.op, backend.name, row.case, row.describe())
    return row


def check_all(device: torch.device | str | None = None, ops_: list[str] | None = None) -> tuple[list[CheckRow], str]:
    """Run every self-check case of every fused backend that can run on `device` (default: the GPU if there is
    one, else the CPU). On the CPU the interpreter backends run only under TRITON_INTERPRET=1. Returns the rows
    and a one-line note on what ran."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows, skipped = [], 0
    for op in (ops() if ops_ is None else ops_):
        if op not in _state.self_checks:
            continue
        _, cases, cuda_dtype = _state.self_checks[op]
        dtype = cuda_dtype if device.type == "cuda" else torch.float32
        for backend in (b for b in backends(op) if b.fused):
            for props in cases:
                if backend.interpreter and device.type == "cpu" and not _interpreter_on():
                    skipped += 1
                    continue
                try:
                    reason = backend.check(device, dtype, **props)
                except Exception as e:  # an availability check that raises: not runnable here
                    reason = f"{type(e).__name__}: {e}"
                if reason is not None:
                    skipped += 1
                    continue
                rows.append(run_self_check(backend, device, dtype, **props))
    if rows:
        note = f"{len(rows)} self-checks of fused backends on {device} ({skipped} cases cannot run here)"
    elif device.type == "cpu":
        note = ("no fused backend runs on this machine (CPU without CUDA; set TRITON_INTERPRET=1 to check the "
                "Triton kernels under the interpreter, slowly)")
    else:
        note = f"no fused backend can run on {device}"
    return rows, note


def check_table(rows: list[CheckRow]) -> list[str]:
    """The rows of check_all as a table: op, backend, case, measured vs bound, pass/FAIL, time in ms."""
    header = ("op", "backend", "case", "measured vs bound", "result", "ms")
    body = [(r.op, r.backend, r.case, r.describe(), "pass" if r.passed else "FAIL", f"{r.ms:.1f}") for r in rows]
    widths = [max(len(str(x[i])) for x in [header, *body]) for i in range(len(header))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *body]]


def resolve(op: str, device: torch.device | str, dtype: torch.dtype, **props) -> Backend:
    """The backend that serves `op` for this device/dtype/shape properties (see module doc). Call it when the
    model or optimizer is built and keep the result: it reads the environment and may run a self-check."""
    device = torch.device(device)
    choice = forced_choice(op)
    checking = os.environ.get(CHECK_VAR, "1").strip() != "0"
    key = (op, device.type, device.index, dtype, tuple(sorted(props.items())), choice, checking)
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


def select(op: str, device: torch.device | str, dtype: torch.dtype, **props) -> Backend:
    """resolve() under its earlier name."""
    return resolve(op, device, dtype, **props)


def explain(op: str, device: torch.device | str, dtype: torch.dtype, **props) -> tuple[Backend, list[tuple[str, str]]]:
    """The chosen backend and, for each preferred one not chosen, why (for the startup report)."""
    chosen = resolve(op, device, dtype, **props)
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
    """Forget cached choices and self-check verdicts (after the environment changed, e.g. in tests)."""
    with _state.lock:
        _state.cache.clear()
        _state.verdicts.clear()


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    return torch.device("mps" if mps is not None and mps.is_available() else "cpu")


def print_table(device: torch.device | str | None = None, check: bool = False, file: TextIO | None = None) -> bool:
    """`nanotrain --kernels [--check]`: the extension's status, the backend of each op on this machine and, with
    check, every self-check as a table. Returns False when a self-check failed."""
    from nanotrain.ops._ext import extension_status

    out = file or sys.stdout
    device = torch.device(device) if device is not None else _default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"extension nanotrain._C: {extension_status()}", file=out)
    print(f"backends on {device} ({dtype}):", file=out)
    for line in report(device, dtype):
        print("  " + line, file=out)
    if not check:
        return True
    rows, note = check_all(device)
    print(f"self-checks: {note}", file=out)
    if rows:
        for line in check_table(rows):
            print("  " + line, file=out)
    return all(r.passed for r in rows)
