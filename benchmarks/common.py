"""Shared helpers of the benchmarks: timing, the device's measured limits, and the one row format.

How nanotrain measures (METHOD.md of the device machine; STYLE.md §7):
- count first: FLOPs and the fewest bytes an op must move, so a time becomes TFLOP/s or GB/s and a
  percentage of the device's *measured* ceiling (`limits()`: bf16 matmul and device copy, measured once per
  results file and recorded in it);
- time GPU work with CUDA events after warm-up and take the median of many repeats (`cuda_time_ms`; `measure`
  adds the peak memory); CPU work with perf_counter, likewise (`cpu_time_s`);
- compare with the strongest peer on the same device in the same run (`Row.vs_peer`);
- every benchmark speaks one language: a `Row` (device, commit, date, bench, op, provider, shape, ms, rate,
  % of limit, vs peer, peak memory), appended as one JSON line to ONE results file per run (`results_path()`:
  $NANOTRAIN_RESULTS, else $OUT/results.jsonl on the device machine, else benchmarks/out/results.jsonl), and
  printed with one table (`table`) or as RESULTS.md lines (`Row.markdown`).

Each bench_<name>.py exposes `collect(quick: bool) -> list[Row]` (raising NeedsCUDA where it cannot run here)
and `main()` = `common.main(name, collect)`; benchmarks/run.py runs several of them into one results file.
torch is imported inside the functions that use it, so the plan's bookkeeping (benchmarks/run.py stage, summary)
starts fast. Benchmarks import this as `import common` (benchmarks/conftest.py puts this folder on sys.path; a script
run as `python benchmarks/bench_x.py` has it there already).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable, Iterable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -- timing --------------------------------------------------------------------------------------------------


def cuda_times_ms(fn: Callable[[], object], warmup: int = 5, repeats: int = 20) -> list[float]:
    """Milliseconds of each of `repeats` calls of fn(), timed with CUDA events after `warmup` untimed calls."""
    import torch

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


def matmul_peak_tflops(dtype=None, n: int = 8192, repeats: int = 20) -> float:
    """Measured dense matmul rate (TFLOP/s) of an n x n x n product on random data (dtype: bf16 unless given):
    the compute ceiling."""
    import torch

    dtype = dtype or torch.bfloat16
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = cuda_time_ms(lambda: a @ b, warmup=5, repeats=repeats)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def copy_bandwidth_gbs(num_bytes: int = 2 << 30, repeats: int = 20) -> float:
    """Measured device-to-device copy rate (GB/s, bytes read + written): the memory ceiling."""
    import torch

    src = torch.randint(0, 255, (num_bytes,), device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), warmup=3, repeats=repeats)
    return 2 * num_bytes / (ms * 1e-3) / 1e9


def tflops(flops: float, ms: float) -> float:
    """FLOPs done in `ms` milliseconds, as TFLOP/s."""
    return flops / (ms * 1e-3) / 1e12


def gbs(num_bytes: float, ms: float) -> float:
    """Bytes moved in `ms` milliseconds, as GB/s."""
    return num_bytes / (ms * 1e-3) / 1e9


def measure(fn: Callable[[], object], warmup: int = 5, repeats: int = 20) -> tuple[float, float | None]:
    """(median ms, peak MB) of fn() on CUDA: events after warm-up, and the allocator's peak over the timed calls
    above what was allocated before (the op's own working memory, outputs and autograd buffers included)."""
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ms = cuda_time_ms(fn, warmup=warmup, repeats=repeats)
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**20


# -- machine facts ---------------------------------------------------------------------------------------------


def git_commit() -> str:
    """The commit a row belongs to: $NANOTRAIN_COMMIT when set (the device machine's copy of the tree has no
    history: benchmarks/gpu_check.sh is called with the commit made here), else the short hash of HEAD with
    '+dirty' when tracked files differ from it, else 'unknown'."""
    if os.environ.get("NANOTRAIN_COMMIT"):
        return os.environ["NANOTRAIN_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name() -> str:
    """The GPU's name, or the CPU's model and the threads torch uses."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu} ({torch.get_num_threads()} threads)"


def software() -> str:
    """torch (and CUDA), triton and python versions, in one short string."""
    import torch

    parts = [f"torch {torch.__version__}"]
    if torch.version.cuda:
        parts.append(f"cuda {torch.version.cuda}")
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        pass
    parts.append(f"python {platform.python_version()}")
    return ", ".join(parts)


def machine_info() -> dict:
    """What a recorded number needs beside it: date, device, commit, software versions, extension build."""
    import torch

    info = {"date": _now(), "device": device_name(), "commit": git_commit(), "software": software()}
    if torch.cuda.is_available():
        info["capability"] = "sm_%d%d" % torch.cuda.get_device_capability()
    try:
        from nanotrain.ops._ext import extension_status

        info["extension"] = extension_status()
    except ImportError:
        info["extension"] = "nanotrain not importable"
    return info


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the one row format ----------------------------------------------------------------------------------------

STATUSES = ("ok", "skipped", "error")


@dataclass
class Row:
    """One measured case of any benchmark: a JSON line of the results file, a line of the table and of RESULTS.md.

    bench: the benchmark ("attention", "muon", "fp8", "packing", "loader", "train", "compile", "limits");
    op: what was measured ("fwd+bwd", "orthogonalize", "forward GEMM", ...); provider: the backend or peer;
    shape: the case, led by the model shape's name where there is one ("d26 B=8 T=2048 H=13 D=128 w=1025");
    ms: median time of one call; rate in unit (TFLOP/s, GB/s, Mtok/s, tok/s, ...); pct_of_limit: rate over
    the ceiling named in `limit`, measured on the same device; vs_peer: speed-up over `peer` in the same run
    (> 1: faster); peak_mb: allocator peak of the timed calls (GPU); status: ok, or skipped / error with the
    reason in note. device, commit and date are filled in by `record` when left empty.
    """

    bench: str
    op: str
    provider: str
    shape: str
    ms: float | None = None
    rate: float | None = None
    unit: str = ""
    pct_of_limit: float | None = None
    limit: str = ""
    vs_peer: float | None = None
    peer: str = ""
    peak_mb: float | None = None
    status: str = "ok"
    note: str = ""
    device: str = ""
    commit: str = ""
    date: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"Row.status must be one of {STATUSES}, got {self.status!r}")

    def to_json(self) -> str:
        """One JSON line (NaN and infinities become null: JSON has none)."""
        d = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}
        return json.dumps(d, sort_keys=False)

    @classmethod
    def from_json(cls, line: str | dict) -> Row:
        """The Row of a JSON line (or its dict); unknown keys are an error, so a format drift is noticed."""
        d = json.loads(line) if isinstance(line, str) else dict(line)
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"not a benchmark row: unknown keys {sorted(unknown)}")
        return cls(**d)

    def rate_text(self) -> str:
        if self.rate is None:
            return "-"
        return (f"{self.rate:,.0f}" if abs(self.rate) >= 100 else f"{self.rate:.3g}") + (f" {self.unit}" if self.unit
                                                                                       else "")

    def markdown(self) -> str:
        """The RESULTS.md line of this row (MARKDOWN_HEADER gives the columns)."""
        return "| " + " | ".join(_cells(self, markdown=True)) + " |"


COLUMNS = ("date", "device", "commit", "bench", "op", "provider", "shape", "time (median)", "rate", "% of limit",
           "vs peer", "peak mem", "note")
MARKDOWN_HEADER = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


def _cells(r: Row, markdown: bool) -> list[str]:
    ms = "-" if r.ms is None else f"{r.ms:.4g} ms"
    pct = "-" if r.pct_of_limit is None else f"{r.pct_of_limit:.0f}%"
    peer = "-" if r.vs_peer is None else f"{r.vs_peer:.2f}x {r.peer}".strip()
    mem = "-" if r.peak_mb is None else f"{r.peak_mb:,.0f} MB"
    note = r.note if r.status == "ok" else f"{r.status.upper()}: {r.note}"
    if markdown:
        note = note.replace("|", "/")
    return [r.date[:10], r.device, r.commit, r.bench, r.op, r.provider, r.shape, ms, r.rate_text(), pct, peer, mem,
            note]


def table(rows: Iterable[Row], width: int = 60) -> str:
    """The rows as one aligned text table (what every benchmark and gpu_check.sh print last). Machine columns
    that are the same for all rows are said once above it."""
    rows = list(rows)
    if not rows:
        return "(no benchmark rows)"
    header = list(COLUMNS)
    cells = [_cells(r, markdown=False) for r in rows]
    shared = [i for i in range(3) if len({c[i] for c in cells}) == 1]
    lines = []
    if shared:
        lines.append(", ".join(f"{header[i]}: {cells[0][i]}" for i in shared))
    keep = [i for i in range(len(header)) if i not in shared]
    cells = [[c[i][:width] for i in keep] for c in cells]
    header = [header[i] for i in keep]
    widths = [max(len(h), *(len(c[j]) for c in cells)) for j, h in enumerate(header)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    lines.extend("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)
    return "\n".join(lines)


# -- the one results file of a run -----------------------------------------------------------------------------


def results_path() -> str:
    """Where this run's rows go: $NANOTRAIN_RESULTS, else $OUT/results.jsonl (the device machine), else
    benchmarks/out/results.jsonl (ignored by git)."""
    if os.environ.get("NANOTRAIN_RESULTS"):
        return os.environ["NANOTRAIN_RESULTS"]
    if os.environ.get("OUT"):
        return os.path.join(os.environ["OUT"], "results.jsonl")
    return os.path.join(ROOT, "benchmarks", "out", "results.jsonl")


def _stamp(row: Row) -> Row:
    info = _machine_stamp()
    row.device = row.device or info["device"]
    row.commit = row.commit or info["commit"]
    row.date = row.date or _now()
    return row


@functools.lru_cache(maxsize=1)
def _machine_stamp() -> dict:
    return {"device": device_name(), "commit": git_commit()}


_recorded: list[Row] = []


def record(row: Row, path: str | None = None) -> Row:
    """Stamp the row (device, commit, date) and append it to the results file at once (a run cut short by a
    time limit keeps every row measured before it); also kept for recorded()."""
    _stamp(row)
    path = path or results_path()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(row.to_json() + "\n")
    _recorded.append(row)
    return row


def recorded() -> list[Row]:
    """The rows this process recorded, in order."""
    return list(_recorded)


def load_rows(path: str | None = None) -> list[Row]:
    """Every row of a results file (JSON lines); [] when it does not exist."""
    path = path or results_path()
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [Row.from_json(line) for line in f if line.strip()]


# -- the device's measured ceilings, once per results file ------------------------------------------------------


def limits(path: str | None = None) -> dict[str, float]:
    """{"matmul": bf16 TFLOP/s, "copy": GB/s} of this GPU, measured once per results file: read back from its
    "limits" rows when an earlier benchmark of the run measured them on this device, else measured and recorded."""
    device = device_name()
    found = {r.op: r.rate for r in load_rows(path) if r.bench == "limits" and r.device == device and r.status == "ok"}
    if "bf16 matmul" not in found:
        found["bf16 matmul"] = matmul_peak_tflops()
        record(Row("limits", "bf16 matmul", "torch.matmul", "8192x8192x8192 bf16", ms=None,
                   rate=found["bf16 matmul"], unit="TFLOP/s", note="the compute ceiling of % of limit"), path)
    if "copy" not in found:
        found["copy"] = copy_bandwidth_gbs()
        record(Row("limits", "copy", "Tensor.copy_", "2 GiB uint8", rate=found["copy"], unit="GB/s",
                   note="the memory ceiling of % of limit (bytes read + written)"), path)
    return {"matmul": found["bf16 matmul"], "copy": found["copy"]}


# -- running a benchmark ---------------------------------------------------------------------------------------


class NeedsCUDA(Exception):
    """Raised by a benchmark's collect() where it cannot run without a CUDA GPU (the runner records a skip)."""


def require_cuda(what: str) -> None:
    """Raise NeedsCUDA naming `what` when there is no CUDA device."""
    import torch

    if not torch.cuda.is_available():
        raise NeedsCUDA(f"{what} needs a CUDA GPU")


def run_collect(bench: str, collect: Callable[[bool], list[Row]], quick: bool, path: str | None = None) -> list[Row]:
    """Run one benchmark's collect(quick) and record its rows; a benchmark that cannot run here (NeedsCUDA) or
    fails records one skipped/error row saying why, so the results file and the table show every benchmark."""
    try:
        rows = collect(quick)
    except NeedsCUDA as e:
        rows = [Row(bench, "-", "-", "-", status="skipped", note=str(e))]
    except Exception as e:  # noqa: BLE001 - one failing benchmark must not hide the others
        rows = [Row(bench, "-", "-", "-", status="error", note=f"{type(e).__name__}: {e}"[:300])]
    return [record(r, path) for r in rows]


def main(bench: str, collect: Callable[[bool], list[Row]], argv: list[str] | None = None) -> int:
    """The command line of a bench_<name>.py: run collect, append its rows to the results file, print the table."""
    p = argparse.ArgumentParser(description=f"nanotrain benchmark: {bench}")
    p.add_argument("--quick", action="store_true", help="fewer repeats and cases (first timings)")
    p.add_argument("--results", default=None, help="results file (JSON lines; default: common.results_path())")
    args = p.parse_args(argv)
    path = args.results or results_path()
    rows = run_collect(bench, collect, args.quick, path)
    print(table(rows))
    print(f"{len(rows)} rows appended to {path}", file=sys.stderr)
    return 1 if any(r.status == "error" for r in rows) else 0


def save_json(rows: list[Row], path: str) -> None:
    """Write rows as one JSON list (e.g. for a report); the run's own record is the JSON-lines results file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump([json.loads(r.to_json()) for r in rows], f, indent=1)
