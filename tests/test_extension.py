"""The compiled extension nanotrain._C: it loads and says how it was built, its ops pass torch's opcheck, the
CUDA code was compiled for sm_80 and sm_90a where nvcc was present, and nanotrain works without it."""
from __future__ import annotations

import glob
import os
import re
import struct
import subprocess
import sys

import pytest
import torch

from nanotrain.ops import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
built = pytest.mark.skipif(_ext.load_extension() is None,
                           reason=f"nanotrain._C is {_ext.extension_status()} (expected on a pure-Python install)")


@built
def test_extension_imports_and_reports_its_build():
    import nanotrain._C as C

    info = _ext.build_info()
    assert info["torch_version"] == C.TORCH_VERSION
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert _ext.has_op("best_fit_pack") and _ext.has_op("relu_squared")
    assert not _ext.has_op("no_such_op")
    assert _ext.has_kernel("best_fit_pack", "CPU") and _ext.has_kernel("relu_squared", "CPU")
    status = _ext.extension_status()
    if info["with_cuda"]:
        assert status == f"built with CUDA {info['cuda_version']} for {info['cuda_arches']} (torch {C.TORCH_VERSION})"
        assert _ext.has_kernel("relu_squared", "CUDA")
    else:
        assert status == f"built CPU-only (torch {C.TORCH_VERSION})"
        assert info["cuda_arches"] == "" and not _ext.has_kernel("relu_squared", "CUDA")


@built
def test_extension_imports_before_torch():
    """`import nanotrain._C` on its own finds torch's libraries (RUNPATH), and its ops work once torch is in."""
    out = _run("import nanotrain._C as C, torch\n"
               "rows, _, _ = torch.ops.nanotrain.best_fit_pack(torch.arange(1, 5, dtype=torch.int32), "
               "torch.tensor([0, 1, 4]), 1, 4)\nprint(C.TORCH_VERSION, rows.tolist())")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [torch.__version__, "[[2,", "3,", "4,", "1]]"]


def _cubin_sms(path: str) -> set[int]:
    """SM numbers of the CUDA ELF images (cubins) embedded in a shared library."""
    data = open(path, "rb").read()
    sms = set()
    for m in re.finditer(rb"\x7fELF\x02\x01\x01", data):
        i = m.start()
        if struct.unpack_from("<H", data, i + 18)[0] != 190:  # e_machine EM_CUDA
            continue
        flags = struct.unpack_from("<I", data, i + 48)[0]
        sms.add((flags >> 8) & 0xFF if flags > 0xFFFF else flags & 0xFF)  # CUDA >= 12.8 / older e_flags layout
    return sms


@built
def test_cuda_code_is_compiled_for_sm80_and_sm90a_where_nvcc_was_present():
    """What CI checks on its CPU machine: nvcc compiled the kernels for both target GPUs."""
    info = _ext.build_info()
    if not info["with_cuda"]:
        pytest.skip("built CPU-only (no nvcc at build time)")
    if os.environ.get("NANOTRAIN_CUDA_ARCHES"):
        pytest.skip("NANOTRAIN_CUDA_ARCHES chose other architectures")
    assert info["cuda_arches"] == "sm_80+sm_90a"
    import nanotrain._C as C

    assert _cubin_sms(C.__file__) == {80, 90}


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, **env})


HIDDEN = """
import sys, torch
import nanotrain
from nanotrain.ops import _ext, packing, registry
assert sys.modules.get('nanotrain._C') is None
print(_ext.extension_status())
print(registry.select('packing', 'cpu', torch.int32).name)
rows, consumed, cropped = packing.pack_rows(torch.arange(1, 8, dtype=torch.int32), torch.tensor([0, 3, 7]), 1, 7)
print(rows.tolist(), consumed.tolist(), int(cropped))
assert sys.modules.get('nanotrain._C') is None
"""


def test_nanotrain_works_with_the_extension_disabled():
    out = _run(HIDDEN, NANOTRAIN_NO_EXT="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "absent: disabled by NANOTRAIN_NO_EXT=1: unset NANOTRAIN_NO_EXT",
        "reference",
        "[[4, 5, 6, 7, 1, 2, 3]] [True, True] 0",
    ]


def test_nanotrain_works_when_the_extension_was_never_built():
    out = _run("import sys; sys.modules['nanotrain._C'] = None\n" + HIDDEN)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "absent: not built: reinstall with `pip install --no-build-isolation -e .`"
    assert lines[1:] == ["reference", "[[4, 5, 6, 7, 1, 2, 3]] [True, True] 0"]


@built
def test_best_fit_pack_passes_opcheck():
    torch.set_num_threads(1)
    lengths = torch.randint(1, 40, (30,))
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    tokens = torch.randint(1, 1000, (int(offsets[-1]),), dtype=torch.int32)
    for num_rows in (0, 3, 100):  # 100: the buffer runs out, fewer rows come back
        torch.library.opcheck(torch.ops.nanotrain.best_fit_pack.default, (tokens, offsets, num_rows, 32))


@built
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_relu_squared_cpu_matches_torch_and_passes_opcheck(dtype):
    x = torch.randn(3, 37, dtype=dtype) * 3
    x[0, :3] = torch.tensor([float("nan"), -0.0, 0.0], dtype=dtype)
    want = torch.relu(x).square()
    got = torch.ops.nanotrain.relu_squared(x)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    xt = x[:, ::2]  # a strided input
    torch.testing.assert_close(torch.ops.nanotrain.relu_squared(xt), torch.relu(xt).square(), rtol=0, atol=0,
                               equal_nan=True)
    if dtype in (torch.float32, torch.float64):
        xg = torch.randn(5, 9, dtype=dtype, requires_grad=True)
        torch.library.opcheck(torch.ops.nanotrain.relu_squared.default, (xg,))
        (g,) = torch.autograd.grad(torch.ops.nanotrain.relu_squared(xg).sum(), xg)
        torch.testing.assert_close(g, 2 * torch.relu(xg.detach()))


@built
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("numel,offset", [(1, 0), (1000, 0), (4099, 1), (1 << 20, 3)])
def test_relu_squared_cuda_matches_torch(dtype, numel, offset):
    if not _ext.has_kernel("relu_squared", "CUDA"):
        pytest.skip(f"nanotrain._C has no CUDA kernels: {_ext.extension_status()}")
    base = torch.randn(numel + offset, device="cuda", dtype=dtype) * 3
    x = base[offset:]  # offset 1 or 3: misaligned for 16-byte vectors, the scalar path runs
    x[: min(3, numel)] = torch.tensor([float("nan"), -0.0, 0.0], device="cuda", dtype=dtype)[: min(3, numel)]
    want = torch.relu(x.float()).square().to(dtype)
    poison = torch.full_like(x, float("nan"))  # freed now, so the op's output likely reuses NaN-filled memory
    del poison
    got = torch.ops.nanotrain.relu_squared(x)
    torch.cuda.synchronize()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(got).sum().item() == 1


@built
@pytest.mark.gpu
def test_relu_squared_cuda_gradient_and_compile():
    if not _ext.has_kernel("relu_squared", "CUDA"):
        pytest.skip(f"nanotrain._C has no CUDA kernels: {_ext.extension_status()}")
    x = torch.randn(64, 257, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.nanotrain.relu_squared.default, (x,))
    f = torch.compile(lambda t: torch.ops.nanotrain.relu_squared(t).sum(), fullgraph=True)
    (g,) = torch.autograd.grad(f(x), x)
    torch.testing.assert_close(g, 2 * torch.relu(x.detach()))


def test_every_source_is_in_the_one_source_list():
    """csrc/sources.cmake (read by setup.py and CMakeLists.txt) lists every .cpp/.cu under csrc/ exactly once,
    every .cu among the CUDA sources, and nothing that does not exist."""
    text = "\n".join(line.split("#", 1)[0] for line in open(os.path.join(ROOT, "csrc", "sources.cmake")))
    lists = {name: body.split() for name, body in re.findall(r"set\(\s*(\w+)\s+([^)]*)\)", text)}
    cpp, cuda = lists["NANOTRAIN_CPP_SOURCES"], lists["NANOTRAIN_CUDA_SOURCES"]
    listed = cpp + cuda
    on_disk = sorted(os.path.relpath(p, ROOT) for ext in ("cpp", "cu")
                     for p in glob.glob(os.path.join(ROOT, "csrc", "**", f"*.{ext}"), recursive=True))
    assert sorted(listed) == on_disk, "add new sources to csrc/sources.cmake (and only once)"
    assert not [f for f in cpp if f.endswith(".cu")], ".cu files belong to NANOTRAIN_CUDA_SOURCES"
