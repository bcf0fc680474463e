"""pytest setup of the benchmarks (not part of `pytest tests`; run `make bench` or `pytest benchmarks`).

- puts this folder on sys.path so benchmarks `import common`;
- collects bench_*.py when the folder is given (`pytest benchmarks`);
- skips `gpu`-marked benchmarks where there is no CUDA device;
- at the end prints every row recorded with common.record() as one table and as RESULTS.md lines; record() has
  already appended each to the run's results file (common.results_path(): $NANOTRAIN_RESULTS, else
  $OUT/results.jsonl on the device machine, else benchmarks/out/results.jsonl, ignored by git).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import common  # noqa: E402


def pytest_collect_file(file_path, parent):
    if file_path.name.startswith("bench_") and file_path.suffix == ".py" and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = common.recorded()
    if not rows:
        return
    terminalreporter.section("nanotrain benchmark rows")
    terminalreporter.write_line(common.table(rows))
    terminalreporter.write_line("")
    terminalreporter.write_line(common.MARKDOWN_HEADER)
    for row in rows:
        terminalreporter.write_line(row.markdown())
    terminalreporter.write_line(f"{len(rows)} rows appended to {common.results_path()}")
