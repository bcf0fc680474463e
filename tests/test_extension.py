"""The compiled extension nanotrain._C: it loads and says how it was built, its ops pass torch's opcheck, the
CUDA code was compiled for sm_80 and sm_90a where nvcc was present (and CUDA sources are listed), its library
paths do not depend on where it was built, and nanotrain works without it."""
from __future__ import annotations

import glob
import os
import re
import shutil
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
    assert _ext.has_op("best_fit_pack")
    assert not _ext.has_op("no_such_op") and not _ext.has_op("relu_squared")  # removed: the model never called it
    assert _ext.has_kernel("best_fit_pack", "CPU")
    status = _ext.extension_status()
    if info["with_cuda"]:
        assert status == (f"built with CUDA {info['cuda_version']} for {info['cuda_arches']} "
                          f"(torch {C.TORCH_VERSION}); {_ext.aot_summary()}")
    else:
        assert status == f"built CPU-only (torch {C.TORCH_VERSION})"
        assert info["cuda_arches"] == ""


def _runpath(path: str) -> list[str]:
    """The RUNPATH (or RPATH) entries of a shared library, read with readelf."""
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    found = re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library (?:runpath|rpath): \[([^\]]*)\]", out)
    return [entry for paths in found for entry in paths.split(":") if entry]


@built
@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils)")
def test_library_paths_do_not_name_the_build_environment():
    """pip builds in a temporary environment it deletes afterwards: a RUNPATH into it would point nowhere. Every
    entry must be relative to the library ($ORIGIN), and it must reach torch's libraries from an installed
    layout (nanotrain/ beside torch/ in one site-packages)."""
    import nanotrain._C as C

    entries = _runpath(C.__file__)
    assert entries, "no RUNPATH: an installed nanotrain._C could not be imported before torch"
    for entry in entries:
        assert entry.startswith("$ORIGIN/"), f"RUNPATH entry {entry!r} depends on where nanotrain._C was built"
        assert not re.search(r"pip-|build-env|/tmp/|overlay", entry), entry
    assert "$ORIGIN/../torch/lib" in entries


@built
def test_installed_layout_imports_before_torch(tmp_path):
    """Laid out as an install does (site-packages/nanotrain/_C*.so beside site-packages/torch), `import
    nanotrain._C` on its own finds torch's libraries through its RUNPATH, and its ops work once torch is in."""
    import nanotrain._C as C

    site = tmp_path / "site-packages"
    (site / "nanotrain").mkdir(parents=True)
    (site / "nanotrain" / "__init__.py").write_text("")
    shutil.copy(C.__file__, site / "nanotrain")
    (site / "torch").symlink_to(os.path.dirname(torch.__file__), target_is_directory=True)
    out = _run(f"import sys; sys.path.insert(0, {str(site)!r})\n"
               "import nanotrain._C as C\n"
               "assert 'torch' not in sys.modules\n"
               "import torch\n"
               "rows, _, _ = torch.ops.nanotrain.best_fit_pack(torch.arange(1, 5, dtype=torch.int32), "
               "torch.tensor([0, 1, 4]), 1, 4)\n"
               "print(C.__file__.startswith(sys.path[0]), C.TORCH_VERSION, rows.tolist())")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", torch.__version__, "[[2,", "3,", "4,", "1]]"]


@built
def test_extension_ops_work_in_a_fresh_process():
    """In the source tree (editable install), nanotrain.ops._ext imports torch before nanotrain._C, which then
    reuses the libraries torch loaded."""
    out = _run("import torch\nfrom nanotrain.ops import _ext\nC = _ext.load_extension()\n"
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
        # the SM is in bits 8-15 from ELF ABI version 8 (nvcc 13), in bits 0-7 before (Triton's ptxas, CUDA 12.x)
        sms.add((flags >> 8) & 0xFF if data[i + 8] >= 8 else flags & 0xFF)
    return sms


@built
def test_cuda_code_is_compiled_for_sm80_and_sm90a_where_nvcc_was_present():
    """What CI checks on its CPU machine: the kernels were compiled for both target GPUs (the ahead-of-time Triton
    cubins embedded in the library; tests/test_aot.py checks them one by one)."""
    info = _ext.build_info()
    if not info["with_cuda"]:
        pytest.skip("built CPU-only (no nvcc at build time, or no CUDA sources listed in csrc/sources.cmake)")
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
def test_a_build_older_than_the_sources_is_not_used_and_says_rebuild():
    """After a `git pull` that adds ops, the old build lacks them: it is reported stale and the pure-Python and
    Triton paths run (before, registering the new ops' fakes raised at the first use of the extension)."""
    out = _run("from nanotrain.ops import _ext\n"
               "real = _ext._op_defined\n"
               "_ext._op_defined = lambda name: name != 'aot_axpby_matmul' and real(name)\n"
               + HIDDEN.replace("assert sys.modules.get('nanotrain._C') is None\n", ""))  # it is imported
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == ("absent: built from older sources (it lacks nanotrain::aot_axpby_matmul): reinstall with "
                        "`pip install --no-build-isolation -e .`")
    assert lines[1:] == ["reference", "[[4, 5, 6, 7, 1, 2, 3]] [True, True] 0"]


@built
def test_best_fit_pack_passes_opcheck():
    torch.set_num_threads(1)
    lengths = torch.randint(1, 40, (30,))
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    tokens = torch.randint(1, 1000, (int(offsets[-1]),), dtype=torch.int32)
    for num_rows in (0, 3, 100):  # 100: the buffer runs out, fewer rows come back
        torch.library.opcheck(torch.ops.nanotrain.best_fit_pack.default, (tokens, offsets, num_rows, 32))


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
