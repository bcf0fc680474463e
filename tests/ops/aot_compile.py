"""Run an ahead-of-time compile script (kernels/_compile.py) in a fresh Python for the slow GPU-compile tests.

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
