"""Run an ahead-of-time compile script (kernels/_compile.py) in a fresh Python for the slow GPU-compile tests
(compile_without_gpu), or an interpreter script that may crash the process (run_interpreted).

conftest sets TRITON_INTERPRET=1 on CPU machines, and the interpreter's @triton.jit functions cannot be
compiled, so the script runs in a subprocess without it; its last stdout line is the JSON result.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


def compile_without_gpu(script: str) -> list:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_interpreted(script: str) -> list:
    """Run `script` in a fresh Python under the Triton interpreter (TRITON_INTERPRET=1) and return its last
    stdout line as JSON. For checks that may crash the process when they fail (an int32 offset that wraps
    reads outside the tensor: a segfault under the interpreter), so the test reports it instead of dying."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"exit status {proc.returncode}:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])
