"""Shared helpers of the benchmarks: timing, the device's measured limits, machine facts, result rows.

How nanotrain measures (METHOD.md of the device machine; STYLE.md §7):
- count first: FLOPs and the fewest bytes an op must move, so a time becomes TFLOP/s or GB/s and a
  percentage of the device's *measured* ceiling (`matmul_peak_tflops`, `copy_bandwidth_gbs`);
- time GPU work with CUDA events after warm-up and take the median of many repeats (`cuda_time_ms`);
  CPU work with perf_counter, likewise (`cpu_time_s`);
- compare with the strongest peer on the same device in the same run (`Row.vs_peer`);
- record each number with its machine, commit and date (`machine_info`, `Row.markdown`) in RESULTS.md.

Benchmarks import this as `import common` (benchmarks/conftest.py puts this folder on sys.path; a script
run as `python benchmarks/bench_x.py` has it there already).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -- timing --------------------------------------------------------------------------------------------------


def cuda_times_ms(fn: Callable[[], object], warmup: int = 5, repeats: int = 20) -> list[float]:
    """Milliseconds of each of `repeats` calls of fn(), timed with CUDA events after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def cuda_time_ms(fn: Callable[[], object], warmup: int = 5, repeats: int = 20) -> float:
    """Median milliseconds of fn() on the current CUDA stream (events, after warm-up)."""
    return statistics.median(cuda_times_ms(fn, warmup, repeats))


def cpu_time_s(fn: Callable[[], object], warmup: int = 2, repeats: int = 10, min_time_s: float = 0.0) -> float:
    """Median seconds of fn() on the host (perf_counter, after warm-up); repeats more while under min_time_s."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    total = 0.0
    while len(times) < repeats or total < min_time_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        total += times[-1]
    return statistics.median(times)


# -- the device's measured limits ------------------------------------------------------------------------------


def matmul_peak_tflops(dtype: torch.dtype = torch.bfloat16, n: int = 8192, repeats: int = 20) -> float:
    """Measured dense matmul rate (TFLOP/s) of an n x n x n product on random data: the compute ceiling."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = cuda_time_ms(lambda: a @ b, warmup=5, repeats=repeats)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def copy_bandwidth_gbs(num_bytes: int = 2 << 30, repeats: int = 20) -> float:
    """Measured device-to-device copy rate (GB/s, bytes read + written): the memory ceiling."""
    src = torch.randint(0, 255, (num_bytes,), device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), warmup=3, repeats=repeats)
    return 2 * num_bytes / (ms * 1e-3) / 1e9


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def gbs(num_bytes: float, ms: float) -> float:
    return num_bytes / (ms * 1e-3) / 1e9


# -- machine facts ---------------------------------------------------------------------------------------------


def git_commit() -> str:
    """Short hash of HEAD, with '+dirty' when tracked files differ from it ('unknown' outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("NANOTRAIN_COMMIT", "unknown")


def device_name() -> str:
    """The GPU's name, or the CPU's model and the threads torch uses."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu} ({torch.get_num_threads()} threads)"


def machine_info() -> dict:
    """What a recorded number needs beside it: date, device, commit, torch/CUDA versions, extension build."""
    info = {
        "date": datetime.date.today().isoformat(),
        "device": device_name(),
        "commit": git_commit(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["capability"] = "sm_%d%d" % torch.cuda.get_device_capability()
    try:
        from nanotrain.ops._ext import extension_status

        info["extension"] = extension_status()
    except ImportError:
        info["extension"] = "nanotrain not importable"
    return info


# -- result rows -----------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One measured case: a line of RESULTS.md and of the JSON report."""

    bench: str  # e.g. "packing"
    case: str  # shape or setting, e.g. "T=2049, 1000 docs, 32 rows"
    provider: str  # the backend measured, e.g. "cpp"
    time_ms: float
    rate: float = 0.0  # in `unit`
    unit: str = ""  # "TFLOP/s", "GB/s", "Mtok/s"
    pct_of_limit: float | None = None  # rate / the device's measured ceiling, in percent
    vs_peer: float | None = None  # speed-up over the strongest peer in the same run (>1: faster)
    peer: str = ""
    note: str = ""
    machine: dict = field(default_factory=dict)

    def markdown(self) -> str:
        m = self.machine or machine_info()
        pct = f"{self.pct_of_limit:.0f}%" if self.pct_of_limit is not None else "-"
        peer = f"{self.vs_peer:.2f}x {self.peer}" if self.vs_peer is not None else "-"
        rate = (f"{self.rate:,.0f}" if self.rate >= 100 else f"{self.rate:.3g}") + f" {self.unit}" if self.unit else "-"
        return (f"| {m.get('date', '')} | {m.get('device', '')} | {m.get('commit', '')} | {self.bench} | {self.case} | "
                f"{self.provider} | {self.time_ms:.4g} ms | {rate} | {pct} | {peer} | {self.note} |")


MARKDOWN_HEADER = ("| date | device | commit | bench | case | provider | time (median) | rate | % of limit | vs peer "
                   "| note |\n|---|---|---|---|---|---|---|---|---|---|---|")

_recorded: list[Row] = []


def record(row: Row) -> Row:
    """Keep a row for the session's summary (benchmarks/conftest.py prints and saves them at the end)."""
    if not row.machine:
        row.machine = machine_info()
    _recorded.append(row)
    return row


def recorded() -> list[Row]:
    return list(_recorded)


def save_json(rows: list[Row], path: str) -> None:
    """Write rows (with their machine facts) as JSON, e.g. to $OUT/bench_<name>.json."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump([asdict(r) for r in rows], f, indent=2)
